"""Argument and input checks shared by the whole library.

Every error lamb_optax raises for bad input is worded here, once: it names
the argument and says what was expected. Construction-time checks run on plain
Python numbers and concrete arrays. Values that are traced
(``optax.inject_hyperparams`` passes hyperparameters as traced arrays inside
``update``) or callables (schedules) are not checked here: they are only known
at run time. The input checks (:func:`check_params`, :func:`check_inputs`)
run once per call of an alias (``lamb``, ``lars``, a preset) at its boundary,
and once per call of a building block used on its own.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, Iterable, Optional, Sequence

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


def check_patterns(name: str, patterns: Any, *,
                   single: bool = False) -> Optional[list[re.Pattern[str]]]:
  """Compiles None or a list/tuple of regex strings (TF's exclusion lists).

  With ``single=True`` one string is one pattern (the mask builders);
  otherwise a plain string is refused, since TF would iterate it character
  by character.
  """
  if patterns is None:
    return None
  if single and isinstance(patterns, str):
    patterns = [patterns]
  elif single and isinstance(patterns, Iterable) and not isinstance(
      patterns, bytes):
    patterns = list(patterns)
  if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
    raise TypeError(
        f"`{name}` must be None or a list of regex strings, got {patterns!r} "
        "(TF iterates a plain string character by character: pass "
        "['bias'], not 'bias').")
  compiled = []
  for p in patterns:
    if not isinstance(p, str):
      raise TypeError(f"`{name}` must hold regex strings, got {p!r}.")
    try:
      compiled.append(re.compile(p))
    except re.error as e:
      raise ValueError(f"`{name}`: invalid regex {p!r}: {e}") from None
  return compiled


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


def check_inexact_leaves(tree: Any, name: str) -> None:
  """Raises TypeError naming the first leaf of ``tree`` that is not a
  floating-point or complex array."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
      shown = dtype if dtype is not None else type(leaf).__name__
      raise TypeError(
          f"`{name}` leaf '{prefix.path_str(path) or '<root>'}' has type "
          f"{shown}; LAMB/LARS need floating-point leaves (float16, "
          "bfloat16, float32 or float64, or complex64 or complex128).")


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
  each leaf the shape of its parameter and a dtype of its kind: floating for
  a floating parameter, complex for a complex one (the precision may differ:
  bf16 gradients of float32 params are fine).
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
      continue  # check_inexact_leaves names leaves that are not arrays.
    if _kind(x_dtype) != _kind(u_dtype):
      raise TypeError(
          f"`{name}` leaf '{where}' has dtype {u_dtype}, but its parameter "
          f"has dtype {x_dtype}: LAMB/LARS need {_kind(x_dtype)} gradients "
          f"for {_kind(x_dtype)} params.")


def _kind(dtype: Any) -> str:
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return "complex"
  if jnp.issubdtype(dtype, jnp.floating):
    return "floating-point"
  return "numeric" if jnp.issubdtype(dtype, jnp.number) else str(dtype)


def check_params_present(params: Any, transform: str) -> None:
  if params is None:
    raise ValueError(
        f"{transform} needs the current parameters: call "
        "`update(updates, state, params)` with `params` (the trust ratio is "
        "||params|| / ||update|| per layer).")


def check_params(params: Any) -> None:
  """The check of ``init``: every leaf of ``params`` is an inexact array."""
  check_inexact_leaves(params, "params")


def check_inputs(updates: Any, params: Any, transform: str) -> None:
  """The checks of ``update``, in the order a reader needs them: params are
  given, have the structure of the updates, are inexact arrays, and every
  update leaf has its parameter's shape and dtype kind."""
  check_params_present(params, transform)
  check_same_structure(params, updates, "updates")
  check_inexact_leaves(params, "params")
  check_inexact_leaves(updates, "updates")
  check_updates_match_params(updates, params)


# --------------------------------------------------------------------------
# Arguments of the schedules, the accumulation helpers and the mask builders.
# --------------------------------------------------------------------------


def check_int(name: str, value: Any, minimum: int, *,
              expected: str = "an int") -> int:
  """Returns ``value`` as an int >= ``minimum``, or raises naming ``name``.

  Bools and floats are refused by type (TypeError: "must be {expected}"),
  values below ``minimum`` by value (ValueError).
  """
  if (isinstance(value, (bool, np.bool_))
      or not isinstance(value, numbers.Integral)):
    raise TypeError(
        f"`{name}` must be {expected}, got {type(value).__name__} "
        f"{value!r}.")
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
  return int(value)


def check_real(name: str, value: Any, *, positive: bool) -> float:
  """Returns ``value`` as a finite float (> 0 or >= 0), or raises."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    raise TypeError(
        f"`{name}` must be a concrete real number, got {type(value).__name__} "
        f"{value!r}.")
  if positive:
    check_positive(name, value)
  else:
    check_non_negative(name, value)
  value = float(value)
  if not math.isfinite(value):
    raise ValueError(f"`{name}` must be finite, got {value!r}.")
  return value


def check_sequence(name: str, value: Any) -> list[Any]:
  """A non-empty list or tuple with one entry per phase, as a list."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise TypeError(
        f"`{name}` must be a sequence (list or tuple) with one entry per "
        f"phase, got {type(value).__name__} {value!r}.")
  if not value:
    raise ValueError(f"`{name}` must have at least one entry, got {value!r}.")
  return list(value)


def check_same_length(**sequences: list[Any]) -> None:
  lengths = {name: len(seq) for name, seq in sequences.items()}
  if len(set(lengths.values())) > 1:
    shown = ", ".join(f"{name} has {n}" for name, n in lengths.items())
    raise ValueError(
        f"One entry per phase: the sequences must have the same length, but "
        f"{shown}.")


def check_float_dtype(name: str, dtype: Any, *,
                      allow_complex: bool = False) -> jnp.dtype:
  """``dtype`` as a floating :class:`jnp.dtype`, or an error naming ``name``.

  A dtype of another kind (int8, bool) is a ValueError; something that is no
  dtype at all a TypeError. With ``allow_complex``, complex dtypes (for
  complex parameters) are accepted too.
  """
  expected = "a floating dtype (e.g. jnp.float32 or jnp.bfloat16)"
  if allow_complex:
    expected += ", or a complex one for complex params"
  try:
    as_dtype = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"`{name}` must be {expected}, got {type(dtype).__name__} "
                    f"{dtype!r}.") from None
  kind = jnp.inexact if allow_complex else jnp.floating
  if not jnp.issubdtype(as_dtype, kind):
    raise ValueError(f"`{name}` must be {expected}, got {as_dtype}.")
  return as_dtype


def check_optional_callable(name: str, value: Any, signature: str) -> None:
  """Raises TypeError unless ``value`` is None or a callable."""
  if value is not None and not callable(value):
    raise TypeError(f"`{name}` must be None or a callable {signature}, got "
                    f"{value!r}.")


MaskArg = Optional[Any | Callable[[Any], Any]]
