r"""The direction :math:`u` kept in the optimizer state: LAMB's CPU fast path.

LAMB reads :math:`u` twice, for :math:`\|u\|` and for the step
:math:`r\,u`. XLA does not recompute an expensive elementwise expression for
two consumers, so it writes :math:`u` to a parameter-sized temporary. On CPU,
XLA allocates an executable's temporaries afresh on every call and each new
4 KiB page costs a minor page fault, which is most of the default step's
cost beside AdamW's (docs/performance.md has the measurements of
``benchmarks/update_step.py``).

:func:`store_in_state` writes :math:`u` into a buffer of the optimizer
state instead. The state is donated in a training step, so XLA writes the
buffer in place (the output aliases the input): no temporary, no fault.
:math:`u` is still computed once, and the norm and the step both read that
one array, so :math:`\|x_{t+1} - x_t\| = \eta_t\,r_t\,\|u_t\|` holds by
construction. The price is one params-shaped array of state (4 bytes per
float32 parameter). Nothing here changes what is computed: with or without
the buffer the updates are the same numbers.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import numerics
from lamb_optax._src import prefix


class StoredDirectionState(NamedTuple):
  """The direction :math:`u` that ``lamb(..., store_direction=True)`` keeps
  in its state.

  Attributes:
    direction: A params-shaped tree: for each stored leaf, LAMB's :math:`u`
      of the last step in the params' compute dtype (float32 for float32,
      bfloat16 and float16 params; zeros before the first); None for leaves
      outside ``trust_ratio_mask`` (their update is passed on as is).
  """

  direction: Any


def store_in_state(keep: Any) -> optax.GradientTransformation:
  """Passes the updates on through a params-shaped buffer of its state.

  The incoming updates are written into the previous buffer with an in-place
  update (``lax.dynamic_update_slice`` at offset 0, so that the donated input
  stays an input of the jitted step and its memory is reused), and the
  buffer, read back in the update's dtype, is what the next transform reads.
  The buffer is in the params' compute dtype (at least float32), which holds
  a float32 or bfloat16 update exactly, so the updates passed on are the
  numbers that came in; an update wider than the buffer (float64 updates of
  float32 params) is refused, naming the leaf, rather than rounded.

  It is the part of :func:`lamb_optax.lamb` (``store_direction=True``) that
  exists for the compiler, not a building block of its own, and trusts the
  checks of that alias.

  Args:
    keep: A params-shaped tree of bools: the leaves to store. Only a leaf
      whose update is read twice (by its trust ratio's norm and by its step)
      needs the buffer: :func:`lamb_optax.lamb` passes its resolved
      ``trust_ratio_mask``, so leaves without a ratio cost no state and no
      extra kernel.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`StoredDirectionState`.
  """

  def init_fn(params):
    return StoredDirectionState(direction=jax.tree.map(
        lambda x, k: (jnp.zeros(jnp.shape(x), numerics.compute_dtype(x.dtype))
                      if k else None), params, keep))

  def update_fn(updates, state, params=None):
    del params
    us, treedef = jax.tree.flatten(updates)
    buffers = treedef.flatten_up_to(state.direction)
    for (path, u), buffer in zip(jax.tree_util.tree_leaves_with_path(updates),
                                 buffers):
      if (buffer is not None
          and jnp.promote_types(u.dtype, buffer.dtype) != buffer.dtype):
        raise TypeError(
            f"`updates` leaf '{prefix.param_path_str(path) or '<root>'}' is "
            f"{u.dtype}, wider than the {buffer.dtype} buffer that "
            "store_direction=True keeps for its parameter: it would be "
            "rounded. Use the default path (store_direction=False) for "
            "updates wider than the params' compute dtype.")

    written = [None if b is None else jax.lax.dynamic_update_slice(
        b, u.astype(b.dtype), (0,) * b.ndim) for b, u in zip(buffers, us)]
    out = [u if w is None else w.astype(u.dtype) for w, u in zip(written, us)]
    return treedef.unflatten(out), StoredDirectionState(
        direction=treedef.unflatten(written))

  return optax.GradientTransformation(init_fn, update_fn)
