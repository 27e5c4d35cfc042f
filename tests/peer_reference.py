"""Float64 NumPy statements of the LAMBs of other libraries.

Each function follows the peer's own update loop, as its source code reads
(the files are named in each docstring), in float64; none calls lamb_optax or
optax. The peers' parameter groups are expressed as a per-layer list of bools
(``weight_decay_mask``: the layers whose group has the decay; None: all).

Conventions are those of reference.py: layers are the entries of a list of
arrays (``jax.tree.leaves`` order), ``t`` starts at 1, schedules are callables
of the 0-based count ``t - 1``, and each step returns a ``reference.Step``
(the ratio recorded is the peer's trust ratio / "lamb coefficient" itself,
before any learning-rate or bias-correction factor).

``update_abs_norms`` is the norm of the same direction computed from absolute
values (|g|, |x|): its ratio to the true norm bounds the cancellation in the
direction, which the comparison's ratio tolerance scales with.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Optional, Sequence, Union

import numpy as np

from reference import Step, norm

Schedule = Union[float, Callable[[int], float]]


def _value(schedule: Schedule, count: int) -> float:
  return float(schedule(count)) if callable(schedule) else float(schedule)


def _mask(mask: Optional[Sequence[bool]], n: int) -> list[bool]:
  return [True] * n if mask is None else [bool(m) for m in mask]


def _global_norm(grads) -> float:
  return math.sqrt(sum(norm(g) ** 2 for g in grads))


class _Run:
  """Parameters and per-step bookkeeping shared by the peers' loops."""

  def __init__(self, params):
    self.x = [np.array(p, np.float64) for p in params]
    self.n = len(self.x)
    self.m = [np.zeros_like(p) for p in self.x]
    self.v = [np.zeros_like(p) for p in self.x]
    self.m_abs = [np.zeros_like(p) for p in self.x]
    self.steps: list[Step] = []
    self._reset()

  def _reset(self):
    self.new_x, self.updates, self.ratios = [], [], []
    self.p_norms, self.u_norms, self.u_abs_norms = [], [], []

  def record(self, i, new_x, ratio, p_norm, u_norm, u_abs_norm):
    self.updates.append(new_x - self.x[i])
    self.new_x.append(new_x)
    self.ratios.append(float(ratio))
    self.p_norms.append(p_norm)
    self.u_norms.append(u_norm)
    self.u_abs_norms.append(u_abs_norm)

  def end_step(self, lr, wd, global_norm=math.nan, clipped=False):
    self.x = self.new_x
    self.steps.append(Step(
        params=[p.copy() for p in self.x], updates=self.updates,
        ratios=self.ratios, raw_ratios=list(self.ratios),
        param_norms=self.p_norms, update_norms=self.u_norms,
        update_abs_norms=self.u_abs_norms, learning_rate=lr,
        weight_decay=wd, grad_global_norm=global_norm, grads_clipped=clipped))
    self._reset()


def _ratio_or_one(w_norm: float, u_norm: float) -> float:
  """torch.where(w_norm > 0, torch.where(g_norm > 0, w/g, 1), 1)."""
  return w_norm / u_norm if (w_norm > 0 and u_norm > 0) else 1.0


def nvlamb(params, grads_seq, *, learning_rate: Schedule = 1e-3,
           b1=0.9, b2=0.999, eps=1e-6, weight_decay: Schedule = 0.01,
           weight_decay_mask=None, max_grad_norm: Optional[float] = 1.0,
           bias_correction=True, grad_averaging=True, adam_w_mode=True,
           use_nvlamb=False) -> list[Step]:
  """apex ``FusedLAMB`` (``csrc/multi_tensor_lamb.cu``, stages 1 and 2).

  clipped_global_grad_norm = G > max ? G / max : 1;
  g = g / clipped;  (L2 mode: g += decay * p);
  m = b1 m + beta3 g (beta3 = 1 - b1 if grad_averaging else 1);
  v = b2 v + (1 - b2) g^2;  update = (m / c1) / (sqrt(v / c2) + eps)
  (AdamW mode: + decay * p);  ratio = lr * |p| / |update| if
  (use_nvlamb or decay != 0) and both norms != 0, else lr;  p -= ratio * u.
  ``max_grad_norm=None`` skips the clip (apex always has one).
  """
  run = _Run(params)
  decay_mask = _mask(weight_decay_mask, run.n)
  for t, grads in enumerate(grads_seq, start=1):
    lr, wd = _value(learning_rate, t - 1), _value(weight_decay, t - 1)
    grads = [np.asarray(g, np.float64) for g in grads]
    global_norm = _global_norm(grads)
    clipped = max_grad_norm is not None and global_norm > max_grad_norm
    clip = global_norm / max_grad_norm if clipped else 1.0
    beta3 = 1.0 - b1 if grad_averaging else 1.0
    c1, c2 = ((1.0 - b1 ** t, 1.0 - b2 ** t) if bias_correction
              else (1.0, 1.0))
    for i in range(run.n):
      decay = wd if decay_mask[i] else 0.0  # the parameter group's decay
      x = run.x[i]
      g = grads[i] / clip
      g_abs = np.abs(g)
      if not adam_w_mode:
        g = g + decay * x
        g_abs = g_abs + abs(decay) * np.abs(x)
      run.m[i] = run.m[i] * b1 + beta3 * g
      run.v[i] = run.v[i] * b2 + (1.0 - b2) * g * g
      run.m_abs[i] = run.m_abs[i] * b1 + beta3 * g_abs
      denom = np.sqrt(run.v[i] / c2) + eps
      u = (run.m[i] / c1) / denom
      u_abs = (run.m_abs[i] / c1) / denom
      if adam_w_mode:
        u = u + decay * x
        u_abs = u_abs + abs(decay) * np.abs(x)
      p_norm, u_norm = norm(x), norm(u)
      ratio = 1.0
      if use_nvlamb or decay != 0.0:
        ratio = _ratio_or_one(p_norm, u_norm)
      run.record(i, x - lr * ratio * u, ratio, p_norm, u_norm, norm(u_abs))
    run.end_step(lr, wd, global_norm, clipped)
  return run.steps


