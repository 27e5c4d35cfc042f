"""Argument and input checks shared by the transforms.

Construction-time checks run on plain Python numbers and concrete arrays. Values
that are traced (``optax.inject_hyperparams`` passes hyperparameters as traced
arrays inside ``update``) or callables (schedules) are not checked here: they
are only known at run time.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lamb_optax._src import prefix


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


def check_learning_rate(value: Any, name: str = "learning_rate") -> None:
  """Raises unless ``value`` is a finite number >= 0 or a schedule.

  None, strings and bools are refused by type (``lamb(None)`` would
  otherwise climb the gradient at an effective learning rate of 1);
  negative, NaN and infinite values by value. Schedules and traced values
  (``optax.inject_hyperparams`` under ``jit``) are only known at run time.
  """
  if value is None or isinstance(value, (str, bytes)):
    raise TypeError(
        f"`{name}` must be a float >= 0 or an optax schedule (a callable "
        f"step -> value), got {type(value).__name__} {value!r}.")
  check_finite_non_negative(name, value)


def check_finite_non_negative(name: str, value: Any) -> None:
  """Raises unless ``value`` is finite and >= 0 (when concrete)."""
  v = _number(name, value)
  if v is not None and not (math.isfinite(v) and v >= 0.0):
    raise ValueError(f"`{name}` must be finite and >= 0, got {value!r}.")


def check_bool(name: str, value: Any) -> None:
  """Raises TypeError unless ``value`` is a Python bool."""
  if not isinstance(value, bool):
    raise TypeError(f"`{name}` must be a bool, got {value!r}.")


def check_patterns(name: str, patterns: Any) -> Optional[list[str]]:
  """None or a list/tuple of regex strings (TF's exclusion lists)."""
  if patterns is None:
    return None
  if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
    raise TypeError(
        f"`{name}` must be None or a list of regex strings, got {patterns!r} "
        "(TF iterates a plain string character by character: pass "
        "['bias'], not 'bias').")
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"`{name}` must hold regex strings, got {p!r}.")
    try:
      re.compile(p)
    except re.error as e:
      raise ValueError(f"`{name}`: invalid regex {p!r}: {e}") from None
  return list(patterns)


def check_ordered(lo_name: str, lo: Any, hi_name: str, hi: Any) -> None:
  """Raises ValueError if concrete ``lo > hi``."""
  lo_v, hi_v = _number(lo_name, lo), _number(hi_name, hi)
  if lo_v is not None and hi_v is not None and lo_v > hi_v:
    raise ValueError(
        f"`{lo_name}` must be <= `{hi_name}`, got {lo_name}={lo!r} > "
        f"{hi_name}={hi!r}.")


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


def check_float_leaves(tree: Any, name: str) -> None:
  """Raises TypeError naming the first non-floating leaf of ``tree``."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
      shown = dtype if dtype is not None else type(leaf).__name__
      raise TypeError(
          f"`{name}` leaf '{prefix.path_str(path) or '<root>'}' has type {shown}; "
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


def check_updates_match_params(updates: Any, params: Any,
                               name: str = "updates") -> None:
  """Raises naming the first leaf whose shape or dtype kind differs.

  ``updates`` must have the structure of ``params`` (checked first), and
  each leaf the shape of its parameter and a floating dtype like it (its
  precision may differ: bf16 gradients of float32 params are fine).
  """
  check_same_structure(params, updates, name)
  flat_updates = jax.tree.leaves(updates)
  for (path, x), u in zip(jax.tree_util.tree_leaves_with_path(params),
                          flat_updates):
    where = prefix.param_path_str(path) or "<root>"
    x_shape, u_shape = np.shape(x), np.shape(u)
    if x_shape != u_shape:
      raise ValueError(
          f"`{name}` leaf '{where}' has shape {tuple(u_shape)}, but its "
          f"parameter has shape {tuple(x_shape)}: gradients must have the "
          "shapes of the params they were taken with.")
    x_dtype = getattr(x, "dtype", None)
    u_dtype = getattr(u, "dtype", None)
    if x_dtype is None or u_dtype is None:
      continue  # check_float_leaves names leaves that are not arrays.
    if (jnp.issubdtype(x_dtype, jnp.floating)
        != jnp.issubdtype(u_dtype, jnp.floating)):
      raise TypeError(
          f"`{name}` leaf '{where}' has dtype {u_dtype}, but its parameter "
          f"has dtype {x_dtype}: LAMB/LARS need floating-point gradients "
          "for floating-point params.")


def check_masks(params: Any, **masks: Any) -> None:
  """Resolves each named mask that is not None against ``params``."""
  for name, mask in masks.items():
    if mask is not None:
      prefix.resolve_mask(mask, params, name)


def check_params_present(params: Any, transform: str) -> None:
  if params is None:
    raise ValueError(
        f"{transform} needs the current parameters: call "
        "`update(updates, state, params)` with `params` (the trust ratio is "
        "||params|| / ||update|| per layer).")


MaskArg = Optional[Any | Callable[[Any], Any]]
