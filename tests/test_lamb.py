"""lamb_optax.lamb against the float64 statement of Algorithm 2 (reference.py).

Every option is run for 12 steps on the awkward fixture tree (conftest.py) and
compared step by step: the parameters after each step and the trust ratios
read back with ``lamb_optax.trust_ratios``. Each case also checks, on the
reference alone, that the option changes the trajectory (or that bounds and
clipping actually bind), so that an implementation ignoring it would fail.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
import reference
from conftest import (ZERO_LAYER, assert_trajectory_close, flat_mask,
                      make_grads, make_params, no_bias_or_norm, run_optimizer,
                      to_numpy64, trajectory_distance)

LR = 0.05
# Binds on the fixture: |x| of dense/bias, embed/table and the zero layer is
# below 0.5, conv/kernel's is above 8 (checked in the test).
PARAM_NORM_BOUNDS = (0.5, 8.0)
# Binds on the fixture: embed/table's ratio is below 0.05, conv/kernel's and
# norm/scale's above 2 (checked).
TRUST_RATIO_BOUNDS = (0.05, 2.0)
# Between the global gradient norms of the fixture's steps (2e3 .. 1.6e4), at
# least 2% away from each: some steps are clipped, some are not (checked).
MAX_GRAD_NORM = 6000.0
# A prefix tree: no ratio for the 3-D kernel, the zero layer and the scalar.
TRUST_MASK = {"conv": False, "dense": True, "embed": True, "head": False,
              "norm": False}


def lr_schedule(count):
  return 0.08 / (1.0 + 0.5 * count)


def wd_schedule(count):
  return 0.02 * (1.0 + count)


# name -> (keyword arguments, shared by lamb_optax.lamb and reference.lamb;
#          what the case must show on the reference: that the option changes
#          the trajectory, or that the bounds / clipping bind)
CASES = {
    "defaults": ({}, None),
    "no_bias_correction": ({"bias_correction": False}, "changes"),
    "nesterov_n": ({"nesterov": "n"}, "changes"),
    "nesterov_nn": ({"nesterov": "nn"}, "changes"),
    "nesterov_nn_no_bias_correction": (
        {"nesterov": "nn", "bias_correction": False}, "changes"),
    "eps_root": ({"eps_root": 1e-6}, "changes"),
    "betas_and_eps": ({"b1": 0.8, "b2": 0.99, "eps": 1e-3}, "changes"),
    "weight_decay": ({"weight_decay": 0.1}, "changes"),
    "weight_decay_mask": (
        {"weight_decay": 0.1, "weight_decay_mask": no_bias_or_norm}, "mask"),
    "trust_ratio_mask": ({"trust_ratio_mask": TRUST_MASK}, "changes"),
    "param_norm_bounds": ({"param_norm_bounds": PARAM_NORM_BOUNDS},
                          "param_norm_bounds"),
    "trust_ratio_bounds": ({"trust_ratio_bounds": TRUST_RATIO_BOUNDS},
                           "trust_ratio_bounds"),
    "max_grad_norm": ({"max_grad_norm": MAX_GRAD_NORM}, "max_grad_norm"),
    "lr_schedule": ({"learning_rate": lr_schedule}, "changes"),
    "weight_decay_schedule": (
        {"weight_decay": wd_schedule, "weight_decay_mask": no_bias_or_norm},
        "changes"),
    "everything": (
        {"learning_rate": lr_schedule, "nesterov": "nn", "eps_root": 1e-8,
         "weight_decay": wd_schedule, "weight_decay_mask": no_bias_or_norm,
         "trust_ratio_mask": TRUST_MASK,
         "param_norm_bounds": PARAM_NORM_BOUNDS,
         "trust_ratio_bounds": TRUST_RATIO_BOUNDS,
         "max_grad_norm": MAX_GRAD_NORM},
        "changes"),
}


def _run_reference(params, params64, grads64, kwargs):
  kwargs = dict(kwargs)
  kwargs.setdefault("learning_rate", LR)
  for key in ("weight_decay_mask", "trust_ratio_mask"):
    if key in kwargs:
      kwargs[key] = flat_mask(kwargs[key], params)
  return reference.lamb(params64, grads64, **kwargs)


def _check_case_matters(what, ref_steps, default_steps, kwargs, params,
                        params64, grads64, paths):
  """The option must be visible in the reference trajectory."""
  if what is None:
    return
  # Every case must move the trajectory well beyond the test's tolerance.
  assert trajectory_distance(ref_steps, default_steps) > 1e-3
  if what == "mask":
    mask = flat_mask(kwargs["weight_decay_mask"], params)
    assert any(mask) and not all(mask)
    unmasked = reference.lamb(params64, grads64, learning_rate=LR,
                              weight_decay=kwargs["weight_decay"])
    assert trajectory_distance(ref_steps, unmasked) > 1e-3
  elif what == "param_norm_bounds":
    lo, hi = PARAM_NORM_BOUNDS
    norms = np.array([s.param_norms for s in ref_steps])
    assert np.any(norms < lo) and np.any(norms > hi)
    assert np.any((norms > lo) & (norms < hi))
    zero = paths.index(ZERO_LAYER)
    # phi(0) = lo > 0: the zero layer gets lo / |u|, not the fallback 1.
    assert ref_steps[0].param_norms[zero] == 0.0
    assert ref_steps[0].ratios[zero] != 1.0
  elif what == "trust_ratio_bounds":
    lo, hi = TRUST_RATIO_BOUNDS
    raw = np.array([s.raw_ratios for s in ref_steps])
    assert np.any(raw < lo) and np.any(raw > hi)
    assert np.any((raw > lo) & (raw < hi))
  elif what == "max_grad_norm":
    clipped = [s.grads_clipped for s in ref_steps]
    assert any(clipped) and not all(clipped)
    norms = np.array([s.grad_global_norm for s in ref_steps])
    assert np.min(np.abs(norms / MAX_GRAD_NORM - 1.0)) > 1e-2


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, params, grads_seq, params64, grads64,
                           paths):
  kwargs, what = CASES[case]
  package_kwargs = dict(kwargs)
  learning_rate = package_kwargs.pop("learning_rate", LR)
  opt = lamb_optax.lamb(learning_rate, **package_kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)

  ref_steps = _run_reference(params, params64, grads64, kwargs)
  default_steps = _run_reference(params, params64, grads64, {})
  _check_case_matters(what, ref_steps, default_steps, kwargs, params,
                      params64, grads64, paths)
  assert_trajectory_close(got_params, got_ratios, ref_steps)


def test_reference_tolerance_is_tight_enough(params, grads_seq, params64,
                                             grads64):
  """The comparison above rejects a small change of the algorithm.

  A learning rate off by 0.1% (far smaller than any option's effect) must
  already fail ``assert_trajectory_close``.
  """
  got_params, got_ratios, _ = run_optimizer(
      lamb_optax.lamb(LR * 1.001), params, grads_seq)
  ref_steps = reference.lamb(params64, grads64, learning_rate=LR)
  with pytest.raises(AssertionError):
    assert_trajectory_close(got_params, got_ratios, ref_steps)


@pytest.mark.parametrize("weight_decay,mask", [(0.0, None),
                                               (0.1, no_bias_or_norm)],
                         ids=["defaults", "weight_decay_and_mask"])
def test_equals_optax_lamb(weight_decay, mask, params, grads_seq, params64,
                           grads64):
  """With its defaults, lamb() computes what optax.lamb computes.

  Both run in float32; they may differ by rounding only: 2e-5 of a layer's
  step per step (this covers optax's float32 ``1 - b2**t``, 6e-6 off, see
  test_adam.py), plus the float32 rounding of the parameters.
  """
  ours, _, _ = run_optimizer(
      lamb_optax.lamb(LR, weight_decay=weight_decay, weight_decay_mask=mask),
      params, grads_seq)
  theirs, _, _ = run_optimizer(
      optax.lamb(LR, weight_decay=weight_decay, mask=mask), params, grads_seq)
  ref_steps = reference.lamb(
      params64, grads64, learning_rate=LR, weight_decay=weight_decay,
      weight_decay_mask=None if mask is None else flat_mask(mask, params))
  moved = np.zeros(len(params64))
  for t, (a, b, ref) in enumerate(zip(ours, theirs, ref_steps), start=1):
    for i, (x, y) in enumerate(zip(to_numpy64(a), to_numpy64(b))):
      moved[i] += np.max(np.abs(ref.updates[i]))
      tol = 2e-5 * moved[i] + t * np.finfo(np.float32).eps * np.max(np.abs(x))
      assert np.max(np.abs(x - y)) <= tol, (t, i)


def test_zero_initialised_layer_has_ratio_one_and_moves(params, grads_seq,
                                                        paths):
  zero = paths.index(ZERO_LAYER)
  assert not np.any(jax.tree.leaves(params)[zero])
  got_params, got_ratios, _ = run_optimizer(lamb_optax.lamb(LR), params,
                                            grads_seq[:2])
  assert float(jax.tree.leaves(got_ratios[0])[zero]) == 1.0
  moved = np.asarray(jax.tree.leaves(got_params[0])[zero])
  assert np.all(moved != 0.0)
  # Step 1 with r = 1: x = -lr * g / (|g| + eps), elementwise.
  g = np.asarray(jax.tree.leaves(grads_seq[0])[zero], np.float64)
  np.testing.assert_allclose(moved, -LR * g / (np.abs(g) + 1e-6), rtol=2e-5)
  # From step 2 on the layer is nonzero and gets a proper ratio.
  assert float(jax.tree.leaves(got_ratios[1])[zero]) != 1.0


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("grad", [-1.0, -1.2, -10.0])
def test_step_norm_is_lr_times_param_norm_when_decay_cancels_adam(grad, jit):
  """LAMB's normalisation must hold however u = adam + wd x is rounded.

  Step 1 with x = 1, wd = 1 and a constant gradient g < 0:
  u = -|g| / (|g| + eps) + 1 = eps / (|g| + eps) > 0, a tiny difference of
  two O(1) terms (as at the equilibrium of decay and gradient). Its float32
  value is mostly rounding, but the step r u = |x| u / |u| has norm lr |x|
  whatever u's rounding is, provided the ratio is computed from the very u
  that is applied (optax.lamb: 2.0 for each g here). The only other honest
  outcome is 0, where u rounds to exactly 0 (then r = 1 and r u = 0).
  """
  params = {"w": jnp.ones((4,))}
  opt = lamb_optax.lamb(1.0, weight_decay=1.0)
  update = jax.jit(opt.update) if jit else opt.update
  updates, _ = update({"w": jnp.full((4,), grad)}, opt.init(params), params)
  step_norm = float(np.linalg.norm(np.asarray(updates["w"], np.float64)))
  assert step_norm == 0.0 or abs(step_norm / 2.0 - 1.0) < 1e-5, step_norm


def test_step_norm_is_lr_times_param_norm_when_nesterov_moment_cancels():
  """Same with N-LAMB: after g1 = -1, g2 = 0.34819007 (float32) the Nesterov
  first moment b1 m_2 / (1 - b1^3) + (1 - b1) g_2 / (1 - b1^2) nearly
  cancels; the scalar layer must still move by exactly lr |x|."""
  params = {"s": jnp.array(1.0)}
  opt = lamb_optax.lamb(1.0, nesterov="n")
  state = opt.init(params)
  _, state = opt.update({"s": jnp.array(-1.0)}, state, params)
  updates, state = opt.update(
      {"s": jnp.array(0.3481900691986084, jnp.float32)}, state, params)
  step = abs(float(updates["s"]))
  assert step == 0.0 or abs(step - 1.0) < 1e-5, step


def test_zero_gradient_layer_does_not_move_with_eps():
  """|u| = 0 (zero gradients, no decay) -> ratio 1 and a zero step."""
  params = {"w": jnp.ones((3, 2)), "b": jnp.full((2,), 0.5)}
  grads = {"w": jnp.zeros((3, 2)), "b": jnp.ones((2,))}
  opt = lamb_optax.lamb(LR)
  state = opt.init(params)
  updates, state = opt.update(grads, state, params)
  assert np.all(np.asarray(updates["w"]) == 0.0)
  assert float(lamb_optax.trust_ratios(state)["w"]) == 1.0
  assert np.all(np.isfinite(np.asarray(updates["b"])))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(dtype):
  """Updates in the gradient dtype, float32 scalar ratios, fixed state."""
  params = jax.tree.map(lambda x: jnp.asarray(x, dtype), make_params())
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(x, dtype), g)
               for g in make_grads(3)]
  opt = lamb_optax.lamb(LR, weight_decay=0.1, max_grad_norm=MAX_GRAD_NORM)
  state = opt.init(params)
  init_dtypes = jax.tree.map(lambda x: x.dtype, state)
  for grads in grads_seq:
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for u in jax.tree.leaves(updates):
      assert u.dtype == dtype
    for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
      assert r.dtype == jnp.float32 and r.shape == ()
    assert jax.tree.map(lambda x: x.dtype, state) == init_dtypes


@pytest.mark.parametrize("max_grad_norm", [None, 1.0])
@pytest.mark.parametrize("param_dtype,grad_dtype", [
    (jnp.float32, jnp.bfloat16), (jnp.bfloat16, jnp.float32)])
def test_mixed_dtypes_updates_in_gradient_dtype(param_dtype, grad_dtype,
                                                max_grad_norm):
  """Contract: updates come back in the gradient's dtype, clipped or not."""
  params = {"w": jnp.ones((4, 3), param_dtype)}
  grads = {"w": jnp.full((4, 3), 0.3, grad_dtype)}
  opt = lamb_optax.lamb(LR, max_grad_norm=max_grad_norm)
  state = opt.init(params)
  updates, new_state = opt.update(grads, state, params)
  assert updates["w"].dtype == grad_dtype
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))