def timm(params, grads_seq, *, learning_rate: Schedule = 1e-3, b1=0.9,
         b2=0.999, eps=1e-6, weight_decay: Schedule = 0.01,
         weight_decay_mask=None, max_grad_norm: Optional[float] = 1.0,
         trust_clip=False, always_adapt=False,
         bias_correction=True) -> list[Step]:
  """timm ``Lamb`` (``timm/optim/lamb.py``, ``_single_tensor_lamb``).

  clip = max(G / max_grad_norm, 1); g = g / clip;
  m.lerp_(g, 1 - b1); v = b2 v + (1 - b2) g^2;
  denom = sqrt(v) / sqrt(c2) + eps; update = (m / c1) / denom;
  if wd != 0: update += wd p;
  if wd != 0 or always_adapt: update *= trust_ratio (1 if a norm is 0;
  min(., 1) if trust_clip); p -= lr update.
  """
  run = _Run(params)
  decay_mask = _mask(weight_decay_mask, run.n)
  for t, grads in enumerate(grads_seq, start=1):
    lr, wd = _value(learning_rate, t - 1), _value(weight_decay, t - 1)
    grads = [np.asarray(g, np.float64) for g in grads]
    global_norm = _global_norm(grads)
    clip = 1.0
    if max_grad_norm is not None:
      clip = max(global_norm / max_grad_norm, 1.0)
    c1, c2 = ((1.0 - b1 ** t, 1.0 - b2 ** t) if bias_correction
              else (1.0, 1.0))
    for i in range(run.n):
      decay = wd if decay_mask[i] else 0.0
      x = run.x[i]
      g = grads[i] / clip
      run.m[i] = run.m[i] + (g - run.m[i]) * (1.0 - b1)
      run.v[i] = run.v[i] * b2 + (1.0 - b2) * g * g
      run.m_abs[i] = run.m_abs[i] * b1 + (1.0 - b1) * np.abs(g)
      denom = np.sqrt(run.v[i]) / math.sqrt(c2) + eps
      u = (run.m[i] / c1) / denom
      u_abs = (run.m_abs[i] / c1) / denom
      if decay != 0:
        u = u + decay * x
        u_abs = u_abs + abs(decay) * np.abs(x)
      p_norm, u_norm = norm(x), norm(u)
      ratio = 1.0
      if decay != 0 or always_adapt:
        ratio = _ratio_or_one(p_norm, u_norm)
        if trust_clip:
          ratio = min(ratio, 1.0)
      run.record(i, x - lr * (ratio * u), ratio, p_norm, u_norm, norm(u_abs))
    run.end_step(lr, wd, global_norm, clip > 1.0)
  return run.steps


