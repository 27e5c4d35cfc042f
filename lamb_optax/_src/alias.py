"""The boundary of every public transform and alias (``lamb``, ``lars``, a
preset, ``scale_by_trust_ratio``): inputs checked once, masks resolved once,
the chain built once; and the links every alias builds from its resolved
settings.

The transforms an alias chains do not check their inputs: they trust the
boundary. :func:`with_input_checks` is that boundary, for a building block
used alone (``scale_by_adam``) as for an alias; :func:`alias` adds the
per-leaf settings (:func:`leaf_specs`) and names the links of
the chain (:func:`optax.named_chain`), so that a component of the state is
``state['adam']`` or ``state['trust_ratio']`` whatever the options.
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import optax

from lamb_optax._src import clipping
from lamb_optax._src import layers
from lamb_optax._src import prefix
from lamb_optax._src import validation


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """What an alias does with one leaf (a pytree leaf itself).

  Attributes:
    trust_ratio_mask: Whether the leaf is in the trust-ratio mask (else
      ``r = 1``).
    weight_decay_mask: Whether the leaf is in the weight-decay mask.
    layer_axes: Sorted axes that index layers (``()``: the leaf is one).
    axis_names: Mesh axes the squared norms are summed over.
  """

  trust_ratio_mask: bool = True
  weight_decay_mask: bool = True
  layer_axes: tuple[int, ...] = ()
  axis_names: tuple[str, ...] = ()


def leaf_specs(params: Any, *, trust_ratio_mask: Any = None,
               trust_ratio_mask_name: str = "trust_ratio_mask",
               weight_decay_mask: Any = None,
               weight_decay_mask_name: str = "weight_decay_mask",
               trust_ratio_only_if_decayed: bool = False,
               layer_axes: layers.LayerAxesArg = None,
               axis_name: layers.AxisNameArg = None) -> Any:
  """Resolves every per-leaf setting once: a params-shaped tree of
  :class:`LeafSpec`.

  Masks are trees, prefixes or callables (None: every leaf); each is called
  or matched once, and errors name the arguments as the public function
  does. With ``trust_ratio_only_if_decayed`` (apex, timm) a leaf gets the
  ratio only if it is in both masks.
  """
  treedef = jax.tree.structure(params)
  in_trust_ratio_mask = prefix.resolve_mask(trust_ratio_mask, params,
                                            trust_ratio_mask_name)
  in_weight_decay_mask = prefix.resolve_mask(weight_decay_mask, params,
                                             weight_decay_mask_name)
  if trust_ratio_only_if_decayed:
    in_trust_ratio_mask = [t and d for t, d in zip(in_trust_ratio_mask,
                                                   in_weight_decay_mask)]
  axes = layers.resolve_layer_axes(layer_axes, params)
  names = layers.resolve_axis_names(axis_name, params)
  return treedef.unflatten([LeafSpec(*spec) for spec in zip(
      in_trust_ratio_mask, in_weight_decay_mask, axes, names)])


def with_input_checks(
    inner: optax.GradientTransformation,
    name: str,
    *,
    updates_like: Optional[Callable[[Any], Any]] = None,
) -> optax.GradientTransformationExtraArgs:
  """``inner`` with its inputs checked, once, before it runs.

  ``init(params)`` checks that every leaf of the params is a floating or
  complex array. ``update(updates, state, params, **extra_args)`` checks
  that params are given, that the updates have their structure and every
  leaf its parameter's shape and dtype kind (:func:`validation.check_inputs`);
  errors name ``name`` and the leaf. Extra keyword arguments go to
  ``inner``.

  Args:
    inner: The transformation, which trusts these checks.
    name: The public function's name, for errors.
    updates_like: For a transform that does not need params
      (``scale_by_adam``): ``state -> `` the tree the updates must match
      (its moments), checked instead of the params.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    validation.check_params(params)
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    if updates_like is None:
      validation.check_inputs(updates, params, name)
    else:
      validation.check_inexact_leaves(updates, "updates")
      validation.check_same_structure(updates_like(state), updates, "updates",
                                      "the params given to init")
      validation.check_updates_match_params(updates, updates_like(state))
    return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def alias(name: str, build: Callable[[Any], optax.GradientTransformation],
          **specs_args: Any) -> optax.GradientTransformationExtraArgs:
  """An alias: its chain built from resolved settings, behind the checks.

  ``init`` and every ``update`` resolve the per-leaf settings once,
  ``specs = leaf_specs(params, **specs_args)`` (the masks, layer
  axes and mesh axes, whose errors name the arguments), after
  :func:`with_input_checks` has checked the inputs. ``build(specs)`` makes
  the chain once for these settings (at ``init``; again only for params of
  another layout), and every later ``update`` reuses it. The updates come
  back in the gradients' dtypes (a float32 decay schedule or clip would
  promote bf16 ones).

  Args:
    name: The alias' name, for errors.
    build: ``specs -> `` the alias' chain, a params-shaped tree of
      :class:`LeafSpec` in.
    **specs_args: The keyword arguments of :func:`leaf_specs`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.
  """
  specs_fn = functools.partial(leaf_specs, **specs_args)
  chains = {}  # One chain per resolved layout of the settings.

  def chain_for(params):
    specs = specs_fn(params)
    key = (jax.tree.structure(specs), tuple(jax.tree.leaves(specs)))
    if key not in chains:
      chains[key] = optax.with_extra_args_support(build(specs))
    return chains[key]

  def init_fn(params):
    return chain_for(params).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    new_updates, state = chain_for(params).update(updates, state, params,
                                                  **extra_args)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates,
                        updates), state

  return with_input_checks(
      optax.GradientTransformationExtraArgs(init_fn, update_fn), name)


def check_max_grad_norm(max_grad_norm: Any) -> None:
  if max_grad_norm is not None:
    validation.check_positive("max_grad_norm", max_grad_norm)


def clip(max_grad_norm: Optional[float], specs: Any, *,
         norm_offset: Optional[float] = None) -> optax.GradientTransformation:
  """The global-norm clip of ``max_grad_norm``; the identity when it is
  None (both have an empty state, so the ``'clip'`` link is always there)."""
  if max_grad_norm is None:
    return optax.identity()
  return clipping.clip_by_global_norm(max_grad_norm, specs,
                                      norm_offset=norm_offset)


def weight_decay_mask(specs: Any, given: Any) -> Any:
  """The resolved ``weight_decay_mask``, for :func:`optax.add_decayed_weights`
  (None when ``given`` is None, which keeps optax's unmasked state)."""
  if given is None:
    return None
  return jax.tree.map(lambda spec: spec.weight_decay_mask, specs)


def trust_ratio_mask(specs: Any) -> Any:
  """The resolved trust-ratio mask: a params-shaped tree of bools."""
  return jax.tree.map(lambda spec: spec.trust_ratio_mask, specs)
