"""Float64 NumPy statement of LAMB (Algorithm 2) and LARS (Algorithm 1).

Written from the math of You et al. (2020), "Large Batch Optimization for Deep
Learning", arXiv 1904.00962, and the documented options of ``lamb_optax``; it
calls neither the package nor optax. A *layer* is one entry of a list of
arrays (the leaves of a pytree, flattened by the tests with
``jax.tree.leaves``).

Conventions shared by both algorithms:

* ``t`` is the step, starting at 1; schedules (``learning_rate``,
  ``weight_decay``) are Python callables of the 0-based count ``t - 1``, or
  plain numbers.
* Masks are lists of bools aligned with the layers (None: all True).
* Complex layers are complex128 arrays; ``|x|`` is the root of the sum of
  their squared magnitudes, and Adam's ``v`` averages ``|g|^2`` (real).
* The trust ratio of a layer with parameters ``x`` and direction ``u`` is
  ``coef * phi(|x|) / (|u| + eps)``, ``phi`` the identity or a clip to
  ``param_norm_bounds``; 1 where ``phi(|x|) == 0`` or ``|u| == 0``; then
  clipped to ``trust_ratio_bounds``; 1 for layers outside the trust mask.

Each step returns a :class:`Step` record: the new parameters and, for the
tests, what led to them (ratios before and after bounds, norms, clipping).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence, Union

import numpy as np

Schedule = Union[float, Callable[[int], float]]


@dataclasses.dataclass
class Step:
  """What one step of the reference did (one entry per layer in lists)."""

  params: list[np.ndarray]        # parameters after the step
  updates: list[np.ndarray]       # x_{t+1} - x_t
  ratios: list[float]             # trust ratios applied (1 outside the mask)
  raw_ratios: list[float]         # before trust_ratio_bounds (nan if masked)
  param_norms: list[float]        # |x_t| before the step
  update_norms: list[float]       # |u_t| (LAMB) or |d_t| (LARS)
  # |u| computed from absolute values (|g|, |x|): >= update_norms; the ratio
  # of the two bounds the cancellation in u, hence the relative rounding
  # error a float32 computation of |u| may honestly have.
  update_abs_norms: list[float]
  learning_rate: float
  weight_decay: float
  grad_global_norm: float = math.nan  # before clipping
  grads_clipped: bool = False


def _value(schedule: Schedule, count: int) -> float:
  return float(schedule(count)) if callable(schedule) else float(schedule)


def _as_float64(arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
  """float64 arrays (complex128 for complex ones)."""
  return [np.array(a, dtype=np.complex128 if np.iscomplexobj(a)
                   else np.float64) for a in arrays]


def _mask(mask: Optional[Sequence[bool]], n: int) -> list[bool]:
  if mask is None:
    return [True] * n
  mask = [bool(m) for m in mask]
  if len(mask) != n:
    raise ValueError(f"mask has {len(mask)} entries for {n} layers")
  return mask


def norm(x: np.ndarray) -> float:
  """L2 norm of a whole layer, in float64: the root of the sum of |x|^2
  (complex layers too)."""
  x = np.asarray(x)
  x = x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)
  return float(np.sqrt(np.sum(np.square(np.abs(x)))))


def clip(value: float, bounds: Optional[tuple[float, float]]) -> float:
  if bounds is None:
    return value
  lo, hi = bounds
  return min(max(value, lo), hi)


def trust_ratio(
    param_norm: float,
    update_norm: float,
    *,
    min_norm: float = 0.0,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
) -> tuple[float, float]:
  """Returns ``(ratio, ratio_before_trust_ratio_bounds)``. ``min_norm`` is a
  floor of both norms (optax's)."""
  param_norm, update_norm = max(param_norm, min_norm), max(update_norm,
                                                           min_norm)
  phi = clip(param_norm, param_norm_bounds)
  if phi == 0.0 or update_norm == 0.0:
    raw = 1.0
  else:
    raw = trust_coefficient * phi / (update_norm + eps)
  return clip(raw, trust_ratio_bounds), raw


def clip_by_global_norm(
    grads: Sequence[np.ndarray], max_norm: float
) -> tuple[list[np.ndarray], float, bool]:
  """Global-norm clipping: if G >= max_norm, g <- g / G * max_norm."""
  global_norm = math.sqrt(sum(norm(g) ** 2 for g in grads))
  if global_norm < max_norm:
    return list(grads), global_norm, False
  return [g / global_norm * max_norm for g in grads], global_norm, True


def adam_direction(
    m: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    t: int,
    *,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    bias_correction: bool,
    nesterov: Optional[str],
) -> np.ndarray:
  """m_hat / (sqrt(v_hat + eps_root) + eps) from the *new* moments m_t, v_t."""
  if bias_correction:
    c1, c2 = 1.0 - b1**t, 1.0 - b2**t
    c1_next, c2_next = 1.0 - b1 ** (t + 1), 1.0 - b2 ** (t + 1)
  else:
    c1 = c2 = c1_next = c2_next = 1.0
  if nesterov is None:
    m_hat = m / c1
  else:
    m_hat = b1 * m / c1_next + (1.0 - b1) * g / c1
  if nesterov == "nn":
    v_hat = b2 * v / c2_next + (1.0 - b2) * np.square(np.abs(g)) / c2
  else:
    v_hat = v / c2
  return m_hat / (np.sqrt(v_hat + eps_root) + eps)


def adam(
    grads_seq: Sequence[Sequence[np.ndarray]],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    bias_correction: bool = True,
    nesterov: Optional[str] = None,
) -> list[tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]]:
  """Adam directions alone: per step ``(directions, mu, nu)``."""
  n = len(grads_seq[0])
  mu = [np.zeros_like(g) for g in _as_float64(grads_seq[0])]
  nu = [np.zeros(m.shape) for m in mu]  # Real: an average of |g|^2.
  out = []
  for t, grads in enumerate(grads_seq, start=1):
    grads = _as_float64(grads)
    dirs = []
    for i in range(n):
      g = grads[i]
      mu[i] = b1 * mu[i] + (1.0 - b1) * g
      nu[i] = b2 * nu[i] + (1.0 - b2) * np.square(np.abs(g))
      dirs.append(adam_direction(
          mu[i], nu[i], g, t, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
          bias_correction=bias_correction, nesterov=nesterov))
    out.append((dirs, [m.copy() for m in mu], [v.copy() for v in nu]))
  return out


