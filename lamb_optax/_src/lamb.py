r"""LAMB: Adam's direction rescaled per layer by a trust ratio.

`lamb` is an optax chain of small transforms. `lamb(..., fused=True)` keeps
the chain's state but computes the update in two fused passes per layer (see
`adam.direction`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import adam
from lamb_optax._src import layers
from lamb_optax._src.checked import checked_chain
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation


# Layers with fewer elements store u even in the fused update (see below).
FUSED_MIN_SIZE = 1 << 16


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
    fused: bool = False,
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
        lamb_optax.scale_by_trust_ratio(mask=trust_ratio_mask, ...),
        optax.scale_by_learning_rate(learning_rate),
    )

  and with the defaults it computes what :func:`optax.lamb` computes (with a
  more accurate :math:`1-\beta^t`, see :func:`lamb_optax.scale_by_adam`).

  ``fused=True`` keeps that state but computes the update in two passes per
  layer: a reduction that recomputes :math:`u_t` from the new moments and
  the parameters, and the elementwise step. :math:`u_t` is never stored, so
  XLA allocates no parameter-sized temporary: the chain (like
  :func:`optax.lamb`) makes XLA write :math:`u_t` to one, which on CPU
  costs a page fault per 4 KiB every step (see ``benchmarks/update_step.py``).
  The two evaluations of :math:`u_t` are written so that XLA compiles them
  to the same arithmetic (they agree bit for bit in the tests, including
  where decay cancels the Adam direction to rounding), but that rests on
  how XLA rewrites them: the default, which computes :math:`u_t` once, keeps
  :math:`\|x_{t+1}-x_t\| = \eta_t\,r_t\|u_t\|` by construction. Layers
  with fewer than 65536 elements store :math:`u_t` in both modes.

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
    fused: Compute the update in two fused passes with no parameter-sized
      temporary (faster on CPU; see above).

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
  if not isinstance(fused, bool):
    raise TypeError(f"`fused` must be a bool, got {fused!r}.")
  param_norm_bounds = validation.check_bounds(
      "param_norm_bounds", param_norm_bounds)
  trust_ratio_bounds = validation.check_bounds(
      "trust_ratio_bounds", trust_ratio_bounds)
  adam_tx = adam.scale_by_adam(
      b1=b1, b2=b2, eps=eps, eps_root=eps_root,
      bias_correction=bias_correction, nesterov=nesterov, mu_dtype=mu_dtype,
      nu_dtype=nu_dtype)
  decay_tx = optax.add_decayed_weights(weight_decay, weight_decay_mask)
  trust_tx = trust_ratio.trust_ratio_transform(
      trust_coefficient=1.0, eps=0.0,
      param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds,
      mask=trust_ratio_mask, mask_name="trust_ratio_mask",
      layer_axes=layer_axes, axis_name=axis_name)
  lr_tx = optax.scale_by_learning_rate(learning_rate)
  parts = [adam_tx, decay_tx, trust_tx, lr_tx]
  if max_grad_norm is not None:
    parts.insert(0, trust_ratio.clip_by_global_norm(max_grad_norm, axis_name))
  chain = optax.chain(*parts)
  no_decay = (isinstance(weight_decay, (int, float))
              and not isinstance(weight_decay, bool) and weight_decay == 0)
  checked = checked_chain(chain, name="lamb",
                          weight_decay_mask=weight_decay_mask,
                          trust_ratio_mask=trust_ratio_mask)
  if not fused:
    return optax.GradientTransformation(checked.init, checked.update)

  def update_fn(updates, state, params=None):
    """The chain's update, computed in two fused passes (see module doc)."""
    checked.check_update_args(updates, params)
    if max_grad_norm is not None:
      clip_state, *state = state
    adam_state, decay_state, _, lr_state = state  # ratios: recomputed

    treedef = jax.tree.structure(params)
    flat_params = treedef.flatten_up_to(params)
    flat_grads = treedef.flatten_up_to(updates)
    validation.check_same_structure(adam_state.mu, updates, "updates",
                                    "the params given to init")
    flat_mu = treedef.flatten_up_to(adam_state.mu)
    flat_nu = treedef.flatten_up_to(adam_state.nu)
    flat_decay = ([False] * len(flat_params) if no_decay else
                  validation.resolve_mask(
                      weight_decay_mask, params, "weight_decay_mask"))
    flat_adapt = validation.resolve_mask(
        trust_ratio_mask, params, "trust_ratio_mask")
    flat_axes = layers.resolve_layer_axes(layer_axes, params)
    flat_names = layers.resolve_axis_names(axis_name, params)

    # Scalars of this step, and the states of the scalar-only transforms.
    count = optax.safe_int32_increment(adam_state.count)
    sc = adam.adam_scalars(count, b1, b2, bias_correction)
    neg_lr, lr_state = lr_tx.update(jnp.ones([], jnp.float32), lr_state)
    if callable(weight_decay):
      (decay_count,) = jax.tree.leaves(decay_state)
      wd = weight_decay(decay_count)
      decay_state = jax.tree.map(optax.safe_int32_increment, decay_state)
    else:
      wd = weight_decay
    grad_dtypes = [g.dtype for g in flat_grads]
    if max_grad_norm is not None:
      global_norm = trust_ratio.global_norm(updates, axis_name)
      clip_scale = jnp.where(global_norm < max_grad_norm, 1.0,
                             max_grad_norm / global_norm)
      flat_grads = [(g.astype(adam.compute_dtype(g.dtype))
                     * clip_scale.astype(adam.compute_dtype(g.dtype)))
                    for g in flat_grads]
    hyper = dict(b1=b1, b2=b2, eps=eps, eps_root=eps_root, nesterov=nesterov)

    out_updates, out_mu, out_nu, ratios = [], [], [], []
    for g, mu, nu, x, decay, adapt, dtype, axes, names in zip(
        flat_grads, flat_mu, flat_nu, flat_params, flat_decay, flat_adapt,
        grad_dtypes, flat_axes, flat_names):
      m, v = adam.moments(g, mu, nu, b1, b2)
      cdt = m.dtype

      def decayed(u, one=None, decay=decay, x=x, cdt=cdt):
        if not decay:
          return u
        w = jnp.asarray(wd, cdt)
        return u + (w if one is None else w * one.astype(cdt)) * x.astype(cdt)

      u = decayed(adam.direction(m, v, g, sc, **hyper))
      ratio = jnp.ones([x.shape[i] for i in axes], jnp.float32)
      if adapt:
        param_sq = trust_ratio.layer_squared_norms(x, axes, names)
        if x.size < FUSED_MIN_SIZE:
          # Small layers: storing u costs little, and a second evaluation
          # would cost XLA more kernels (compile time) than it saves.
          u_norm = u
        else:
          # A runtime 1.0 unique to this leaf (param_sq >= 0), so that the
          # scalars of the norm pass are neither constants nor shared
          # between leaves of one shape (see adam.direction).
          one = 1.0 + jnp.minimum(jnp.min(param_sq), 0.0).astype(jnp.float32)
          # Bit for bit the `u` above, written so that XLA recomputes it in
          # the reduction instead of storing it (see adam.direction).
          u_norm = decayed(adam.direction(m, v, g, sc, one=one, **hyper), one)
        ratio = trust_ratio.trust_ratio_from_norms(
            jnp.sqrt(param_sq),
            jnp.sqrt(trust_ratio.layer_squared_norms(u_norm, axes, names)),
            param_norm_bounds=param_norm_bounds,
            trust_ratio_bounds=trust_ratio_bounds)
        trust_ratio.check_ratio(ratio, x, axes)
      step = trust_ratio.expand_ratio((neg_lr * ratio).astype(cdt), u.ndim,
                                      axes) * u
      out_updates.append(step.astype(dtype))
      out_mu.append(m.astype(mu.dtype))
      out_nu.append(v.astype(nu.dtype))
      ratios.append(ratio)

    new_state = (
        optax.ScaleByAdamState(count=count, mu=treedef.unflatten(out_mu),
                               nu=treedef.unflatten(out_nu)),
        decay_state,
        trust_ratio.ScaleByTrustRatioState(
            trust_ratios=treedef.unflatten(ratios)),
        lr_state,
    )
    if max_grad_norm is not None:
      new_state = (clip_state,) + new_state
    return treedef.unflatten(out_updates), new_state

  return optax.GradientTransformation(checked.init, update_fn)
