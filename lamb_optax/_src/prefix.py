"""One value per parameter leaf, from a prefix tree (masks, layer axes, mesh
axis names, shardings), and the '/'-joined leaf paths errors are worded with."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np


def path_str(path: Sequence[Any]) -> str:
  """Joins a pytree key path as ``'a/b/0/kernel'``."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def param_path_str(path: Sequence[Any]) -> str:
  """A parameter's key path as ``'encoder/layer_0/attention/query/kernel'``.

  The name every lamb_optax error and the examples' logs give a parameter
  (public as ``lamb_optax.param_path``): the keys joined by ``/``, without
  a trailing Flax ``Variable`` attribute. ``nnx.state(model, nnx.Param)``
  leaves are reached through a ``GetAttrKey('value')``, while
  ``nnx.Optimizer`` passes pure arrays to ``update``: dropping that
  attribute gives both the same path.

  Args:
    path: A key path (``jax.tree_util.tree_flatten_with_path``).

  Returns:
    The ``/``-joined path.

  Examples:
    >>> import jax, lamb_optax
    >>> tree = {"dense": {"kernel": 1.0, "bias": [2.0, 3.0]}}
    >>> [lamb_optax.param_path(p)
    ...  for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
    ['dense/bias/0', 'dense/bias/1', 'dense/kernel']
  """
  path = list(path)
  if (path and isinstance(path[-1], jax.tree_util.GetAttrKey)
      and path[-1].name in ("value", "raw_value")):
    path = path[:-1]
  return path_str(path)


class _Box:
  """Keeps a spec (possibly None or a tuple) a single pytree leaf."""

  __slots__ = ("spec",)

  def __init__(self, spec):
    self.spec = spec


def per_leaf(prefix: Any, tree: Any, *, name: str, what: str,
             is_spec: Callable[[Any], bool]) -> list[tuple[str, Any]]:
  """One spec per leaf of ``tree``, from ``prefix``: a tree that is a prefix
  of ``tree`` whose leaves are specs (``is_spec``), each applying to the
  whole subtree it sits over.

  Args:
    prefix: The prefix tree (a single spec applies to every leaf).
    tree: The parameters (or anything with their structure).
    name: The argument's name, for errors.
    what: What a spec is, for errors (e.g. "a Python bool").
    is_spec: Whether a node of ``prefix`` is one spec (a leaf of it).

  Returns:
    ``(leaf path, spec)`` pairs aligned with ``jax.tree.leaves(tree)``.
  """
  try:
    full = jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda _: _Box(spec), sub),
        prefix, tree, is_leaf=is_spec)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"`{name}` does not fit the params: it must be {what}, or a pytree "
        "with the structure of the params (or a prefix of it) whose leaves "
        f"are such values, or a callable returning one. {name} structure: "
        f"{jax.tree.structure(prefix, is_leaf=is_spec)}; params structure: "
        f"{jax.tree.structure(tree)}.") from e
  out = []
  for path, box in jax.tree_util.tree_leaves_with_path(
      full, is_leaf=lambda x: isinstance(x, _Box)):
    if not isinstance(box, _Box):  # A spec leaf where params have a leaf too.
      raise ValueError(f"`{name}` does not fit the params at "
                       f"'{param_path_str(path)}'.")
    if not is_spec(box.spec):
      raise TypeError(
          f"`{name}` leaf '{param_path_str(path)}' must be {what}, "
          f"got {type(box.spec).__name__} {box.spec!r}.")
    out.append((param_path_str(path), box.spec))
  n = len(jax.tree.leaves(tree))
  if len(out) != n:
    raise ValueError(f"`{name}` gives {len(out)} entries for {n} params.")
  return out


def _is_bool(x: Any) -> bool:
  return isinstance(x, (bool, np.bool_))


def resolve_mask(mask: Any, params: Any, name: str) -> list[bool]:
  """Resolves a mask (tree, prefix tree or callable) to one bool per leaf.

  Returns a flat list aligned with ``jax.tree.leaves(params)``; a mask of
  None selects every leaf.
  """
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  if callable(mask):
    mask = mask(params)
  return [bool(m) for _, m in per_leaf(mask, params, name=name,
                                       what="a Python bool", is_spec=_is_bool)]
