"""lamb_optax.scale_by_trust_ratio against the float64 statement of r."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lamb_optax
from lamb_optax._src import trust_ratio as trust_ratio_src
import reference
from helpers import (ZERO_LAYER, flat_mask, jaxpr_equations, make_params,
                     to_numpy64)


def _updates_like(params, seed=2):
  """Directions with norms far from the params' (ratios from 1e-4 to 1e4)."""
  rng = np.random.default_rng(seed)
  leaves, treedef = jax.tree.flatten(params)
  scales = [1e-3, 1e2, 1.0, 10.0, 0.5, 1e-4]
  return jax.tree.unflatten(treedef, [
      jnp.asarray(s * rng.standard_normal(np.shape(x)), jnp.float32)
      for s, x in zip(scales, leaves)])


CASES = {
    "defaults": {},
    "trust_coefficient_and_eps": {"trust_coefficient": 0.02, "eps": 0.3},
    "param_norm_bounds": {"param_norm_bounds": (0.5, 8.0)},
    "trust_ratio_bounds": {"trust_ratio_bounds": (0.1, 5.0)},
    "both_bounds": {"param_norm_bounds": (0.5, 8.0),
                    "trust_ratio_bounds": (0.1, 5.0)},
    "mask": {"mask": {"conv": False, "dense": True, "embed": True,
                      "head": False, "norm": True}},
    "everything": {"trust_coefficient": 3.0, "eps": 1e-3,
                   "param_norm_bounds": (0.05, 2.0),
                   "trust_ratio_bounds": (0.0, 10.0),
                   "mask": lambda p: jax.tree.map(lambda x: x.ndim != 1, p)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, params):
  kwargs = CASES[case]
  updates = _updates_like(params)
  tx = lamb_optax.scale_by_trust_ratio(**kwargs)
  state = tx.init(params)
  scaled, state = tx.update(updates, state, params)

  mask = (flat_mask(kwargs["mask"], params) if "mask" in kwargs
          else [True] * len(jax.tree.leaves(params)))
  ratio_kwargs = {k: v for k, v in kwargs.items() if k != "mask"}
  want_ratios, raw = [], []
  for x, u, adapt in zip(to_numpy64(params), to_numpy64(updates), mask):
    if adapt:
      r, r_raw = reference.trust_ratio(reference.norm(x), reference.norm(u),
                                       **ratio_kwargs)
    else:
      r, r_raw = 1.0, 1.0
    want_ratios.append(r)
    raw.append(r_raw)
  got_ratios = [float(r) for r in
                jax.tree.leaves(lamb_optax.trust_ratios(state))]
  np.testing.assert_allclose(got_ratios, want_ratios, rtol=1e-6)
  for got, u, r in zip(to_numpy64(scaled), to_numpy64(updates), want_ratios):
    np.testing.assert_allclose(got, r * u, rtol=2e-6, atol=1e-30)
  # The options must bind on this data, or the case would test nothing.
  if "trust_ratio_bounds" in kwargs:
    lo, hi = kwargs["trust_ratio_bounds"]
    assert any(r < lo for r in raw) or any(r > hi for r in raw)
  if case != "defaults":
    plain = [reference.trust_ratio(reference.norm(x), reference.norm(u))[0]
             for x, u in zip(to_numpy64(params), to_numpy64(updates))]
    assert not np.allclose(plain, want_ratios, rtol=1e-3)


def test_param_norm_bounds_bind_on_both_sides(params):
  """phi clips |x| from below and from above (the ratio shows which)."""
  lo, hi = 0.5, 8.0
  norms = [reference.norm(x) for x in to_numpy64(params)]
  assert any(0 < n < lo for n in norms) and any(n > hi for n in norms)
  updates = _updates_like(params)
  tx = lamb_optax.scale_by_trust_ratio(param_norm_bounds=(lo, hi))
  _, state = tx.update(updates, tx.init(params), params)
  for r, n, u in zip(jax.tree.leaves(lamb_optax.trust_ratios(state)), norms,
                     to_numpy64(updates)):
    phi = float(r) * reference.norm(u)
    np.testing.assert_allclose(phi, min(max(n, lo), hi), rtol=1e-6)


def test_one_ratio_per_layer_over_all_axes():
  """A layer is one leaf: a 3-D kernel gets one ratio from its full norm."""
  x = jnp.arange(24.0).reshape(2, 3, 4) - 7.0
  u = jnp.cos(jnp.arange(24.0)).reshape(2, 3, 4)
  tx = lamb_optax.scale_by_trust_ratio()
  scaled, state = tx.update({"k": u}, tx.init({"k": x}), {"k": x})
  want = np.linalg.norm(np.ravel(x)) / np.linalg.norm(np.ravel(u))
  assert state.trust_ratios["k"].shape == ()
  np.testing.assert_allclose(float(state.trust_ratios["k"]), want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(scaled["k"]), want * np.asarray(u),
                             rtol=1e-6)


def test_zero_params_or_zero_update_give_ratio_one():
  params = {"zero_x": jnp.zeros((3, 2)), "zero_u": jnp.ones((4,)),
            "scalar": jnp.array(-2.0)}
  updates = {"zero_x": jnp.full((3, 2), 0.7), "zero_u": jnp.zeros((4,)),
             "scalar": jnp.array(0.5)}
  tx = lamb_optax.scale_by_trust_ratio()
  scaled, state = tx.update(updates, tx.init(params), params)
  ratios = lamb_optax.trust_ratios(state)
  assert float(ratios["zero_x"]) == 1.0
  assert float(ratios["zero_u"]) == 1.0
  np.testing.assert_array_equal(scaled["zero_x"], updates["zero_x"])
  np.testing.assert_array_equal(scaled["zero_u"], np.zeros(4))
  # Scalar layer: |x| / |u| = 4, and the scaled update has norm |x|.
  assert float(ratios["scalar"]) == 4.0
  assert float(scaled["scalar"]) == 2.0
  for leaf in jax.tree.leaves(scaled):
    assert np.all(np.isfinite(np.asarray(leaf)))


def test_zero_params_with_lower_param_norm_bound():
  """phi(0) = lo > 0 is not zero: the ratio is lo / |u|, not the fallback."""
  x, u = jnp.zeros((2, 2)), jnp.full((2, 2), 2.0)  # |u| = 4
  tx = lamb_optax.scale_by_trust_ratio(param_norm_bounds=(0.5, 3.0))
  _, state = tx.update({"w": u}, tx.init({"w": x}), {"w": x})
  np.testing.assert_allclose(float(state.trust_ratios["w"]), 0.125,
                             rtol=1e-7)


def test_fallback_ratio_is_clipped_by_trust_ratio_bounds():
  """r = 1 from a zero layer is then clipped, like any other ratio."""
  x, u = jnp.zeros((3,)), jnp.ones((3,))
  tx = lamb_optax.scale_by_trust_ratio(trust_ratio_bounds=(0.0, 0.25))
  scaled, state = tx.update({"w": u}, tx.init({"w": x}), {"w": x})
  assert float(state.trust_ratios["w"]) == 0.25
  np.testing.assert_allclose(np.asarray(scaled["w"]), 0.25)


def test_masked_layers_pass_through_untouched():
  """Outside the mask: r = 1 exactly (even if bounds exclude 1), u as is."""
  params = {"a": jnp.full((3,), 10.0), "b": jnp.full((2, 2), 10.0)}
  updates = {"a": jnp.array([1e-3, -2e-3, 3e-3]),
             "b": jnp.full((2, 2), 1e-3)}
  tx = lamb_optax.scale_by_trust_ratio(
      trust_ratio_bounds=(2.0, 3.0), mask={"a": False, "b": True})
  scaled, state = tx.update(updates, tx.init(params), params)
  assert float(state.trust_ratios["a"]) == 1.0
  np.testing.assert_array_equal(scaled["a"], updates["a"])
  assert float(state.trust_ratios["b"]) == 3.0


def test_initial_state_ratios_are_float32_ones():
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), make_params())
  state = lamb_optax.scale_by_trust_ratio().init(params)
  for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
    assert r.dtype == jnp.float32 and r.shape == () and float(r) == 1.0


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_kept(dtype):
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_params())
  updates = jax.tree.map(lambda x: jnp.asarray(x, dtype),
                         _updates_like(make_params()))
  tx = lamb_optax.scale_by_trust_ratio()
  scaled, state = tx.update(updates, tx.init(params), params)
  for leaf in jax.tree.leaves(scaled):
    assert leaf.dtype == dtype
  for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
    assert r.dtype == jnp.float32 and r.shape == ()


