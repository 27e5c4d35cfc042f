"""Distributed LAMB/LARS: jit + NamedSharding, ZeRO-1, pmap and shard_map.

The multi-device scenarios run once, in a subprocess with 8 simulated CPU
devices (tests/distributed_scenarios.py), each alongside the single-device
float32 run of the same 5 steps; the tests below assert on what it measured.
The checks that need no second device (placement logic, errors) run here.

Tolerances: ``param_err`` is the largest parameter difference from the
single-device run over all steps and leaves, relative to the layer's total
move (measured <= 4e-6: a sharded norm sums in another order); ``ratio_err``
the largest relative trust-ratio difference (measured <= 3e-7).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import distributed_scenarios as scenarios
import lamb_optax
from lamb_optax._src.sharding import state_shardings

PARAM_TOL = 3e-5
RATIO_TOL = 3e-6
# What a wrong distribution does, at the least (measured >= 0.3).
WRONG = 0.05
SCENARIOS = os.path.join(os.path.dirname(__file__), "distributed_scenarios.py")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharding") / "results.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  try:
    proc = subprocess.run([sys.executable, SCENARIOS, str(out)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S,
                          check=False)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"distributed_scenarios.py ran past {TIMEOUT_S} s:\n"
                f"{(e.stderr or '')[-3000:]}")
  if proc.returncode != 0:
    pytest.fail(f"distributed_scenarios.py failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-5000:]}")
  with open(out) as f:
    return json.load(f)


def result(measured, key):
  assert key in measured, f"scenario {key} did not run"
  value = measured[key]
  assert "crashed" not in value, value.get("crashed")
  return value


def assert_matches_single_device(errors, what):
  assert "crashed" not in errors, (what, errors.get("crashed"))
  assert errors["param_err"] <= PARAM_TOL, (what, errors)
  assert errors["ratio_err"] <= RATIO_TOL, (what, errors)


MOMENTS = {"lamb": ("mu", "nu"), "lamb_store_direction": ("mu", "nu"), "lars": ("ema",)}
LEAVES = ("blocks/kernel", "dense/bias", "dense/kernel", "embed/table",
          "head/kernel", "norm/scale")


# --- jit + NamedSharding: FSDP over "data", tensor parallel over "model" ----


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_jit_named_sharding_matches_single_device(measured, name):
  r = result(measured, f"jit/{name}")
  assert_matches_single_device(r, f"jit/{name}")
  assert r["steps_run"] == scenarios.NUM_STEPS


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_jit_state_is_sharded_like_params_and_stays(measured, name):
  r = result(measured, f"jit/{name}")
  # state_shardings gave each moment leaf its param's sharding, and the
  # arrays had it after init and after 5 calls of the step compiled once
  # (a compiled step refuses inputs sharded otherwise).
  assert r["mismatches"] == []
  assert r["moments_checked"] == 2 * len(MOMENTS[name]) * len(LEAVES)
  assert r["param_shardings_kept"]
  moment = MOMENTS[name][0]
  shapes = r["shard_shapes"]
  # (4, 128, 128) as P(None, "data", "model") on the (2, 4) mesh.
  assert shapes[f"{moment}/blocks/kernel"][1] == [4, 64, 32]
  assert shapes[f"{moment}/embed/table"][1] == [2, 8]  # (16, 8) over 8.
  assert shapes[f"{moment}/dense/bias"][1] == [12]  # Replicated.


def test_jit_on_explicit_mesh(measured):
  """``jax.make_mesh``'s default axis type (Explicit) works the same."""
  r = result(measured, "jit_explicit/lamb")
  assert_matches_single_device(r, "jit_explicit/lamb")
  assert r["mismatches"] == []


