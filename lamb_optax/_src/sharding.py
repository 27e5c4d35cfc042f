r"""Shardings of the optimizer state, from the shardings of the params.

Under ``jax.jit`` with ``NamedSharding`` the optimizer needs no collective of
its own: XLA adds the sums a sharded layer's norm needs. What the user must
choose is where the state lives. :func:`state_shardings` places every state
leaf that mirrors a parameter (Adam's ``mu``/``nu``, LARS' momentum) like that
parameter (FSDP, tensor parallelism), optionally splits it further over a
data-parallel axis (ZeRO-1), and replicates the rest (step counts, trust
ratios), and places a per-layer trust-ratio array like the layer axes of its
parameter.
"""

from __future__ import annotations

import itertools
from typing import Any, Optional

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec
import optax

from lamb_optax._src import prefix


def state_shardings(
    optimizer: optax.GradientTransformation,
    params: Any,
    param_shardings: Any,
    *,
    zero_axis: Optional[str] = None,
) -> Any:
  r"""``NamedSharding`` s for ``optimizer.init(params)``, following the params.

  The state's shapes come from :func:`jax.eval_shape` (nothing is computed or
  allocated). Every subtree of the state that has the params' structure (such
  as ``mu``, ``nu``, LARS' momentum or the trust ratios; leaves masked out
  with :class:`optax.MaskedNode` are allowed) gives each leaf whose shape
  equals its parameter's the parameter's sharding, so moments are sharded
  exactly like the params (FSDP over a data axis, tensor parallelism over a
  model axis). A leaf of such a subtree whose shape is that of some axes of
  its parameter (the per-layer trust ratios of a leaf with ``layer_axes``)
  gets the parameter's sharding of those axes, so ratios of layers split
  over a mesh axis (pipeline stages) are split the same way; when its shape
  matches several choices of axes that shard differently, it is replicated.
  Every other leaf (step counts, scalar ratios) is replicated.

  With ``zero_axis`` (ZeRO-1: replicated params, partitioned optimizer
  state), each parameter-shaped state leaf that is not already split over
  that mesh axis is additionally split over it, along its first dimension
  that its sharding leaves unsplit and whose size the axis size divides;
  leaves with no such dimension keep the parameter's sharding.

  Use the result as the ``out_shardings`` of the jitted ``init`` and as the
  state's in/out sharding of the train step, so the state never moves::

    state_sh = lamb_optax.state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = jax.jit(train_step, out_shardings=(param_sh, state_sh))

  Args:
    optimizer: The :class:`optax.GradientTransformation` whose state is
      placed.
    params: The parameters, as arrays or :class:`jax.ShapeDtypeStruct` s.
    param_shardings: A :class:`jax.sharding.NamedSharding` per parameter: a
      pytree with the params' structure, a prefix of it, or one sharding for
      all. All must share one mesh.
    zero_axis: Optional name of a mesh axis to split the parameter-shaped
      state over as well (ZeRO-1).

  Returns:
    A pytree of :class:`jax.sharding.NamedSharding` with the structure of
    ``optimizer.init(params)``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import lamb_optax
    >>> mesh = jax.make_mesh((1,), ('data',))
    >>> params = {'w': jnp.zeros((4, 2)), 'b': jnp.zeros(2)}
    >>> tx = lamb_optax.lamb(1e-3, max_grad_norm=1.0, store_direction=True)
    >>> shardings = lamb_optax.state_shardings(
    ...     tx, params, NamedSharding(mesh, P()), zero_axis='data')
    >>> shardings['adam'].mu['w'].spec  # mu and nu: split over 'data' (ZeRO-1).
    P('data', None)
    >>> shardings['adam'].count.spec  # The step count: replicated.
    P()
    >>> shardings['direction'].direction['w'].spec  # The stored u, as mu.
    P('data', None)
    >>> shardings['trust_ratio'].trust_ratios['w'].spec  # A scalar ratio.
    P()
  """
  params_shape = jax.eval_shape(lambda p: p, params)
  treedef = jax.tree.structure(params_shape)
  flat_params = treedef.flatten_up_to(params_shape)
  flat_shardings = _per_param_shardings(param_shardings, params_shape)
  mesh = flat_shardings[0].mesh
  for sharding in flat_shardings[1:]:
    if sharding.mesh != mesh:
      raise ValueError(
          "`param_shardings` must all use one mesh; got meshes with axes "
          f"{dict(mesh.shape)} and {dict(sharding.mesh.shape)}.")
  param_shardings = list(flat_shardings)
  if zero_axis is not None:
    if not isinstance(zero_axis, str):
      raise TypeError(f"`zero_axis` must be a mesh axis name (str) or None, "
                      f"got {zero_axis!r}.")
    if zero_axis not in mesh.axis_names:
      raise ValueError(
          f"`zero_axis` {zero_axis!r} is not an axis of the params' mesh, "
          f"whose axes are {tuple(mesh.axis_names)}.")
    flat_shardings = [_zero_split(s, p.shape, zero_axis)
                      for s, p in zip(flat_shardings, flat_params)]
  replicated = NamedSharding(mesh, PartitionSpec())

  state_shape = jax.eval_shape(optimizer.init, params_shape)
  single_leaf = treedef.num_nodes == 1 and treedef.num_leaves == 1

  def place(node):
    if not jax.tree.leaves(node):  # None, EmptyState(), MaskedNode(): no leaves.
      return node
    if _is_array(node):
      if single_leaf and node.shape == flat_params[0].shape:
        return flat_shardings[0]
      return replicated
    if not single_leaf:
      parts = _params_like(node, treedef)
      if parts is not None:
        return treedef.unflatten([
            part if not _is_array(part)  # A masked-out leaf.
            else sharding if part.shape == param.shape
            else _of_axes(part.shape, param.shape, param_sharding)
            for part, param, sharding, param_sharding in zip(
                parts, flat_params, flat_shardings, param_shardings)])
    children, node_def = jax.tree.flatten(node, is_leaf=lambda x: x is not node)
    return node_def.unflatten([place(child) for child in children])

  return place(state_shape)


