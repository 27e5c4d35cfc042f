"""Invariants of LAMB and LARS, checked with hypothesis on random layers.

(a) With phi the identity and no weight decay, each layer's step has norm
    exactly lr * |x| (for nonzero x and u): the trust ratio normalises u.
(b) With eps = eps_root = 0 the update is invariant to scaling every gradient
    by c > 0 (Adam's direction is; so is LARS' ratio times momentum).
(c) Ratios respect param_norm_bounds and trust_ratio_bounds.
(d) Layers outside trust_ratio_mask take exactly the plain Adam(+decay) step
    of optax.chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate).

The optimizers run eagerly (op-by-op, cached per shape) so that hypothesis'
hyperparameters need no recompilation; shapes come from a small set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import lamb_optax
import reference

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    database=None)
SHAPES = [(), (3,), (2, 3), (2, 2, 2)]
NESTEROV = st.sampled_from([None, "n", "nn"])


@st.composite
def arrays(draw, shape, *, nonzero=False, min_exp=-3, max_exp=3):
  """float32 array: integers in [-1000, 1000] / 1000 times 10**e (one e per
  array), so magnitudes span 1e-6 .. 1e3 with neither under- nor overflow."""
  exponent = draw(st.integers(min_exp, max_exp))
  ints = draw(hnp.arrays(np.int32, shape, elements=st.integers(-1000, 1000)))
  if nonzero:
    ints = np.where(ints == 0, 1, ints)
  return np.asarray(ints * (10.0**exponent / 1000.0), np.float32)


@st.composite
def problems(draw, *, max_steps=3, nonzero_grads=False, nonzero_params=False):
  """(params, [grads per step]) as dicts of float32 jax arrays."""
  shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3))
  num_steps = draw(st.integers(1, max_steps))
  params = {f"l{i}": jnp.asarray(draw(arrays(s, nonzero=nonzero_params)))
            for i, s in enumerate(shapes)}
  grads_seq = [{f"l{i}": jnp.asarray(draw(arrays(s, nonzero=nonzero_grads)))
                for i, s in enumerate(shapes)} for _ in range(num_steps)]
  return params, grads_seq


def _norm(x):
  return reference.norm(np.asarray(x, np.float64))


def _adam_magnitudes(grads_seq, keys, **hyper):
  """Per step and layer, the float64 Adam direction and its magnitude bound
  (the direction computed from |g|): their ratio measures cancellation."""
  signed = reference.adam(
      [[np.asarray(g[k], np.float64) for k in keys] for g in grads_seq],
      **hyper)
  absolute = reference.adam(
      [[np.abs(np.asarray(g[k], np.float64)) for k in keys]
       for g in grads_seq], **hyper)
  return [(u, u_abs) for (u, _, _), (u_abs, _, _) in zip(signed, absolute)]


def _steps(opt, params, grads_seq):
  """Yields (params before the step, updates, state) for each step."""
  state = opt.init(params)
  for grads in grads_seq:
    updates, state = opt.update(grads, state, params)
    yield params, updates, state
    params = optax.apply_updates(params, updates)


# (a) -----------------------------------------------------------------------


@SETTINGS
@given(problem=problems(), lr=st.floats(1e-3, 1.0), nesterov=NESTEROV,
       bias_correction=st.booleans(), eps_root=st.sampled_from([0.0, 1e-8]))
def test_lamb_step_norm_is_lr_times_param_norm(problem, lr, nesterov,
                                               bias_correction, eps_root):
  params, grads_seq = problem
  opt = lamb_optax.lamb(lr, nesterov=nesterov, bias_correction=bias_correction,
                        eps_root=eps_root)
  keys = sorted(params)
  magnitudes = _adam_magnitudes(grads_seq, keys, nesterov=nesterov,
                                bias_correction=bias_correction,
                                eps_root=eps_root)
  for (x, updates, _), (u, u_abs) in zip(_steps(opt, params, grads_seq),
                                         magnitudes):
    for i, key in enumerate(keys):
      x_norm, step_norm = _norm(x[key]), _norm(updates[key])
      if x_norm == 0.0:
        continue  # r = 1: the fallback, not the invariant
      if step_norm == 0.0:
        # Only where u vanishes (or cancels to float32 noise).
        assert _norm(u[i]) <= 1e-6 * _norm(u_abs[i])
        continue
      np.testing.assert_allclose(step_norm, lr * x_norm, rtol=1e-5)


@SETTINGS
@given(problem=problems(), lr=st.floats(1e-3, 1.0),
       momentum=st.sampled_from([0.0, 0.5, 0.9]),
       trust_coefficient=st.floats(1e-3, 10.0),
       eps=st.sampled_from([0.0, 1e-3, 1.0]))
def test_lars_step_norm(problem, lr, momentum, trust_coefficient, eps):
  """LARS: |step| = lr c |x| |m| / (|m| + eps); lr |x| when c = 1, eps = 0."""
  params, grads_seq = problem
  opt = lamb_optax.lars(lr, momentum=momentum,
                        trust_coefficient=trust_coefficient, eps=eps)
  momenta = {k: np.zeros(np.shape(v)) for k, v in params.items()}
  abs_momenta = {k: np.zeros(np.shape(v)) for k, v in params.items()}
  for t, (x, updates, _) in enumerate(_steps(opt, params, grads_seq)):
    for key in x:
      g = np.asarray(grads_seq[t][key], np.float64)
      momenta[key] = momentum * momenta[key] + (1 - momentum) * g
      abs_momenta[key] = momentum * abs_momenta[key] + (1 - momentum) * abs(g)
      x_norm, m_norm = _norm(x[key]), reference.norm(momenta[key])
      if x_norm == 0.0:
        continue  # r = 1: the fallback, not the invariant
      if m_norm <= 1e-6 * reference.norm(abs_momenta[key]):
        continue  # m vanishes, or cancels to float32 noise
      np.testing.assert_allclose(
          _norm(updates[key]),
          lr * trust_coefficient * x_norm * m_norm / (m_norm + eps),
          rtol=1e-5)


# (b) -----------------------------------------------------------------------


@SETTINGS
@given(problem=problems(nonzero_grads=True), scale=st.floats(1e-3, 1e3),
       nesterov=NESTEROV, bias_correction=st.booleans(),
       weight_decay=st.sampled_from([0.0, 0.1]))
def test_lamb_invariant_to_gradient_scale_when_eps_is_zero(
    problem, scale, nesterov, bias_correction, weight_decay):
  params, grads_seq = problem
  scaled_seq = [jax.tree.map(lambda g: g * np.float32(scale), grads)
                for grads in grads_seq]
  opt = lamb_optax.lamb(0.1, eps=0.0, eps_root=0.0, nesterov=nesterov,
                        bias_correction=bias_correction,
                        weight_decay=weight_decay)
  keys = sorted(params)
  magnitudes = _adam_magnitudes(grads_seq, keys, nesterov=nesterov,
                                bias_correction=bias_correction, eps=0.0)
  # Where the Adam direction nearly cancels (|u| << |u|_abs) its float32
  # rounding, and so its change under g -> c g, grows by |u|_abs / |u|;
  # differences then carry over to later steps through x.
  cond = 1.0
  for (x, u1, s1), (_, u2, s2), (u, u_abs) in zip(
      _steps(opt, params, grads_seq), _steps(opt, params, scaled_seq),
      magnitudes):
    for i, key in enumerate(keys):
      x64 = np.asarray(x[key], np.float64)
      signed = reference.norm(u[i] + weight_decay * x64)
      if signed > 0:
        cond = max(cond, reference.norm(u_abs[i] + weight_decay * np.abs(x64))
                   / signed)
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
      np.testing.assert_allclose(
          b, a, rtol=1e-5 * cond,
          atol=1e-5 * cond * np.max(np.abs(a), initial=0.0))
    np.testing.assert_allclose(
        [float(r) for r in jax.tree.leaves(lamb_optax.trust_ratios(s2))],
        [float(r) for r in jax.tree.leaves(lamb_optax.trust_ratios(s1))],
        rtol=1e-5 * cond)


@SETTINGS
@given(problem=problems(nonzero_grads=True, nonzero_params=True),
       scale=st.floats(1e-3, 1e3), momentum=st.sampled_from([0.0, 0.9]))
def test_lars_invariant_to_gradient_scale_when_eps_and_decay_are_zero(
    problem, scale, momentum):
  """(Nonzero params: a zero layer takes the fallback r = 1, step lr m.)"""
  params, grads_seq = problem
  scaled_seq = [jax.tree.map(lambda g: g * np.float32(scale), grads)
                for grads in grads_seq]
  opt = lamb_optax.lars(0.1, momentum=momentum, eps=0.0, weight_decay=0.0)
  for (_, u1, _), (_, u2, _) in zip(_steps(opt, params, grads_seq),
                                    _steps(opt, params, scaled_seq)):
    for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2)):
      a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
      np.testing.assert_allclose(b, a, rtol=1e-5,
                                 atol=1e-5 * np.max(np.abs(a), initial=0.0))


# (c) -----------------------------------------------------------------------

# 0 or a float32-representable magnitude (a bound like 1e-140 is 0 in
# float32, where the ratio is computed).
BOUND = st.just(0.0) | st.floats(1e-3, 10.0)


@st.composite
def bounds(draw):
  lo, hi = sorted((draw(BOUND), draw(BOUND)))
  return lo, hi


@SETTINGS
@given(data=st.data(), param_norm_bounds=st.none() | bounds(),
       trust_ratio_bounds=st.none() | bounds(),
       trust_coefficient=st.floats(0.0, 10.0),
       eps=st.sampled_from([0.0, 1e-3, 1.0]))
def test_trust_ratio_formula_and_bounds(data, param_norm_bounds,
                                        trust_ratio_bounds, trust_coefficient,
                                        eps):
  """scale_by_trust_ratio on random layers: r is the documented formula and
  lies within trust_ratio_bounds (as float32 numbers)."""
  shapes = data.draw(st.lists(st.sampled_from(SHAPES), min_size=1,
                              max_size=3))
  params = {f"l{i}": jnp.asarray(data.draw(arrays(s)))
            for i, s in enumerate(shapes)}
  updates = {f"l{i}": jnp.asarray(data.draw(arrays(s)))
             for i, s in enumerate(shapes)}
  tx = lamb_optax.scale_by_trust_ratio(
      trust_coefficient=trust_coefficient, eps=eps,
      param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds)
  scaled, state = tx.update(updates, tx.init(params), params)
  for key in params:
    r = state.trust_ratios[key]
    assert r.dtype == jnp.float32 and r.shape == ()
    want, _ = reference.trust_ratio(
        _norm(params[key]), _norm(updates[key]),
        trust_coefficient=trust_coefficient, eps=eps,
        param_norm_bounds=param_norm_bounds,
        trust_ratio_bounds=trust_ratio_bounds)
    np.testing.assert_allclose(float(r), want, rtol=2e-6, atol=1e-30)
    if trust_ratio_bounds is not None:
      lo, hi = (float(np.float32(b)) for b in trust_ratio_bounds)
      assert lo <= float(r) <= hi
    np.testing.assert_allclose(np.asarray(scaled[key], np.float64),
                               float(r) * np.asarray(updates[key], np.float64),
                               rtol=2e-6, atol=1e-30)


@SETTINGS
@given(problem=problems(), param_norm_bounds=bounds(),
       trust_ratio_bounds=st.none() | bounds(), nesterov=NESTEROV)
def test_lamb_steps_respect_bounds(problem, param_norm_bounds,
                                   trust_ratio_bounds, nesterov):
  """LAMB: ratios in trust_ratio_bounds; without them, each adapted layer's
  step has norm lr * phi(|x|) in lr * [lo, hi] (r |u| = phi)."""
  params, grads_seq = problem
  lr = 0.1
  opt = lamb_optax.lamb(lr, nesterov=nesterov,
                        param_norm_bounds=param_norm_bounds,
                        trust_ratio_bounds=trust_ratio_bounds)
  lo, hi = param_norm_bounds
  for x, updates, state in _steps(opt, params, grads_seq):
    ratios = lamb_optax.trust_ratios(state)
    for key in x:
      r = float(ratios[key])
      if trust_ratio_bounds is not None:
        r_lo, r_hi = (float(np.float32(b)) for b in trust_ratio_bounds)
        assert r_lo <= r <= r_hi
        continue
      step_norm = _norm(updates[key])
      phi = min(max(_norm(x[key]), lo), hi)
      if phi == 0.0 or step_norm == 0.0:
        continue  # fallback r = 1
      assert lo * (1 - 1e-5) <= step_norm / lr <= hi * (1 + 1e-5)
      np.testing.assert_allclose(step_norm / lr, phi, rtol=1e-5)


# (d) -----------------------------------------------------------------------


@SETTINGS
@given(data=st.data(), problem=problems(), lr=st.floats(1e-3, 1.0),
       weight_decay=st.sampled_from([0.0, 0.01, 0.3]),
       nesterov=st.sampled_from([None, "n"]),
       eps_root=st.sampled_from([0.0, 1e-8]))
def test_layers_outside_trust_mask_take_the_adam_step(
    data, problem, lr, weight_decay, nesterov, eps_root):
  params, grads_seq = problem
  keys = sorted(params)
  trust_mask = {k: data.draw(st.booleans(), label=f"trust {k}") for k in keys}
  decay_mask = {k: data.draw(st.booleans(), label=f"decay {k}") for k in keys}
  opt = lamb_optax.lamb(lr, weight_decay=weight_decay, eps_root=eps_root,
                        nesterov=nesterov, weight_decay_mask=decay_mask,
                        trust_ratio_mask=trust_mask)
  plain = optax.chain(
      optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-6, eps_root=eps_root,
                          nesterov=nesterov == "n"),
      optax.add_decayed_weights(weight_decay, decay_mask),
      optax.scale_by_learning_rate(lr))
  magnitudes = _adam_magnitudes(grads_seq, keys, nesterov=nesterov,
                                eps_root=eps_root)
  # Both see the same parameter trajectory: LAMB's.
  plain_state = plain.init(params)
  for grads, (x, updates, state), (_, u_abs) in zip(
      grads_seq, _steps(opt, params, grads_seq), magnitudes):
    plain_updates, plain_state = plain.update(grads, plain_state, x)
    ratios = lamb_optax.trust_ratios(state)
    for i, key in enumerate(keys):
      if trust_mask[key]:
        continue
      assert float(ratios[key]) == 1.0
      want = np.asarray(plain_updates[key], np.float64)
      # Rounding (and optax's float32 1 - b2**t, 6e-6 off) is relative to
      # the terms lr |m_hat / sqrt(v_hat)| and lr wd |x|, which may cancel.
      terms = lr * (u_abs[i] + (weight_decay if decay_mask[key] else 0.0)
                    * np.abs(np.asarray(x[key], np.float64)))
      err = np.abs(np.asarray(updates[key], np.float64) - want)
      assert np.all(err <= 2e-5 * terms + 1e-12), (key, err, terms)
