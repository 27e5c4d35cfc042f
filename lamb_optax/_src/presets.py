r"""Per-peer LAMB presets: the numerics and defaults of each LAMB in use.

Each preset is :func:`lamb_optax.lamb` or an :func:`optax.chain` of the same
pieces: :func:`optax.clip_by_global_norm`, :func:`lamb_optax.scale_by_adam`,
:func:`optax.add_decayed_weights`, :func:`lamb_optax.scale_by_trust_ratio`
and :func:`optax.scale_by_learning_rate`, with what a peer does differently
taken from optax or given as an option of the one trust ratio:

* the run-time gate on the weight decay (apex, timm: no ratio where the decay
  is 0), a clamp of :math:`\|x\|` (torch-optimizer), bounds that leave the
  fallback :math:`r = 1` alone (DeepSpeed) and the parameter norm taken after
  a decoupled decay (Keras) are :class:`TrustRatioOptions`; their bounds may
  be traced values (``optax.inject_hyperparams`` injects every numeric
  argument, ``clamp_value`` and ``max_coeff`` too);
* :math:`\sqrt{1-\beta_2^t} / (1-\beta_1^t)` as a multiplier of the step
  (DeepSpeed, torch-optimizer's ``debias``) is :func:`optax.scale_by_schedule`;
* Keras' decoupled decay :math:`x \mathrel{-}= \eta \lambda x`, outside the
  ratio, is :func:`optax.add_decayed_weights` after the ratio;
* DeepSpeed's clip, with 1e-6 added to the norm, is the library's global-norm
  clip with ``norm_offset=1e-6``.

Every preset takes one vocabulary: ``weight_decay_mask``,
``trust_ratio_mask`` (the leaves that may get the ratio; a peer's own rule
applies within it), ``max_grad_norm``, ``layer_axes`` and ``axis_name``,
meaning what they mean in :func:`lamb_optax.lamb`, so that a caller can
pick a preset from a plain name -> factory mapping. A *layer* is one leaf of
the parameter pytree in every preset, as one tensor is in every peer, or with
``layer_axes`` one slice of a leaf that stacks layers. Every preset is an
:func:`optax.named_chain` whose state is found by name (``state['adam']``,
``state['trust_ratio']``) whatever the options.
"""

from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
import optax

from lamb_optax._src import adam as adam_lib
from lamb_optax._src import alias
from lamb_optax._src import docstrings
from lamb_optax._src import lamb as lamb_lib
from lamb_optax._src import layers
from lamb_optax._src import masks
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation

TrustRatioOptions = trust_ratio.TrustRatioOptions


def _check_common(learning_rate, b1, b2, eps, weight_decay, max_grad_norm,
                  **flags):
  """The checks every preset shares; ``flags`` are its bool options."""
  validation.check_learning_rate(learning_rate)
  adam_lib.check_arguments(b1=b1, b2=b2, eps=eps, eps_root=0.0,
                           bias_correction=flags.pop("bias_correction", True))
  if weight_decay is not None:
    validation.check_finite_non_negative("weight_decay", weight_decay)
  alias.check_max_grad_norm(max_grad_norm)
  for name, value in flags.items():
    validation.check_bool(name, value)


def _adam(b1, b2, eps, *, eps_root=0.0, bias_correction=True):
  """The ``'adam'`` link: Adam's direction."""
  return ("adam", adam_lib.adam_transform(b1=b1, b2=b2, eps=eps,
                                          eps_root=eps_root,
                                          bias_correction=bias_correction))


def _weight_decay(weight_decay, specs, weight_decay_mask):
  """The ``'weight_decay'`` link (the identity for a None decay)."""
  if weight_decay is None:
    return ("weight_decay", optax.identity())
  return ("weight_decay", optax.add_decayed_weights(
      weight_decay, alias.weight_decay_mask(specs, weight_decay_mask)))


