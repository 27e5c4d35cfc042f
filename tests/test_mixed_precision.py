"""bfloat16 / float16 parameters: float32 norms, stable dtypes, no recompiles.

* The trust ratio's norms are accumulated in float32 from the low-precision
  values: the ratios equal the float64 norms of the very same bf16/fp16
  values to float32 accuracy, on leaves big enough that a bf16-accumulated
  norm is visibly off (and an fp16-accumulated one overflows).
* Updates come back in the gradient dtype; ``mu_dtype`` / ``nu_dtype`` keep
  the moments' dtypes across steps.
* Under ``jax.jit`` five steps compile once, with the state's shapes and
  dtypes identical at every step (chain, store_direction and LARS; with and without
  ``layer_axes``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax

LR = 0.01
NUM_LAYERS = 4
# Each slice of "big" has 128 * 128 elements, the whole leaf 65536: enough that bf16 accumulation of its squared norm
# loses ~1e-3 and fp16 accumulation of it overflows.
LAYER_AXES = {"b": None, "big": 0, "w": None}
DTYPES = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def mixed_precision_params(dtype):
  rng = np.random.default_rng(0)
  scales = np.array([0.5, 1.0, 2.0, 4.0]).reshape(-1, 1, 1)
  big = scales * rng.uniform(0.5, 1.5, (NUM_LAYERS, 128, 128)) * rng.choice(
      [-1.0, 1.0], (NUM_LAYERS, 128, 128))
  return {"b": jnp.asarray(rng.uniform(0.1, 0.2, (32,)), dtype),
          "big": jnp.asarray(big, dtype),
          "w": jnp.asarray(rng.standard_normal((64, 32)), dtype)}


def mixed_precision_grads(dtype, num_steps, seed=1):
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(num_steps):
    # Nonzero everywhere (|g| >= 0.05), so that eps = 0 is safe.
    out.append({k: jnp.asarray(
        rng.uniform(0.05, 1.0, s) * rng.choice([-1.0, 1.0], s), dtype)
                for k, s in (("b", (32,)), ("big", (NUM_LAYERS, 128, 128)),
                             ("w", (64, 32)))})
  return out


def norms64(x, layer_axes):
  x = np.asarray(x, np.float64)
  reduce = tuple(i for i in range(x.ndim) if i not in layer_axes)
  return np.sqrt(np.sum(x * x, axis=reduce))


def low_precision_norms(x, layer_axes):
  """Norms accumulated in the leaf's own dtype (what must be avoided)."""
  reduce = tuple(i for i in range(x.ndim) if i not in layer_axes)
  return np.asarray(jnp.sqrt(jnp.sum(jnp.square(x), axis=reduce)), np.float64)


def _axes(layer_axes, key):
  if layer_axes is None or layer_axes[key] is None:
    return ()
  return (layer_axes[key],)


# name -> (optimizer factory, what the first step's direction is, from g)
FIRST_STEP = {
    # eps = 0: the first Adam direction is sign(g), exactly representable.
    "lamb": (lambda **kw: lamb_optax.lamb(LR, eps=0.0, **kw), np.sign),
    "store_direction": (lambda **kw: lamb_optax.lamb(LR, eps=0.0, store_direction=True, **kw),
              np.sign),
    # momentum = 0: the first LARS direction is g itself.
    "lars": (lambda **kw: lamb_optax.lars(LR, momentum=0.0, **kw),
             lambda g: g),
}


@pytest.mark.parametrize("layer_axes", [None, LAYER_AXES],
                         ids=["per_leaf", "layer_axes"])
