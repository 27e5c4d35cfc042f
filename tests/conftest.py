"""Shared fixtures: the awkward parameter tree of helpers.py and its
gradients, as float32 arrays and as float64 numpy leaves."""

from __future__ import annotations

import pytest

from helpers import leaf_paths, make_grads, make_params, to_numpy64


@pytest.fixture(scope="session")
def params():
  return make_params()


@pytest.fixture(scope="session")
def grads_seq():
  return make_grads()


@pytest.fixture(scope="session")
def params64(params):
  return to_numpy64(params)


@pytest.fixture(scope="session")
def grads64(grads_seq):
  return [to_numpy64(g) for g in grads_seq]


@pytest.fixture(scope="session")
def paths(params):
  return leaf_paths(params)

