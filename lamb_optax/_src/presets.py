r"""Per-peer LAMB presets: the numerics and defaults of each LAMB in use.

Each preset is :func:`lamb_optax.lamb` (TF's) or an :func:`optax.named_chain`
of the same pieces, a peer's differences taken from optax or given as options
of the one trust ratio (:class:`TrustRatioOptions`). All six share one
signature, written once in :func:`_preset` (only defaults and the peer's
keyword-only switches differ), so a name -> factory mapping can call any.
``docs/presets.md`` gives each peer's update, how it differs from Algorithm 2
of You et al. (2020), and porting notes.
"""

import collections
import functools
import inspect
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


# The arguments every preset shares, in the signature's order (their types
# and defaults are written in _preset).
_Args = collections.namedtuple("_Args", (
    "learning_rate b1 b2 eps weight_decay weight_decay_mask trust_ratio_mask "
    "max_grad_norm layer_axes axis_name"))

_ARGS_DOC = r"""  Args:
    learning_rate: :math:`\eta`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
"""


def _preset(*, eps: float, weight_decay: Any, max_grad_norm: Optional[float],
            weight_decay_type: Any = optax.ScalarOrSchedule) -> Callable:
  """Gives ``fn(args, *, switches)`` the one preset signature: the shared
  arguments, with these defaults, then ``fn``'s keyword-only switches; ``fn``
  gets the shared ones as an :class:`_Args`. Its docstring's ``Args:`` gets
  the first three, and the ``<shared args: ...>`` lines are filled."""
  positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
  keyword = inspect.Parameter.KEYWORD_ONLY
  shared = [
      ("learning_rate", positional, optax.ScalarOrSchedule, 1e-3),
      ("b1", positional, float, 0.9),
      ("b2", positional, float, 0.999),
      ("eps", positional, float, eps),
      ("weight_decay", positional, weight_decay_type, weight_decay),
      ("weight_decay_mask", keyword, validation.MaskArg, None),
      ("trust_ratio_mask", keyword, validation.MaskArg, None),
      ("max_grad_norm", keyword, Optional[float], max_grad_norm),
      ("layer_axes", keyword, layers.LayerAxesArg, None),
      ("axis_name", keyword, layers.AxisNameArg, None),
  ]

  def decorate(fn):
    switches = list(inspect.signature(fn).parameters.values())[1:]
    signature = inspect.Signature(
        [inspect.Parameter(name, kind, annotation=annotation, default=default)
         for name, kind, annotation, default in shared] + switches,
        return_annotation=optax.GradientTransformationExtraArgs)

    @functools.wraps(fn)
    def preset(*args, **kwargs):
      try:  # TypeErrors in Python's words and order for a def.
        bound = signature.bind(*args[:5], **kwargs)
      except TypeError as error:
        raise TypeError(
            f"{fn.__name__}() got {str(error).removeprefix('got ')}") from None
      if len(args) > 5:
        raise TypeError(f"{fn.__name__}() takes from 0 to 5 positional "
                        f"arguments but {len(args)} were given")
      bound.apply_defaults()
      given = bound.arguments
      return fn(_Args(*(given.pop(name) for name in _Args._fields)), **given)

    preset.__signature__ = signature
    preset.__annotations__ = {
        **{p.name: p.annotation for p in signature.parameters.values()},
        "return": signature.return_annotation}
    preset.__doc__ = preset.__doc__.replace("  Args:\n", _ARGS_DOC, 1)
    return docstrings.with_shared_args(preset)

  return decorate


def _check_common(args: _Args, **flags: Any) -> None:
  """The checks every chained preset shares; ``flags`` are its bools."""
  validation.check_learning_rate(args.learning_rate)
  adam_lib.check_arguments(b1=args.b1, b2=args.b2, eps=args.eps, eps_root=0.0,
                           bias_correction=flags.pop("bias_correction", True))
  if args.weight_decay is not None:
    validation.check_finite_non_negative("weight_decay", args.weight_decay)
  alias.check_max_grad_norm(args.max_grad_norm)
  for name, value in flags.items():
    validation.check_bool(name, value)