@pytest.mark.parametrize("opt_name", list(FIRST_STEP))
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_ratios_are_float32_accurate_norms_of_low_precision_values(
    dtype_name, opt_name, layer_axes):
  dtype = DTYPES[dtype_name]
  make, direction = FIRST_STEP[opt_name]
  params = mixed_precision_params(dtype)
  (grads,) = mixed_precision_grads(dtype, 1)
  opt = make(layer_axes=layer_axes)
  updates, state = opt.update(grads, opt.init(params), params)
  ratios = lamb_optax.trust_ratios(state)
  for key in params:
    axes = _axes(layer_axes, key)
    x = params[key]
    u = direction(np.asarray(grads[key], np.float64))
    want = norms64(x, axes) / norms64(u, axes)
    got = np.asarray(ratios[key], np.float64)
    assert ratios[key].dtype == jnp.float32
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=key)
    assert updates[key].dtype == dtype
  # A norm accumulated in bf16/fp16 would be off by far more on "big".
  axes = _axes(layer_axes, "big")
  bad = low_precision_norms(params["big"], axes)
  good = norms64(params["big"], axes)
  with np.errstate(invalid="ignore"):
    rel = np.abs(bad / good - 1.0)
  assert not np.all(rel <= 1e-4)  # (nan/inf where fp16 overflowed)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_scale_by_trust_ratio_norms_in_float32(dtype_name):
  """The transform alone, on arbitrary low-precision updates."""
  dtype = DTYPES[dtype_name]
  params = mixed_precision_params(dtype)
  (updates,) = mixed_precision_grads(dtype, 1, seed=5)
  tx = lamb_optax.scale_by_trust_ratio(layer_axes=LAYER_AXES)
  scaled, state = tx.update(updates, tx.init(params), params)
  ratios = lamb_optax.trust_ratios(state)
  for key in params:
    axes = _axes(LAYER_AXES, key)
    want = norms64(params[key], axes) / norms64(updates[key], axes)
    np.testing.assert_allclose(np.asarray(ratios[key], np.float64), want,
                               rtol=1e-5, err_msg=key)
    assert scaled[key].dtype == dtype
    # The scaled update is r u rounded once to the update dtype.
    expected = np.asarray(updates[key], np.float64) * np.expand_dims(
        want, tuple(i for i in range(updates[key].ndim) if i not in axes))
    resolution = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11
    np.testing.assert_allclose(np.asarray(scaled[key], np.float64), expected,
                               rtol=resolution, atol=0)


