"""What lamb_optax reads from JAX that JAX does not expose the same way in
every supported version. Each read is here, once, with its fallback."""

from __future__ import annotations

from typing import Any

import jax


def check_vma_enabled() -> bool:
  """Whether JAX tracks varying mesh axes here (``shard_map(check_vma=True)``).

  Then a value that varies along no axis is replicated along all of them.
  The public ``jax.config.check_vma`` (which follows the enclosing
  ``shard_map``) is read where it exists; older JAX only has the private
  ``jax._src.config._check_vma``; without either, assume no tracking.
  """
  public = getattr(jax.config, "check_vma", None)
  if isinstance(public, bool):
    return public
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    return bool(jax_config._check_vma.value)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False


def varying_axes(value: Any) -> frozenset[str]:
  """The mesh axes ``value`` varies along, where JAX tracks them."""
  aval = jax.typeof(value)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(vma or ())
