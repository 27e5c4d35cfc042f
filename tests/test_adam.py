"""lamb_optax.scale_by_adam: the direction u of LAMB, against float64 and optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
import reference
from helpers import make_grads, make_params, to_numpy64

CASES = {
    "defaults": {},
    "no_bias_correction": {"bias_correction": False},
    "nesterov_n": {"nesterov": "n"},
    "nesterov_nn": {"nesterov": "nn"},
    "nesterov_n_no_bias_correction": {"nesterov": "n",
                                      "bias_correction": False},
    "nesterov_nn_no_bias_correction": {"nesterov": "nn",
                                       "bias_correction": False},
    "eps_root": {"eps_root": 1e-6},
    "betas_and_eps": {"b1": 0.5, "b2": 0.9, "eps": 1e-2},
}


def _run(tx, params, grads_seq):
  state = tx.init(params)
  out = []
  for grads in grads_seq:
    updates, state = tx.update(jax.tree.map(jnp.asarray, grads), state,
                               params)
    out.append((updates, state))
  return out


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, params, grads_seq, grads64):
  kwargs = CASES[case]
  got = _run(lamb_optax.scale_by_adam(**kwargs), params, grads_seq)
  # The defaults are optax.scale_by_adam's (eps=1e-8).
  hyper = dict(b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0,
               bias_correction=True, nesterov=None)
  hyper.update(kwargs)
  want = reference.adam(grads64, **hyper)
  plain = reference.adam(grads64, eps=1e-8)
  changed = False
  for t, ((updates, state), (dirs, mu, nu), (plain_dirs, _, _)) in enumerate(
      zip(got, want, plain), start=1):
    assert int(state.count) == t
    for u, m, v, u_ref, m_ref, v_ref, u_plain in zip(
        jax.tree.leaves(updates), jax.tree.leaves(state.mu),
        jax.tree.leaves(state.nu), dirs, mu, nu, plain_dirs):
      scale = np.max(np.abs(u_ref))
      # float32 arithmetic: ~7e-7 of the layer's largest entry measured
      # (entries with cancellation in m are only accurate to that scale).
      # 3e-6 still rejects 1 - b2**t computed from float32(b2) (6e-6 off,
      # see test_bias_correction_is_float32_accurate).
      np.testing.assert_allclose(np.asarray(u, np.float64), u_ref, rtol=3e-6,
                                 atol=3e-6 * scale)
      # The moments themselves are stored un-corrected.
      np.testing.assert_allclose(np.asarray(m, np.float64), m_ref, rtol=3e-6,
                                 atol=3e-6 * np.max(np.abs(m_ref)))
      np.testing.assert_allclose(np.asarray(v, np.float64), v_ref, rtol=3e-6)
      changed |= np.max(np.abs(u_ref - u_plain)) > 1e-3 * scale
  assert changed or case == "defaults"


def test_bias_correction_is_float32_accurate():
  """1 - b**t must be as accurate as float32 allows (~1e-7), not ~1e-5.

  With eps = 0, step t of a constant gradient g gives exactly
  m_hat = g and v_hat = g**2, so u = sign(g). Computing 1 - b2**t as
  ``1 - float32(b2)**t`` loses 5 digits to cancellation (float32(0.999) is
  0.99900001287, so 1 - b2**1 is off by 1.3e-5 relative) and |u| comes out
  as 1 - 6.4e-6. Computing it as ``-expm1(t * log(b2))`` with log(b2) taken
  in double precision keeps float32 accuracy. (optax.scale_by_adam has the
  6e-6 error.)
  """
  b1, b2 = 0.9, 0.999
  tx = lamb_optax.scale_by_adam(b1=b1, b2=b2, eps=0.0)
  g = {"w": jnp.array([0.5, -2.0, 3.0, -0.25], jnp.float32)}
  g64 = np.asarray(g["w"], np.float64)
  state = tx.init(g)
  for _ in range(5):
    u, state = tx.update(g, state)
    np.testing.assert_allclose(np.asarray(u["w"]), np.sign(g64), rtol=1e-6)
  # Later steps: start from the exact moments of t - 1 constant gradients,
  # m = (1 - b1**(t-1)) g and v = (1 - b2**(t-1)) g**2.
  for t in (10, 100, 1000, 10000):
    state = optax.ScaleByAdamState(
        count=jnp.asarray(t - 1, jnp.int32),
        mu={"w": jnp.asarray((1 - b1 ** (t - 1)) * g64, jnp.float32)},
        nu={"w": jnp.asarray((1 - b2 ** (t - 1)) * g64**2, jnp.float32)})
    u, _ = tx.update(g, state)
    np.testing.assert_allclose(np.asarray(u["w"]), np.sign(g64), rtol=1e-6,
                               err_msg=f"step {t}")


def test_plain_equals_optax_scale_by_adam(params, grads_seq):
  # Both default to eps=1e-8 (LAMB's 1e-6 is lamb_optax.lamb's default).
  for kwargs in ({}, {"eps": 1e-6}, {"eps": 1e-8},
                 {"eps_root": 1e-8, "b1": 0.8, "b2": 0.99, "eps": 1e-4}):
    ours = _run(lamb_optax.scale_by_adam(**kwargs), params, grads_seq)
    theirs = _run(optax.scale_by_adam(**kwargs), params, grads_seq)
    for (u1, s1), (u2, s2) in zip(ours, theirs):
      assert int(s1.count) == int(s2.count)
      for a, b in zip(jax.tree.leaves((u1, s1.mu, s1.nu)),
                      jax.tree.leaves((u2, s2.mu, s2.nu))):
        # Two float32 computations of one formula: 2e-5 relative covers
        # optax's float32 1 - b**t, 6e-6 off (see
        # test_bias_correction_is_float32_accurate).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5,
                                   atol=1e-30)


@pytest.mark.parametrize("nesterov", ["n", True])
def test_nesterov_n_equals_optax_nesterov(nesterov, params, grads_seq):
  ours = _run(lamb_optax.scale_by_adam(eps=1e-6, nesterov=nesterov), params,
              grads_seq)
  theirs = _run(optax.scale_by_adam(eps=1e-6, nesterov=True), params,
                grads_seq)
  plain = _run(optax.scale_by_adam(eps=1e-6), params, grads_seq)
  for (u1, s1), (u2, s2), (u3, _) in zip(ours, theirs, plain):
    for a, b, c in zip(jax.tree.leaves(u1), jax.tree.leaves(u2),
                       jax.tree.leaves(u3)):
      a, b, c = (np.asarray(x, np.float64) for x in (a, b, c))
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6 * np.abs(b).max())
      # And the comparison is not vacuous: nesterov differs from plain Adam.
      assert np.max(np.abs(b - c)) > 1e-3 * np.abs(b).max()
    for a, b in zip(jax.tree.leaves((s1.mu, s1.nu)),
                    jax.tree.leaves((s2.mu, s2.nu))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=1e-30)


@pytest.mark.parametrize("nesterov", [None, "n", "nn"])
def test_zero_gradient_gives_zero_direction(nesterov):
  params = {"a": jnp.ones((2, 3)), "s": jnp.ones(())}
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = lamb_optax.scale_by_adam(nesterov=nesterov)
  u, _ = tx.update(zeros, tx.init(params))
  for leaf in jax.tree.leaves(u):
    assert np.all(np.asarray(leaf) == 0.0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_dtypes_kept(dtype):
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_params())
  tx = lamb_optax.scale_by_adam(nesterov="nn")
  state = tx.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  assert state.count.dtype == jnp.int32
  for grads in make_grads(2):
    grads = jax.tree.map(lambda x: jnp.asarray(x, dtype), grads)
    u, state = tx.update(grads, state)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(u))
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes


def test_low_precision_gradients_use_float32_arithmetic():
  """bf16 gradients: the direction equals the float32 computation on the
  upcast gradients, rounded once to bf16 (not a bf16 computation)."""
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g)
               for g in make_grads(3)]
  params = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32),
                        grads_seq[0])
  # mu/nu in float32 (params are float32), grads bf16.
  ours = _run(lamb_optax.scale_by_adam(), params, grads_seq)
  want = reference.adam([to_numpy64(g) for g in grads_seq], eps=1e-8)
  for (u, _), (dirs, _, _) in zip(ours, want):
    for got, ref in zip(jax.tree.leaves(u), dirs):
      assert got.dtype == jnp.bfloat16
      # One bf16 rounding: 2**-9 relative, plus float32 noise.
      np.testing.assert_allclose(np.asarray(got, np.float64), ref,
                                 rtol=2.0**-8, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("mu_dtype,nu_dtype", [
    (jnp.bfloat16, None), (None, jnp.bfloat16), (jnp.bfloat16, jnp.bfloat16)])
def test_moment_dtypes(mu_dtype, nu_dtype):
  params = jax.tree.map(jnp.asarray, make_params())
  tx = lamb_optax.scale_by_adam(mu_dtype=mu_dtype, nu_dtype=nu_dtype)
  state = tx.init(params)
  want_mu = mu_dtype or jnp.float32
  want_nu = nu_dtype or jnp.float32
  ref = reference.adam([to_numpy64(g) for g in make_grads(3)], eps=1e-8)
  for grads, (dirs, mu_ref, _) in zip(make_grads(3), ref):
    u, state = tx.update(jax.tree.map(jnp.asarray, grads), state)
    assert all(m.dtype == want_mu for m in jax.tree.leaves(state.mu))
    assert all(v.dtype == want_nu for v in jax.tree.leaves(state.nu))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
    for m, m_ref in zip(jax.tree.leaves(state.mu), mu_ref):
      # bf16 storage compounds one rounding per step (3 steps here).
      rtol = 3 * 2.0**-8 if mu_dtype is not None else 1e-5
      np.testing.assert_allclose(np.asarray(m, np.float64), m_ref, rtol=rtol,
                                 atol=rtol * np.abs(m_ref).max())
    for u_leaf, u_ref in zip(jax.tree.leaves(u), dirs):
      np.testing.assert_allclose(np.asarray(u_leaf, np.float64), u_ref,
                                 rtol=2e-2, atol=2e-2 * np.abs(u_ref).max())


def test_jit_gives_the_same_directions(params, grads_seq):
  tx = lamb_optax.scale_by_adam(nesterov="n", eps_root=1e-8)
  state_e = state_j = tx.init(params)
  update = jax.jit(tx.update)
  for grads in grads_seq[:3]:
    grads = jax.tree.map(jnp.asarray, grads)
    u_e, state_e = tx.update(grads, state_e)
    u_j, state_j = update(grads, state_j)
    for a, b in zip(jax.tree.leaves(u_e), jax.tree.leaves(u_j)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      # XLA may fuse (and so round) differently under jit: a few ulps of the
      # layer's largest entry.
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(a).max())
