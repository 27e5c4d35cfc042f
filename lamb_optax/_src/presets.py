r"""Per-peer LAMB presets: the numerics and defaults of each LAMB in use.

Each preset is an :func:`optax.chain` of the library's pieces
(:func:`optax.clip_by_global_norm`, :func:`lamb_optax.scale_by_adam`,
:func:`optax.add_decayed_weights`, :func:`lamb_optax.scale_by_trust_ratio`,
:func:`optax.scale_by_learning_rate`) and of the small transforms below, one
per way a peer departs from Algorithm 2 of You et al. (2020):

* :func:`_scale_by_peer_trust_ratio`: the library's one trust ratio
  (:func:`lamb_optax.scale_by_trust_ratio`'s engine) with a step count, for
  the rules that are options of it: a run-time gate on the weight decay
  (apex, timm: no ratio where the decay is 0), a clamp of :math:`\|x\|`
  (torch-optimizer), bounds that leave the fallback :math:`r = 1` alone
  (DeepSpeed) and the parameter norm taken after a decoupled decay (Keras).
  Its bounds may be traced values (``optax.inject_hyperparams`` injects
  every numeric argument, ``clamp_value`` and ``max_coeff`` too).
* :func:`_scale_by_bias_correction_factor`: :math:`\sqrt{1-\beta_2^t} /
  (1-\beta_1^t)` as a multiplier of the step (DeepSpeed, torch-optimizer's
  ``debias``).
* DeepSpeed's clip, with 1e-6 added to the norm: the library's global-norm
  clip with ``norm_offset=1e-6``.
* :func:`_add_decoupled_weight_decay`: Keras' :math:`x \mathrel{-}= \eta
  \lambda x`, outside the ratio.

A *layer* is one leaf of the parameter pytree in every preset, as one tensor
is in every peer, or with ``layer_axes`` one slice of a leaf that stacks
layers (scanned models); ``axis_name`` sums the norms (ratios and global clip)
over ``shard_map`` mesh axes. Both mean what they mean in
:func:`lamb_optax.lamb`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import adam as adam_lib
from lamb_optax._src import checked
from lamb_optax._src import clipping
from lamb_optax._src import layers
from lamb_optax._src import masks
from lamb_optax._src import numerics
from lamb_optax._src import prefix
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation

# --------------------------------------------------------------------------
# Small transforms for what the peers do differently.
# --------------------------------------------------------------------------


class PeerTrustRatioState(NamedTuple):
  """State of the presets' trust ratio: a step count (for weight-decay and
  learning-rate schedules) and the ratios of the last update, read with
  :func:`lamb_optax.trust_ratios`."""

  count: chex.Array
  trust: trust_ratio.ScaleByTrustRatioState


class CountState(NamedTuple):
  """A step count (int32), for the presets' scheduled scalars."""

  count: chex.Array


def _at(value: Any, count: chex.Array) -> Any:
  """A scalar or a schedule evaluated at the 0-based ``count``."""
  return value(count) if callable(value) else value


