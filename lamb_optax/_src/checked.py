"""The input checks that wrap the lamb, lars and preset chains."""

from __future__ import annotations

from typing import Any

import jax
import optax

from lamb_optax._src import validation


def checked_chain(chain: optax.GradientTransformation, *, name: str,
                  weight_decay_mask: Any = None,
                  trust_ratio_mask: Any = None
                  ) -> optax.GradientTransformation:
  """``chain`` with errors that name the argument, and updates kept in the
  gradient dtype (a float32 decay schedule or clip would promote bf16)."""

  def init_fn(params):
    validation.check_float_leaves(params, "params")
    validation.check_masks(params, weight_decay_mask=weight_decay_mask,
                           trust_ratio_mask=trust_ratio_mask)
    return chain.init(params)

  def update_fn(updates, state, params=None):
    validation.check_params_present(params, name)
    validation.check_same_structure(params, updates, "updates")
    validation.check_float_leaves(params, "params")
    validation.check_float_leaves(updates, "updates")
    validation.check_updates_match_params(updates, params)
    validation.check_masks(params, weight_decay_mask=weight_decay_mask)
    new_updates, state = chain.update(updates, state, params)
    return jax.tree.map(lambda u, g: u.astype(g.dtype), new_updates,
                        updates), state

  return optax.GradientTransformation(init_fn, update_fn)
