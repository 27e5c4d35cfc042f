r"""The layer-wise trust ratio of LAMB and LARS."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import adam
from lamb_optax._src import layers
from lamb_optax._src import validation


class ScaleByTrustRatioState(NamedTuple):
  """State of :func:`scale_by_trust_ratio`.

  Attributes:
    trust_ratios: float32 pytree shaped like the params, one scalar per leaf
      (or, with ``layer_axes``, an array with the shape of the leaf's layer
      axes): the ratios applied by the last update (1 before the first update
      and for leaves outside the trust-ratio mask). Read it with
      :func:`lamb_optax.trust_ratios`.
  """

  trust_ratios: Any


def layer_squared_norms(x: chex.Array, layer_axes: tuple[int, ...] = (),
                        axis_name: tuple[str, ...] = ()) -> chex.Array:
  r"""Squared L2 norms of the layers of one leaf, in (at least) float32.

  The reduction runs over every axis not in ``layer_axes`` (all of them by
  default, giving a scalar), so the result has the shape of the layer axes.
  The values are upcast before squaring, so bfloat16/float16 parameters get
  float32-accurate norms. With ``axis_name`` the local sums are added over
  those mesh axes (``shard_map``: the leaf is a block of the layer).
  """
  x = x.astype(adam.compute_dtype(x.dtype))
  reduce_axes = tuple(i for i in range(x.ndim) if i not in layer_axes)
  squared = jnp.sum(jnp.square(x), axis=reduce_axes)
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
  for name in axis_name:
    try:
      jax.lax.axis_size(name)
    except NameError as e:
      raise ValueError(
          f"`axis_name` names mesh axis {name!r}, which is not bound here: "
          "the update must run inside shard_map (or pmap) over a mesh with "
          f"that axis. ({e})") from e
  varying = _varying_axes(value)
  if varying or _tracks_varying_axes():
    for name in axis_name:
      if name not in varying:
        raise ValueError(
            f"`axis_name` includes mesh axis {name!r}, but this leaf is "
            f"replicated along it (it varies only along {sorted(varying)}): "
            "summing its squared norm over that axis would count it once "
            f"per device. Leave {name!r} out for this leaf (see "
            "lamb_optax.axis_names_from_specs).")
  return jax.lax.psum(value, axis_name)


def _tracks_varying_axes() -> bool:
  """Whether JAX tracks varying axes here (``shard_map(check_vma=True)``).

  Then a value that varies along no axis is replicated along all of them.
  JAX has no public accessor for this (0.10); without it, assume not.
  """
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    return bool(jax_config._check_vma.value)  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    return False


def _varying_axes(value: chex.Array) -> frozenset[str]:
  """The mesh axes ``value`` varies along, where JAX tracks them."""
  aval = jax.typeof(value)
  vma = getattr(aval, "vma", None)
  if vma is None:
    vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
  return frozenset(vma or ())


def expand_ratio(ratio: chex.Array, ndim: int,
                 layer_axes: tuple[int, ...]) -> chex.Array:
  """Reshapes per-layer ratios to broadcast against the leaf."""
  if not layer_axes:
    return ratio
  return jnp.expand_dims(
      ratio, tuple(i for i in range(ndim) if i not in layer_axes))


def initial_ratios(params: Any, layer_axes: layers.LayerAxesArg) -> Any:
  """Ones of the layer axes' shape for every leaf (the state before a step)."""
  flat, treedef = jax.tree.flatten(params)
  flat_axes = layers.resolve_layer_axes(layer_axes, params)
  return treedef.unflatten([
      jnp.ones([x.shape[i] for i in axes], jnp.float32)
      for x, axes in zip(flat, flat_axes)])


def check_ratio(ratio: chex.Array, leaf: chex.Array,
                layer_axes: tuple[int, ...]) -> None:
  """chex checks: one float32 ratio per layer of ``leaf``."""
  chex.assert_shape(ratio, tuple(leaf.shape[i] for i in layer_axes))
  chex.assert_type(ratio, jnp.float32)