def _scale_by_peer_trust_ratio(
    *,
    mask: validation.MaskArg = None,
    mask_name: str = "trust_ratio_mask",
    gate_weight_decay: Optional[optax.ScalarOrSchedule] = None,
    options: trust_ratio.TrustRatioOptions = trust_ratio.TrustRatioOptions(),
    decoupled_decay: Optional[tuple[Any, Any, Any]] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""The engine's trust ratio (:func:`trust_ratio.scale_updates`) with a
  step count, for the peers' run-time rules.

  * ``gate_weight_decay`` (a scalar, a traced scalar or a schedule of the
    step): where its value is 0 every ratio is 1 (apex and timm adapt only
    layers whose decay is non-zero);
  * ``decoupled_decay = (learning_rate, weight_decay, mask)``: on the leaves
    of ``mask``, :math:`\phi` is the norm of :math:`x - \eta_t\lambda_t x`
    (Keras decays before the step);
  * ``options``: the :class:`trust_ratio.TrustRatioOptions` (bounds that
    may be traced, DeepSpeed's unclipped fallback).

  Leaves outside ``mask`` get :math:`r = 1`; ``layer_axes`` and
  ``axis_name`` are those of :func:`lamb_optax.scale_by_trust_ratio`.
  """
  decay_mask, decay_mask_name = False, "weight_decay_mask"
  if decoupled_decay is not None:
    decay_mask = decoupled_decay[2]
  specs_fn = functools.partial(
      trust_ratio.leaf_specs, adapt_mask=mask, adapt_mask_name=mask_name,
      decay_mask=decay_mask, decay_mask_name=decay_mask_name,
      layer_axes=layer_axes, axis_name=axis_name)

  def init_fn(params):
    validation.check_float_leaves(params, "params")
    return PeerTrustRatioState(
        count=jnp.zeros([], jnp.int32),
        trust=trust_ratio.initial_state(params, specs_fn(params)))

  def update_fn(updates, state, params=None):
    validation.check_params_present(params, "the trust ratio")
    validation.check_updates_match_params(updates, params)
    count = state.count
    gate = param_decay = None
    if gate_weight_decay is not None:
      gate = jnp.asarray(_at(gate_weight_decay, count)) != 0
    if decoupled_decay is not None:
      lr, wd, _ = decoupled_decay
      param_decay = jnp.asarray(_at(lr, count)) * jnp.asarray(_at(wd, count))
    scaled, trust = trust_ratio.scale_updates(
        updates, params, specs_fn(params), state.trust, options, gate=gate,
        param_decay=param_decay)
    return scaled, PeerTrustRatioState(
        count=optax.safe_int32_increment(count), trust=trust)

  return optax.GradientTransformation(init_fn, update_fn)


def _scale_by_bias_correction_factor(b1: Any, b2: Any
                                     ) -> optax.GradientTransformation:
  r"""Multiplies the updates by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.

  DeepSpeed and torch-optimizer (``debias=True``) keep raw moments and fold
  Adam's bias correction into the step size, after the trust ratio.
  """

  def init_fn(params):
    del params
    return CountState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    c1 = adam_lib.one_minus_power(base=b1, count=count)
    c2 = adam_lib.one_minus_power(base=b2, count=count)
    factor = jnp.sqrt(c2) / c1
    updates = jax.tree.map(
        lambda u: (u.astype(numerics.compute_dtype(u.dtype))
                   * factor).astype(u.dtype), updates)
    return updates, CountState(count=count)

  return optax.GradientTransformation(init_fn, update_fn)


def _add_decoupled_weight_decay(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule,
    mask: validation.MaskArg,
) -> optax.GradientTransformation:
  r"""Adds :math:`-\eta_t \lambda_t x` to the (final) updates of ``mask``."""

  def init_fn(params):
    del params
    return CountState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    validation.check_params_present(params, "keras (decoupled weight decay)")
    scale = (jnp.asarray(_at(learning_rate, state.count))
             * jnp.asarray(_at(weight_decay, state.count)))
    decayed = prefix.resolve_mask(mask, params, "weight_decay_mask")
    treedef = jax.tree.structure(params)

    def leaf(u, x, decay):
      if not decay:
        return u
      cdt = numerics.compute_dtype(u.dtype)
      return (u.astype(cdt) - x.astype(cdt) * scale.astype(cdt)).astype(u.dtype)

    return (jax.tree.map(leaf, updates, params, treedef.unflatten(decayed)),
            CountState(count=optax.safe_int32_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# Argument checks shared by the presets.
# --------------------------------------------------------------------------


def _check_common(learning_rate, eps, weight_decay, max_grad_norm=None):
  validation.check_learning_rate(learning_rate)
  validation.check_non_negative("eps", eps)
  if weight_decay is not None:
    validation.check_finite_non_negative("weight_decay", weight_decay)
  if max_grad_norm is not None:
    validation.check_positive("max_grad_norm", max_grad_norm)


def _finish(chain, *, name, weight_decay_mask=None, trust_ratio_mask=None):
  """The chain with the library's argument checks and dtype handling."""
  return checked.checked_chain(chain, name=name,
                               weight_decay_mask=weight_decay_mask,
                               trust_ratio_mask=trust_ratio_mask)


# --------------------------------------------------------------------------
# The presets.
# --------------------------------------------------------------------------


def nvlamb(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    *,
    weight_decay_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = 1.0,
    bias_correction: bool = True,
    grad_averaging: bool = True,
    adam_w_mode: bool = True,
    use_nvlamb: bool = False,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""NVIDIA's LAMB: ``apex.optimizers.FusedLAMB`` (as in NVIDIA's BERT).

  With :math:`G` the global norm of all gradients, :math:`\lambda_l` the
  decay of layer :math:`l` (``weight_decay`` on the leaves of
  ``weight_decay_mask``, 0 elsewhere: apex's parameter groups) and
  :math:`c_i = 1-\beta_i^t` (1 without ``bias_correction``):

  .. math::

    g &\leftarrow g / (G / \mathrm{max\_grad\_norm})
      \quad \text{if } G > \mathrm{max\_grad\_norm}, \\
    g &\leftarrow g + \lambda_l x \quad \text{(only if not adam\_w\_mode)}, \\
    m_t &= \beta_1 m_{t-1} + \beta_3 g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \quad
    \beta_3 = 1-\beta_1 \text{ (grad\_averaging) or } 1, \\
    u &= \frac{m_t/c_1}{\sqrt{v_t/c_2} + \epsilon}
      \; (+\, \lambda_l x \text{ if adam\_w\_mode}), \\
    r &= \|x\| / \|u\| \text{ if } \lambda_l \ne 0 \text{ or use\_nvlamb},
      \text{ else } 1; \quad r = 1 \text{ if a norm is } 0, \\
    x &\leftarrow x - \eta\, r\, u.

  How it differs from Algorithm 2 of the paper: the gradients are
  pre-normalised by their global norm (to ``max_grad_norm=1.0`` by
  default); layers without weight decay (biases and LayerNorm in BERT, or
  everything when ``weight_decay=0``) get no trust ratio unless
  ``use_nvlamb=True``; ``adam_w_mode=False`` turns the decay into an L2 term
  added to the gradient before the moments (then outside :math:`u`);
  ``grad_averaging=False`` accumulates :math:`m_t = \beta_1 m_{t-1} + g`
  (computed here as the averaged moment times :math:`1/(1-\beta_1)`, the
  same number since :math:`m` is linear in :math:`g` and :math:`\epsilon`
  sits in the denominator). ``eps`` is outside the square root, as in the
  paper.

  The defaults are apex's *code* defaults (``eps=1e-6``, ``weight_decay=0.01``,
  ``max_grad_norm=1.0``); its docstring states ``eps=1e-8`` and
  ``weight_decay=0`` (NVIDIA/apex#1186). Whether the ratio applies is decided
  at each step from the value of the decay (a schedule or an injected
  hyperparameter that reaches 0 switches it off), as apex decides it per
  parameter group at each call. ``max_grad_norm=None`` disables the clip
  (apex always clips).

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{\hat v}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    weight_decay_mask: Bool pytree (or prefix, or callable) of the leaves that
      get decay, and hence the ratio; None: all leaves.
    max_grad_norm: Global gradient-norm clip (> 0), or None.
    bias_correction: Whether the moments are bias corrected.
    grad_averaging: Whether the gradient enters :math:`m` with
      :math:`1-\beta_1`.
    adam_w_mode: Decay inside :math:`u` (True) or as L2 into :math:`g`.
    use_nvlamb: Apply the ratio to layers without decay too.
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), as in :func:`lamb_optax.lamb`: None (a layer is a leaf), an
      int or tuple of ints for every leaf, a per-leaf pytree (or prefix), or
      a callable ``params -> such a tree``. Norms reduce over the other
      axes; the ratios (and those in the state) have the layer axes' shape.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along
      (a name or tuple of names for every leaf, or a per-leaf pytree): the
      trust ratio's squared norms and the ``max_grad_norm`` global norm are
      summed over them, as in :func:`lamb_optax.lamb`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lamb_optax import presets
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = presets.nvlamb(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    7.927

  References:
    NVIDIA/apex, ``apex/optimizers/fused_lamb.py`` and
    ``csrc/multi_tensor_lamb.cu``; NVIDIA/DeepLearningExamples, BERT.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, eps, weight_decay, max_grad_norm)
  for name, value in (("bias_correction", bias_correction),
                      ("grad_averaging", grad_averaging),
                      ("adam_w_mode", adam_w_mode),
                      ("use_nvlamb", use_nvlamb)):
    validation.check_bool(name, value)
  parts = []
  if max_grad_norm is not None:
    parts.append(clipping.clip_by_global_norm(max_grad_norm, axis_name))
  decay_tx = optax.add_decayed_weights(weight_decay, weight_decay_mask)
  if not adam_w_mode:
    parts.append(decay_tx)  # L2: into the gradient, before the moments
  parts.append(adam_lib.scale_by_adam(b1=b1, b2=b2, eps=eps,
                                  bias_correction=bias_correction))
  if not grad_averaging:
    # m_t = b1 m_{t-1} + g is the averaged moment divided by 1 - b1.
    parts.append(optax.scale(1.0 / (1.0 - b1)))
  if adam_w_mode:
    parts.append(decay_tx)
  if use_nvlamb:
    parts.append(trust_ratio.scale_by_trust_ratio(
        layer_axes=layer_axes, axis_name=axis_name))
    trust_mask = None
  else:
    parts.append(_scale_by_peer_trust_ratio(
        mask=weight_decay_mask, mask_name="weight_decay_mask",
        gate_weight_decay=weight_decay, layer_axes=layer_axes,
        axis_name=axis_name))
    trust_mask = weight_decay_mask
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _finish(optax.chain(*parts), name="nvlamb",
                 weight_decay_mask=weight_decay_mask,
                 trust_ratio_mask=trust_mask)


def timm(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    *,
    weight_decay_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = 1.0,
    trust_clip: bool = False,
    always_adapt: bool = False,
    bias_correction: bool = True,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""timm's LAMB: ``timm.optim.Lamb`` (Ross Wightman's NVLAMB port).

  With :math:`G` the global gradient norm, :math:`\lambda_l` the decay of
  the layer (``weight_decay`` on ``weight_decay_mask``, else 0) and
  :math:`c_i = 1-\beta_i^t` (1 without ``bias_correction``):

  .. math::

    g &\leftarrow g / \max(G / \mathrm{max\_grad\_norm}, 1), \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
    u &= \frac{m_t / c_1}{\sqrt{v_t}/\sqrt{c_2} + \epsilon} + \lambda_l x, \\
    r &= \|x\| / \|u\| \text{ if } \lambda_l \ne 0 \text{ or always\_adapt},
      \text{ else } 1; \quad r = 1 \text{ if a norm is } 0; \quad
      r \leftarrow \min(r, 1) \text{ if trust\_clip}, \\
    x &\leftarrow x - \eta\, r\, u.

  timm writes the denominator as :math:`\sqrt{v_t}/\sqrt{c_2} + \epsilon`:
  the same number as the paper's :math:`\sqrt{v_t/c_2} + \epsilon` (eps
  outside the root, after the correction), unlike torch-optimizer and
  DeepSpeed. How it differs from Algorithm 2: the global clip to
  ``max_grad_norm=1.0`` (None disables it), no ratio on layers without decay
  unless ``always_adapt``, and LAMBC's ``trust_clip``. Defaults are timm's.
  timm's ``grad_averaging``, ``decoupled_decay``, ``caution`` and
  ``corrected_weight_decay`` options are not reproduced (their defaults,
  which this preset computes, are True, False, False, False).

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{v}/\sqrt{c_2}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    weight_decay_mask: Bool pytree (or prefix, or callable) of the leaves that
      get decay (and the ratio); None: all leaves.
    max_grad_norm: Global gradient-norm clip (> 0), or None.
    trust_clip: Cap the ratio at 1 (LAMBC).
    always_adapt: Apply the ratio to layers without decay too.
    bias_correction: Whether the moments are bias corrected.
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), as in :func:`lamb_optax.lamb`: None (a layer is a leaf), an
      int or tuple of ints for every leaf, a per-leaf pytree (or prefix), or
      a callable ``params -> such a tree``. Norms reduce over the other
      axes; the ratios (and those in the state) have the layer axes' shape.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along
      (a name or tuple of names for every leaf, or a per-leaf pytree): the
      trust ratio's squared norms and the ``max_grad_norm`` global norm are
      summed over them, as in :func:`lamb_optax.lamb`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lamb_optax import presets
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = presets.timm(learning_rate=0.1, trust_clip=True)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    10.601

  References:
    huggingface/pytorch-image-models, ``timm/optim/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, eps, weight_decay, max_grad_norm)
  for name, value in (("trust_clip", trust_clip),
                      ("always_adapt", always_adapt),
                      ("bias_correction", bias_correction)):
    validation.check_bool(name, value)
  parts = []
  if max_grad_norm is not None:
    parts.append(clipping.clip_by_global_norm(max_grad_norm, axis_name))
  parts.append(adam_lib.scale_by_adam(b1=b1, b2=b2, eps=eps,
                                  bias_correction=bias_correction))
  parts.append(optax.add_decayed_weights(weight_decay, weight_decay_mask))
  parts.append(_scale_by_peer_trust_ratio(
      mask=None if always_adapt else weight_decay_mask,
      mask_name="weight_decay_mask",
      gate_weight_decay=None if always_adapt else weight_decay,
      options=trust_ratio.TrustRatioOptions(
          trust_ratio_bounds=(0.0, 1.0) if trust_clip else None,
          bound_fallback=False),
      layer_axes=layer_axes, axis_name=axis_name))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _finish(optax.chain(*parts), name="timm",
                 weight_decay_mask=weight_decay_mask)


