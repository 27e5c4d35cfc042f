"""The global-norm gradient clip, with the norm summed over mesh axes."""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import layers
from lamb_optax._src import numerics


def global_norm(tree: Any, axis_name: layers.AxisNameArg = None) -> chex.Array:
  """L2 norm of a whole pytree in (at least) float32, each leaf's squared norm
  first summed over its mesh axes (``axis_name``, as in
  :func:`lamb_optax.scale_by_trust_ratio`)."""
  names = layers.resolve_axis_names(axis_name, tree)
  return jnp.sqrt(sum(numerics.squared_norms(g, (), n)
                      for g, n in zip(jax.tree.leaves(tree), names)))


def clip_by_global_norm(max_norm: Any,
                        axis_name: layers.AxisNameArg = None,
                        *,
                        norm_offset: Optional[float] = None,
                        ) -> optax.GradientTransformation:
  r"""Scales the gradients down to global norm ``max_norm`` when above it.

  With :math:`G` the global norm: :math:`g \leftarrow g \cdot
  \mathrm{max\_norm}/G` where :math:`G \ge \mathrm{max\_norm}`
  (:func:`optax.clip_by_global_norm`, which this is when ``axis_name`` and
  ``norm_offset`` are None). With ``norm_offset`` :math:`\delta` (DeepSpeed's
  1e-6): :math:`g \leftarrow g / k` with :math:`k = (G + \delta) /
  \mathrm{max\_norm}` where :math:`k > 1`. With ``axis_name`` (``shard_map``)
  each leaf's squared norm is first summed over its mesh axes, so every
  device clips by the norm of the whole gradient.
  """
  if axis_name is None and norm_offset is None:
    return optax.clip_by_global_norm(max_norm)

  def init_fn(params):
    layers.resolve_axis_names(axis_name, params)
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates, axis_name)
    if norm_offset is None:
      scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
      apply = lambda g: g * scale.astype(g.dtype)
    else:
      clip = (norm + norm_offset) / max_norm
      divisor = jnp.where(clip > 1, clip, 1.0)
      apply = lambda g: g / divisor.astype(g.dtype)
    return jax.tree.map(
        lambda g: apply(numerics.upcast(g)).astype(g.dtype), updates), state

  return optax.GradientTransformation(init_fn, update_fn)