def lamb(
    params: Sequence[np.ndarray],
    grads_seq: Sequence[Sequence[np.ndarray]],
    *,
    learning_rate: Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: Schedule = 0.0,
    eps_root: float = 0.0,
    bias_correction: bool = True,
    nesterov: Optional[str] = None,
    weight_decay_mask: Optional[Sequence[bool]] = None,
    trust_ratio_mask: Optional[Sequence[bool]] = None,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    max_grad_norm: Optional[float] = None,
) -> list[Step]:
  """Runs LAMB (Algorithm 2) over ``grads_seq``; returns one Step per step.

  The gradients are given in advance (they do not depend on the parameters),
  so the trajectory is a pure function of the hyperparameters.
  """
  x = _as_float64(params)
  n = len(x)
  decay_mask = _mask(weight_decay_mask, n)
  adapt_mask = _mask(trust_ratio_mask, n)
  mu = [np.zeros_like(p) for p in x]
  nu = [np.zeros(p.shape) for p in x]  # Real: an average of |g|^2.
  mu_abs = [np.zeros(p.shape) for p in x]
  steps = []
  for t, grads in enumerate(grads_seq, start=1):
    count = t - 1
    lr = _value(learning_rate, count)
    wd = _value(weight_decay, count)
    grads = _as_float64(grads)
    global_norm, clipped = math.nan, False
    if max_grad_norm is not None:
      grads, global_norm, clipped = clip_by_global_norm(grads, max_grad_norm)
    new_x, updates, ratios, raw_ratios, p_norms, u_norms = [], [], [], [], [], []
    u_abs_norms = []
    for i in range(n):
      g = grads[i]
      mu[i] = b1 * mu[i] + (1.0 - b1) * g
      nu[i] = b2 * nu[i] + (1.0 - b2) * np.square(np.abs(g))
      mu_abs[i] = b1 * mu_abs[i] + (1.0 - b1) * np.abs(g)
      hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                   bias_correction=bias_correction, nesterov=nesterov)
      u = adam_direction(mu[i], nu[i], g, t, **hyper)
      u_abs = adam_direction(mu_abs[i], nu[i], np.abs(g), t, **hyper)
      if decay_mask[i]:
        u = u + wd * x[i]
        u_abs = u_abs + abs(wd) * np.abs(x[i])
      p_norm, u_norm = norm(x[i]), norm(u)
      u_abs_norms.append(norm(u_abs))
      if adapt_mask[i]:
        r, raw = trust_ratio(
            p_norm, u_norm, param_norm_bounds=param_norm_bounds,
            trust_ratio_bounds=trust_ratio_bounds)
      else:
        r, raw = 1.0, math.nan
      step = -lr * r * u
      new_x.append(x[i] + step)
      updates.append(step)
      ratios.append(r)
      raw_ratios.append(raw)
      p_norms.append(p_norm)
      u_norms.append(u_norm)
    x = new_x
    steps.append(Step(
        params=[p.copy() for p in x], updates=updates, ratios=ratios,
        raw_ratios=raw_ratios, param_norms=p_norms, update_norms=u_norms,
        update_abs_norms=u_abs_norms,
        learning_rate=lr, weight_decay=wd, grad_global_norm=global_norm,
        grads_clipped=clipped))
  return steps