def torch_optimizer(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    weight_decay_mask: validation.MaskArg = None,
    clamp_value: float = 10.0,
    debias: bool = False,
    adam: bool = False,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""torch-optimizer's LAMB: ``torch_optimizer.Lamb`` (jettify).

  With raw (not bias-corrected) moments and :math:`c_i = 1-\beta_i^t`:

  .. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
    u &= \frac{m_t}{\sqrt{v_t} + \epsilon} + \lambda x, \\
    r &= \min(\|x\|, \mathrm{clamp\_value}) / \|u\|; \quad
      r = 1 \text{ if a norm is } 0 \text{ or adam}, \\
    x &\leftarrow x - \eta\, s_t\, r\, u, \quad
      s_t = \sqrt{c_2}/c_1 \text{ if debias, else } 1.

  How it differs from Algorithm 2: no bias correction by default (the
  paper's v3), so early steps see :math:`m/\sqrt{v}` of the raw moments;
  ``debias=True`` puts the correction in the step size *after* the ratio,
  which the ratio does not normalise away; :math:`\phi(z) = \min(z, 10)`;
  ``adam=True`` drops the ratio (Adam with decay in the update). Defaults
  are torch-optimizer's code defaults (its docstring says ``eps=1e-8``, the
  code uses 1e-6). torch-optimizer has no decay mask: its parameter groups
  with ``weight_decay=0`` are ``weight_decay_mask`` here.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{v}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    weight_decay_mask: Bool pytree (or prefix, or callable) of the leaves that
      get decay; None: all. Every leaf gets the ratio.
    clamp_value: Upper clamp of :math:`\|x\|` in the ratio, >= 0.
    debias: Multiply the step by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
    adam: Use :math:`r = 1` (no layer adaptation).
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), as in :func:`lamb_optax.lamb`: None (a layer is a leaf), an
      int or tuple of ints for every leaf, a per-leaf pytree (or prefix), or
      a callable ``params -> such a tree``. Norms reduce over the other
      axes; the ratios (and those in the state) have the layer axes' shape.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along
      (a name or tuple of names for every leaf, or a per-leaf pytree): the
      trust ratio's squared norms are summed over them, as in
      :func:`lamb_optax.lamb`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lamb_optax import presets
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = presets.torch_optimizer(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    7.942

  References:
    jettify/pytorch-optimizer, ``torch_optimizer/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, eps, weight_decay)
  validation.check_non_negative("clamp_value", clamp_value)
  validation.check_bool("debias", debias)
  validation.check_bool("adam", adam)
  parts = [
      adam_lib.scale_by_adam(b1=b1, b2=b2, eps=eps, bias_correction=False),
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      _scale_by_peer_trust_ratio(mask=False if adam else None,
                                 options=trust_ratio.TrustRatioOptions(
                                     param_norm_bounds=(0.0, clamp_value)),
                                 layer_axes=layer_axes, axis_name=axis_name),
  ]
  if debias:
    parts.append(_scale_by_bias_correction_factor(b1, b2))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _finish(optax.chain(*parts), name="torch_optimizer",
                 weight_decay_mask=weight_decay_mask)



