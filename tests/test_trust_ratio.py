"""lamb_optax.scale_by_trust_ratio against the float64 statement of r."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
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
    "min_norm": {"min_norm": 0.5},
    "param_norm_bounds": {"param_norm_bounds": (0.5, 8.0)},
    "trust_ratio_bounds": {"trust_ratio_bounds": (0.1, 5.0)},
    "both_bounds": {"param_norm_bounds": (0.5, 8.0),
                    "trust_ratio_bounds": (0.1, 5.0)},
    "trust_ratio_mask": {"trust_ratio_mask": {
        "conv": False, "dense": True, "embed": True, "head": False,
        "norm": True}},
    "everything": {"trust_coefficient": 3.0, "eps": 1e-3,
                   "param_norm_bounds": (0.05, 2.0),
                   "trust_ratio_bounds": (0.0, 10.0),
                   "trust_ratio_mask": lambda p: jax.tree.map(
                       lambda x: x.ndim != 1, p)},
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, params):
  kwargs = CASES[case]
  updates = _updates_like(params)
  tx = lamb_optax.scale_by_trust_ratio(**kwargs)
  state = tx.init(params)
  scaled, state = tx.update(updates, state, params)

  mask = (flat_mask(kwargs["trust_ratio_mask"], params)
          if "trust_ratio_mask" in kwargs
          else [True] * len(jax.tree.leaves(params)))
  ratio_kwargs = {k: v for k, v in kwargs.items() if k != "trust_ratio_mask"}
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
      trust_ratio_bounds=(2.0, 3.0), trust_ratio_mask={"a": False, "b": True})
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
# The layout: small leaves reduced together in chunks, each chunk's ratios in
# one vector op, every leaf's step reading its ratio as a buffer of its own.
# --------------------------------------------------------------------------

SMALL = trust_ratio_src.SMALL_LEAF_SIZE
CHUNK = trust_ratio_src.CHUNK_SIZE


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
  tx = lamb_optax.scale_by_trust_ratio(trust_ratio_mask=mask)
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


@pytest.mark.parametrize("copies", [1, 20, CHUNK + 1])
def test_ratios_are_one_vector_op_per_chunk_and_small_norms_one_reduction(
    copies):
  """However many leaves: one division (the ratio formula, on a vector) per
  chunk of at most CHUNK_SIZE leaves; one reduction of x and one of u per
  large leaf, and one of the x's and u's together per chunk of small leaves
  of one shape (a small leaf alone of its shape is reduced as a large
  one)."""
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
  chunks = lambda n: -(-n // CHUNK)
  lone = copies == 1  # Then the bias and the scale are alone of their shape.
  # embed and every kernel (and a lone small leaf), each reduced on its own.
  big = 1 + copies + (2 if lone else 0)
  # The (768,) leaves, the (3072,) ones.
  small_chunks = 0 if lone else 2 * chunks(copies)
  assert _count(jaxpr, "div") == small_chunks + chunks(big)
  assert _count(jaxpr, "sqrt") == 2 * (small_chunks + chunks(big))
  assert _count(jaxpr, "reduce_sum") == 2 * big + small_chunks


def _kernel_counts():
  """benchmarks/update_step.py's count of an executable's kernels."""
  spec = importlib.util.spec_from_file_location(
      "benchmarks_update_step",
      pathlib.Path(__file__).resolve().parents[1] / "benchmarks" /
      "update_step.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.kernel_counts


def test_leaves_of_one_shape_share_their_step_kernels():
  """What the layout is for (docs/performance.md, "Compile time"): XLA:CPU
  compiles each distinct kernel once, so the distinct kernels of the
  compiled step must not grow with the number of leaves of one shape (each
  leaf reads its ratio as a buffer of its own, not through a constant
  offset), while the kernels do."""
  kernel_counts = _kernel_counts()

  def counts(copies):
    params = {f"layer_{i:02d}": {
        "bias": jax.ShapeDtypeStruct((64,), jnp.float32),
        "kernel": jax.ShapeDtypeStruct((80, 64), jnp.float32)}
              for i in range(copies)}
    tx = lamb_optax.scale_by_trust_ratio()
    state = jax.eval_shape(tx.init, params)
    compiled = jax.jit(tx.update).lower(params, state, params).compile()
    return kernel_counts(compiled.as_text())

  few, many = counts(CHUNK), counts(4 * CHUNK)
  assert many["kernels"] > 3 * few["kernels"]
  assert many["distinct_kernels"] == few["distinct_kernels"]


def test_state_is_params_shaped_float32_ratios():
  """trust_ratios: a float32 scalar per leaf, or the layer axes' shape for
  a stacked leaf; 1 outside the mask; nothing else."""
  params = {"stack": jnp.ones((3, 4, 2)), "w": jnp.ones((4, 2)),
            "s": jnp.ones(())}
  tx = lamb_optax.scale_by_trust_ratio(layer_axes={"stack": 0, "w": None,
                                                   "s": None},
                                       trust_ratio_mask={"stack": True,
                                                         "w": False,
                                                         "s": True})
  state = tx.init(params)
  assert type(state) is lamb_optax.ScaleByTrustRatioState
  assert state._fields == ("count", "trust_ratios")
  assert jax.tree.structure(state.trust_ratios) == jax.tree.structure(params)
  assert jax.tree.map(lambda r: (r.shape, r.dtype), state.trust_ratios) == {
      "stack": ((3,), jnp.float32), "w": ((), jnp.float32),
      "s": ((), jnp.float32)}
  updates = jax.tree.map(lambda x: 0.5 * x, params)
  _, state = tx.update(updates, state, params)
  ratios = lamb_optax.trust_ratios(state)
  assert ratios is state.trust_ratios
  np.testing.assert_allclose(np.asarray(ratios["stack"]), 2.0 * np.ones(3))
  assert float(ratios["w"]) == 1.0 and float(ratios["s"]) == 2.0


# --------------------------------------------------------------------------
# optax's min_norm.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("min_norm", [0.0, 0.05, 3.0])
def test_min_norm_equals_optax(min_norm, params, paths):
  """optax.scale_by_trust_ratio's positional arguments mean the same here:
  both norms raised to min_norm (so a zero layer gets min_norm / |u|)."""
  updates = _updates_like(params)
  ours = lamb_optax.scale_by_trust_ratio(min_norm, 0.7, 1e-3)
  theirs = optax.scale_by_trust_ratio(min_norm, 0.7, 1e-3)
  got, state = ours.update(updates, ours.init(params), params)
  want, _ = theirs.update(updates, theirs.init(params), params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-6,
                               atol=1e-30)
  for r, x, u in zip(jax.tree.leaves(state.trust_ratios),
                     to_numpy64(params), to_numpy64(updates)):
    want_r, _ = reference.trust_ratio(reference.norm(x), reference.norm(u),
                                      min_norm=min_norm,
                                      trust_coefficient=0.7, eps=1e-3)
    np.testing.assert_allclose(float(r), want_r, rtol=1e-6)
  if min_norm == 3.0:  # It binds: a zero layer no longer falls back to 1.
    zero = jax.tree.leaves(state.trust_ratios)[paths.index(ZERO_LAYER)]
    assert float(zero) != 1.0


def test_eager_steps_compile_nothing_new_after_the_first(caplog):
  """Op by op (no jit), every primitive is compiled once and reused: the
  ratio hand-out's reduction must not be traced anew at every step."""
  params = {"w": jnp.ones((80, 64)), "b": jnp.ones(64), "s": jnp.ones(())}
  updates = jax.tree.map(lambda x: 0.5 * x, params)
  tx = lamb_optax.lamb(1e-2, weight_decay=0.1)
  state = tx.init(params)
  _, state = tx.update(updates, state, params)  # Compiles what it needs.
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    tx.update(updates, state, params)
  compiled = [r.getMessage() for r in caplog.records
              if "Compiling" in r.getMessage()]
  assert not compiled, compiled
