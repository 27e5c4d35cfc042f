"""`lamb(..., fused=True)`: the same algorithm and state, no temporaries.

The fused update recomputes the direction u in the norm pass instead of
storing it. These tests hold it to the same float64 reference as the default
path, check that its state is the chain's, that XLA really allocates no
parameter-sized temporary for it (and does for the chain: the reason it
exists), and bound its one documented difference.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
from lamb_optax._src import lamb as lamb_impl
from conftest import assert_trajectory_close, run_optimizer
from test_lamb import CASES, LR, _run_reference


@pytest.fixture(autouse=True)
def two_pass_on_every_layer(monkeypatch):
  """The test trees are small; make every layer take the two-pass route
  (by default layers under FUSED_MIN_SIZE elements store u)."""
  monkeypatch.setattr(lamb_impl, "FUSED_MIN_SIZE", 0)


@pytest.mark.parametrize("case", list(CASES))
def test_fused_matches_reference(case, params, grads_seq, params64, grads64):
  kwargs, _ = CASES[case]
  package_kwargs = dict(kwargs)
  learning_rate = package_kwargs.pop("learning_rate", LR)
  opt = lamb_optax.lamb(learning_rate, fused=True, **package_kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)
  assert_trajectory_close(got_params, got_ratios,
                          _run_reference(params, params64, grads64, kwargs))


@pytest.mark.parametrize("case", ["defaults", "everything"])
def test_fused_jit_matches_reference(case, params, grads_seq, params64,
                                     grads64):
  """Under jit XLA rewrites the two evaluations of u separately."""
  kwargs, _ = CASES[case]
  package_kwargs = dict(kwargs)
  learning_rate = package_kwargs.pop("learning_rate", LR)
  opt = lamb_optax.lamb(learning_rate, fused=True, **package_kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq, jit=True)
  assert_trajectory_close(got_params, got_ratios,
                          _run_reference(params, params64, grads64, kwargs))


def test_fused_state_is_the_chain_state(params, grads_seq):
  kwargs = CASES["everything"][0]
  package_kwargs = dict(kwargs)
  learning_rate = package_kwargs.pop("learning_rate")
  fused = lamb_optax.lamb(learning_rate, fused=True, **package_kwargs)
  plain = lamb_optax.lamb(learning_rate, **package_kwargs)
  _, _, fused_states = run_optimizer(fused, params, grads_seq[:3])
  _, _, plain_states = run_optimizer(plain, params, grads_seq[:3])
  for a, b in zip(fused_states, plain_states):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_allclose(np.asarray(x, np.float64),
                                 np.asarray(y, np.float64), rtol=2e-5,
                                 atol=1e-12)


def _temp_bytes(opt, params):
  state = opt.init(params)

  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  # Donated, as in a training loop: outputs reuse the input buffers, so
  # whatever else XLA must store is a temporary.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # donated grads have no output to reuse
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
        params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_small_layers_store_u_in_the_fused_update(monkeypatch):
  """Below FUSED_MIN_SIZE the fused update stores u (cheap, fewer kernels);
  above it, it does not."""
  params = {"w": jnp.ones((64, 64))}
  opt = lamb_optax.lamb(1e-3, weight_decay=0.01, fused=True)
  monkeypatch.setattr(lamb_impl, "FUSED_MIN_SIZE", 64 * 64 + 1)
  assert _temp_bytes(opt, params) >= 64 * 64 * 4
  monkeypatch.setattr(lamb_impl, "FUSED_MIN_SIZE", 64 * 64)
  assert _temp_bytes(opt, params) < 64 * 64


def test_fused_allocates_no_parameter_sized_temporary():
  params = {"kernel": jnp.ones((512, 256)), "other": jnp.ones((256, 512)),
            "bias": jnp.ones((512,))}
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  fused = _temp_bytes(lamb_optax.lamb(1e-3, weight_decay=0.01, fused=True),
                      params)
  chain = _temp_bytes(lamb_optax.lamb(1e-3, weight_decay=0.01), params)
  # The chain stores u for its two readers (the norm and the step).
  assert chain >= 512 * 256 * 4
  assert fused < 0.02 * param_bytes


def test_fused_bf16_keeps_dtypes():
  params = {"w": jnp.ones((8, 4), jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16)}
  opt = lamb_optax.lamb(1e-2, weight_decay=0.1, max_grad_norm=1.0,
                        fused=True)
  state = opt.init(params)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3, x.dtype), params)
  updates, new_state = jax.jit(opt.update)(grads, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))
  ratios = lamb_optax.trust_ratios(new_state)
  assert all(r.dtype == jnp.float32 and r.shape == () for r in
             jax.tree.leaves(ratios))


def test_fused_step_norm_is_bounded_under_total_cancellation():
  """The documented caveat: where weight decay cancels the Adam direction to
  float32 rounding, the norm and the step see different roundings of u. The
  step norm is then not exactly lr * ||x||, but within a few ulps' factor:
  never an explosion."""
  params = {"w": jnp.ones(4)}
  opt = lamb_optax.lamb(1.0, weight_decay=1.0, fused=True)
  state = opt.init(params)
  update = jax.jit(opt.update)
  grads = -np.linspace(1.0, 30.0, 59).astype(np.float32)
  norms = np.array([
      float(jnp.linalg.norm(update({"w": jnp.full(4, g)}, state, params)[0]["w"]))
      for g in grads])
  assert np.all(np.isfinite(norms))
  assert np.all(norms <= 8.0 * 2.0)


def test_fused_must_be_bool():
  with pytest.raises(TypeError, match="fused"):
    lamb_optax.lamb(1e-3, fused="yes")


def _small_tree():
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  return {"w": jax.random.normal(k[0], (6, 5)),
          "b": jax.random.normal(k[1], (5,)) * 0.1,
          "s": jnp.float32(0.5)}


def _grads(i):
  base = _small_tree()
  return jax.tree.map(lambda x: jnp.sin(x * (i + 2)) * 10.0 ** (i % 3 - 1),
                      base)


def test_fused_under_inject_hyperparams_matches_chain():
  """Traced learning rate and weight decay, changed at run time."""
  kw = dict(learning_rate=1e-2, weight_decay=0.05)
  fused = optax.inject_hyperparams(lamb_optax.lamb)(fused=True, **kw)
  plain = optax.inject_hyperparams(lamb_optax.lamb)(**kw)
  params = _small_tree()
  sf, sp = fused.init(params), plain.init(params)
  for i in range(4):
    if i == 2:
      for s in (sf, sp):
        s.hyperparams["learning_rate"] = jnp.asarray(3e-3)
        s.hyperparams["weight_decay"] = jnp.asarray(0.2)
    uf, sf = jax.jit(fused.update)(_grads(i), sf, params)
    up, sp = jax.jit(plain.update)(_grads(i), sp, params)
    for a, b in zip(jax.tree.leaves(uf), jax.tree.leaves(up)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, uf)


def test_fused_under_apply_if_finite_skips_nan_steps():
  opt = optax.apply_if_finite(lamb_optax.lamb(1e-2, weight_decay=0.1,
                                              fused=True), 3)
  params = _small_tree()
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(_grads(0), state, params)
  params = optax.apply_updates(params, updates)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan) if g.ndim == 0
                     else g.at[0].set(jnp.nan), _grads(1))
  skipped_updates, skipped_state = update(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in
             jax.tree.leaves(skipped_updates))
  for a, b in zip(jax.tree.leaves(skipped_state.inner_state),
                  jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)
  assert int(skipped_state.notfinite_count) == 1


def test_fused_under_multisteps_equals_fused_on_mean_gradient():
  k = 3
  params = _small_tree()
  inner = lamb_optax.lamb(1e-2, weight_decay=0.1, fused=True)
  multi = optax.MultiSteps(inner, every_k_schedule=k)
  ms = multi.init(params)
  for i in range(k):
    updates, ms = jax.jit(multi.update)(_grads(i), ms, params)
  mean = jax.tree.map(lambda *g: sum(g) / k, *[_grads(i) for i in range(k)])
  want, _ = inner.update(mean, inner.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


def test_fused_errors_name_the_argument():
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  opt = lamb_optax.lamb(1e-2, fused=True, trust_ratio_mask={"w": True})
  with pytest.raises(ValueError, match="trust_ratio_mask"):
    opt.init(params)
  opt = lamb_optax.lamb(1e-2, fused=True)
  state = opt.init(params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state, None)
  with pytest.raises(TypeError, match="updates"):
    opt.update({"w": jnp.ones((3, 3), jnp.int32), "b": jnp.ones(3)}, state,
               params)
