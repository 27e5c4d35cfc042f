"""The global-norm gradient clip, with the norm summed over mesh axes."""

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import numerics


def global_norm(tree: Any, axis_names: Optional[list[tuple[str, ...]]] = None
                ) -> chex.Array:
  """L2 norm of a whole pytree in (at least) float32, each leaf's squared norm
  first summed over its mesh axes (``axis_names``: one tuple per leaf, as
  :func:`lamb_optax.scale_by_trust_ratio`'s ``axis_name`` resolves)."""
  leaves = jax.tree.leaves(tree)
  names = axis_names or [()] * len(leaves)
  return jnp.sqrt(sum(numerics.squared_norms(g, (), n)
                      for g, n in zip(leaves, names)))


def clip_by_global_norm(max_norm: Any, specs: Any = None, *,
                        norm_offset: Optional[float] = None,
                        ) -> optax.GradientTransformation:
  r"""Scales the gradients down to global norm ``max_norm`` when above it.

  With :math:`G` the global norm: :math:`g \leftarrow g \cdot
  \mathrm{max\_norm}/G` where :math:`G \ge \mathrm{max\_norm}`
  (:func:`optax.clip_by_global_norm`, which this is when no leaf is split
  over mesh axes and ``norm_offset`` is None). With ``norm_offset``
  :math:`\delta` (DeepSpeed's 1e-6): :math:`g \leftarrow g / k` with
  :math:`k = (G + \delta) / \mathrm{max\_norm}` where :math:`k > 1`. Under
  ``shard_map`` each leaf's squared norm is first summed over the mesh axes
  its spec names (``specs``: the params-shaped
  :class:`lamb_optax._src.trust_ratio.LeafSpec` tree an alias resolved), so
  every device clips by the norm of the whole gradient.
  """
  axis_names = (None if specs is None
                else [spec.axis_names for spec in jax.tree.leaves(specs)])
  if not any(axis_names or ()) and norm_offset is None:
    return optax.clip_by_global_norm(max_norm)

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates, axis_names)
    if norm_offset is None:
      scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
      apply = lambda g: g * scale.astype(g.dtype)
    else:
      clip = (norm + norm_offset) / max_norm
      divisor = jnp.where(clip > 1, clip, 1.0)
      apply = lambda g: g / divisor.astype(g.dtype)
    return jax.tree.map(
        lambda g: apply(numerics.upcast(g)).astype(g.dtype), updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)
