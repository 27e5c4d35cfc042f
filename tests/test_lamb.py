"""lamb_optax.lamb against the float64 statement of Algorithm 2 (reference.py).

Every option is run for 12 steps on the awkward fixture tree (helpers.py) and
compared step by step: the parameters after each step and the trust ratios
read back with ``lamb_optax.trust_ratios``. Each case also checks, on the
reference alone, that the option changes the trajectory (or that bounds and
clipping actually bind), so that an implementation ignoring it would fail.
"""

from __future__ import annotations

import inspect
import warnings

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


# --------------------------------------------------------------------------
# store_direction=True: the fast path keeps u in the state.
# --------------------------------------------------------------------------


def _stored(opt_state):
  """The stored directions of a lamb(store_direction=True) state."""
  return opt_state["direction"].direction


@pytest.mark.parametrize("case", list(CASES))
def test_store_direction_matches_reference(case, params, grads_seq, params64,
                                           grads64):
  kwargs, _ = CASES[case]
  package_kwargs = dict(kwargs)
  learning_rate = package_kwargs.pop("learning_rate", LR)
  opt = lamb_optax.lamb(learning_rate, store_direction=True, **package_kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq)
  assert_trajectory_close(got_params, got_ratios,
                          _run_reference(params, params64, grads64, kwargs))


@pytest.mark.parametrize("case", ["defaults", "everything"])
def test_store_direction_jit_matches_reference(case, params, grads_seq,
                                               params64, grads64):
  kwargs, _ = CASES[case]
  package_kwargs = dict(kwargs)
  learning_rate = package_kwargs.pop("learning_rate", LR)
  opt = lamb_optax.lamb(learning_rate, store_direction=True, **package_kwargs)
  got_params, got_ratios, _ = run_optimizer(opt, params, grads_seq, jit=True)
  assert_trajectory_close(got_params, got_ratios,
                          _run_reference(params, params64, grads64, kwargs))


def test_store_direction_state_is_the_chain_state_plus_u(params, grads_seq):
  """The chain's state, whose 'direction' holds the u of the last step
  (and no array without store_direction)."""
  kwargs = dict(CASES["everything"][0])
  learning_rate = kwargs.pop("learning_rate")
  stored = lamb_optax.lamb(learning_rate, store_direction=True, **kwargs)
  plain = lamb_optax.lamb(learning_rate, **kwargs)
  _, _, stored_states = run_optimizer(stored, params, grads_seq[:3])
  _, _, plain_states = run_optimizer(plain, params, grads_seq[:3])
  for a, b in zip(stored_states, plain_states):
    assert isinstance(a["direction"], lamb_optax.StoredDirectionState)
    assert isinstance(b["direction"], lamb_optax.StoredDirectionState)
    assert not jax.tree.leaves(b["direction"])
    without = {name: part for name, part in a.items() if name != "direction"}
    assert list(a) == list(b)
    assert jax.tree.structure(without) == jax.tree.structure(
        {name: part for name, part in b.items() if name != "direction"})
    for x, y in zip(jax.tree.leaves(without), jax.tree.leaves(b)):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_allclose(np.asarray(x, np.float64),
                                 np.asarray(y, np.float64), rtol=2e-5,
                                 atol=1e-12)
    # u is stored for the leaves that get a ratio, and only for them.
    in_mask = flat_mask(TRUST_MASK, params)
    assert not all(in_mask) and any(in_mask)
    stored_leaves = jax.tree.structure(params).flatten_up_to(
        a["direction"].direction)
    for buffer, x, in_trust_ratio_mask in zip(
        stored_leaves, jax.tree.leaves(params), in_mask):
      if in_trust_ratio_mask:
        assert (buffer.shape, buffer.dtype) == (np.shape(x), x.dtype)
      else:
        assert buffer is None