def _bf16_layer(n, seed):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(0.05 * rng.standard_normal(n), jnp.bfloat16)
  u = jnp.asarray(1e-3 * rng.standard_normal(n) + 2e-4, jnp.bfloat16)
  return x, u


def test_bfloat16_ratio_accurate_to_float32():
  """For bf16 layers the ratio is the float64 ratio of the very same bf16
  values (upcast) to float32 accuracy, far below bf16's 2**-8 = 4e-3."""
  params, updates = {}, {}
  for i, n in enumerate([7, 300, 4096]):
    params[f"l{i}"], updates[f"l{i}"] = _bf16_layer(n, seed=i)
  tx = lamb_optax.scale_by_trust_ratio()
  _, state = tx.update(updates, tx.init(params), params)
  for key in params:
    x64 = np.asarray(params[key], np.float64)
    u64 = np.asarray(updates[key], np.float64)
    want = reference.norm(x64) / reference.norm(u64)
    got = float(state.trust_ratios[key])
    assert abs(got / want - 1.0) < 1e-5, (key, got, want)


def test_bfloat16_naive_ratio_would_be_worse():
  """Why the upcast matters: the same ratio with norms taken in bf16
  (jnp.linalg.norm on the bf16 arrays) is off by ~1e-3, 100x the package's
  error on the same data."""
  x, u = _bf16_layer(4096, seed=0)
  x64, u64 = np.asarray(x, np.float64), np.asarray(u, np.float64)
  want = reference.norm(x64) / reference.norm(u64)
  naive = float(jnp.linalg.norm(x) / jnp.linalg.norm(u))
  tx = lamb_optax.scale_by_trust_ratio()
  _, state = tx.update({"w": u}, tx.init({"w": x}), {"w": x})
  ours = float(state.trust_ratios["w"])
  naive_error, our_error = abs(naive / want - 1), abs(ours / want - 1)
  assert naive_error > 1e-3
  assert our_error < 1e-5
  assert naive_error > 100 * our_error