def _trust_ratio(specs, options):
  return ("trust_ratio", trust_ratio.trust_ratio_transform(specs, options))


def _clip(max_grad_norm, specs, **kwargs):
  return ("clip", alias.clip(max_grad_norm, specs, **kwargs))


def _learning_rate(learning_rate):
  return ("learning_rate", optax.scale_by_learning_rate(learning_rate))


def _bias_correction_factor(b1: Any, b2: Any) -> optax.GradientTransformation:
  r"""Multiplies the updates by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.

  DeepSpeed and torch-optimizer (``debias=True``) keep raw moments and fold
  Adam's bias correction into the step size, after the trust ratio.
  """

  def factor(count):  # optax's count is 0-based: step t = count + 1.
    t = count + 1
    return (jnp.sqrt(adam_lib.one_minus_power(b2, t))
            / adam_lib.one_minus_power(b1, t))

  return optax.scale_by_schedule(factor)


def _bias_correction(on: bool, b1: Any, b2: Any) -> tuple[str, Any]:
  """The ``'bias_correction'`` link: the factor, or the identity."""
  return ("bias_correction",
          _bias_correction_factor(b1, b2) if on else optax.identity())


@docstrings.with_shared_args
def nvlamb(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    *,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = 1.0,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    bias_correction: bool = True,
    grad_averaging: bool = True,
    adam_w_mode: bool = True,
    use_nvlamb: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""NVIDIA's LAMB: ``apex.optimizers.FusedLAMB`` (as in NVIDIA's BERT).

  With :math:`G` the global norm of all gradients, :math:`\lambda_l` the
  decay of layer :math:`l` (``weight_decay`` on ``weight_decay_mask``, else
  0: apex's parameter groups) and :math:`c_i = 1-\beta_i^t` (1 without
  ``bias_correction``):

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

  How it differs from Algorithm 2: the global clip (``max_grad_norm=None``
  turns it off; apex always clips); no ratio on layers whose decay is 0,
  decided at each step from the decay's value (within
  ``trust_ratio_mask``), unless ``use_nvlamb``; ``adam_w_mode=False`` makes
  the decay an L2 term of :math:`g`; ``grad_averaging=False`` is computed as
  the averaged moment times :math:`1/(1-\beta_1)`, the same update. The
  defaults are apex's code defaults (its docstring says ``eps=1e-8`` and
  ``weight_decay=0``, NVIDIA/apex#1186).

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{\hat v}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>
    bias_correction: Whether the moments are bias corrected.
    grad_averaging: Whether the gradient enters :math:`m` with
      :math:`1-\beta_1`.
    adam_w_mode: Decay inside :math:`u` (True) or as L2 into :math:`g`.
    use_nvlamb: Apply the ratio to layers without decay too.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.nvlamb(learning_rate=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # The layer moves lr * ||x||.
    0.3742

  References:
    NVIDIA/apex, ``apex/optimizers/fused_lamb.py``; NVIDIA's BERT.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, b1, b2, eps, weight_decay, max_grad_norm,
                bias_correction=bias_correction, grad_averaging=grad_averaging,
                adam_w_mode=adam_w_mode, use_nvlamb=use_nvlamb)
  options = TrustRatioOptions(decay_gate=None if use_nvlamb else weight_decay)

  def build(specs):
    decay = _weight_decay(weight_decay, specs, weight_decay_mask)
    return optax.named_chain(
        _clip(max_grad_norm, specs),
        # L2: into the gradient, before the moments.
        *([] if adam_w_mode else [decay]),
        _adam(b1, b2, eps, bias_correction=bias_correction),
        # m_t = b1 m_{t-1} + g is the averaged moment divided by 1 - b1.
        ("grad_averaging", optax.identity() if grad_averaging
         else optax.scale(1.0 / (1.0 - b1))),
        *([decay] if adam_w_mode else []),
        _trust_ratio(specs, options),
        _learning_rate(learning_rate),
    )

  return alias.alias("nvlamb", build, trust_ratio_mask=trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     trust_ratio_only_if_decayed=not use_nvlamb,
                     layer_axes=layer_axes, axis_name=axis_name)


