r"""LAMB: Adam's direction rescaled per layer by a trust ratio.

`lamb` is an optax chain of small transforms; `lamb(..., store_direction=True)`
adds one that keeps the direction in the state (see `stored_direction`).
"""

from __future__ import annotations

from typing import Any, Optional
import warnings

import optax

from lamb_optax._src import adam
from lamb_optax._src import clipping
from lamb_optax._src import layers
from lamb_optax._src import stored_direction
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation
from lamb_optax._src.checked import checked_chain


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
    nu_dtype: Optional[Any] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    store_direction: bool = False,
    fused: Optional[bool] = None,
) -> optax.GradientTransformation:
  r"""The LAMB optimizer (Algorithm 2 of You et al., 2020).

  A *layer* is one leaf of the parameter pytree (or one slice of a stacked
  leaf, see ``layer_axes``). At step :math:`t`, for each
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

  It is exactly::

    optax.chain(
        optax.clip_by_global_norm(max_grad_norm),   # only if set
        lamb_optax.scale_by_adam(b1, b2, eps, eps_root, ...),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        lamb_optax.store_in_state(trust_ratio_mask),  # if store_direction
        lamb_optax.scale_by_trust_ratio(mask=trust_ratio_mask, ...),
        optax.scale_by_learning_rate(learning_rate),
    )

  and with the defaults it computes what :func:`optax.lamb` computes (with a
  more accurate :math:`1-\beta^t`, see :func:`lamb_optax.scale_by_adam`).

  ``store_direction=True`` is the fast path on CPU: the chain gains
  ``lamb_optax.store_in_state(trust_ratio_mask)`` between the decay and the
  ratio, which keeps :math:`u_t` in a params-shaped buffer of the optimizer
  state (a :class:`lamb_optax.StoredDirectionState`). In a jitted step that
  donates the state, XLA writes :math:`u_t` there in place instead of into
  a fresh parameter-sized temporary, whose page faults are most of the
  default's step time on CPU (on BERT-base, 1.7x AdamW's step instead of
  2.6x; see docs/performance.md). The updates are the same numbers either
  way, and :math:`\|x_{t+1}-x_t\| = \eta_t\,r_t\|u_t\|` holds by
  construction in both (:math:`u_t` is computed once). The cost is memory:
  one more params-shaped array of state for the leaves in
  ``trust_ratio_mask`` (4 bytes per parameter, in float32 for float32 and
  bfloat16 params alike; 438 MB on BERT-base), held between steps, where
  the default's temporary lives only during the step. The state layout
  depends on this argument only, never on the backend: a checkpoint
  restores on any backend into an optimizer built with the same
  ``store_direction``.

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
    mu_dtype: Optional dtype of the first moment (e.g. ``jnp.bfloat16`` to
      halve its memory); None keeps the params' dtype.
    nu_dtype: Optional dtype of the second moment; None keeps the params'
      dtype.
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), so each layer gets its own ratio; see
      :func:`lamb_optax.scale_by_trust_ratio` and
      :func:`lamb_optax.layer_axes_from_metadata`.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along;
      the trust ratio's squared norms and the ``max_grad_norm`` global norm
      are summed over them. See :func:`lamb_optax.scale_by_trust_ratio` and
      :func:`lamb_optax.axis_names_from_specs`.
    store_direction: Keep :math:`u_t` in the optimizer state (the fast path
      on CPU; 4 more bytes of state per float32 parameter; see above).
    fused: Deprecated alias of ``store_direction`` (it named an earlier
      mechanism); warns.

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
  validation.check_learning_rate(learning_rate)
  validation.check_finite_non_negative("weight_decay", weight_decay)
  if max_grad_norm is not None:
    validation.check_positive("max_grad_norm", max_grad_norm)
  if fused is not None:
    validation.check_bool("fused", fused)
    warnings.warn(
        "`fused=` is deprecated: pass `store_direction=True` for the fast "
        "path (the direction u is then kept in the optimizer state, 4 bytes "
        "per float32 parameter; see lamb_optax.lamb's docstring).",
        DeprecationWarning, stacklevel=2)
    store_direction = store_direction or fused
  validation.check_bool("store_direction", store_direction)
  trust_tx = trust_ratio.trust_ratio_from_arguments(
      mask=trust_ratio_mask, mask_name="trust_ratio_mask",
      param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds, layer_axes=layer_axes,
      axis_name=axis_name)
  parts = [
      adam.scale_by_adam(
          b1=b1, b2=b2, eps=eps, eps_root=eps_root,
          bias_correction=bias_correction, nesterov=nesterov,
          mu_dtype=mu_dtype, nu_dtype=nu_dtype),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
  ]
  if max_grad_norm is not None:
    parts.insert(0, clipping.clip_by_global_norm(max_grad_norm, axis_name))
  if store_direction:
    parts.append(stored_direction.store_in_state(mask=trust_ratio_mask))
  parts += [trust_tx, optax.scale_by_learning_rate(learning_rate)]
  return checked_chain(optax.chain(*parts), name="lamb",
                       weight_decay_mask=weight_decay_mask,
                       trust_ratio_mask=trust_ratio_mask)