def test_float16_norm_does_not_overflow():
  """float16 layers whose squared norm exceeds float16's max (65504)."""
  x = jnp.full((1000,), 30.0, jnp.float16)   # |x|^2 = 9e5
  u = jnp.full((1000,), 10.0, jnp.float16)   # |u|^2 = 1e5
  assert not np.isfinite(float(jnp.sum(jnp.square(x))))  # naive overflows
  tx = lamb_optax.scale_by_trust_ratio()
  scaled, state = tx.update({"w": u}, tx.init({"w": x}), {"w": x})
  np.testing.assert_allclose(float(state.trust_ratios["w"]), 3.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(scaled["w"], np.float64), 30.0,
                             rtol=1e-3)


def test_jit_matches_eager(params):
  updates = _updates_like(params)
  tx = lamb_optax.scale_by_trust_ratio(param_norm_bounds=(0.5, 8.0),
                                       trust_ratio_bounds=(0.1, 5.0))
  state = tx.init(params)
  eager = tx.update(updates, state, params)
  jitted = jax.jit(tx.update)(updates, state, params)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_zero_layer_fixture_gets_ratio_one(params, paths):
  tx = lamb_optax.scale_by_trust_ratio()
  _, state = tx.update(_updates_like(params), tx.init(params), params)
  ratios = jax.tree.leaves(lamb_optax.trust_ratios(state))
  assert float(ratios[paths.index(ZERO_LAYER)]) == 1.0


# --------------------------------------------------------------------------
# The engine's layout: small leaves reduced together by shape, every ratio of
# a one-layer leaf in one vector op, each step reading it through its slot.
# --------------------------------------------------------------------------

SMALL = trust_ratio_src.SMALL_LEAF_SIZE


