"""The boundary of an alias (``lamb``, ``lars``, a preset): inputs checked
once, masks resolved once, extra arguments passed on; and the pieces every
alias builds from its resolved settings."""

import functools
from typing import Any, Callable, Optional

import jax
import optax

from lamb_optax._src import clipping
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation


def checked_alias(
    name: str,
    specs_fn: Callable[[Any], Any],
    build: Callable[[Any], optax.GradientTransformation],
) -> optax.GradientTransformationExtraArgs:
  """An alias whose ``init`` and ``update`` check their inputs once.

  ``init(params)`` checks the params; ``update(updates, state, params,
  **extra_args)`` checks that params are given, the structures, dtypes and
  shapes (:func:`validation.check_inputs`). Both then resolve every per-leaf
  setting once, ``specs = specs_fn(params)`` (the masks, layer axes and mesh
  axes, whose errors name the arguments), and run ``build(specs)``: the
  chain, made of transforms that trust these checks. Extra keyword arguments
  of ``update`` go to the chain (optax's aliases accept them too); the
  updates come back in the gradients' dtypes (a float32 decay schedule or
  clip would promote bf16 ones).

  Args:
    name: The alias' name, for errors.
    specs_fn: ``params -> `` a params-shaped tree of
      :class:`trust_ratio.LeafSpec`.
    build: ``specs -> `` the alias' :class:`optax.GradientTransformation`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.
  """

  def init_fn(params):
    validation.check_params(params)
    return build(specs_fn(params)).init(params)

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_inputs(updates, params, name)
    chain = optax.with_extra_args_support(build(specs_fn(params)))
    new_updates, state = chain.update(updates, state, params, **extra_args)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates,
                        updates), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def check_max_grad_norm(max_grad_norm: Any) -> None:
  if max_grad_norm is not None:
    validation.check_positive("max_grad_norm", max_grad_norm)


def clip(max_grad_norm: Optional[float], specs: Any, *,
         norm_offset: Optional[float] = None
         ) -> list[optax.GradientTransformation]:
  """The global-norm clip of ``max_grad_norm`` as a list of chain parts
  (empty when it is None)."""
  if max_grad_norm is None:
    return []
  return [clipping.clip_by_global_norm(max_grad_norm, specs,
                                       norm_offset=norm_offset)]


def decay_mask(specs: Any, weight_decay_mask: Any) -> Any:
  """The resolved ``weight_decay_mask``, for :func:`optax.add_decayed_weights`
  (None when none was given, which keeps optax's unmasked state)."""
  if weight_decay_mask is None:
    return None
  return jax.tree.map(lambda spec: spec.decay, specs)


def adapted(specs: Any) -> Any:
  """The resolved trust-ratio mask: a params-shaped tree of bools."""
  return jax.tree.map(lambda spec: spec.adapt, specs)


def alias(name: str, build: Callable[[Any], optax.GradientTransformation],
          **specs_args: Any) -> optax.GradientTransformationExtraArgs:
  """:func:`checked_alias` whose settings are resolved by
  :func:`trust_ratio.leaf_specs` with ``specs_args`` (the alias' masks,
  layer axes and mesh axes)."""
  return checked_alias(name, functools.partial(trust_ratio.leaf_specs,
                                               **specs_args), build)