def _adam_state(state):
  (adam_state,) = [s for s in jax.tree.leaves(
      state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                   if isinstance(s, optax.ScaleByAdamState)]
  return adam_state


@pytest.mark.parametrize("store_direction", [False, True],
                         ids=["chain", "store_direction"])
@pytest.mark.parametrize("param_dtype,moment_dtype", [
    (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32),
    (jnp.float16, jnp.float32)], ids=["bf16_moments_on_f32",
                                      "f32_moments_on_bf16",
                                      "f32_moments_on_fp16"])
def test_moment_dtypes_kept_across_steps(param_dtype, moment_dtype,
                                        store_direction):
  params = mixed_precision_params(param_dtype)
  grads_seq = mixed_precision_grads(param_dtype, 3)
  b1, b2 = 0.9, 0.999
  opt = lamb_optax.lamb(LR, b1=b1, b2=b2, weight_decay=0.01,
                        mu_dtype=moment_dtype, nu_dtype=moment_dtype,
                        layer_axes=LAYER_AXES,
                        store_direction=store_direction)
  state = opt.init(params)
  prev_mu = {k: np.zeros(v.shape) for k, v in params.items()}
  prev_nu = {k: np.zeros(v.shape) for k, v in params.items()}
  # Stored values: one rounding to the moment dtype (bf16: 2**-9 relative)
  # after float32 arithmetic (a few float32 ulps of the terms added).
  storage = 2.0**-8 if moment_dtype == jnp.bfloat16 else 0.0
  arithmetic = 4 * 2.0**-24
  for grads in grads_seq:
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    adam_state = _adam_state(state)
    for key in params:
      assert updates[key].dtype == param_dtype
      assert params[key].dtype == param_dtype
      mu, nu = adam_state.mu[key], adam_state.nu[key]
      assert mu.dtype == moment_dtype and nu.dtype == moment_dtype, key
      g = np.asarray(grads[key], np.float64)
      for got, prev, beta, term in ((mu, prev_mu, b1, g),
                                    (nu, prev_nu, b2, g * g)):
        want = beta * prev[key] + (1 - beta) * term
        scale = beta * np.abs(prev[key]) + (1 - beta) * np.abs(term)
        err = np.abs(np.asarray(got, np.float64) - want)
        # float32 moments on bf16/fp16 params: bf16 storage (or a float32
        # recurrence fed bf16-rounded moments) would be ~1e-3 off.
        assert np.all(err <= storage * np.abs(want) + arithmetic * scale), (
            key, np.max(err / scale))
      prev_mu[key] = np.asarray(mu, np.float64)
      prev_nu[key] = np.asarray(nu, np.float64)


CONFIGS = {
    "lamb": lambda **kw: lamb_optax.lamb(LR, weight_decay=0.01,
                                         max_grad_norm=50.0, **kw),
    "store_direction": lambda **kw: lamb_optax.lamb(LR, weight_decay=0.01, store_direction=True,
                                          max_grad_norm=50.0, **kw),
    "lamb_f32_moments": lambda **kw: lamb_optax.lamb(
        optax.linear_schedule(LR, LR / 10, 5), weight_decay=0.01,
        mu_dtype=jnp.float32, nu_dtype=jnp.float32, **kw),
    "store_direction_bf16_mu": lambda **kw: lamb_optax.lamb(
        LR, weight_decay=optax.linear_schedule(0.01, 0.0, 5), store_direction=True,
        mu_dtype=jnp.bfloat16, **kw),
    "lars": lambda **kw: lamb_optax.lars(LR, weight_decay=0.01, **kw),
}


def _signature(tree):
  return jax.tree.map(
      lambda x: (jnp.shape(x), jnp.result_type(x),
                 getattr(x, "weak_type", False)), tree)


@pytest.mark.parametrize("config,layer_axes", [
    ("lamb", LAYER_AXES), ("lamb", None), ("store_direction", LAYER_AXES),
    ("lamb_f32_moments", LAYER_AXES), ("store_direction_bf16_mu", None),
    ("lars", LAYER_AXES), ("lars", None)],
                         ids=["lamb-layer_axes", "lamb-per_leaf",
                              "store_direction-layer_axes", "lamb_f32_moments-layer_axes",
                              "store_direction_bf16_mu-per_leaf", "lars-layer_axes",
                              "lars-per_leaf"])
def test_jit_compiles_once_over_five_steps(config, layer_axes):
  dtype = jnp.bfloat16
  params = mixed_precision_params(dtype)
  opt = CONFIGS[config](layer_axes=layer_axes)
  state = opt.init(params)
  signature = _signature(state)
  param_signature = _signature(params)
  update = jax.jit(opt.update)
  for grads in mixed_precision_grads(dtype, 5, seed=2):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert _signature(state) == signature
    assert _signature(params) == param_signature
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
  assert update._cache_size() == 1
  ratios = lamb_optax.trust_ratios(state)
  assert ratios["big"].shape == (() if layer_axes is None else (NUM_LAYERS,))
  assert all(np.all(np.isfinite(np.asarray(r)))
             for r in jax.tree.leaves(ratios))


def test_recompile_counter_sees_a_changed_state():
  """The check above can fail: a state whose dtype drifts recompiles."""
  params = {"w": jnp.ones((3, 2), jnp.bfloat16)}
  grads = {"w": jnp.full((3, 2), 0.5, jnp.bfloat16)}
  opt = lamb_optax.lamb(LR)
  state = opt.init(params)
  update = jax.jit(opt.update)
  _, new_state = update(grads, state, params)
  drifted = jax.tree.map(
      lambda x: x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x,
      new_state)
  update(grads, drifted, params)
  assert update._cache_size() == 2
  assert _signature(drifted) != _signature(state)