def deepspeed(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    weight_decay_mask: validation.MaskArg = None,
    bias_correction: bool = True,
    max_grad_norm: Optional[float] = None,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    eps_inside_sqrt: bool = False,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""DeepSpeed's LAMB: ``deepspeed.ops.lamb.FusedLamb``.

  With raw moments, :math:`c_i = 1-\beta_i^t` and :math:`G` the global
  gradient norm:

  .. math::

    g &\leftarrow g / k, \quad
      k = (G + 10^{-6})/\mathrm{max\_grad\_norm} \text{ if } k > 1, \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
    u &= \frac{m_t}{\sqrt{v_t} + \epsilon} + \lambda x
      \quad \left(\frac{m_t}{\sqrt{v_t + \epsilon}} + \lambda x
      \text{ with eps\_inside\_sqrt}\right), \\
    r &= \mathrm{clip}(\|x\|/\|u\|, \mathrm{min\_coeff},
      \mathrm{max\_coeff}); \quad r = 1 \text{ if a norm is } 0, \\
    x &\leftarrow x - \eta\, s_t\, r\, u, \quad
      s_t = \sqrt{c_2}/c_1 \text{ if bias\_correction, else } 1.

  How it differs from Algorithm 2: the ratio is computed from the raw
  moments and the bias correction multiplies the step afterwards, so it is
  not normalised away by the ratio (the first step is
  :math:`\sqrt{1-\beta_2}/(1-\beta_1) \approx 0.32` times the paper's);
  ``eps`` is 1e-8 and may sit inside the root; the ratio is clipped to
  ``[min_coeff, max_coeff]`` (the 1 of a zero norm is not clipped).
  DeepSpeed clips with a norm its caller passes (``grad_norms``); here
  :math:`G` is the global norm of the gradient tree, and
  ``max_grad_norm=None`` (DeepSpeed: 0) disables the clip. DeepSpeed's
  parameter groups with ``weight_decay=0`` are ``weight_decay_mask`` here.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{v}` (or to :math:`v`), >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    weight_decay_mask: Bool pytree (or prefix, or callable) of the leaves that
      get decay; None: all. Every leaf gets the ratio.
    bias_correction: Multiply the step by :math:`\sqrt{c_2}/c_1`.
    max_grad_norm: Global gradient-norm clip (> 0), or None.
    max_coeff: Upper bound of the ratio.
    min_coeff: Lower bound of the ratio, ``0 <= min_coeff <= max_coeff``.
    eps_inside_sqrt: Put ``eps`` under the square root.
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), as in :func:`lamb_optax.lamb`: None (a layer is a leaf), an
      int or tuple of ints for every leaf, a per-leaf pytree (or prefix), or
      a callable ``params -> such a tree``. Norms reduce over the other
      axes; the ratios (and those in the state) have the layer axes' shape.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along
      (a name or tuple of names for every leaf, or a per-leaf pytree): the
      trust ratio's squared norms and the ``max_grad_norm`` global norm are
      summed over them, as in :func:`lamb_optax.lamb`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lamb_optax import presets
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = presets.deepspeed(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    12.166

  References:
    microsoft/DeepSpeed, ``deepspeed/ops/lamb/fused_lamb.py`` and
    ``csrc/lamb/fused_lamb_cuda_kernel.cu``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, eps, weight_decay, max_grad_norm)
  validation.check_non_negative("max_coeff", max_coeff)
  validation.check_non_negative("min_coeff", min_coeff)
  validation.check_ordered("min_coeff", min_coeff, "max_coeff", max_coeff)
  validation.check_bool("bias_correction", bias_correction)
  validation.check_bool("eps_inside_sqrt", eps_inside_sqrt)
  parts = []
  if max_grad_norm is not None:
    parts.append(clipping.clip_by_global_norm(
        max_grad_norm, axis_name, norm_offset=1e-6))
  if eps_inside_sqrt:
    adam_tx = adam_lib.scale_by_adam(b1=b1, b2=b2, eps=0.0, eps_root=eps,
                                 bias_correction=False)
  else:
    adam_tx = adam_lib.scale_by_adam(b1=b1, b2=b2, eps=eps,
                                     bias_correction=False)
  parts += [
      adam_tx,
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      _scale_by_peer_trust_ratio(options=trust_ratio.TrustRatioOptions(
          trust_ratio_bounds=(min_coeff, max_coeff), bound_fallback=False),
                                 layer_axes=layer_axes, axis_name=axis_name),
  ]
  if bias_correction:
    parts.append(_scale_by_bias_correction_factor(b1, b2))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return _finish(optax.chain(*parts), name="deepspeed",
                 weight_decay_mask=weight_decay_mask)


def tensorflow(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    exclude_from_weight_decay: Optional[Sequence[str]] = None,
    exclude_from_layer_adaptation: Optional[Sequence[str]] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""TensorFlow's LAMB: ``tfa.optimizers.LAMB`` and tf-models' ``LAMB``.

  .. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
    u &= \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}
      + \lambda x \quad \text{(unless excluded from weight decay)}, \\
    r &= \|x\|/\|u\| \quad \text{(1 if excluded from layer adaptation, or
      if a norm is 0)}, \\
    x &\leftarrow x - \eta\, r\, u.

  This is Algorithm 2 with :math:`\phi` the identity; what TF adds is how
  layers are excluded: ``exclude_from_weight_decay`` and
  ``exclude_from_layer_adaptation`` are lists of regexes, and a leaf is
  excluded when any of them matches (:func:`re.search`) its '/'-joined path,
  e.g. ``'encoder/layer_0/attention/kernel'`` (TF matches the variable name;
  see :func:`lamb_optax.masks.exclude_paths`). As in TF, an empty or None
  ``exclude_from_layer_adaptation`` means "the weight-decay list". Defaults
  are TF's (``weight_decay_rate`` there). Keras' ``clipnorm`` is not part of
  the preset: chain :func:`optax.clip_by_global_norm` or
  :func:`optax.clip_by_block_rms`-style clipping in front if you used it.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{\hat v}`, >= 0 (TF replaces 0 by 1e-7).
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    exclude_from_weight_decay: None or a list of regex strings.
    exclude_from_layer_adaptation: None or a list of regex strings; empty
      or None: ``exclude_from_weight_decay``.
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), as in :func:`lamb_optax.lamb`: None (a layer is a leaf), an
      int or tuple of ints for every leaf, a per-leaf pytree (or prefix), or
      a callable ``params -> such a tree``. Norms reduce over the other
      axes; the ratios (and those in the state) have the layer axes' shape.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along
      (a name or tuple of names for every leaf, or a per-leaf pytree): the
      trust ratio's squared norms are summed over them, as in
      :func:`lamb_optax.lamb`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lamb_optax import presets
    >>> def loss(p):
    ...   return jnp.sum(p['dense']['kernel'] ** 2) + p['dense']['bias'] ** 2
    >>> opt = presets.tensorflow(learning_rate=0.1, weight_decay=0.01,
    ...                          exclude_from_weight_decay=['bias'])
    >>> params = {'dense': {'kernel': jnp.array([1., 2.]),
    ...                     'bias': jnp.array(3.)}}
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(loss)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{loss(params):.3f}")
    10.070

  References:
    tensorflow/addons, ``tensorflow_addons/optimizers/lamb.py``;
    tensorflow/models, ``official/modeling/optimization/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, eps, weight_decay)
  wd_patterns = validation.check_patterns("exclude_from_weight_decay",
                                exclude_from_weight_decay)
  la_patterns = validation.check_patterns("exclude_from_layer_adaptation",
                                exclude_from_layer_adaptation)
  if not la_patterns:
    la_patterns = wd_patterns
  wd_mask = masks.exclude_paths(wd_patterns) if wd_patterns else None
  la_mask = masks.exclude_paths(la_patterns) if la_patterns else None
  chain = optax.chain(
      adam_lib.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, wd_mask),
      trust_ratio.scale_by_trust_ratio(mask=la_mask, layer_axes=layer_axes,
                                       axis_name=axis_name),
      optax.scale_by_learning_rate(learning_rate),
  )
  return _finish(chain, name="tensorflow", weight_decay_mask=wd_mask,
                 trust_ratio_mask=la_mask)


