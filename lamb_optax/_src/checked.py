"""The input checks that wrap the lamb and lars chains."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import optax

from lamb_optax._src import validation


class CheckedChain(NamedTuple):
  init: Callable[[Any], Any]
  check_update_args: Callable[[Any, Any], None]
  update: Callable[..., Any]


def checked_chain(chain: optax.GradientTransformation, *, name: str,
                  weight_decay_mask: Any, trust_ratio_mask: Any) -> CheckedChain:
  """``chain`` with errors that name the argument, and updates kept in the
  gradient dtype (a float32 decay schedule or clip would promote bf16)."""

  def init_fn(params):
    validation.check_float_leaves(params, "params")
    validation.check_masks(params, weight_decay_mask=weight_decay_mask,
                           trust_ratio_mask=trust_ratio_mask)
    return chain.init(params)

  def check_update_args(updates, params):
    validation.check_params_present(params, name)
    validation.check_same_structure(params, updates, "updates")
    validation.check_float_leaves(params, "params")
    validation.check_float_leaves(updates, "updates")
    validation.check_masks(params, weight_decay_mask=weight_decay_mask)

  def update_fn(updates, state, params=None):
    check_update_args(updates, params)
    new_updates, state = chain.update(updates, state, params)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates,
                        updates), state

  return CheckedChain(init_fn, check_update_args, update_fn)