# --- ZeRO-1: replicated params, state split over "data" ---------------------


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_zero1_matches_single_device_with_split_state(measured, name):
  r = result(measured, f"zero1/{name}")
  assert_matches_single_device(r, f"zero1/{name}")
  assert r["mismatches"] == []
  assert r["param_shardings_kept"]
  for moment in MOMENTS[name]:
    for leaf in LEAVES:
      full, local, spec = r["shard_shapes"][f"{moment}/{leaf}"]
      # Split in two along the first dimension, over "data".
      assert local == [full[0] // 2] + full[1:], (moment, leaf, full, local)
      assert spec.startswith("P('data'"), (moment, leaf, spec)


def test_zero_axis_adds_to_fsdp_and_tp_specs(measured):
  assert result(measured, "zero_specs") == {
      # Already split over "data": unchanged.
      "mu/blocks/kernel": "P(None, 'data', 'model')",
      "mu/embed/table": "P(('data', 'model'),)",
      # The first unsplit dimension that 2 divides gets "data".
      "mu/dense/bias": "P('data',)",
      "mu/dense/kernel": "P('data', 'model')",
      "mu/head/kernel": "P('data', None)",
      # No free dimension / 2 does not divide 3: unchanged.
      "mu/norm/scale": "P('model',)",
      "mu/odd/vector": "P()",
  }


# --- pmap: replicated params, grads pmean'd by the user ---------------------


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_pmap_needs_no_collective_in_the_optimizer(measured, name):
  r = result(measured, f"pmap/{name}")
  assert_matches_single_device(r, f"pmap/{name}")
  # The step's only collectives are the user's pmean of the gradients.
  assert r["psums_step"] == r["psums_user"] > 0
  assert r["spread_across_replicas"] == 0.0


# --- shard_map: params as local blocks, axis_name from the specs ------------


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_shard_map_with_axis_names_from_specs(measured, name):
  r = result(measured, f"shard_map/{name}")
  assert r["axis_name"] == {
      "blocks": {"kernel": ["data", "model"]},
      "dense": {"bias": None, "kernel": ["model"]},
      "embed": {"table": ["data", "model"]},
      "head": {"kernel": None},
      "norm": {"scale": ["model"]},
  }
  assert_matches_single_device(r["correct"], f"shard_map/{name}")


@pytest.mark.parametrize("name", scenarios.OPTIMIZERS)
def test_shard_map_layer_axis_split_over_stage(measured, name):
  """A stacked leaf whose layer axis is split: each device holds 2 of the 4
  layers, and the helper leaves "stage" out of that leaf's axes."""
  r = result(measured, f"shard_map/{name}")
  assert r["stage_axis_name"]["blocks"]["kernel"] == ["model"]
  assert r["stage_axis_name"]["embed"]["table"] == ["stage", "model"]
  # state_shardings splits the blocks' per-layer ratios over "stage" too.
  assert r["stage_ratio_specs"] == [str(P("stage"))]
  assert_matches_single_device(r["stage"], f"shard_map stage/{name}")


def test_shard_map_stage_axis_in_axis_name_is_wrong(measured):
  r = result(measured, "shard_map/lamb")
  # Without layer_axes the helper keeps "stage": the norms of different
  # layers are added (no error, the leaf does vary along "stage").
  assert r["stage_wrong_axis_name"]["blocks"]["kernel"] == ["stage", "model"]
  assert "crashed" not in r["stage_wrong"], r["stage_wrong"]["crashed"]
  assert r["stage_wrong"]["ratio_err"] > WRONG


def test_shard_map_without_axis_name_is_wrong(measured):
  r = result(measured, "shard_map/lamb")
  # check_vma=False: each device uses its block's norm for the layer's.
  assert "crashed" not in r["no_axis_name"], r["no_axis_name"]["crashed"]
  assert r["no_axis_name"]["ratio_err"] > WRONG
  assert r["no_axis_name"]["param_err"] > WRONG
  # check_vma=True (the default): shard_map refuses the device-dependent
  # ratios at out_specs.
  err = r["no_axis_name_checked"]
  assert err["type"] == "ValueError" and "out_specs" in err["message"], err


@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_shard_map_psum_over_replicated_axis_raises(measured, name):
  err = result(measured, f"shard_map/{name}")["all_axes"]
  assert err["type"] == "ValueError", err
  # dense/kernel is P(None, "model"): replicated along "data".
  assert "`axis_name`" in err["message"]
  assert "'data'" in err["message"] and "replicated" in err["message"]
  assert "axis_names_from_specs" in err["message"]


def test_shard_map_psum_of_fully_replicated_leaf_raises(measured):
  err = result(measured, "replicated_leaf_psum")
  assert err["type"] == "ValueError", err
  assert "`axis_name`" in err["message"] and "'model'" in err["message"]


@pytest.mark.parametrize("name", ["lamb", "lamb_store_direction"])
def test_shard_map_max_grad_norm_uses_global_norm(measured, name):
  # The clip is active at every step...
  assert min(measured["grad_norms"]) > 2 * scenarios.MAX_GRAD_NORM
  # ...and matches the single-device clip by the norm of the whole gradient
  # (a norm of the local blocks would be smaller, and differ per device).
  assert_matches_single_device(result(measured, f"shard_map/{name}")["clipped"],
                               f"shard_map clipped/{name}")


# --- In-process: placement logic and errors (one device) --------------------


def one_device_mesh():
  return jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])


def test_unbound_axis_name_names_axis_name():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  for tx in (lamb_optax.lamb(1e-3, axis_name="data"),
             lamb_optax.lamb(1e-3, axis_name="data", store_direction=True),
             lamb_optax.lamb(1e-3, axis_name="data", max_grad_norm=1.0),
             lamb_optax.lars(1e-3, axis_name="data")):
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"`axis_name`.*'data'.*not bound"):
      jax.jit(tx.update)(params, state, params)


