"""lamb_optax.lars against the float64 statement of Algorithm 1 (reference.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
import reference
from helpers import (ZERO_LAYER, assert_trajectory_close, flat_mask,
                      make_grads, make_params, no_bias_or_norm, run_optimizer,
                      to_numpy64, trajectory_distance)

LR = 0.05
PARAM_NORM_BOUNDS = (0.5, 8.0)
# LARS ratios on the fixture run from ~2e-3 (dense/kernel, gradients 1e3) to
# ~2e5 (conv/kernel, gradients 1e-4): these bounds bind on both sides.
TRUST_RATIO_BOUNDS = (0.01, 10.0)
TRUST_MASK = {"conv": False, "dense": True, "embed": False, "head": True,
              "norm": True}


def lr_schedule(count):
  return 0.1 * 0.8**count


def wd_schedule(count):
  return 0.05 * (1.0 + count)


CASES = {
    "defaults": {},
    "momentum_0": {"momentum": 0.0},
    "momentum_0.9_coefficient_eps": {"momentum": 0.9,
                                     "trust_coefficient": 0.02, "eps": 1e-3},
    "momentum_0_coefficient_eps": {"momentum": 0.0, "trust_coefficient": 0.02,
                                   "eps": 1e-3},
    "weight_decay": {"weight_decay": 0.1},
    "weight_decay_mask": {"weight_decay": 0.1,
                          "weight_decay_mask": no_bias_or_norm},
    "trust_ratio_mask": {"trust_ratio_mask": TRUST_MASK},
    "param_norm_bounds": {"param_norm_bounds": PARAM_NORM_BOUNDS},
    "trust_ratio_bounds": {"trust_ratio_bounds": TRUST_RATIO_BOUNDS},
    "lr_schedule": {"learning_rate": lr_schedule},
    "weight_decay_schedule": {"weight_decay": wd_schedule,
                              "weight_decay_mask": no_bias_or_norm},
    "everything": {"learning_rate": lr_schedule, "momentum": 0.8,
                   "weight_decay": wd_schedule,
                   "weight_decay_mask": no_bias_or_norm,
                   "trust_ratio_mask": TRUST_MASK,
                   "param_norm_bounds": PARAM_NORM_BOUNDS,
                   "trust_ratio_bounds": TRUST_RATIO_BOUNDS,
                   "trust_coefficient": 0.5, "eps": 1e-2},
    "nesterov": {"nesterov": True},
    "nesterov_coefficient_eps": {"nesterov": True, "momentum": 0.9,
                                 "trust_coefficient": 0.02, "eps": 1e-3},
    "nesterov_weight_decay_mask": {"nesterov": True, "momentum": 0.8,
                                   "weight_decay": 0.1,
                                   "weight_decay_mask": no_bias_or_norm},
    "nesterov_everything": {"nesterov": True, "learning_rate": lr_schedule,
                            "momentum": 0.8, "weight_decay": wd_schedule,
                            "weight_decay_mask": no_bias_or_norm,
                            "trust_ratio_mask": TRUST_MASK,
                            "param_norm_bounds": PARAM_NORM_BOUNDS,
                            "trust_ratio_bounds": TRUST_RATIO_BOUNDS,
                            "trust_coefficient": 0.5, "eps": 1e-2},
}


def _run_reference(params, params64, grads64, kwargs):
  kwargs = dict(kwargs)
  kwargs.setdefault("learning_rate", LR)
  for key in ("weight_decay_mask", "trust_ratio_mask"):
    if key in kwargs:
      kwargs[key] = flat_mask(kwargs[key], params)
  return reference.lars(params64, grads64, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, params, grads_seq, params64, grads64):
  kwargs = dict(CASES[case])
  learning_rate = kwargs.pop("learning_rate", LR)
  opt = lamb_optax.lars(learning_rate, **kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)
  ref_steps = _run_reference(params, params64, grads64, CASES[case])

  if case != "defaults":
    default_steps = _run_reference(params, params64, grads64, {})
    assert trajectory_distance(ref_steps, default_steps) > 1e-3
  if kwargs.get("nesterov"):
    heavy_ball = dict(CASES[case], nesterov=False)
    assert trajectory_distance(
        ref_steps, _run_reference(params, params64, grads64, heavy_ball)) > 1e-3
  if "weight_decay_mask" in kwargs:
    unmasked = dict(CASES[case])
    del unmasked["weight_decay_mask"]
    assert trajectory_distance(
        ref_steps, _run_reference(params, params64, grads64, unmasked)) > 1e-3
  if "param_norm_bounds" in kwargs:
    lo, hi = kwargs["param_norm_bounds"]
    norms = np.array([s.param_norms for s in ref_steps])
    assert np.any(norms < lo) and np.any(norms > hi)
  if "trust_ratio_bounds" in kwargs:
    lo, hi = kwargs["trust_ratio_bounds"]
    raw = np.array([s.raw_ratios for s in ref_steps])
    assert np.any(raw < lo) and np.any(raw > hi)
  if kwargs.get("eps"):
    # eps must matter: comparable to |m| for some layer.
    m_norms = np.array([s.update_norms for s in ref_steps])
    assert np.any((m_norms > 0.1 * kwargs["eps"])
                  & (m_norms < 10 * kwargs["eps"]))

  assert_trajectory_close(got_params, got_ratios, ref_steps)


def test_reference_tolerance_is_tight_enough(params, grads_seq, params64,
                                             grads64):
  """A momentum off by 0.1% already fails the comparison."""
  got_params, got_ratios, _ = run_optimizer(
      lamb_optax.lars(LR, momentum=0.9009), params, grads_seq)
  ref_steps = reference.lars(params64, grads64, learning_rate=LR)
  with pytest.raises(AssertionError):
    assert_trajectory_close(got_params, got_ratios, ref_steps)


def test_differs_from_optax_lars(params, grads_seq):
  """Algorithm 1 of the 2020 paper is not optax.lars (2017 LARS)."""
  ours, _, _ = run_optimizer(lamb_optax.lars(LR), params, grads_seq[:3])
  theirs, _, _ = run_optimizer(optax.lars(LR), params, grads_seq[:3])
  diff = max(np.max(np.abs(a - b)) for a, b in
             zip(to_numpy64(ours[-1]), to_numpy64(theirs[-1])))
  assert diff > 1e-3


def _updates_at_fixed_params(opt, params, grads_seq):
  """The updates of each step, all taken at the same ``params``."""
  state, out = opt.init(params), []
  for grads in grads_seq:
    updates, state = opt.update(grads, state, params)
    out.append(to_numpy64(updates))
  return out


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_nesterov_without_ratio_is_one_minus_beta_times_optax(
    params, grads_seq, momentum):
  """Without the ratio and with a constant learning rate, d_t is (1 - beta)
  times the direction of optax's Nesterov trace, step after step."""
  kw = dict(weight_decay=0.1, trust_ratio_mask=False, momentum=momentum)
  ours = _updates_at_fixed_params(
      lamb_optax.lars(LR, nesterov=True, **kw), params, grads_seq[:4])
  theirs = _updates_at_fixed_params(
      optax.lars(LR, nesterov=True, **kw), params, grads_seq[:4])
  heavy_ball = _updates_at_fixed_params(
      lamb_optax.lars(LR, **kw), params, grads_seq[:4])
  for t, (got, want, plain) in enumerate(zip(ours, theirs, heavy_ball)):
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, (1 - momentum) * w, rtol=1e-5,
                                 atol=1e-6 * np.abs(w).max(), err_msg=str(t))
    assert any(not np.allclose(g, p, rtol=1e-3) for g, p in zip(got, plain))