def _grouping_tree():
  """Small leaves that share shapes (across dtypes), two leaves just above
  the small-leaf size, a scalar and a zero leaf, interleaved in leaf order."""
  rng = np.random.default_rng(7)
  big = (SMALL // 64 + 1, 64)  # SMALL + 64 elements: reduced on its own.
  specs = {
      "a_bias": ((768,), jnp.float32, 0.3),
      "b_big": (big, jnp.float32, 1.0),
      "c_bias": ((768,), jnp.bfloat16, 2.0),
      "d_scale": ((768,), jnp.float32, 0.01),
      "e_small": ((4, 2), jnp.float32, 5.0),
      "f_big": (big, jnp.float32, 0.02),
      "g_small": ((4, 2), jnp.float32, 0.1),
      "h_scalar": ((), jnp.float32, 1.5),
      "i_zero": ((768,), jnp.float32, 0.0),
  }
  params = {k: jnp.asarray(s * rng.standard_normal(shape), dt)
            for k, (shape, dt, s) in specs.items()}
  updates = {k: jnp.asarray(10.0 ** rng.uniform(-3, 3)
                            * rng.standard_normal(shape), dt)
             for k, (shape, dt, _) in specs.items()}
  return params, updates


@pytest.mark.parametrize("masked", [False, True])
def test_grouped_small_leaves_and_single_leaves_match_reference(masked):
  params, updates = _grouping_tree()
  assert np.size(params["b_big"]) > SMALL >= np.size(params["a_bias"])
  mask = ({k: k not in ("c_bias", "f_big") for k in params} if masked
          else None)
  tx = lamb_optax.scale_by_trust_ratio(mask=mask)
  scaled, state = jax.jit(tx.update)(updates, tx.init(params), params)
  ratios = lamb_optax.trust_ratios(state)
  for key in params:
    x, u = np.asarray(params[key], np.float64), np.asarray(updates[key],
                                                           np.float64)
    want = (1.0 if mask and not mask[key] else
            reference.trust_ratio(reference.norm(x), reference.norm(u))[0])
    np.testing.assert_allclose(float(ratios[key]), want, rtol=1e-6,
                               err_msg=key)
    assert scaled[key].dtype == updates[key].dtype, key
    tol = 8e-3 if updates[key].dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(np.asarray(scaled[key], np.float64), want * u,
                               rtol=tol, atol=1e-30, err_msg=key)
  assert float(ratios["i_zero"]) == 1.0  # ||x|| = 0: r = 1.


def _count(jaxpr, primitive: str) -> int:
  """Equations of ``primitive`` in a jaxpr, sub-jaxprs included."""
  return sum(eqn.primitive.name == primitive for eqn in jaxpr_equations(jaxpr))


@pytest.mark.parametrize("copies", [1, 20])
def test_every_ratio_is_one_vector_op_and_small_norms_one_reduction_per_shape(
    copies):
  """However many leaves: one division (the ratio formula, on a vector) and
  one reduction of x and of u per small-leaf shape and per large leaf."""
  rng = np.random.default_rng(0)
  params = {}
  for i in range(copies):
    params[f"layer_{i:02d}"] = {
        "bias": jnp.asarray(rng.standard_normal(768), jnp.float32),
        "kernel": jnp.asarray(rng.standard_normal((96, 96)), jnp.float32),
        "scale": jnp.asarray(rng.standard_normal(3072), jnp.float32)}
  params["embed"] = jnp.asarray(rng.standard_normal((70, 64)), jnp.float32)
  tx = lamb_optax.scale_by_trust_ratio()
  jaxpr = jax.make_jaxpr(tx.update)(params, tx.init(params), params).jaxpr
  assert 96 * 96 > SMALL >= 3072 and 70 * 64 > SMALL
  big = 1 + copies  # embed and every kernel, each reduced on its own.
  groups = 2  # All the (768,) leaves together, all the (3072,) leaves.
  assert _count(jaxpr, "div") == 1
  assert _count(jaxpr, "sqrt") == 2
  assert _count(jaxpr, "reduce_sum") == 2 * (groups + big)


def test_the_step_reads_its_ratio_through_the_state_slot():
  """The slot in the state is what each leaf's step reads: exchange two
  slots and the two leaves exchange ratios (so the index is live state, not
  a constant folded into the step)."""
  params = {"a": jnp.full((3,), 2.0), "b": jnp.full((3,), 8.0),
            "c": jnp.full((2, 2), 1.0)}
  updates = jax.tree.map(jnp.ones_like, params)
  tx = lamb_optax.scale_by_trust_ratio()
  state = tx.init(params)
  assert [int(s) for s in jax.tree.leaves(state.slots)] == [0, 1, 2]
  assert state.ratios.shape == (3,) and state.ratios.dtype == jnp.float32
  step = jax.jit(tx.update)
  scaled, _ = step(updates, state, params)
  np.testing.assert_allclose(np.asarray(scaled["a"]), 2.0 * np.ones(3))
  np.testing.assert_allclose(np.asarray(scaled["b"]), 8.0 * np.ones(3))
  swapped = state._replace(slots={"a": state.slots["b"],
                                  "b": state.slots["a"],
                                  "c": state.slots["c"]})
  scaled, new_state = step(updates, swapped, params)
  np.testing.assert_allclose(np.asarray(scaled["a"]), 8.0 * np.ones(3))
  np.testing.assert_allclose(np.asarray(scaled["b"]), 2.0 * np.ones(3))
  np.testing.assert_allclose(np.asarray(scaled["c"]), np.ones((2, 2)))


def test_state_layout():
  """ratios: one float32 per one-layer leaf; slots: int32 scalars for those
  leaves (None for stacked ones); layer_ratios: a per-leaf array of the
  layer axes' shape for stacked leaves (None for the others)."""
  params = {"stack": jnp.ones((3, 4, 2)), "w": jnp.ones((4, 2)),
            "s": jnp.ones(())}
  tx = lamb_optax.scale_by_trust_ratio(layer_axes={"stack": 0, "w": None,
                                                   "s": None},
                                       mask={"stack": True, "w": False,
                                             "s": True})
  state = tx.init(params)
  assert state.ratios.shape == (2,)
  assert state.slots["stack"] is None and state.layer_ratios["w"] is None
  assert state.slots["w"].dtype == jnp.int32 and state.slots["w"].shape == ()
  assert state.layer_ratios["stack"].shape == (3,)
  updates = jax.tree.map(lambda x: 0.5 * x, params)
  _, state = tx.update(updates, state, params)
  ratios = lamb_optax.trust_ratios(state)
  assert jax.tree.structure(ratios) == jax.tree.structure(params)
  np.testing.assert_allclose(np.asarray(ratios["stack"]), 2.0 * np.ones(3))
  assert float(ratios["w"]) == 1.0 and float(ratios["s"]) == 2.0