@docstrings.with_shared_args
def timm(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.01,
    *,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = 1.0,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    trust_clip: bool = False,
    always_adapt: bool = False,
    bias_correction: bool = True,
) -> optax.GradientTransformationExtraArgs:
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

  :math:`\sqrt{v_t}/\sqrt{c_2}` is the paper's :math:`\sqrt{v_t/c_2}`. How it
  differs from Algorithm 2: the global clip (None turns it off), no ratio on
  layers without decay unless ``always_adapt`` (as in ``nvlamb``), and
  LAMBC's ``trust_clip``. Defaults are timm's; its ``grad_averaging``,
  ``decoupled_decay``, ``caution`` and ``corrected_weight_decay`` are not
  reproduced (this computes their defaults).

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{v}/\sqrt{c_2}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>
    trust_clip: Cap the ratio at 1 (LAMBC).
    always_adapt: Apply the ratio to layers without decay too.
    bias_correction: Whether the moments are bias corrected.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.timm(learning_rate=0.1, trust_clip=True)
    >>> _, state = opt.update(2 * params, opt.init(params), params)
    >>> print(lamb_optax.trust_ratios(state))  # ||x|| / ||u|| = 2.1, capped
    1.0

  References:
    huggingface/pytorch-image-models, ``timm/optim/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, b1, b2, eps, weight_decay, max_grad_norm,
                trust_clip=trust_clip, always_adapt=always_adapt,
                bias_correction=bias_correction)
  options = TrustRatioOptions(
      trust_ratio_bounds=(0.0, 1.0) if trust_clip else None,
      bound_fallback=False,
      decay_gate=None if always_adapt else weight_decay)

  def build(specs):
    return optax.named_chain(
        _clip(max_grad_norm, specs),
        _adam(b1, b2, eps, bias_correction=bias_correction),
        _weight_decay(weight_decay, specs, weight_decay_mask),
        _trust_ratio(specs, options),
        _learning_rate(learning_rate),
    )

  return alias.alias("timm", build, trust_ratio_mask=trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     trust_ratio_only_if_decayed=not always_adapt,
                     layer_axes=layer_axes, axis_name=axis_name)


