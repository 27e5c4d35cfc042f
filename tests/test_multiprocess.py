"""Two CPU processes (jax.distributed, gloo, 127.0.0.1) train one model.

tests/multiprocess_worker.py runs in 2 processes with 2 local devices each:
a (2, 2) ("data", "model") mesh whose "data" axis spans the processes, the
params of distributed_scenarios sharded FSDP over "data" and tensor parallel
over "model", 5 jitted steps of lamb, lamb(store_direction=True) and lars. Every step's
gathered params and trust ratios must equal the single-process float32 run
(computed here) within float32 tolerance (see test_sharding.py).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import distributed_scenarios as scenarios
import helpers

PARAM_TOL = 3e-5
RATIO_TOL = 3e-6
WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
TIMEOUT_S = 120
NUM_PROCESSES = 2


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  out = tmp_path_factory.mktemp("multiprocess")
  port = helpers.free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  helpers.run_processes(
      [[sys.executable, WORKER, str(i), str(port), str(out)]
       for i in range(NUM_PROCESSES)], out, TIMEOUT_S, env)
  arrays, facts = [], []
  for i in range(NUM_PROCESSES):
    with np.load(out / f"process_{i}.npz") as data:
      arrays.append(dict(data))
    with open(out / f"process_{i}.json") as f:
      facts.append(json.load(f))
  return arrays, facts


def steps_of(arrays, name):
  num_leaves = sum(len(leaves) for leaves in scenarios.SHAPES.values())
  out = []
  for t in range(scenarios.NUM_STEPS):
    out.append({
        kind: [np.asarray(arrays[f"{name}/{t}/{kind}/{i}"], np.float64)
               for i in range(num_leaves)]
        for kind in ("params", "ratios")})
  return out


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_two_processes_match_single_process(workers, name):
  arrays, _ = workers
  ref = scenarios.run_single_device(name)
  for process, got in enumerate(arrays):
    errors = scenarios.compare(steps_of(got, name), ref)
    assert errors["param_err"] <= PARAM_TOL, (process, errors)
    assert errors["ratio_err"] <= RATIO_TOL, (process, errors)


def test_processes_gathered_the_same_values(workers):
  arrays, _ = workers
  assert arrays[0].keys() == arrays[1].keys()
  for key in arrays[0]:
    np.testing.assert_array_equal(arrays[0][key], arrays[1][key], err_msg=key)


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_state_is_split_across_processes(workers, name):
  _, facts = workers
  for process, f in enumerate(facts):
    assert f["process_index"] == process
    assert (f["process_count"], f["device_count"]) == (2, 4)
    r = f[name]
    assert r["moment_shardings_match_params"]
    # (4, 128, 128) as P(None, "data", "model"): each process holds half of
    # the leaf ("data" spans the processes), as 2 blocks of (4, 64, 64).
    assert r["blocks_moment_global_shape"] == [4, 128, 128]
    assert r["blocks_moment_local_shapes"] == [[4, 64, 64], [4, 64, 64]]
    assert not r["blocks_moment_is_fully_addressable"]
    assert r["step_compilations"] == 1