def keras(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
    weight_decay: Optional[optax.ScalarOrSchedule] = None,
    *,
    weight_decay_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""Keras 3's LAMB: ``keras.optimizers.Lamb``.

  With :math:`G` the global gradient norm (``global_clipnorm``) and
  :math:`\lambda` applied on ``weight_decay_mask``, Keras first decays the
  variable, then takes the LAMB step from the decayed variable:

  .. math::

    g &\leftarrow g \min(1, \mathrm{max\_grad\_norm}/G), \\
    x' &= x - \eta \lambda x, \\
    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g^2, \\
    u &= \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}, \\
    r &= \|x'\|/\|u\| \quad (1 \text{ if a norm is } 0), \\
    x &\leftarrow x' - \eta\, r\, u.

  How it differs from Algorithm 2: the decay is decoupled (AdamW-style,
  scaled by :math:`\eta` but not by :math:`r`) and is *not* part of
  :math:`u`, so it neither enters :math:`\|u\|` nor is rescaled; the ratio
  uses the already decayed :math:`\|x'\|`. ``eps`` defaults to 1e-7
  (Keras' ``epsilon``). Defaults are Keras 3's
  (``learning_rate=0.001, beta_1=0.9, beta_2=0.999, epsilon=1e-7,
  weight_decay=None, global_clipnorm=None``); Keras'
  ``exclude_from_weight_decay(var_names=[...])`` (regexes searched in the
  variable path) is ``weight_decay_mask=lamb_optax.masks.exclude_paths(...)``.
  Keras' per-variable ``clipnorm``/``clipvalue`` and EMA are not part of the
  preset.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{\hat v}`, >= 0.
    weight_decay: None (no decay) or :math:`\lambda` >= 0, a scalar or a
      schedule.
    weight_decay_mask: Bool pytree (or prefix, or callable) of the leaves that
      get decay; None: all. Every leaf gets the ratio.
    max_grad_norm: Keras' ``global_clipnorm`` (> 0), or None.
    layer_axes: The axes of stacked leaves that index layers (scanned
      models), as in :func:`lamb_optax.lamb`: None (a layer is a leaf), an
      int or tuple of ints for every leaf, a per-leaf pytree (or prefix), or
      a callable ``params -> such a tree``. Norms reduce over the other
      axes; the ratios (and those in the state) have the layer axes' shape.
    axis_name: Under ``shard_map``, the mesh axes each leaf is split along
      (a name or tuple of names for every leaf, or a per-leaf pytree): the
      trust ratio's squared norms and the ``max_grad_norm`` global norm are
      summed over them, as in :func:`lamb_optax.lamb`.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from lamb_optax import presets
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = presets.keras(learning_rate=0.1, weight_decay=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    7.477

  References:
    keras-team/keras, ``keras/src/optimizers/lamb.py`` and
    ``keras/src/optimizers/base_optimizer.py`` (``_apply_weight_decay``).

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, eps, weight_decay, max_grad_norm)
  parts = []
  if max_grad_norm is not None:
    parts.append(clipping.clip_by_global_norm(max_grad_norm, axis_name))
  parts.append(adam_lib.scale_by_adam(b1=b1, b2=b2, eps=eps))
  if weight_decay is None:
    parts += [trust_ratio.scale_by_trust_ratio(layer_axes=layer_axes,
                                               axis_name=axis_name),
              optax.scale_by_learning_rate(learning_rate)]
  else:
    parts += [
        _scale_by_peer_trust_ratio(
            decoupled_decay=(learning_rate, weight_decay, weight_decay_mask),
            layer_axes=layer_axes, axis_name=axis_name),
        optax.scale_by_learning_rate(learning_rate),
        _add_decoupled_weight_decay(learning_rate, weight_decay,
                                    weight_decay_mask),
    ]
  return _finish(optax.chain(*parts), name="keras",
                 weight_decay_mask=weight_decay_mask)