def torch_optimizer(params, grads_seq, *, learning_rate: Schedule = 1e-3,
                    b1=0.9, b2=0.999, eps=1e-6, weight_decay: Schedule = 0.0,
                    weight_decay_mask=None, clamp_value=10.0, debias=False,
                    adam=False) -> list[Step]:
  """torch-optimizer ``Lamb`` (``torch_optimizer/lamb.py``).

  m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2 (raw);
  step_size = lr * (sqrt(c2) / c1 if debias else 1);
  weight_norm = |p|.clamp(0, clamp_value);
  adam_step = m / (sqrt(v) + eps); if wd != 0: adam_step += wd p;
  trust_ratio = 1 if weight_norm == 0 or |adam_step| == 0 else
  weight_norm / |adam_step|; if adam: trust_ratio = 1;
  p -= step_size * trust_ratio * adam_step.
  """
  run = _Run(params)
  decay_mask = _mask(weight_decay_mask, run.n)
  for t, grads in enumerate(grads_seq, start=1):
    lr, wd = _value(learning_rate, t - 1), _value(weight_decay, t - 1)
    grads = [np.asarray(g, np.float64) for g in grads]
    step_size = lr
    if debias:
      step_size = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    for i in range(run.n):
      decay = wd if decay_mask[i] else 0.0
      x, g = run.x[i], grads[i]
      run.m[i] = run.m[i] * b1 + (1.0 - b1) * g
      run.v[i] = run.v[i] * b2 + (1.0 - b2) * g * g
      run.m_abs[i] = run.m_abs[i] * b1 + (1.0 - b1) * np.abs(g)
      weight_norm = min(max(norm(x), 0.0), clamp_value)
      denom = np.sqrt(run.v[i]) + eps
      adam_step = run.m[i] / denom
      u_abs = run.m_abs[i] / denom
      if decay != 0:
        adam_step = adam_step + decay * x
        u_abs = u_abs + abs(decay) * np.abs(x)
      adam_norm = norm(adam_step)
      if weight_norm == 0 or adam_norm == 0:
        ratio = 1.0
      else:
        ratio = weight_norm / adam_norm
      if adam:
        ratio = 1.0
      run.record(i, x - step_size * ratio * adam_step, ratio, norm(x),
                 adam_norm, norm(u_abs))
    run.end_step(lr, wd)
  return run.steps


def deepspeed(params, grads_seq, *, learning_rate: Schedule = 1e-3, b1=0.9,
              b2=0.999, eps=1e-8, weight_decay: Schedule = 0.0,
              weight_decay_mask=None, bias_correction=True,
              max_grad_norm: Optional[float] = None, max_coeff=10.0,
              min_coeff=0.01, eps_inside_sqrt=False) -> list[Step]:
  """DeepSpeed ``FusedLamb`` (``deepspeed/ops/lamb/fused_lamb.py``,
  ``csrc/lamb/fused_lamb_cuda_kernel.cu``), the caller's norm being the global
  gradient norm.

  clip = (G + 1e-6) / max_grad_norm; combined_scale = clip if clip > 1 else 1;
  g = g / combined_scale; m, v raw;
  denom = sqrt(v + eps) (eps_inside_sqrt) or sqrt(v) + eps;
  update = m / denom + decay p;
  lamb_coeff = 1, or clip(|p| / |update|, min_coeff, max_coeff) when both
  norms are != 0; step_size = lr sqrt(c2) / c1 (bias_correction) or lr;
  p -= step_size * lamb_coeff * update.
  """
  run = _Run(params)
  decay_mask = _mask(weight_decay_mask, run.n)
  for t, grads in enumerate(grads_seq, start=1):
    lr, wd = _value(learning_rate, t - 1), _value(weight_decay, t - 1)
    grads = [np.asarray(g, np.float64) for g in grads]
    global_norm = _global_norm(grads)
    combined_scale = 1.0
    if max_grad_norm is not None and max_grad_norm > 0:
      clip = (global_norm + 1e-6) / max_grad_norm
      if clip > 1:
        combined_scale = clip
    if bias_correction:
      step_size = lr * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    else:
      step_size = lr
    for i in range(run.n):
      decay = wd if decay_mask[i] else 0.0
      x = run.x[i]
      g = grads[i] / combined_scale
      run.m[i] = b1 * run.m[i] + (1.0 - b1) * g
      run.v[i] = b2 * run.v[i] + (1.0 - b2) * g * g
      run.m_abs[i] = b1 * run.m_abs[i] + (1.0 - b1) * np.abs(g)
      if eps_inside_sqrt:
        denom = np.sqrt(run.v[i] + eps)
      else:
        denom = np.sqrt(run.v[i]) + eps
      u = run.m[i] / denom + decay * x
      u_abs = run.m_abs[i] / denom + abs(decay) * np.abs(x)
      w_norm, u_norm = norm(x), norm(u)
      coeff = 1.0
      if w_norm != 0 and u_norm != 0:
        coeff = min(max(w_norm / u_norm, min_coeff), max_coeff)
      run.record(i, x - step_size * coeff * u, coeff, w_norm, u_norm,
                 norm(u_abs))
    run.end_step(lr, wd, global_norm, combined_scale > 1.0)
  return run.steps


