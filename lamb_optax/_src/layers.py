r"""What a "layer" is: the axes of a leaf that index layers, and the mesh axes
a layer's norm is summed over.

By default a layer is one leaf of the parameter pytree. Scanned models
(``flax.linen.scan``, ``nnx.scan``) stack the :math:`L` layers of a block into
one leaf of shape ``(L, ...)``; ``layer_axes`` names the axes that index the
layers, so that each slice gets its own norm and trust ratio. Under
``shard_map`` a leaf is a local block and its norm is a sum over the devices
that hold the other blocks: ``axis_name`` names those mesh axes.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
from jax.sharding import PartitionSpec
import numpy as np

from lamb_optax._src import prefix

LayerAxes = Optional[Union[int, Sequence[int]]]
LayerAxesArg = Optional[Union[Any, Callable[[Any], Any]]]
AxisNameArg = Optional[Union[str, Sequence[str], Any]]


def _is_int(x: Any) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_axes_spec(x: Any) -> bool:
  """A leaf of a ``layer_axes`` tree: None, an int or a tuple/list of ints."""
  return (x is None or _is_int(x)
          or (isinstance(x, (tuple, list)) and all(_is_int(a) for a in x)))


def _is_names_spec(x: Any) -> bool:
  """A leaf of an ``axis_name`` tree: None, a str or a tuple/list of strs."""
  return (x is None or isinstance(x, str)
          or (isinstance(x, (tuple, list)) and all(isinstance(a, str) for a in x)))


def resolve_layer_axes(layer_axes: LayerAxesArg, params: Any,
                       name: str = "layer_axes") -> list[tuple[int, ...]]:
  """The layer axes of every leaf, as sorted non-negative tuples.

  Args:
    layer_axes: None, an int or tuple of ints (for every leaf), a pytree
      (or prefix) of such values matching ``params``, or a callable
      ``params -> such a tree``.
    params: The parameters.
    name: The argument's name in errors.

  Returns:
    A list aligned with ``jax.tree.leaves(params)``; ``()`` means the whole
    leaf is one layer.
  """
  leaves = jax.tree.leaves(params)
  if layer_axes is None:
    return [()] * len(leaves)
  if callable(layer_axes):
    layer_axes = layer_axes(params)
  specs = prefix.per_leaf(layer_axes, params, name=name,
                          what="None, an int or a tuple of ints",
                          is_spec=_is_axes_spec)
  out = []
  for (path, spec), leaf in zip(specs, leaves):
    if spec is None:
      out.append(())
      continue
    axes = (spec,) if _is_int(spec) else tuple(spec)
    ndim = np.ndim(leaf)
    normalised = []
    for a in axes:
      if not -ndim <= int(a) < ndim:
        raise ValueError(
            f"`{name}` for leaf '{path or '<root>'}' names axis {int(a)}, out "
            f"of range for its shape {tuple(np.shape(leaf))} (ndim {ndim}).")
      normalised.append(int(a) % ndim)
    if len(set(normalised)) != len(normalised):
      raise ValueError(f"`{name}` for leaf '{path or '<root>'}' repeats an "
                       f"axis: {axes!r}.")
    out.append(tuple(sorted(normalised)))
  return out


def resolve_axis_names(axis_name: AxisNameArg, params: Any,
                       name: str = "axis_name") -> list[tuple[str, ...]]:
  """The mesh axes each leaf's squared norms are summed over (``psum``).

  Args:
    axis_name: None, a mesh axis name or tuple of names (for every leaf), or
      a pytree (or prefix) of such values matching ``params``.
    params: The parameters.
    name: The argument's name in errors.

  Returns:
    A list of tuples of axis names aligned with ``jax.tree.leaves(params)``.
  """
  leaves = jax.tree.leaves(params)
  if axis_name is None:
    return [()] * len(leaves)
  if isinstance(axis_name, str) or (
      isinstance(axis_name, (tuple, list)) and axis_name
      and all(isinstance(a, str) for a in axis_name)):
    return [_names(axis_name)] * len(leaves)
  specs = prefix.per_leaf(axis_name, params, name=name,
                          what="None, a mesh axis name or a tuple of names",
                          is_spec=_is_names_spec)
  return [_names(spec) for _, spec in specs]


def _names(spec: Any) -> tuple[str, ...]:
  if spec is None:
    return ()
  names = (spec,) if isinstance(spec, str) else tuple(spec)
  if len(set(names)) != len(names):
    raise ValueError(f"`axis_name` repeats a mesh axis: {spec!r}.")
  return names


def _spec_entries(spec: Any) -> Optional[tuple[Any, ...]]:
  """The per-dimension entries of a partitioning annotation, or None."""
  if isinstance(spec, PartitionSpec):
    return tuple(spec)
  names = getattr(spec, "names", None)  # flax.linen Partitioned & co.
  if isinstance(names, (tuple, list, PartitionSpec)):
    return tuple(names)
  get_metadata = getattr(spec, "get_metadata", None)  # nnx.Variable
  if callable(get_metadata):
    metadata = get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
      value = metadata.get(key)
      if value is not None:
        return tuple(value)
    return None
  if isinstance(spec, tuple) and all(
      e is None or isinstance(e, str)
      or (isinstance(e, tuple) and all(isinstance(n, str) for n in e))
      for e in spec):
    return spec
  return None


def _entry_names(entry: Any) -> tuple[str, ...]:
  if entry is None:
    return ()
  if isinstance(entry, str):
    return (entry,)
  return tuple(entry)


def layer_axes_from_metadata(tree: Any,
                             layer_names: Union[str, Sequence[str]] = "layers"
                             ) -> Any:
  r"""``layer_axes`` from the axis names a Flax model already carries.

  A scanned Flax model names the axis it stacks layers along:
  ``flax.linen.scan(..., metadata_params={nn.PARTITION_NAME: 'layers'})`` and
  ``nnx.scan``/``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME:
  'layers'})`` insert that name into each stacked parameter's partitioning
  metadata (this needs the parameters to carry such metadata, e.g. from
  ``nn.with_partitioning`` / ``nnx.with_partitioning``). This function maps
  every leaf to the positions of ``layer_names`` among its axis names, so a
  scanned model is trained with one line::

    tx = lamb_optax.lamb(1e-3, layer_axes=lamb_optax.layer_axes_from_metadata(
        variables['params']))

  Args:
    tree: Boxed linen params (``nn.Partitioned`` / ``nn.LogicallyPartitioned``
      leaves), an ``nnx.State`` of ``nnx.Variable`` s (``nnx.state(model,
      nnx.Param)``), or a pytree of ``PartitionSpec`` s or tuples of logical
      axis names (``nn.get_partition_spec(variables)``,
      ``nnx.get_partition_spec(state)``).
    layer_names: The logical axis name(s) that index layers.

  Returns:
    A pytree with the structure of the (unboxed) params whose leaves are
    ``None`` (the leaf is one layer) or a tuple of ints, ready for
    ``layer_axes=``. For an ``nnx.State`` it is an ``nnx.State`` (it fits
    ``nnx.Optimizer``; use ``nnx.to_pure_dict`` on it for pure-dict params).

  Stacked leaves that carry no partitioning metadata (e.g. a LayerNorm scale
  created without ``with_partitioning``) get ``None``: the whole stack is then
  one layer. That is harmless when they are outside the trust-ratio mask (BERT's
  convention), but annotate them, or give their ``layer_axes`` by hand, if
  their ratio matters.

  Examples:
    >>> from jax.sharding import PartitionSpec as P
    >>> import lamb_optax
    >>> specs = {'blocks': {'kernel': P('layers', None, 'model')},
    ...          'head': {'kernel': P(None, 'model')}}
    >>> lamb_optax.layer_axes_from_metadata(specs)
    {'blocks': {'kernel': (0,)}, 'head': {'kernel': None}}
  """
  names = ((layer_names,) if isinstance(layer_names, str) else
           tuple(layer_names) if isinstance(layer_names, (tuple, list)) else ())
  if not names or not all(isinstance(n, str) for n in names):
    raise TypeError("`layer_names` must be a str or a sequence of str, got "
                    f"{layer_names!r}.")

  def axes_of(annotation):
    entries = _spec_entries(annotation)
    if entries is None:
      return None
    axes = tuple(i for i, e in enumerate(entries)
                 if any(n in names for n in _entry_names(e)))
    return axes or None

  def is_leaf(x):
    # An nnx.Variable is one leaf even without sharding metadata (e.g. a
    # LayerNorm scale): mapping into it would leave the Variable box in the
    # result, which then fits neither the pure params nor nnx.as_pure(state).
    return (_spec_entries(x) is not None or x is None
            or callable(getattr(x, "get_metadata", None)))

  return jax.tree.map(axes_of, tree, is_leaf=is_leaf)


def axis_names_from_specs(specs: Any, layer_axes: LayerAxesArg = None) -> Any:
  r"""``axis_name`` for ``shard_map`` from the params' ``PartitionSpec`` s.

  Under ``shard_map`` each device holds a block of every leaf; a layer's
  squared norm is the sum of its blocks' squared norms over exactly the mesh
  axes that split the leaf. Summing (``psum``) over an axis along which the
  leaf is *replicated* would count it once per device on that axis, so the
  result lists only the axes named in each leaf's spec. Mesh axes that split
  a *layer* axis are left out too: the devices along them hold different
  layers, whose norms must not be added.

  Args:
    specs: A pytree of ``jax.sharding.PartitionSpec`` (the ``in_specs`` of
      the params), one per leaf.
    layer_axes: The ``layer_axes`` given to the optimizer (same forms), or
      None.

  Returns:
    A pytree of tuples of mesh axis names (``None`` where the leaf is not
    split), ready for ``axis_name=``.

  Examples:
    >>> from jax.sharding import PartitionSpec as P
    >>> import lamb_optax
    >>> specs = {'w': P('data', 'model'), 'b': P(), 'stack': P('stage', 'model')}
    >>> lamb_optax.axis_names_from_specs(specs, layer_axes={'w': None,
    ...     'b': None, 'stack': 0})
    {'b': None, 'stack': ('model',), 'w': ('data', 'model')}
  """
  is_spec = lambda x: isinstance(x, PartitionSpec) or x is None
  flat, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
  for i, spec in enumerate(flat):
    if not isinstance(spec, PartitionSpec):
      raise TypeError(f"`specs` leaf {i} must be a PartitionSpec, got "
                      f"{type(spec).__name__} {spec!r}.")
  if layer_axes is None:
    per_leaf_axes = [()] * len(flat)
  else:
    if callable(layer_axes):
      raise TypeError("`layer_axes` must be a tree here, not a callable (there "
                      "are no params to call it on).")
    dummies = treedef.unflatten([np.zeros((1,) * max(len(s), 1)) for s in flat])
    spec_axes = prefix.per_leaf(layer_axes, dummies, name="layer_axes",
                                what="None, an int or a tuple of ints",
                                is_spec=_is_axes_spec)
    per_leaf_axes = []
    for (path, a), spec in zip(spec_axes, flat):
      a = () if a is None else (a,) if _is_int(a) else tuple(a)
      if any(int(i) < 0 for i in a):
        # A PartitionSpec may omit trailing dimensions, so it does not tell
        # the leaf's rank, and a negative axis cannot be placed.
        raise ValueError(
            f"`layer_axes` for leaf '{path or '<root>'}' is {a!r}: give "
            "non-negative axes here (a PartitionSpec does not tell the "
            "leaf's rank).")
      per_leaf_axes.append(tuple(int(i) for i in a))
  out = []
  for spec, axes in zip(flat, per_leaf_axes):
    names = []
    for dim, entry in enumerate(tuple(spec)):
      if dim in axes:
        continue
      names.extend(n for n in _entry_names(entry) if n not in names)
    out.append(tuple(names) or None)
  return treedef.unflatten(out)
