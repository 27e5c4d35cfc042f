r"""LAMB: Adam's direction rescaled per layer by a trust ratio."""

from __future__ import annotations

from typing import Any, Optional

import optax

from lamb_optax._src import adam
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation


def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    eps_root: float = 0.0,
    bias_correction: bool = True,
    nesterov: Optional[str] = None,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    max_grad_norm: Optional[float] = None,
    mu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""The LAMB optimizer (Algorithm 2 of You et al., 2020).

  A *layer* is one leaf of the parameter pytree. At step :math:`t`, for each
  layer with parameters :math:`x_t` and gradient :math:`g_t` (globally
  clipped to ``max_grad_norm`` first when it is set, NVIDIA's
  pre-normalisation):

  .. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
    u_t &= \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
           + \lambda x_t, \\
    r_t &= \frac{\phi(\|x_t\|)}{\|u_t\|}, \\
    x_{t+1} &= x_t - \eta_t \, r_t \, u_t,

  with :math:`\hat m, \hat v` the bias-corrected moments (see
  :func:`lamb_optax.scale_by_adam` for ``bias_correction`` and the N-LAMB /
  NN-LAMB ``nesterov`` forms), :math:`\lambda` the ``weight_decay`` (inside
  the norm, as in the paper), :math:`\phi` the identity or a clip to
  ``param_norm_bounds``, :math:`r_t = 1` where :math:`\phi(\|x\|)=0` or
  :math:`\|u\|=0`, then :math:`r_t` clipped to ``trust_ratio_bounds``. Layers
  outside ``weight_decay_mask`` get no decay; layers outside
  ``trust_ratio_mask`` get :math:`r_t = 1` (a plain Adam(+decay) step). For
  BERT's convention (no decay and no ratio on biases and LayerNorm) pass
  :func:`lamb_optax.masks.exclude_bias_and_norm` to both masks.

  This is exactly::

    optax.chain(
        optax.clip_by_global_norm(max_grad_norm),   # only if set
        lamb_optax.scale_by_adam(b1, b2, eps, eps_root, ...),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        lamb_optax.scale_by_trust_ratio(mask=trust_ratio_mask, ...),
        optax.scale_by_learning_rate(learning_rate),
    )

  With the defaults it computes what :func:`optax.lamb` computes.

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to the denominator outside the square root, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    eps_root: Added to the second moment inside the square root, >= 0.
    bias_correction: Whether the moments are bias corrected.
    nesterov: None, ``"n"`` (N-LAMB) or ``"nn"`` (NN-LAMB).
    weight_decay_mask: Bool pytree (or prefix, or callable) selecting the
      leaves that get weight decay; None decays all.
    trust_ratio_mask: Bool pytree (or prefix, or callable) selecting the
      leaves that get the trust ratio; None adapts all.
    param_norm_bounds: Optional ``(lo, hi)`` bounds of :math:`\phi`.
    trust_ratio_bounds: Optional ``(lo, hi)`` bounds of :math:`r`.
    max_grad_norm: Optional global gradient-norm clip (> 0) applied to the raw
      gradients before the moments.
    mu_dtype: Optional dtype of the first moment.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lamb_optax
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = lamb_optax.lamb(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    7.942

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  validation.check_non_negative("weight_decay", weight_decay)
  if max_grad_norm is not None:
    validation.check_positive("max_grad_norm", max_grad_norm)
  parts = []
  if max_grad_norm is not None:
    parts.append(optax.clip_by_global_norm(max_grad_norm))
  parts += [
      adam.scale_by_adam(
          b1=b1, b2=b2, eps=eps, eps_root=eps_root,
          bias_correction=bias_correction, nesterov=nesterov,
          mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      trust_ratio.scale_by_trust_ratio(
          mask=trust_ratio_mask,
          param_norm_bounds=param_norm_bounds,
          trust_ratio_bounds=trust_ratio_bounds),
      optax.scale_by_learning_rate(learning_rate),
  ]
  return optax.chain(*parts)