def lars(
    params: Sequence[np.ndarray],
    grads_seq: Sequence[Sequence[np.ndarray]],
    *,
    learning_rate: Schedule,
    momentum: float = 0.9,
    weight_decay: Schedule = 0.0,
    weight_decay_mask: Optional[Sequence[bool]] = None,
    trust_ratio_mask: Optional[Sequence[bool]] = None,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    nesterov: bool = False,
) -> list[Step]:
  """Runs LARS as in Algorithm 1 of You et al. (2020).

  m_t = momentum m_{t-1} + (1 - momentum) (g_t + wd x_t);
  x_{t+1} = x_t - lr r_t d_t with r_t = coef phi(|x_t|) / (|d_t| + eps),
  where d_t = m_t, or with ``nesterov`` the Nesterov direction
  d_t = momentum m_t + (1 - momentum) (g_t + wd x_t).
  """
  x = _as_float64(params)
  n = len(x)
  decay_mask = _mask(weight_decay_mask, n)
  adapt_mask = _mask(trust_ratio_mask, n)
  mom = [np.zeros_like(p) for p in x]
  mom_abs = [np.zeros(p.shape) for p in x]
  steps = []
  for t, grads in enumerate(grads_seq, start=1):
    count = t - 1
    lr = _value(learning_rate, count)
    wd = _value(weight_decay, count)
    grads = _as_float64(grads)
    new_x, updates, ratios, raw_ratios, p_norms, m_norms = [], [], [], [], [], []
    m_abs_norms = []
    for i in range(n):
      d = grads[i] + wd * x[i] if decay_mask[i] else grads[i]
      d_abs = np.abs(grads[i]) + (abs(wd) * np.abs(x[i]) if decay_mask[i]
                                  else 0.0)
      mom[i] = momentum * mom[i] + (1.0 - momentum) * d
      mom_abs[i] = momentum * mom_abs[i] + (1.0 - momentum) * d_abs
      if nesterov:
        direction = momentum * mom[i] + (1.0 - momentum) * d
        direction_abs = momentum * mom_abs[i] + (1.0 - momentum) * d_abs
      else:
        direction, direction_abs = mom[i], mom_abs[i]
      p_norm, m_norm = norm(x[i]), norm(direction)
      m_abs_norms.append(norm(direction_abs))
      if adapt_mask[i]:
        r, raw = trust_ratio(
            p_norm, m_norm, trust_coefficient=trust_coefficient, eps=eps,
            param_norm_bounds=param_norm_bounds,
            trust_ratio_bounds=trust_ratio_bounds)
      else:
        r, raw = 1.0, math.nan
      step = -lr * r * direction
      new_x.append(x[i] + step)
      updates.append(step)
      ratios.append(r)
      raw_ratios.append(raw)
      p_norms.append(p_norm)
      m_norms.append(m_norm)
    x = new_x
    steps.append(Step(
        params=[p.copy() for p in x], updates=updates, ratios=ratios,
        raw_ratios=raw_ratios, param_norms=p_norms, update_norms=m_norms,
        update_abs_norms=m_abs_norms, learning_rate=lr, weight_decay=wd))
  return steps