@pytest.mark.parametrize("nesterov", [False, True])
def test_each_step_moves_a_layer_by_lr_times_its_norm(params, grads_seq,
                                                      nesterov):
  """Defaults (c = 1, eps = 0): |x_{t+1} - x_t| = lr |x_t| per layer (the
  ratio acts on the direction it scales, m_t or the Nesterov d_t)."""
  got_params, _, _ = run_optimizer(lamb_optax.lars(LR, nesterov=nesterov),
                                   params, grads_seq[:4])
  prev = to_numpy64(params)
  for step in got_params:
    cur = to_numpy64(step)
    for x_prev, x_cur in zip(prev, cur):
      if reference.norm(x_prev) > 0:
        np.testing.assert_allclose(reference.norm(x_cur - x_prev),
                                   LR * reference.norm(x_prev), rtol=1e-5)
    prev = cur


def test_zero_initialised_layer_has_ratio_one_and_moves(params, grads_seq,
                                                        paths):
  zero = paths.index(ZERO_LAYER)
  got_params, got_ratios, _ = run_optimizer(
      lamb_optax.lars(LR, momentum=0.9), params, grads_seq[:2])
  assert float(jax.tree.leaves(got_ratios[0])[zero]) == 1.0
  moved = np.asarray(jax.tree.leaves(got_params[0])[zero], np.float64)
  g = np.asarray(jax.tree.leaves(grads_seq[0])[zero], np.float64)
  # Step 1: m = (1 - momentum) g, r = 1.
  np.testing.assert_allclose(moved, -LR * 0.1 * g, rtol=1e-6)
  assert float(jax.tree.leaves(got_ratios[1])[zero]) != 1.0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(dtype):
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_params())
  opt = lamb_optax.lars(LR, weight_decay=0.1)
  state = opt.init(params)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  for grads in make_grads(2):
    grads = jax.tree.map(lambda x: jnp.asarray(x, dtype), grads)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
      assert r.dtype == jnp.float32 and r.shape == ()
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes


def test_bfloat16_ratio_is_float64_ratio_of_the_bf16_values():
  """bf16 params: r = |x| / |m| from the very same bf16 values (the momentum
  is the state's bf16 trace), to float32 accuracy."""
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), make_params())
  opt = lamb_optax.lars(LR, weight_decay=0.1)
  state = opt.init(params)
  for grads in make_grads(3):
    grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), grads)
    old_params = params
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    (ema,) = [s for s in jax.tree.leaves(
        state, is_leaf=lambda s: isinstance(s, optax.EmaState))
              if isinstance(s, optax.EmaState)]
    got = jax.tree.leaves(lamb_optax.trust_ratios(state))
    for r, x, m in zip(got, jax.tree.leaves(old_params),
                       jax.tree.leaves(ema.ema)):
      assert m.dtype == jnp.bfloat16
      want, _ = reference.trust_ratio(reference.norm(np.asarray(x)),
                                      reference.norm(np.asarray(m)))
      assert abs(float(r) / want - 1.0) < 1e-5


def test_float32_params_bfloat16_grads_updates_in_gradient_dtype():
  """Contract: updates come back in the gradient's dtype."""
  params = {"w": jnp.ones((4, 3), jnp.float32)}
  grads = {"w": jnp.full((4, 3), 0.3, jnp.bfloat16)}
  opt = lamb_optax.lars(LR)
  updates, _ = opt.update(grads, opt.init(params), params)
  assert updates["w"].dtype == jnp.bfloat16


@pytest.mark.parametrize("weight_decay", [
    0.1, optax.linear_schedule(0.1, 0.01, 10)], ids=["constant", "schedule"])
@pytest.mark.parametrize("grad_dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_params_state_dtypes_are_stable(weight_decay, grad_dtype):
  """bf16 params: the momentum's dtype must not change across steps (a
  scanned training loop needs a fixed carry), and bf16 gradients must give
  bf16 updates, also with a weight-decay schedule (optax schedules return
  float32 arrays)."""
  params = {"w": jnp.ones((4, 3), jnp.bfloat16), "s": jnp.ones((),
                                                               jnp.bfloat16)}
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3, grad_dtype), params)
  opt = lamb_optax.lars(LR, weight_decay=weight_decay)
  state = opt.init(params)
  updates, new_state = opt.update(grads, state, params)
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))
  assert all(u.dtype == grad_dtype for u in jax.tree.leaves(updates))

  def step(carry, _):
    params, state = carry
    updates, state = opt.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.lax.scan(step, (params, state), None, length=3)
  assert all(np.all(np.isfinite(np.asarray(x, np.float32)))
             for x in jax.tree.leaves(params))