def trust_ratio_from_norms(
    param_norm: chex.Array,
    update_norm: chex.Array,
    *,
    trust_coefficient: Any = 1.0,
    eps: Any = 0.0,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
) -> chex.Array:
  r"""The ratio :math:`r` from the norms (see :func:`scale_by_trust_ratio`)."""
  phi = param_norm
  if param_norm_bounds is not None:
    phi = jnp.clip(phi, param_norm_bounds[0], param_norm_bounds[1])
  ratio = trust_coefficient * phi / (update_norm + eps)
  ratio = jnp.where((phi > 0) & (update_norm > 0), ratio, 1.0)
  if trust_ratio_bounds is not None:
    ratio = jnp.clip(ratio, trust_ratio_bounds[0], trust_ratio_bounds[1])
  return ratio.astype(jnp.float32)


def scale_by_trust_ratio(
    *,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    mask: validation.MaskArg = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
) -> optax.GradientTransformation:
  r"""Scales each layer's update by its trust ratio.

  A *layer* is one leaf of the parameter pytree, or with ``layer_axes`` one
  slice of a leaf that stacks several layers. For a layer with parameters
  :math:`x` and incoming update :math:`u`,

  .. math::

    r = \eta \, \frac{\phi(\|x\|_2)}{\|u\|_2 + \epsilon}, \qquad
    \phi(z) = \min(\max(z, \phi_{lo}), \phi_{hi}),

  with :math:`\eta` the ``trust_coefficient``, :math:`\phi` the identity
  unless ``param_norm_bounds=(lo, hi)`` is given, and :math:`r = 1` where
  :math:`\phi(\|x\|) = 0` or :math:`\|u\| = 0` (so that zero-initialised
  parameters still move, as in the authors' code). :math:`r` is then clipped
  to ``trust_ratio_bounds=(lo, hi)`` when given (DeepSpeed's min/max
  coefficient; ``(0, 1)`` is timm's ``trust_clip``). Layers outside ``mask``
  get :math:`r = 1`. The transform returns :math:`r\,u`.

  Norms are computed in float32 (float64 for float64 leaves) from the leaf's
  values whatever its dtype; the scaled update keeps the update's dtype and
  the ratios are kept in the state as float32 (see
  :func:`lamb_optax.trust_ratios`).

  Non-finite updates give non-finite ratios and updates; wrap the optimizer in
  :func:`optax.apply_if_finite` to skip such steps.

  Args:
    trust_coefficient: :math:`\eta`, a multiplier of the ratio (LARS'
      "trust coefficient"; 1 in LAMB).
    eps: Added to :math:`\|u\|` in the denominator, >= 0.
    param_norm_bounds: Optional ``(lo, hi)`` with ``0 <= lo <= hi``: the
      bounds of :math:`\phi` (the paper's :math:`\gamma_l, \gamma_u`).
    trust_ratio_bounds: Optional ``(lo, hi)`` with ``0 <= lo <= hi``: bounds
      on the ratio itself.
    mask: Pytree of bools with the params' structure (or a prefix), or a
      callable ``params -> such a tree``: True where the ratio applies.
      None applies it to every leaf. A masked-out stacked leaf gets
      :math:`r = 1` for all its layers.
    layer_axes: The axes that index layers, for leaves that stack layers
      (``nn.scan``/``nnx.scan``): None (every leaf is one layer), an int or
      tuple of ints for every leaf, a pytree (or prefix) matching the params
      whose leaves are None, an int or a tuple of ints, or a callable
      ``params -> such a tree`` (see
      :func:`lamb_optax.layer_axes_from_metadata`). Norms reduce over the
      other axes; ratios, bounds and the state take the shape of the layer
      axes.
    axis_name: For ``shard_map``: the mesh axes each leaf is split along,
      over which its squared norms are summed (``lax.psum``). None (no sum),
      one axis name or a tuple of names for every leaf, or a pytree (or
      prefix) of per-leaf names (see :func:`lamb_optax.axis_names_from_specs`).
      Never name an axis along which a leaf is replicated: its norm would
      be counted once per device on it. Not needed under ``jax.jit`` with
      ``NamedSharding`` (XLA inserts the sums) nor ``pmap`` with replicated
      params.

  Returns:
    A :class:`optax.GradientTransformation` object.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> tx = lamb_optax.scale_by_trust_ratio()
    >>> params = {'w': jnp.full((2, 2), 3.0), 'b': jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> updates = {'w': jnp.full((2, 2), 0.5), 'b': jnp.ones(2)}
    >>> scaled, state = tx.update(updates, state, params)
    >>> float(state.trust_ratios['w'])  # ||x|| / ||u|| = 6 / 1
    6.0
    >>> float(state.trust_ratios['b'])  # ||x|| = 0, so r = 1
    1.0

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  return trust_ratio_transform(
      trust_coefficient=trust_coefficient, eps=eps,
      param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds, mask=mask, mask_name="mask",
      layer_axes=layer_axes, axis_name=axis_name)


def trust_ratio_transform(*, trust_coefficient, eps, param_norm_bounds,
                          trust_ratio_bounds, mask, mask_name,
                          layer_axes=None, axis_name=None):
  """:func:`scale_by_trust_ratio`, naming its mask ``mask_name`` in errors."""
  validation.check_non_negative("trust_coefficient", trust_coefficient)
  validation.check_non_negative("eps", eps)
  param_norm_bounds = validation.check_bounds(
      "param_norm_bounds", param_norm_bounds)
  trust_ratio_bounds = validation.check_bounds(
      "trust_ratio_bounds", trust_ratio_bounds)

  def init_fn(params):
    validation.check_float_leaves(params, "params")
    validation.check_masks(params, **{mask_name: mask})
    layers.resolve_axis_names(axis_name, params)
    return ScaleByTrustRatioState(
        trust_ratios=initial_ratios(params, layer_axes))

  def update_fn(updates, state, params=None):
    validation.check_params_present(params, "scale_by_trust_ratio")
    validation.check_same_structure(params, updates, "updates")
    validation.check_float_leaves(params, "params")
    validation.check_float_leaves(updates, "updates")
    treedef = jax.tree.structure(params)
    flat_params = treedef.flatten_up_to(params)
    flat_updates = treedef.flatten_up_to(updates)
    flat_mask = validation.resolve_mask(mask, params, mask_name)
    flat_axes = layers.resolve_layer_axes(layer_axes, params)
    flat_names = layers.resolve_axis_names(axis_name, params)

    new_updates, ratios = [], []
    for u, x, adapt, axes, names in zip(flat_updates, flat_params, flat_mask,
                                        flat_axes, flat_names):
      if not adapt:
        new_updates.append(u)
        ratios.append(jnp.ones([x.shape[i] for i in axes], jnp.float32))
        continue
      param_norm = jnp.sqrt(layer_squared_norms(x, axes, names))
      update_norm = jnp.sqrt(layer_squared_norms(u, axes, names))
      ratio = trust_ratio_from_norms(
          param_norm, update_norm,
          trust_coefficient=trust_coefficient, eps=eps,
          param_norm_bounds=param_norm_bounds,
          trust_ratio_bounds=trust_ratio_bounds)
      check_ratio(ratio, x, axes)
      cdt = adam.compute_dtype(u.dtype)
      scale = expand_ratio(ratio.astype(cdt), u.ndim, axes)
      new_updates.append((u.astype(cdt) * scale).astype(u.dtype))
      ratios.append(ratio)
    return (treedef.unflatten(new_updates),
            ScaleByTrustRatioState(trust_ratios=treedef.unflatten(ratios)))

  return optax.GradientTransformation(init_fn, update_fn)


def global_norm(tree: Any, axis_name: layers.AxisNameArg = None) -> chex.Array:
  """L2 norm of a whole pytree in (at least) float32, each leaf's squared norm
  first summed over its mesh axes (``axis_name``, as in
  :func:`scale_by_trust_ratio`)."""
  names = layers.resolve_axis_names(axis_name, tree)
  return jnp.sqrt(sum(layer_squared_norms(g, (), n)
                      for g, n in zip(jax.tree.leaves(tree), names)))


def clip_by_global_norm(max_norm: float,
                        axis_name: layers.AxisNameArg = None
                        ) -> optax.GradientTransformation:
  """:func:`optax.clip_by_global_norm`, with the norm summed over mesh axes.

  Without ``axis_name`` this is :func:`optax.clip_by_global_norm` itself.
  With it (``shard_map``), each leaf's squared norm is first summed over its
  mesh axes (see :func:`scale_by_trust_ratio`), so every device clips by the
  norm of the whole gradient.
  """
  if axis_name is None:
    return optax.clip_by_global_norm(max_norm)

  def update_fn(updates, state, params=None):
    del params
    norm = global_norm(updates, axis_name)
    scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
    return jax.tree.map(
        lambda g: (g.astype(adam.compute_dtype(g.dtype))
                   * scale.astype(adam.compute_dtype(g.dtype))).astype(g.dtype),
        updates), state

  return optax.GradientTransformation(
      lambda params: optax.EmptyState(), update_fn)