def _of_axes(shape: tuple[int, ...], param_shape: tuple[int, ...],
             sharding: NamedSharding) -> NamedSharding:
  """``sharding`` restricted to the axes of ``param_shape`` that ``shape``
  is made of (in order), or replicated if no choice, or several that shard
  differently, match."""
  entries = (list(sharding.spec)
             + [None] * (len(param_shape) - len(sharding.spec)))
  choices = {tuple(entries[i] for i in axes)
             for axes in itertools.combinations(range(len(param_shape)),
                                                len(shape))
             if tuple(param_shape[i] for i in axes) == tuple(shape)}
  restricted = list(choices.pop()) if len(choices) == 1 else []
  while restricted and restricted[-1] is None:
    restricted.pop()
  return NamedSharding(sharding.mesh, PartitionSpec(*restricted),
                       memory_kind=sharding.memory_kind)


def _is_array(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _params_like(node: Any, treedef: Any) -> Optional[list[Any]]:
  """``node``'s leaves in params order, if it has the params' structure."""
  try:
    parts = treedef.flatten_up_to(node)
  except (ValueError, TypeError):
    return None
  if not any(_is_array(p) for p in parts):
    return None
  if not all(_is_array(p) or not jax.tree.leaves(p) for p in parts):
    return None
  return parts


def _per_param_shardings(param_shardings: Any, params: Any) -> list[Any]:
  """One ``NamedSharding`` per leaf of ``params``, from a (prefix) tree."""
  if not jax.tree.leaves(params):
    raise ValueError("`params` has no leaves.")
  return [sharding for _, sharding in prefix.per_leaf(
      param_shardings, params, name="param_shardings",
      what="a jax.sharding.NamedSharding",
      is_spec=lambda x: isinstance(x, NamedSharding))]


def _zero_split(sharding: NamedSharding, shape: tuple[int, ...],
                zero_axis: str) -> NamedSharding:
  """``sharding``, further split over ``zero_axis`` along a free dimension."""
  entries = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  used = {name for entry in entries if entry is not None
          for name in ((entry,) if isinstance(entry, str) else entry)}
  if zero_axis in used:
    return sharding
  size = sharding.mesh.shape[zero_axis]
  for dim, (entry, n) in enumerate(zip(entries, shape)):
    if entry is None and n % size == 0:
      entries[dim] = zero_axis
      return NamedSharding(sharding.mesh, PartitionSpec(*entries),
                           memory_kind=sharding.memory_kind)
  return sharding