def _chain(name: str, args: _Args, options: TrustRatioOptions,
           links: Callable[[Any, Any], list], *,
           norm_offset: Optional[float] = None,
           **specs_args: Any) -> optax.GradientTransformationExtraArgs:
  """The alias of a chained preset: ``clip, *links(decay, ratio),
  learning_rate``; ``specs_args`` override ``args``' masks for the alias."""

  def build(specs):
    decay = optax.identity()
    if args.weight_decay is not None:
      decay = optax.add_decayed_weights(
          args.weight_decay,
          alias.weight_decay_mask(specs, args.weight_decay_mask))
    ratio = trust_ratio.trust_ratio_transform(specs, options)
    return optax.named_chain(
        ("clip", alias.clip(args.max_grad_norm, specs,
                            norm_offset=norm_offset)),
        *links(("weight_decay", decay), ("trust_ratio", ratio)),
        ("learning_rate", optax.scale_by_learning_rate(args.learning_rate)),
    )

  specs_args = {"trust_ratio_mask": args.trust_ratio_mask,
                "weight_decay_mask": args.weight_decay_mask,
                "layer_axes": args.layer_axes, "axis_name": args.axis_name,
                **specs_args}
  return alias.alias(name, build, **specs_args)


def _adam(b1, b2, eps, *, eps_root=0.0, bias_correction=True):
  """The ``'adam'`` link: Adam's direction."""
  return ("adam", adam_lib.adam_transform(b1=b1, b2=b2, eps=eps,
                                          eps_root=eps_root,
                                          bias_correction=bias_correction))


def _bias_correction(on: bool, b1: Any, b2: Any) -> tuple[str, Any]:
  r"""The ``'bias_correction'`` link: a step factor (after the ratio)
  :math:`\sqrt{1-\beta_2^t}/(1-\beta_1^t)`, or the identity."""

  def factor(count):  # optax's count is 0-based: step t = count + 1.
    t = count + 1
    return (jnp.sqrt(adam_lib.one_minus_power(b2, t))
            / adam_lib.one_minus_power(b1, t))

  return ("bias_correction",
          optax.scale_by_schedule(factor) if on else optax.identity())