def test_bfloat16_scheduled_weight_decay_keeps_dtypes():
  """An optax schedule returns float32 arrays: bf16 updates must stay bf16."""
  params = {"w": jnp.ones((4, 3), jnp.bfloat16)}
  grads = {"w": jnp.full((4, 3), 0.3, jnp.bfloat16)}
  opt = lamb_optax.lamb(optax.linear_schedule(1e-2, 1e-3, 10),
                        weight_decay=optax.linear_schedule(0.1, 0.01, 10))
  state = opt.init(params)
  updates, new_state = opt.update(grads, state, params)
  assert updates["w"].dtype == jnp.bfloat16
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))


def test_bfloat16_ratios_match_reference_from_bfloat16_values():
  """bf16 params and grads: the ratio of step 1 is the float64 ratio of the
  very same (upcast) bf16 values, to well within bf16's own resolution."""
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), make_params())
  grads = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16),
                       make_grads(1)[0])
  opt = lamb_optax.lamb(LR, weight_decay=0.1)
  state = opt.init(params)
  _, state = opt.update(grads, state, params)
  got = np.array([float(r) for r in
                  jax.tree.leaves(lamb_optax.trust_ratios(state))])
  ref = reference.lamb(to_numpy64(params), [to_numpy64(grads)],
                       learning_rate=LR, weight_decay=0.1)[0]
  # The Adam direction itself may be rounded to bf16 before its norm is
  # taken; that costs at most bf16's relative resolution (2**-8).
  np.testing.assert_allclose(got, ref.ratios, rtol=2.0**-8)