def test_store_direction_stores_only_leaves_with_a_ratio(params, grads_seq):
  """Leaves outside trust_ratio_mask read their update once: no buffer, and
  the same numbers as storing every leaf."""
  mask = lambda p: jax.tree.map(lambda x: np.ndim(x) >= 2, p)
  masked = lamb_optax.lamb(LR, weight_decay=0.01, trust_ratio_mask=mask,
                           store_direction=True)
  plain = lamb_optax.lamb(LR, weight_decay=0.01, trust_ratio_mask=mask)
  state = masked.init(params)
  direction = _stored(state)
  n_stored = len(jax.tree.leaves(direction))
  assert 0 < n_stored < len(jax.tree.leaves(params))
  assert n_stored == sum(flat_mask(mask, params))
  got, got_ratios, _ = run_optimizer(masked, params, grads_seq[:4], jit=True)
  want, want_ratios, _ = run_optimizer(plain, params, grads_seq[:4], jit=True)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  for g, w in zip(jax.tree.leaves(got_ratios), jax.tree.leaves(want_ratios)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def _jitted_step_temp_bytes(opt, params):
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


def test_store_direction_allocates_no_parameter_sized_temporary():
  params = {"kernel": jnp.ones((512, 256)), "other": jnp.ones((256, 512)),
            "bias": jnp.ones((512,))}
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  stored = _jitted_step_temp_bytes(
      lamb_optax.lamb(1e-3, weight_decay=0.01, store_direction=True), params)
  chain = _jitted_step_temp_bytes(lamb_optax.lamb(1e-3, weight_decay=0.01),
                                  params)
  # The chain stores u for its two readers (the norm and the step).
  assert chain >= 512 * 256 * 4
  assert stored < 0.02 * param_bytes


# Float32 rounds each norm and product to 2**-24 relative: the invariants
# below hold to a few of those, where fused=True (recomputing u) was 7.8e-5
# off under cancellation.
F32_ROUNDING = 2.0 ** -24


@pytest.mark.parametrize("store_direction", [False, True],
                         ids=["default", "store_direction"])
@pytest.mark.parametrize("shape", [(4,), (64, 64), (300, 257)])
def test_step_norm_is_lr_ratio_u_norm_under_total_cancellation(
    shape, store_direction):
  """x = -sign(g) / wd: the decay cancels the first Adam direction
  sign(g) * |g| / (|g| + eps), so u is eps/|g| and rounding. Still
  ||step|| = lr * r * ||u|| = lr * ||x|| to float32 rounding of the norms."""
  rng = np.random.default_rng(sum(shape))
  g = (rng.standard_normal(shape)
       * 10.0 ** rng.uniform(0, 3, shape)).astype(np.float32)
  lr, wd = 0.5, 0.1
  x = (-np.sign(g) / wd).astype(np.float32)
  params = {"w": jnp.asarray(x)}
  opt = lamb_optax.lamb(lr, weight_decay=wd, store_direction=store_direction)
  updates, state = jax.jit(opt.update)({"w": jnp.asarray(g)},
                                       opt.init(params), params)
  step = np.asarray(updates["w"], np.float64)
  ratio = float(lamb_optax.trust_ratios(state)["w"])
  x_norm = np.linalg.norm(x.astype(np.float64))
  assert np.linalg.norm(step) == pytest.approx(lr * x_norm,
                                               rel=4 * F32_ROUNDING)
  if store_direction:
    u = np.asarray(_stored(state)["w"])
    # The step reads the one stored u: exactly -lr * (r * u) in float32.
    np.testing.assert_array_equal(
        np.asarray(updates["w"]),
        np.float32(-lr) * (np.float32(ratio) * u))
    u_norm = np.linalg.norm(u.astype(np.float64))
    assert u_norm < 1e-4 * x_norm * wd  # the cancellation did happen
    assert np.linalg.norm(step) == pytest.approx(lr * ratio * u_norm,
                                                 rel=2 * F32_ROUNDING)


def test_store_direction_bf16_keeps_dtypes():
  params = {"w": jnp.ones((8, 4), jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16)}
  opt = lamb_optax.lamb(1e-2, weight_decay=0.1, max_grad_norm=1.0,
                        store_direction=True)
  state = opt.init(params)
  grads = jax.tree.map(lambda x: jnp.full(x.shape, 0.3, x.dtype), params)
  updates, new_state = jax.jit(opt.update)(grads, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert (jax.tree.map(lambda x: x.dtype, new_state)
          == jax.tree.map(lambda x: x.dtype, state))
  ratios = lamb_optax.trust_ratios(new_state)
  assert all(r.dtype == jnp.float32 and r.shape == () for r in
             jax.tree.leaves(ratios))


def _small_tree():
  k = jax.random.split(jax.random.PRNGKey(3), 3)
  return {"w": jax.random.normal(k[0], (6, 5)),
          "b": jax.random.normal(k[1], (5,)) * 0.1,
          "s": jnp.float32(0.5)}


def _small_grads(i):
  return jax.tree.map(lambda x: jnp.sin(x * (i + 2)) * 10.0 ** (i % 3 - 1),
                      _small_tree())


def test_store_direction_under_inject_hyperparams_matches_chain():
  """Traced learning rate and weight decay, changed at run time."""
  kw = dict(learning_rate=1e-2, weight_decay=0.05)
  stored = optax.inject_hyperparams(lamb_optax.lamb)(store_direction=True,
                                                     **kw)
  plain = optax.inject_hyperparams(lamb_optax.lamb)(**kw)
  params = _small_tree()
  sf, sp = stored.init(params), plain.init(params)
  for i in range(4):
    if i == 2:
      for s in (sf, sp):
        s.hyperparams["learning_rate"] = jnp.asarray(3e-3)
        s.hyperparams["weight_decay"] = jnp.asarray(0.2)
    uf, sf = jax.jit(stored.update)(_small_grads(i), sf, params)
    up, sp = jax.jit(plain.update)(_small_grads(i), sp, params)
    for a, b in zip(jax.tree.leaves(uf), jax.tree.leaves(up)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
    params = optax.apply_updates(params, uf)


def test_store_direction_under_apply_if_finite_skips_nan_steps():
  opt = optax.apply_if_finite(lamb_optax.lamb(1e-2, weight_decay=0.1,
                                              store_direction=True), 3)
  params = _small_tree()
  state = opt.init(params)
  update = jax.jit(opt.update)
  updates, state = update(_small_grads(0), state, params)
  params = optax.apply_updates(params, updates)
  bad = jax.tree.map(lambda g: g.at[...].set(jnp.nan) if g.ndim == 0
                     else g.at[0].set(jnp.nan), _small_grads(1))
  skipped_updates, skipped_state = update(bad, state, params)
  assert all(np.all(np.asarray(u) == 0) for u in
             jax.tree.leaves(skipped_updates))
  for a, b in zip(jax.tree.leaves(skipped_state.inner_state),
                  jax.tree.leaves(state.inner_state)):
    np.testing.assert_array_equal(a, b)
  assert int(skipped_state.notfinite_count) == 1


def test_store_direction_under_multisteps_equals_one_step_on_mean_gradient():
  k = 3
  params = _small_tree()
  inner = lamb_optax.lamb(1e-2, weight_decay=0.1, store_direction=True)
  multi = optax.MultiSteps(inner, every_k_schedule=k)
  ms = multi.init(params)
  for i in range(k):
    updates, ms = jax.jit(multi.update)(_small_grads(i), ms, params)
  mean = jax.tree.map(lambda *g: sum(g) / k,
                      *[_small_grads(i) for i in range(k)])
  want, _ = inner.update(mean, inner.init(params), params)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)
  assert any(float(jnp.max(jnp.abs(u))) > 0 for u in jax.tree.leaves(updates))


def test_store_direction_errors_name_the_argument():
  params = {"w": jnp.ones((3, 3)), "b": jnp.ones(3)}
  opt = lamb_optax.lamb(1e-2, store_direction=True,
                        trust_ratio_mask={"w": True})
  with pytest.raises(ValueError, match="trust_ratio_mask"):
    opt.init(params)
  opt = lamb_optax.lamb(1e-2, store_direction=True)
  state = opt.init(params)
  with pytest.raises(ValueError, match="params"):
    opt.update(params, state, None)
  with pytest.raises(TypeError, match="updates"):
    opt.update({"w": jnp.ones((3, 3), jnp.int32), "b": jnp.ones(3)}, state,
               params)
  with pytest.raises(TypeError, match="store_direction"):
    lamb_optax.lamb(1e-3, store_direction="yes")


def test_fused_is_gone():
  """The first release has no `fused=` (an alias of store_direction in the
  development versions): a call that passes it is refused by name."""
  with pytest.raises(TypeError, match="fused"):
    lamb_optax.lamb(1e-3, fused=True)
  assert "fused" not in inspect.signature(lamb_optax.lamb).parameters


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("store_direction", [False, True])
def test_state_layout_does_not_depend_on_the_backend(monkeypatch, backend,
                                                     store_direction):
  """A checkpoint written on one backend restores on another: the state's
  structure, shapes and dtypes depend on the arguments only."""
  params = {"w": jnp.ones((3, 4)), "b": jnp.ones(4)}

  def layout():
    opt = lamb_optax.lamb(1e-3, weight_decay=0.01,
                          store_direction=store_direction)
    state = jax.eval_shape(opt.init, params)
    return jax.tree.structure(state), jax.tree.leaves(state)

  want = layout()
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  assert layout() == want


@pytest.mark.parametrize("grad_dtype", [jnp.float32, jnp.bfloat16])
def test_store_direction_keeps_updates_of_bf16_params_exactly(grad_dtype):
  """bfloat16 params: u is kept in float32, so float32 updates pass through
  the buffer unrounded and the fast path gives the default's numbers bit for
  bit (a bfloat16 buffer rounded them: 2.5e-3 off in the sum of a step).
  With bfloat16 updates the two paths agree to a few bfloat16 roundings
  (2^-6 relative): XLA may keep a bfloat16 intermediate in float32 inside
  a fusion, and does so on one path and not the other."""
  rng = np.random.default_rng(3)
  params = {"w": jnp.asarray(rng.standard_normal((32, 16)), jnp.bfloat16),
            "b": jnp.asarray(rng.standard_normal(16), jnp.bfloat16)}
  grads = [jax.tree.map(lambda x: jnp.asarray(
      rng.standard_normal(x.shape), grad_dtype), params) for _ in range(3)]
  runs = []
  for store in (False, True):
    opt = lamb_optax.lamb(1e-2, weight_decay=0.01, store_direction=store)
    state, step = opt.init(params), jax.jit(opt.update)
    updates_seq = []
    for g in grads:
      updates, state = step(g, state, params)
      updates_seq.append(updates)
    runs.append((updates_seq, state))
  if grad_dtype == jnp.float32:
    assert runs[0][0][0]["w"].dtype == jnp.float32
  assert (jax.tree.map(lambda b: b.dtype, _stored(runs[1][1]))
          == {"w": jnp.float32, "b": jnp.float32})
  for a, b in zip(runs[0][0], runs[1][0]):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert x.dtype == y.dtype
      if grad_dtype == jnp.float32:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
      else:
        np.testing.assert_allclose(np.asarray(x, np.float32),
                                   np.asarray(y, np.float32), rtol=2 ** -6)


def test_store_direction_refuses_updates_wider_than_its_buffer():
  with jax.enable_x64(True):
    tx = lamb_optax.lamb(1e-3, store_direction=True)
    params = {"layer": {"w": jnp.ones(3, jnp.float32)}}
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"'layer/w' is float64.*rounded"):
      tx.update({"layer": {"w": jnp.ones(3, jnp.float64)}}, state, params)