def test_zero_axis_not_in_mesh_names_zero_axis():
  params = {"w": jnp.ones((4, 2))}
  sharding = NamedSharding(one_device_mesh(), P())
  with pytest.raises(ValueError, match=r"`zero_axis` 'model'.*\('data',\)"):
    state_shardings(lamb_optax.lamb(1e-3), params, sharding, zero_axis="model")


def test_param_shardings_must_be_named_shardings():
  params = {"w": jnp.ones((4, 2))}
  with pytest.raises(TypeError, match=r"`param_shardings` leaf .*'w'"):
    state_shardings(lamb_optax.lamb(1e-3), params, {"w": P()})


def test_state_shardings_places_moments_like_params():
  mesh = one_device_mesh()
  params = {"stack": jax.ShapeDtypeStruct((3, 4, 2), jnp.float32),
            "w": jax.ShapeDtypeStruct((4, 2), jnp.bfloat16),
            "s": jax.ShapeDtypeStruct((), jnp.float32)}
  param_sh = {"stack": NamedSharding(mesh, P(None, "data")),
              "w": NamedSharding(mesh, P("data")),
              "s": NamedSharding(mesh, P())}
  tx = lamb_optax.lamb(1e-3, layer_axes={"stack": 0, "w": None, "s": None},
                       mu_dtype=jnp.bfloat16, max_grad_norm=1.0)
  shardings = state_shardings(tx, params, param_sh)
  state_shape = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(state_shape)
  adam_sh = shardings["adam"]
  assert adam_sh.mu == param_sh and adam_sh.nu == param_sh
  replicated = NamedSharding(mesh, P())
  assert adam_sh.count == replicated
  # The ratios: params-shaped, of the layer axes' shape (3,) for the stack
  # and scalars: replicated (a scalar parameter's own sharding is P() too).
  trust_sh = shardings["trust_ratio"]
  assert trust_sh == lamb_optax.ScaleByTrustRatioState(
      count=replicated,
      trust_ratios={"stack": replicated, "w": replicated, "s": replicated})
  # Used as out_shardings of the jitted init, on real arrays.
  real = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
  state = jax.jit(tx.init, out_shardings=shardings)(real)
  assert state["adam"].mu["stack"].sharding == param_sh["stack"]


def test_state_shardings_places_per_layer_ratios_like_their_layer_axes():
  """A stacked leaf's ratios, shaped like its layer axes, get the param's
  sharding of those axes (a layer axis split over a mesh axis splits its
  ratios too); a shape that several choices of axes match, sharded
  differently, is replicated rather than guessed."""
  mesh = one_device_mesh()
  params = {"stack": jax.ShapeDtypeStruct((3, 4, 2), jnp.float32),
            "square": jax.ShapeDtypeStruct((4, 4, 2), jnp.float32)}
  param_sh = {"stack": NamedSharding(mesh, P("data", None)),
              "square": NamedSharding(mesh, P("data", None))}
  tx = lamb_optax.lamb(1e-3, layer_axes=0)
  trust_sh = state_shardings(tx, params, param_sh)["trust_ratio"]
  assert trust_sh.trust_ratios["stack"] == NamedSharding(mesh, P("data"))
  # (4,) is axis 0 ("data") or axis 1 (unsplit) of (4, 4, 2): replicated.
  assert trust_sh.trust_ratios["square"] == NamedSharding(mesh, P())


def test_state_shardings_with_masked_state_and_single_leaf():
  mesh = one_device_mesh()
  sharding = NamedSharding(mesh, P("data"))
  # optax.masked leaves MaskedNode where the mask is False.
  params = {"a": jnp.ones((4,)), "b": jnp.ones((2, 2))}
  tx = optax.masked(optax.adam(1e-3), {"a": True, "b": False})
  shardings = state_shardings(tx, params, {"a": sharding, "b": sharding})
  assert jax.tree.structure(shardings) == jax.tree.structure(
      jax.eval_shape(tx.init, params))
  mu = shardings.inner_state[0].mu
  assert mu["a"] == sharding and isinstance(mu["b"], optax.MaskedNode)
  # A single array as params.
  tx = lamb_optax.lars(1e-3)
  shardings = state_shardings(tx, jnp.ones((4, 3)), sharding)
  assert shardings["momentum"].ema == sharding
  assert shardings["momentum"].count == NamedSharding(mesh, P())
  assert shardings["trust_ratio"].trust_ratios == NamedSharding(mesh, P())


def test_state_shardings_zero_axis_on_one_device_mesh():
  mesh = one_device_mesh()
  params = {"w": np.ones((4, 2), np.float32), "s": np.ones((), np.float32)}
  shardings = state_shardings(lamb_optax.lamb(1e-3), params,
                              NamedSharding(mesh, P()), zero_axis="data")
  assert shardings["adam"].mu["w"].spec == P("data", None)
  assert shardings["adam"].mu["s"].spec == P()  # No dimension to split.
  assert shardings["adam"].count.spec == P()
