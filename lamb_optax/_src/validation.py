"""Argument and input checks shared by the transforms.

Construction-time checks run on plain Python numbers and concrete arrays. Values
that are traced (``optax.inject_hyperparams`` passes hyperparameters as traced
arrays inside ``update``) or callables (schedules) are not checked here: they
are only known at run time.
"""

from __future__ import annotations

import numbers
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _concrete_float(value: Any) -> Optional[float]:
  """Returns ``value`` as a Python float when it is a concrete real scalar."""
  if isinstance(value, jax.core.Tracer) or callable(value):
    return None
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"expected a real number, got the boolean {value!r}")
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
    if not jnp.issubdtype(value.dtype, jnp.number) or jnp.issubdtype(
        value.dtype, jnp.complexfloating):
      raise TypeError(f"expected a real number, got dtype {value.dtype}")
    return float(value)
  raise TypeError(f"expected a real scalar, got {type(value).__name__} {value!r}")


def _number(name: str, value: Any) -> Optional[float]:
  try:
    return _concrete_float(value)
  except TypeError as e:
    raise TypeError(f"`{name}`: {e}") from None


def _rounding_hint(value: Any) -> str:
  dtype = getattr(value, "dtype", None)
  if dtype is not None and jnp.dtype(dtype).itemsize < 4:
    return (f" The value was stored as {jnp.dtype(dtype)}, which rounds it; "
            "with optax.inject_hyperparams pass hyperparam_dtype=jnp.float32.")
  return ""


def check_unit_interval(name: str, value: Any) -> None:
  """Raises ValueError unless ``0 <= value < 1`` (when concrete)."""
  v = _number(name, value)
  if v is not None and not 0.0 <= v < 1.0:
    raise ValueError(
        f"`{name}` must be in [0, 1), got {value!r}.{_rounding_hint(value)}")


def check_non_negative(name: str, value: Any) -> None:
  """Raises ValueError unless ``value >= 0`` (when concrete)."""
  v = _number(name, value)
  if v is not None and not v >= 0.0:  # also rejects NaN
    raise ValueError(f"`{name}` must be >= 0, got {value!r}.")


def check_positive(name: str, value: Any) -> None:
  """Raises ValueError unless ``value > 0`` (when concrete)."""
  v = _number(name, value)
  if v is not None and not v > 0.0:
    raise ValueError(f"`{name}` must be > 0, got {value!r}.")


def check_bounds(name: str, bounds: Any) -> Optional[tuple[float, float]]:
  """Validates an optional ``(lo, hi)`` pair with ``0 <= lo <= hi``.

  ``hi`` may be ``float('inf')``. Returns the pair as Python floats, or None.
  """
  if bounds is None:
    return None
  if isinstance(bounds, (str, bytes)) or not isinstance(bounds, Sequence):
    raise TypeError(
        f"`{name}` must be None or a pair (lo, hi) with 0 <= lo <= hi, got "
        f"{bounds!r}.")
  if len(bounds) != 2:
    raise ValueError(
        f"`{name}` must be a pair (lo, hi) with 0 <= lo <= hi, got "
        f"{len(bounds)} values: {bounds!r}.")
  lo, hi = (_number(name, b) for b in bounds)
  if lo is None or hi is None:
    raise TypeError(f"`{name}` must hold concrete numbers, got {bounds!r}.")
  if not (0.0 <= lo <= hi):  # also rejects NaN
    raise ValueError(
        f"`{name}` must satisfy 0 <= lo <= hi, got (lo, hi) = {bounds!r}.")
  return lo, hi


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(
        f"`{name}` must be one of {list(choices)!r}, got {value!r}.")


def path_str(path: Sequence[Any]) -> str:
  """Joins a pytree key path as ``'a/b/0/kernel'``."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(str(key.name))
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:  # Unknown key types: fall back to their own string form.
      parts.append(re.sub(r"^[\[\.]|[\]]$", "", str(key)))
  return "/".join(parts)


def param_path_str(path: Sequence[Any]) -> str:
  """:func:`path_str` without a trailing Flax ``Variable`` attribute.

  ``nnx.state(model, nnx.Param)`` leaves are reached through a
  ``GetAttrKey('value')``, while ``nnx.Optimizer`` passes pure arrays to
  ``update``: dropping that attribute gives both the same path.
  """
  path = list(path)
  if (path and isinstance(path[-1], jax.tree_util.GetAttrKey)
      and path[-1].name in ("value", "raw_value")):
    path = path[:-1]
  return path_str(path)


def check_float_leaves(tree: Any, name: str) -> None:
  """Raises TypeError naming the first non-floating leaf of ``tree``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      shown = dtype if dtype is not None else type(leaf).__name__
      raise TypeError(
          f"`{name}` leaf '{path_str(path) or '<root>'}' has type {shown}; "
          "LAMB/LARS need floating-point leaves (float16, bfloat16, float32 "
          "or float64).")


def check_same_structure(reference: Any, other: Any, name: str,
                         reference_name: str = "params") -> None:
  ref_def = jax.tree.structure(reference)
  other_def = jax.tree.structure(other)
  if ref_def != other_def:
    raise ValueError(
        f"`{name}` does not have the structure of `{reference_name}`: "
        f"{name} is {other_def}, {reference_name} is {ref_def}.")


def resolve_mask(mask: Any, params: Any, name: str) -> list[bool]:
  """Resolves a mask (tree, prefix tree or callable) to one bool per leaf.

  Returns a flat list aligned with ``jax.tree.leaves(params)``; a mask of
  None selects every leaf.
  """
  if mask is None:
    return [True] * len(jax.tree.leaves(params))
  if callable(mask):
    mask = mask(params)
  try:
    full = jax.tree.map(
        lambda m, sub: jax.tree.map(lambda _: m, sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"`{name}` does not fit the params: it must be a pytree of bools with "
        f"the structure of the params (or a prefix of it), or a callable "
        f"returning one. Mask structure: {jax.tree.structure(mask)}; params "
        f"structure: {jax.tree.structure(params)}.") from e
  flat = jax.tree.leaves(full)
  out = []
  for path, m in jax.tree_util.tree_leaves_with_path(full):
    if not isinstance(m, (bool, np.bool_)):
      raise TypeError(
          f"`{name}` leaf '{path_str(path)}' must be a Python bool, got "
          f"{type(m).__name__} {m!r}.")
    out.append(bool(m))
  assert len(out) == len(flat)
  return out


def check_masks(params: Any, **masks: Any) -> None:
  """Resolves each named mask that is not None against ``params``."""
  for name, mask in masks.items():
    if mask is not None:
      resolve_mask(mask, params, name)


def check_params_present(params: Any, transform: str) -> None:
  if params is None:
    raise ValueError(
        f"{transform} needs the current parameters: call "
        "`update(updates, state, params)` with `params` (the trust ratio is "
        "||params|| / ||update|| per layer).")


MaskArg = Optional[Any | Callable[[Any], Any]]
