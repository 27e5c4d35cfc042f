r"""Dtype rules and squared norms shared by every transform.

Arithmetic runs in at least float32 (:func:`compute_dtype`): bfloat16 and
float16 leaves are upcast before they are squared or combined, so their norms
are float32-accurate, and results are cast back to the dtype the state or the
caller holds. Complex leaves keep their dtype (complex64 or complex128); their
squared magnitudes and norms are real, in :func:`real_dtype` (float32 for
complex64, float64 for complex128), as in optax.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp

from lamb_optax._src import jax_compat


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype arithmetic runs in: at least float32 (bf16/fp16 are upcast)."""
  return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real dtype of :func:`compute_dtype`: norms and squared magnitudes
  are in it (float32 for complex64 and every narrower float)."""
  return jnp.finfo(compute_dtype(dtype)).dtype


def upcast(x: chex.Array) -> chex.Array:
  """``x`` in its :func:`compute_dtype`."""
  return x.astype(compute_dtype(x.dtype))


def abs_sq(x: chex.Array) -> chex.Array:
  r""":math:`|x|^2` elementwise, real: :math:`x^2` for real ``x`` and
  :math:`\mathrm{Re}(x)^2 + \mathrm{Im}(x)^2` for complex ``x``."""
  if jnp.iscomplexobj(x):
    return jnp.square(x.real) + jnp.square(x.imag)
  return jnp.square(x)


def squared_norms(x: chex.Array, keep_axes: tuple[int, ...] = (),
                  axis_name: tuple[str, ...] = ()) -> chex.Array:
  r"""Squared L2 norms of ``x`` over every axis not in ``keep_axes``.

  The result has the shape of the kept axes (a scalar by default) and the
  :func:`real_dtype` of ``x`` (for complex ``x``, the sum of
  :math:`|x|^2`). With ``axis_name`` the local sums are added
  over those mesh axes (``shard_map``: ``x`` is one block of the layer), see
  :func:`psum_over`.
  """
  x = upcast(x)
  reduce_axes = tuple(i for i in range(x.ndim) if i not in keep_axes)
  squared = jnp.sum(abs_sq(x), axis=reduce_axes)
  if axis_name:
    squared = psum_over(squared, axis_name)
  return squared


def psum_over(value: chex.Array, axis_name: tuple[str, ...]) -> chex.Array:
  """``lax.psum`` over mesh axes, refusing axes the value does not vary on.

  Under ``shard_map`` a value that is replicated along a mesh axis would be
  counted once per device on that axis. Where JAX tracks which axes a value
  varies along (``shard_map`` with ``check_vma=True``, the default) and the
  value varies along some axes but not one of ``axis_name``, this raises;
  without that tracking (``check_vma=False``, ``pmap``) it cannot tell. An
  axis name that is not bound gets an error that names ``axis_name``.
  """
  check_summable(value, axis_name)
  return jax.lax.psum(value, axis_name)


def check_summable(value: chex.Array, axis_name: tuple[str, ...]) -> None:
  """The checks of :func:`psum_over`, on ``value`` (or any array that varies
  along the same mesh axes), without the sum."""
  for name in axis_name:
    try:
      jax.lax.axis_size(name)
    except NameError as e:
      raise ValueError(
          f"`axis_name` names mesh axis {name!r}, which is not bound here: "
          "the update must run inside shard_map (or pmap) over a mesh with "
          f"that axis. ({e})") from e
  varying = jax_compat.varying_axes(value)
  if varying or jax_compat.check_vma_enabled():
    for name in axis_name:
      if name not in varying:
        raise ValueError(
            f"`axis_name` includes mesh axis {name!r}, but this leaf is "
            f"replicated along it (it varies only along {sorted(varying)}): "
            "summing its squared norm over that axis would count it once "
            f"per device. Leave {name!r} out for this leaf (see "
            "lamb_optax.axis_names_from_specs).")