@_preset(eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
def nvlamb(args: _Args, *, bias_correction: bool = True,
           grad_averaging: bool = True, adam_w_mode: bool = True,
           use_nvlamb: bool = False):
  r"""NVIDIA's LAMB: ``apex.optimizers.FusedLAMB`` (as in NVIDIA's BERT).

  A global clip, then Adam's direction plus the decay (or L2 into :math:`g`);
  layers whose decay is 0 get no ratio, decided at each step, unless
  ``use_nvlamb``. Defaults are apex's code's (see ``docs/presets.md``).

  Args:
    eps: Added to :math:`\sqrt{\hat v}`, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>
    bias_correction: Whether the moments are bias corrected.
    grad_averaging: Whether :math:`g` enters :math:`m` with :math:`1-\beta_1`.
    adam_w_mode: Decay inside :math:`u` (True) or as L2 into :math:`g`.
    use_nvlamb: Apply the ratio to layers without decay too.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.nvlamb(learning_rate=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # The layer moves lr * ||x||.
    0.3742

  References:
    NVIDIA/apex, ``apex/optimizers/fused_lamb.py``; You et al., 2020.
  """
  _check_common(args, bias_correction=bias_correction,
                grad_averaging=grad_averaging, adam_w_mode=adam_w_mode,
                use_nvlamb=use_nvlamb)
  options = TrustRatioOptions(
      decay_gate=None if use_nvlamb else args.weight_decay)

  def links(decay, ratio):  # L2 (not adam_w_mode): decay before the moments.
    # m_t = b1 m_{t-1} + g is the averaged moment divided by 1 - b1.
    averaging = (optax.identity() if grad_averaging
                 else optax.scale(1.0 / (1.0 - args.b1)))
    return [*([] if adam_w_mode else [decay]),
            _adam(args.b1, args.b2, args.eps, bias_correction=bias_correction),
            ("grad_averaging", averaging),
            *([decay] if adam_w_mode else []), ratio]

  return _chain("nvlamb", args, options, links,
                trust_ratio_only_if_decayed=not use_nvlamb)


@_preset(eps=1e-6, weight_decay=0.01, max_grad_norm=1.0)
def timm(args: _Args, *, trust_clip: bool = False, always_adapt: bool = False,
         bias_correction: bool = True):
  r"""timm's LAMB: ``timm.optim.Lamb`` (Ross Wightman's NVLAMB port).

  A global clip, then the paper's direction plus the decay; as in
  :func:`nvlamb`, no ratio on layers without decay unless ``always_adapt``;
  LAMBC's ``trust_clip``. Defaults are timm's.

  Args:
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
  """
  _check_common(args, trust_clip=trust_clip, always_adapt=always_adapt,
                bias_correction=bias_correction)
  options = TrustRatioOptions(
      trust_ratio_bounds=(0.0, 1.0) if trust_clip else None,
      bound_fallback=False,
      decay_gate=None if always_adapt else args.weight_decay)
  return _chain("timm", args, options, lambda decay, ratio: [
      _adam(args.b1, args.b2, args.eps, bias_correction=bias_correction),
      decay, ratio],
                trust_ratio_only_if_decayed=not always_adapt)


@_preset(eps=1e-6, weight_decay=0.0, max_grad_norm=None)
def torch_optimizer(args: _Args, *, clamp_value: float = 10.0,
                    debias: bool = False, adam: bool = False):
  r"""torch-optimizer's LAMB: ``torch_optimizer.Lamb`` (jettify).

  Raw moments, :math:`\phi(z) = \min(z, \mathrm{clamp\_value})`, with
  ``debias`` the bias correction as a step factor after the ratio;
  ``adam=True`` drops the ratio. Defaults are its code's.

  Args:
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
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.torch_optimizer(learning_rate=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # lr * ||x||
    0.3742

  References:
    jettify/pytorch-optimizer, ``torch_optimizer/lamb.py``.
  """
  _check_common(args, debias=debias, adam=adam)
  validation.check_non_negative("clamp_value", clamp_value)
  options = TrustRatioOptions(param_norm_bounds=(0.0, clamp_value))
  return _chain("torch_optimizer", args, options, lambda decay, ratio: [
      _adam(args.b1, args.b2, args.eps, bias_correction=False), decay, ratio,
      _bias_correction(debias, args.b1, args.b2)],
                trust_ratio_mask=False if adam else args.trust_ratio_mask)


@_preset(eps=1e-8, weight_decay=0.0, max_grad_norm=None)
def deepspeed(args: _Args, *, bias_correction: bool = True,
              max_coeff: float = 10.0, min_coeff: float = 0.01,
              eps_inside_sqrt: bool = False):
  r"""DeepSpeed's LAMB: ``deepspeed.ops.lamb.FusedLamb``.

  Raw moments, the ratio clipped to ``[min_coeff, max_coeff]`` (not the 1 of
  a zero norm), the bias correction as a step factor after it, and a clip
  of :math:`(G + 10^{-6})`. Defaults are DeepSpeed's.

  Args:
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
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.deepspeed(learning_rate=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # 0.32 * lr * ||x||
    0.1183

  References:
    microsoft/DeepSpeed, ``deepspeed/ops/lamb/fused_lamb.py``.
  """
  _check_common(args, bias_correction=bias_correction,
                eps_inside_sqrt=eps_inside_sqrt)
  validation.check_non_negative("max_coeff", max_coeff)
  validation.check_non_negative("min_coeff", min_coeff)
  validation.check_ordered("min_coeff", min_coeff, "max_coeff", max_coeff)
  options = TrustRatioOptions(trust_ratio_bounds=(min_coeff, max_coeff),
                              bound_fallback=False)
  eps, eps_root = (0.0, args.eps) if eps_inside_sqrt else (args.eps, 0.0)
  return _chain("deepspeed", args, options, lambda decay, ratio: [
      _adam(args.b1, args.b2, eps, eps_root=eps_root, bias_correction=False),
      decay, ratio, _bias_correction(bias_correction, args.b1, args.b2)],
                norm_offset=1e-6)


@_preset(eps=1e-6, weight_decay=0.0, max_grad_norm=None)
def tensorflow(args: _Args, *,
               exclude_from_weight_decay: Optional[Sequence[str]] = None,
               exclude_from_layer_adaptation: Optional[Sequence[str]] = None):
  r"""TensorFlow's LAMB: ``tfa.optimizers.LAMB`` and tf-models' ``LAMB``.

  :func:`lamb_optax.lamb` with TF's exclusions: regexes searched in each
  leaf's '/'-joined path (:func:`lamb_optax.masks.exclude_paths`); as in TF,
  layer adaptation defaults to the weight-decay exclusions.

  Args:
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
  """
  weight_decay_mask = _tf_mask(
      "exclude_from_weight_decay", exclude_from_weight_decay,
      "weight_decay_mask", args.weight_decay_mask)
  trust_ratio_mask = _tf_mask(
      "exclude_from_layer_adaptation", exclude_from_layer_adaptation,
      "trust_ratio_mask", args.trust_ratio_mask)
  if trust_ratio_mask is None:  # TF: the weight-decay exclusions.
    trust_ratio_mask = weight_decay_mask
  return lamb_lib.lamb(
      args.learning_rate, args.b1, args.b2, args.eps,
      weight_decay=args.weight_decay, weight_decay_mask=weight_decay_mask,
      trust_ratio_mask=trust_ratio_mask, max_grad_norm=args.max_grad_norm,
      layer_axes=args.layer_axes, axis_name=args.axis_name)


def _tf_mask(patterns_name: str, patterns: Any, mask_name: str,
             mask: Any) -> Any:
  """A mask from TF's exclusion regexes, or the mask given (not both)."""
  if not validation.check_patterns(patterns_name, patterns):
    return mask
  if mask is not None:
    raise ValueError(f"Pass either `{patterns_name}` (TF's regexes) or "
                     f"`{mask_name}`, not both.")
  return masks.exclude_paths(list(patterns))


@_preset(eps=1e-7, weight_decay=None, max_grad_norm=None,
         weight_decay_type=Optional[optax.ScalarOrSchedule])
def keras(args: _Args):
  r"""Keras 3's LAMB: ``keras.optimizers.Lamb``.

  The paper's direction with a decoupled decay :math:`x' = x - \eta\lambda x`
  outside it, and the ratio taken on the decayed :math:`\|x'\|`. Defaults
  are Keras 3's.

  Args:
    eps: Added to :math:`\sqrt{\hat v}`, >= 0.
    weight_decay: None (no decay) or :math:`\lambda` >= 0 (or a schedule).
    <shared args: weight_decay_mask trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lamb_optax import presets
    >>> params = jnp.array([1., 2., 3.])
    >>> opt = presets.keras(learning_rate=0.1, weight_decay=0.1)
    >>> updates, _ = opt.update(2 * params, opt.init(params), params)
    >>> print(f"{jnp.linalg.norm(updates):.4f}")  # -lr (r u + wd x)
    0.4053

  References:
    keras-team/keras, ``keras/src/optimizers/lamb.py``.
  """
  _check_common(args)
  decoupled = args.weight_decay is not None
  options = TrustRatioOptions(decoupled_decay=(
      (args.learning_rate, args.weight_decay) if decoupled else None))
  # -lr * (r u + wd x): the decay outside the ratio, scaled by lr.
  return _chain("keras", args, options, lambda decay, ratio: [
      _adam(args.b1, args.b2, args.eps), ratio, decay])