@docstrings.with_shared_args
def torch_optimizer(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    clamp_value: float = 10.0,
    debias: bool = False,
    adam: bool = False,
) -> optax.GradientTransformationExtraArgs:
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

  How it differs from Algorithm 2: raw moments (the paper's v3);
  ``debias=True`` puts the bias correction in the step *after* the ratio,
  which does not normalise it away; :math:`\phi(z) = \min(z, 10)`;
  ``adam=True`` drops the ratio. torch-optimizer neither masks nor clips:
  ``trust_ratio_mask=None`` and ``max_grad_norm=None`` are its behaviour.
  Defaults are its code's (its docstring says ``eps=1e-8``).

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{v}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>
    clamp_value: Upper clamp of :math:`\|x\|` in the ratio, >= 0.
    debias: Multiply the step by :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`.
    adam: Use :math:`r = 1` (no trust ratio on any layer).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.torch_optimizer(learning_rate=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # lr * ||x||
    0.3742

  References:
    jettify/pytorch-optimizer, ``torch_optimizer/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, b1, b2, eps, weight_decay, max_grad_norm,
                debias=debias, adam=adam)
  validation.check_non_negative("clamp_value", clamp_value)
  options = TrustRatioOptions(param_norm_bounds=(0.0, clamp_value))

  def build(specs):
    return optax.named_chain(
        _clip(max_grad_norm, specs),
        _adam(b1, b2, eps, bias_correction=False),
        _weight_decay(weight_decay, specs, weight_decay_mask),
        _trust_ratio(specs, options),
        _bias_correction(debias, b1, b2),
        _learning_rate(learning_rate),
    )

  return alias.alias("torch_optimizer", build,
                     trust_ratio_mask=False if adam else trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     layer_axes=layer_axes, axis_name=axis_name)


@docstrings.with_shared_args
def deepspeed(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    bias_correction: bool = True,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    eps_inside_sqrt: bool = False,
) -> optax.GradientTransformationExtraArgs:
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

  How it differs from Algorithm 2: the ratio comes from raw moments and the
  bias correction multiplies the step afterwards (the first step is
  :math:`\sqrt{1-\beta_2}/(1-\beta_1) \approx 0.32` times the paper's);
  ``eps`` is 1e-8 and may sit inside the root; the ratio is clipped to
  ``[min_coeff, max_coeff]``, but not the 1 of a zero norm. DeepSpeed clips
  with a norm its caller passes; here :math:`G` is the gradient tree's, and
  ``max_grad_norm=None`` (DeepSpeed: 0) turns the clip off.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{v}` (or to :math:`v`), >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>
    bias_correction: Multiply the step by :math:`\sqrt{c_2}/c_1`.
    max_coeff: Upper bound of the ratio.
    min_coeff: Lower bound of the ratio, ``0 <= min_coeff <= max_coeff``.
    eps_inside_sqrt: Put ``eps`` under the square root.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.deepspeed(learning_rate=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # 0.32 * lr * ||x||
    0.1183

  References:
    microsoft/DeepSpeed, ``deepspeed/ops/lamb/fused_lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, b1, b2, eps, weight_decay, max_grad_norm,
                bias_correction=bias_correction,
                eps_inside_sqrt=eps_inside_sqrt)
  validation.check_non_negative("max_coeff", max_coeff)
  validation.check_non_negative("min_coeff", min_coeff)
  validation.check_ordered("min_coeff", min_coeff, "max_coeff", max_coeff)
  options = TrustRatioOptions(trust_ratio_bounds=(min_coeff, max_coeff),
                              bound_fallback=False)

  def build(specs):
    return optax.named_chain(
        _clip(max_grad_norm, specs, norm_offset=1e-6),
        (_adam(b1, b2, 0.0, eps_root=eps, bias_correction=False)
         if eps_inside_sqrt else
         _adam(b1, b2, eps, bias_correction=False)),
        _weight_decay(weight_decay, specs, weight_decay_mask),
        _trust_ratio(specs, options),
        _bias_correction(bias_correction, b1, b2),
        _learning_rate(learning_rate),
    )

  return alias.alias("deepspeed", build, trust_ratio_mask=trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     layer_axes=layer_axes, axis_name=axis_name)


@docstrings.with_shared_args
def tensorflow(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    exclude_from_weight_decay: Optional[Sequence[str]] = None,
    exclude_from_layer_adaptation: Optional[Sequence[str]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""TensorFlow's LAMB: ``tfa.optimizers.LAMB`` and tf-models' ``LAMB``.

  Algorithm 2 with :math:`\phi` the identity: a call of
  :func:`lamb_optax.lamb`. What TF adds is how layers are excluded:
  ``exclude_from_weight_decay`` and ``exclude_from_layer_adaptation`` are
  lists of regexes, and a leaf is excluded when one matches
  (:func:`re.search`) its '/'-joined path, e.g.
  ``'encoder/layer_0/attention/kernel'`` (see
  :func:`lamb_optax.masks.exclude_paths`). An empty or None layer-adaptation
  list means the weight-decay list, as in TF; so does
  ``trust_ratio_mask=None`` when the masks are given directly. Defaults are
  TF's (``weight_decay_rate`` there); Keras' ``global_clipnorm`` is
  ``max_grad_norm``.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{\hat v}`, >= 0 (TF replaces 0 by 1e-7).
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask>
    trust_ratio_mask: The same forms: the leaves that get the trust ratio;
      the others take :math:`r = 1`. None: ``weight_decay_mask`` (TF's rule).
    <shared args: max_grad_norm layer_axes axis_name>
    exclude_from_weight_decay: None or a list of regex strings: TF's way of
      giving ``weight_decay_mask`` (pass one of the two).
    exclude_from_layer_adaptation: None or a list of regex strings: TF's way
      of giving ``trust_ratio_mask`` (pass one of the two).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> from lamb_optax import presets
    >>> params = {'dense': {'kernel': jnp.array([1., 2.]), 'bias': jnp.ones(1)}}
    >>> opt = presets.tensorflow(learning_rate=0.1, weight_decay=0.01,
    ...                          exclude_from_weight_decay=['bias'])
    >>> _, state = opt.update(params, opt.init(params), params)
    >>> print(lamb_optax.trust_ratios(state)['dense']['bias'])
    1.0

  References:
    tensorflow/addons, ``optimizers/lamb.py``; tensorflow/models,
    ``official/modeling/optimization/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  weight_decay_mask = _tf_mask(
      "exclude_from_weight_decay", exclude_from_weight_decay,
      "weight_decay_mask", weight_decay_mask)
  trust_ratio_mask = _tf_mask(
      "exclude_from_layer_adaptation", exclude_from_layer_adaptation,
      "trust_ratio_mask", trust_ratio_mask)
  if trust_ratio_mask is None:  # TF: the weight-decay exclusions.
    trust_ratio_mask = weight_decay_mask
  return lamb_lib.lamb(
      learning_rate, b1, b2, eps, weight_decay=weight_decay,
      weight_decay_mask=weight_decay_mask, trust_ratio_mask=trust_ratio_mask,
      max_grad_norm=max_grad_norm, layer_axes=layer_axes,
      axis_name=axis_name)


def _tf_mask(patterns_name: str, patterns: Any, mask_name: str,
             mask: Any) -> Any:
  """A mask from TF's exclusion regexes, or the mask given (not both)."""
  if not validation.check_patterns(patterns_name, patterns):
    return mask
  if mask is not None:
    raise ValueError(f"Pass either `{patterns_name}` (TF's regexes) or "
                     f"`{mask_name}`, not both.")
  return masks.exclude_paths(list(patterns))


@docstrings.with_shared_args
def keras(
    learning_rate: optax.ScalarOrSchedule = 1e-3,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-7,
    weight_decay: Optional[optax.ScalarOrSchedule] = None,
    *,
    weight_decay_mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformationExtraArgs:
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

  How it differs from Algorithm 2: the decay is decoupled (scaled by
  :math:`\eta`, not by :math:`r`) and not part of :math:`u`; the ratio uses
  the decayed :math:`\|x'\|`. Defaults are Keras 3's (``epsilon=1e-7``,
  ``weight_decay=None``); ``max_grad_norm`` is its ``global_clipnorm``.

  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to :math:`\sqrt{\hat v}`, >= 0.
    weight_decay: None (no decay) or :math:`\lambda` >= 0, a scalar or a
      schedule.
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.keras(learning_rate=0.1, weight_decay=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # -lr (r u + wd x)
    0.4053

  References:
    keras-team/keras, ``keras/src/optimizers/lamb.py``.

    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  _check_common(learning_rate, b1, b2, eps, weight_decay, max_grad_norm)
  decoupled = weight_decay is not None
  options = TrustRatioOptions(
      decoupled_decay=(learning_rate, weight_decay) if decoupled else None)

  def build(specs):
    return optax.named_chain(
        _clip(max_grad_norm, specs),
        _adam(b1, b2, eps),
        _trust_ratio(specs, options),
        # -lr * (r u + wd x): the decay outside the ratio, scaled by lr.
        _weight_decay(weight_decay, specs, weight_decay_mask),
        _learning_rate(learning_rate),
    )

  return alias.alias("keras", build, trust_ratio_mask=trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     layer_axes=layer_axes, axis_name=axis_name)