def tensorflow(params, grads_seq, paths: Sequence[str], *,
               learning_rate: Schedule = 1e-3, b1=0.9, b2=0.999, eps=1e-6,
               weight_decay: Schedule = 0.0, exclude_from_weight_decay=None,
               exclude_from_layer_adaptation=None) -> list[Step]:
  """TF Addons ``LAMB`` (``tensorflow_addons/optimizers/lamb.py``; tf-models'
  copy is the same), with ``paths`` the variable names.

  update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps);
  if _do_use_weight_decay(name): update += wd var;
  ratio = 1, or where(|w| > 0, where(|u| > 0, |w| / |u|, 1), 1) if
  _do_layer_adaptation(name); var -= ratio * lr * update.
  exclude_from_layer_adaptation falls back to exclude_from_weight_decay when
  it is falsy (None or empty); names are excluded by re.search.
  """
  if exclude_from_layer_adaptation:
    layer_exclusions = exclude_from_layer_adaptation
  else:
    layer_exclusions = exclude_from_weight_decay

  def excluded(patterns, name):
    return bool(patterns) and any(re.search(r, name) is not None
                                  for r in patterns)

  run = _Run(params)
  assert len(paths) == run.n
  for t, grads in enumerate(grads_seq, start=1):
    lr, wd = _value(learning_rate, t - 1), _value(weight_decay, t - 1)
    grads = [np.asarray(g, np.float64) for g in grads]
    for i in range(run.n):
      x, g = run.x[i], grads[i]
      run.m[i] = run.m[i] * b1 + g * (1.0 - b1)
      run.v[i] = run.v[i] * b2 + (g * g) * (1.0 - b2)
      run.m_abs[i] = run.m_abs[i] * b1 + np.abs(g) * (1.0 - b1)
      v_sqrt = np.sqrt(run.v[i] / (1.0 - b2 ** t))
      update = (run.m[i] / (1.0 - b1 ** t)) / (v_sqrt + eps)
      u_abs = (run.m_abs[i] / (1.0 - b1 ** t)) / (v_sqrt + eps)
      if not excluded(exclude_from_weight_decay, paths[i]):
        update = update + wd * x
        u_abs = u_abs + abs(wd) * np.abs(x)
      ratio = 1.0
      if not excluded(layer_exclusions, paths[i]):
        ratio = _ratio_or_one(norm(x), norm(update))
      run.record(i, x - ratio * lr * update, ratio, norm(x), norm(update),
                 norm(u_abs))
    run.end_step(lr, wd)
  return run.steps


def keras(params, grads_seq, *, learning_rate: Schedule = 1e-3, b1=0.9,
          b2=0.999, eps=1e-7, weight_decay: Optional[Schedule] = None,
          weight_decay_mask=None,
          max_grad_norm: Optional[float] = None) -> list[Step]:
  """Keras 3 ``Lamb`` (``keras/src/optimizers/lamb.py``) under
  ``BaseOptimizer.apply``: clip (global_clipnorm), then
  ``_apply_weight_decay`` (var -= var * wd * lr), then ``update_step``:

  m += (g - m)(1 - b1); v += (g^2 - v)(1 - b2);
  update = (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps);
  ratio = |var| / |update| of the *decayed* var (1 if a norm is 0);
  var -= ratio * lr * update.
  """
  run = _Run(params)
  decay_mask = _mask(weight_decay_mask, run.n)
  for t, grads in enumerate(grads_seq, start=1):
    lr = _value(learning_rate, t - 1)
    wd = None if weight_decay is None else _value(weight_decay, t - 1)
    grads = [np.asarray(g, np.float64) for g in grads]
    global_norm = _global_norm(grads)
    clipped = False
    if max_grad_norm is not None:
      scale = max_grad_norm * min(1.0 / global_norm, 1.0 / max_grad_norm)
      clipped = scale < 1.0
      grads = [g * scale for g in grads]
    for i in range(run.n):
      x0 = run.x[i]
      x = x0
      if wd is not None and decay_mask[i]:
        x = x - x * wd * lr
      g = grads[i]
      run.m[i] = run.m[i] + (g - run.m[i]) * (1.0 - b1)
      run.v[i] = run.v[i] + (g * g - run.v[i]) * (1.0 - b2)
      run.m_abs[i] = run.m_abs[i] + (np.abs(g) - run.m_abs[i]) * (1.0 - b1)
      v_sqrt = np.sqrt(run.v[i] / (1.0 - b2 ** t)) + eps
      update = (run.m[i] / (1.0 - b1 ** t)) / v_sqrt
      u_abs = (run.m_abs[i] / (1.0 - b1 ** t)) / v_sqrt
      w_norm, g_norm = norm(x), norm(update)
      ratio = _ratio_or_one(w_norm, g_norm)
      # The move is relative to the parameters before the decay.
      run.updates.append(x - ratio * lr * update - x0)
      run.new_x.append(x - ratio * lr * update)
      run.ratios.append(ratio)
      run.p_norms.append(w_norm)
      run.u_norms.append(g_norm)
      run.u_abs_norms.append(norm(u_abs))
    run.end_step(lr, math.nan if wd is None else wd, global_norm, clipped)
  return run.steps