def test_mu_dtype_bfloat16_kept_across_steps():
  """mu_dtype=bf16 stores the first moment in bf16 every step, with values
  that are the bf16 rounding of b1 * mu + (1 - b1) * g."""
  params = jax.tree.map(jnp.asarray, make_params())
  grads_seq = make_grads(4)
  opt = lamb_optax.lamb(LR, mu_dtype=jnp.bfloat16)
  state = opt.init(params)
  prev_mu = [np.zeros(np.shape(x)) for x in jax.tree.leaves(params)]
  for grads in grads_seq:
    _, state = opt.update(jax.tree.map(jnp.asarray, grads), state, params)
    (adam_state,) = [s for s in jax.tree.leaves(
        state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
                     if isinstance(s, optax.ScaleByAdamState)]
    mus = jax.tree.leaves(adam_state.mu)
    nus = jax.tree.leaves(adam_state.nu)
    assert all(m.dtype == jnp.bfloat16 for m in mus)
    assert all(v.dtype == jnp.float32 for v in nus)
    for m, prev, g in zip(mus, prev_mu, jax.tree.leaves(grads)):
      g = np.asarray(g, np.float64)
      want = 0.9 * prev + 0.1 * g
      # bf16 rounding (2**-9 relative) plus float32 arithmetic.
      tol = 2.0**-8 * np.abs(want) + 1e-6 * (0.9 * np.abs(prev)
                                             + 0.1 * np.abs(g))
      assert np.all(np.abs(np.asarray(m, np.float64) - want) <= tol)
    prev_mu = [np.asarray(m, np.float64) for m in mus]


def test_jit_and_eager_agree(params, grads_seq):
  opt = lamb_optax.lamb(LR, weight_decay=0.1, nesterov="n")
  jitted, jitted_ratios, _ = run_optimizer(opt, params, grads_seq[:3],
                                          jit=True)
  eager, eager_ratios, _ = run_optimizer(opt, params, grads_seq[:3], jit=False)
  for a, b in zip(jitted + jitted_ratios, eager + eager_ratios):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                                 atol=1e-7)
