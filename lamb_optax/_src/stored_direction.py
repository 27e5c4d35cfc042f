r"""The direction :math:`u` kept in the optimizer state: LAMB's fast path on CPU.

LAMB reads :math:`u` twice, for :math:`\|u\|` and for the step
:math:`r\,u`. XLA does not recompute an expensive elementwise expression for
two consumers, so it writes :math:`u` to a parameter-sized temporary. On CPU,
XLA allocates an executable's temporaries afresh on every call and each new
4 KiB page costs a minor page fault: on BERT-base shapes (109.5M params)
107k faults per step, which is most of the default's 2.4-3.0x AdamW's step
(``benchmarks/update_step.py``, docs/performance.md).

:func:`store_in_state` writes :math:`u` into a buffer of the optimizer
state instead. The state is donated in a training step, so XLA writes the
buffer in place (the output aliases the input): no temporary, no fault.
:math:`u` is still computed once, and the norm and the step both read that
one array, so :math:`\|x_{t+1} - x_t\| = \eta_t\,r_t\,\|u_t\|` holds by
construction. The price is one params-shaped array of state (4 bytes per
float32 parameter). Nothing here changes what is computed: with or without
the buffer the updates are the same numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import prefix
from lamb_optax._src import validation


class StoredDirectionState(NamedTuple):
  """The last update that passed through :func:`store_in_state`.

  Attributes:
    direction: A params-shaped tree: for each stored leaf, LAMB's :math:`u`
      of the last step in the params' dtype (zeros before the first); None
      for leaves outside the ``mask`` (their update is passed on as is).
  """

  direction: Any


def store_in_state(
    mask: validation.MaskArg = None) -> optax.GradientTransformation:
  """Passes the updates on through a params-shaped buffer of its state.

  The incoming updates are written into the previous buffer with an in-place
  update (``lax.dynamic_update_slice`` at offset 0, so that the donated input
  stays an input of the jitted step and its memory is reused), and the
  buffer is what the next transform reads. The updates are cast to the
  buffer's dtype (the params'), so the state's dtypes never change.

  Args:
    mask: The leaves to store (a bool pytree, prefix or callable, as
      ``trust_ratio_mask``); None stores every leaf. Only a leaf whose update
      is read twice (by its trust ratio's norm and by its step) needs the
      buffer: :func:`lamb_optax.lamb` passes its ``trust_ratio_mask``, so
      leaves without a ratio cost no state and no extra kernel.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`StoredDirectionState`.
  """

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    keep = prefix.resolve_mask(mask, params, "mask")
    return StoredDirectionState(direction=treedef.unflatten([
        jnp.zeros_like(x) if k else None for x, k in zip(leaves, keep)]))

  def update_fn(updates, state, params=None):
    del params
    us, treedef = jax.tree.flatten(updates)
    try:
      buffers = treedef.flatten_up_to(state.direction)
    except (ValueError, TypeError):
      validation.check_same_structure(state.direction, updates, "updates")
      raise
    validation.check_updates_match_params(updates, treedef.unflatten(
        [u if b is None else b for b, u in zip(buffers, us)]))

    def write(buffer, u):
      if buffer is None:
        return u
      return jax.lax.dynamic_update_slice(
          buffer, u.astype(buffer.dtype), (0,) * buffer.ndim)

    out = [write(b, u) for b, u in zip(buffers, us)]
    return treedef.unflatten(out), StoredDirectionState(
        direction=treedef.unflatten([
            None if b is None else o for b, o in zip(buffers, out)]))

  return optax.GradientTransformation(init_fn, update_fn)
