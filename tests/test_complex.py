"""Complex parameters, as optax supports them: LAMB, LARS, Adam's moments and
the trust ratio on complex64 (and complex128) leaves against the float64
statement of the math (tests/reference.py on complex128 arrays), optax's
own results and stable state dtypes.

The norm of a complex layer is that of its magnitudes, taken in the real
compute dtype (float32 for complex64, float64 for complex128); Adam's second
moment averages :math:`|g|^2`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
import reference

LR, WD = 0.05, 0.01
NUM_STEPS = 5


def _complex_tree(dtype=np.complex64):
  """A matrix, a vector, a scalar and a zero layer, at different scales."""
  rng = np.random.default_rng(11)

  def c(shape, scale):
    return np.asarray(scale * (rng.standard_normal(shape)
                               + 1j * rng.standard_normal(shape)), dtype)

  return {"a_kernel": c((4, 3), 1.0), "b_bias": c((3,), 0.1),
          "c_scalar": c((), 2.0), "d_zero": np.zeros((2, 2), dtype)}


def _complex_grads(dtype=np.complex64, num_steps=NUM_STEPS):
  rng = np.random.default_rng(12)
  shapes = {k: np.shape(v) for k, v in _complex_tree().items()}
  scales = {"a_kernel": 1.0, "b_bias": 1e-2, "c_scalar": 10.0, "d_zero": 0.3}
  return [{k: np.asarray(scales[k] * (0.5 + rng.standard_normal(s)
                                      + 1j * rng.standard_normal(s)), dtype)
           for k, s in shapes.items()} for _ in range(num_steps)]


def _run(tx, params, grads_seq):
  params = jax.tree.map(jnp.asarray, params)
  state = tx.init(params)
  step = jax.jit(tx.update)
  out = []
  for grads in grads_seq:
    updates, state = step(jax.tree.map(jnp.asarray, grads), state, params)
    params = optax.apply_updates(params, updates)
    out.append((params, lamb_optax.trust_ratios(state), state))
  return out


def _assert_follows(got, ref_steps, *, ratio_rtol=2e-6):
  """float32 accuracy: each step's move to 1e-5 of its size, plus an ulp of
  the params per step; ratios to float32 rounding."""
  moved = np.zeros(len(ref_steps[0].params))
  for t, ((params, ratios, _), ref) in enumerate(zip(got, ref_steps), 1):
    for i, (x, want) in enumerate(zip(jax.tree.leaves(params), ref.params)):
      assert x.dtype == np.complex64
      moved[i] += np.max(np.abs(ref.updates[i]), initial=0.0)
      tol = 1e-5 * moved[i] + t * 2.0**-23 * np.max(np.abs(want), initial=0)
      err = np.max(np.abs(np.asarray(x, np.complex128) - want), initial=0.0)
      assert err <= tol, (t, i, err, tol)
    np.testing.assert_allclose([float(r) for r in jax.tree.leaves(ratios)],
                               ref.ratios, rtol=ratio_rtol)


@pytest.mark.parametrize("masked", [False, True])
def test_lamb_follows_the_float64_statement(masked):
  mask = {"a_kernel": True, "b_bias": not masked, "c_scalar": True,
          "d_zero": True}
  tx = lamb_optax.lamb(LR, weight_decay=WD, weight_decay_mask=mask,
                       trust_ratio_mask=mask)
  got = _run(tx, _complex_tree(), _complex_grads())
  flat_mask = jax.tree.leaves(mask)
  ref = reference.lamb(jax.tree.leaves(_complex_tree()),
                       [jax.tree.leaves(g) for g in _complex_grads()],
                       learning_rate=LR, weight_decay=WD,
                       weight_decay_mask=flat_mask, trust_ratio_mask=flat_mask)
  _assert_follows(got, ref)
  # The ratios are |x| / |u| of complex layers: far from 1 here.
  assert max(abs(r - 1.0) for r in ref[-1].ratios) > 0.5


def test_lars_follows_the_float64_statement():
  tx = lamb_optax.lars(LR, weight_decay=WD, momentum=0.8)
  got = _run(tx, _complex_tree(), _complex_grads())
  ref = reference.lars(jax.tree.leaves(_complex_tree()),
                       [jax.tree.leaves(g) for g in _complex_grads()],
                       learning_rate=LR, weight_decay=WD, momentum=0.8)
  _assert_follows(got, ref)


def test_adam_moments_of_complex_gradients():
  """m is complex, v the average of |g|^2 (real, stored in the complex
  parameter dtype as optax stores it), the direction m_hat / (sqrt(v_hat) +
  eps)."""
  tx = lamb_optax.scale_by_adam()
  params = jax.tree.map(jnp.asarray, _complex_tree())
  state = tx.init(params)
  grads_seq = _complex_grads()
  want = reference.adam([jax.tree.leaves(g) for g in grads_seq], eps=1e-8)
  for grads, (dirs, mu, nu) in zip(grads_seq, want):
    u, state = tx.update(jax.tree.map(jnp.asarray, grads), state)
    for got, ref in zip(jax.tree.leaves(u), dirs):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=1e-7)
    for got, ref in zip(jax.tree.leaves(state.nu), nu):
      assert got.dtype == jnp.complex64
      np.testing.assert_array_equal(np.imag(np.asarray(got)), 0.0)
      np.testing.assert_allclose(np.real(np.asarray(got)), ref, rtol=2e-6)
    for got, ref in zip(jax.tree.leaves(state.mu), mu):
      np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-6, atol=1e-9)


def test_trust_ratio_uses_magnitudes():
  x = jnp.array([3 + 4j, 0j], jnp.complex64)      # |x| = 5
  u = jnp.array([1j, -1 + 0j], jnp.complex64)     # |u| = sqrt(2)
  tx = lamb_optax.scale_by_trust_ratio()
  scaled, state = tx.update({"w": u}, tx.init({"w": x}), {"w": x})
  ratio = state.trust_ratios["w"]
  assert ratio.dtype == jnp.float32
  np.testing.assert_allclose(float(ratio), 5 / np.sqrt(2), rtol=1e-7)
  assert scaled["w"].dtype == jnp.complex64
  np.testing.assert_allclose(np.asarray(scaled["w"]),
                             5 / np.sqrt(2) * np.asarray(u), rtol=1e-6)


def test_complex128_norms_are_float64():
  """complex128 layers: the norms in float64. Magnitudes of 1e-25 square to
  1e-50, which float32 flushes to 0 (and would fall back to r = 1); in
  float64 the ratio is |x| / |u| = 10."""
  with jax.enable_x64(True):
    x = jnp.full((4,), 1e-25 * (1 + 1j), jnp.complex128)
    u = jnp.full((4,), 1e-26 * (1 - 1j), jnp.complex128)
    tx = lamb_optax.scale_by_trust_ratio()
    scaled, state = tx.update({"w": u}, tx.init({"w": x}), {"w": x})
    assert scaled["w"].dtype == jnp.complex128
    assert float(state.trust_ratios["w"]) == pytest.approx(10.0, rel=1e-7)
    assert np.float32(1e-50) == 0.0  # What float32 norms would have seen.


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
@pytest.mark.parametrize("name", ["lamb", "lamb_store_direction", "lars"])
def test_state_dtypes_are_stable(name, dtype):
  with jax.enable_x64(dtype == jnp.complex128):
    tx = {"lamb": lambda: lamb_optax.lamb(LR, weight_decay=WD,
                                          max_grad_norm=1.0),
          "lamb_store_direction": lambda: lamb_optax.lamb(
              LR, weight_decay=WD, store_direction=True),
          "lars": lambda: lamb_optax.lars(LR, weight_decay=WD)}[name]()
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), _complex_tree())
    state = tx.init(params)
    before = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    step = jax.jit(tx.update)
    for grads in _complex_grads(num_steps=2):
      grads = jax.tree.map(lambda g: jnp.asarray(g, dtype), grads)
      updates, state = step(grads, state, params)
      params = optax.apply_updates(params, updates)
      assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == before
      assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
      assert r.dtype == jnp.float32


def test_lamb_equals_optax_lamb_on_complex_params():
  ours = _run(lamb_optax.lamb(LR, weight_decay=WD), _complex_tree(),
              _complex_grads())
  theirs_tx = optax.lamb(LR, weight_decay=WD)
  params = jax.tree.map(jnp.asarray, _complex_tree())
  state = theirs_tx.init(params)
  for (got, _, _), grads in zip(ours, _complex_grads()):
    updates, state = theirs_tx.update(jax.tree.map(jnp.asarray, grads), state,
                                      params)
    params = optax.apply_updates(params, updates)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
      # optax's float32 1 - b2**t is 6e-6 off (test_adam.py).
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                 atol=1e-6)


def test_real_gradients_of_complex_params_are_refused_naming_the_leaf():
  tx = lamb_optax.lamb(LR)
  params = jax.tree.map(jnp.asarray, _complex_tree())
  grads = jax.tree.map(lambda g: jnp.asarray(g.real), _complex_grads()[0])
  with pytest.raises(TypeError, match=r"`updates` leaf 'a_kernel'.*complex"):
    tx.update(grads, tx.init(params), params)
