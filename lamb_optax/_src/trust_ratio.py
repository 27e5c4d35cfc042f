r"""The layer-wise trust ratio of LAMB and LARS: one engine for every caller.

Every per-leaf setting (is the ratio applied, is the leaf decayed, which axes
index layers, which mesh axes its norm is summed over) is resolved once per
call into a params-shaped tree of :class:`LeafSpec`. :func:`scale_updates`
then maps one computation over the leaves: each leaf's squared norms (one per
layer), its ratios (:func:`trust_ratio_from_norms`, the one ratio function)
and its scaled update. :func:`scale_by_trust_ratio`, :func:`lamb_optax.lamb`,
:func:`lamb_optax.lars` and every preset use it; the presets' rules (a
run-time gate on the decay, ratio bounds that leave the fallback ``r = 1``
alone, traced bounds, the norm of decoupled-decayed params) are options.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamb_optax._src import layers
from lamb_optax._src import numerics
from lamb_optax._src import prefix
from lamb_optax._src import validation

# Leaves of at most this many elements have their norms reduced together with
# the other leaves of their shape (one stacked reduction instead of one per
# leaf): on BERT-base the biases and LayerNorm scales, 243 of 391 leaves.
SMALL_LEAF_SIZE = 4096


class ScaleByTrustRatioState(NamedTuple):
  """State of :func:`scale_by_trust_ratio`: the ratios of the last update.

  Read them with :func:`lamb_optax.trust_ratios` (or the
  :attr:`trust_ratios` property), a params-shaped tree. They are stored so
  that every step kernel reads its ratio the same way:

  Attributes:
    ratios: float32 vector: the ratio of every leaf that is one layer (no
      ``layer_axes``), in the params' leaf order; 1 before the first update
      and for leaves outside the mask. They are computed in one vector
      operation.
    slots: Params-shaped: for a leaf that is one layer, an int32 scalar, the
      index of its ratio in ``ratios``; None for leaves with layer axes. The
      index is state, not a constant of the step, so that the steps of
      leaves of one shape are one compiled kernel.
    layer_ratios: Params-shaped: for a leaf with layer axes, its float32
      ratios, shaped like those axes (a separate array, so that it can be
      sharded along a layer axis split over devices); None for the others.
  """

  ratios: chex.Array
  slots: Any
  layer_ratios: Any

  @property
  def trust_ratios(self) -> Any:
    """The float32 ratios of the last update as a params-shaped tree: a
    scalar per leaf, or the layer axes' shape with ``layer_axes``; 1 for
    leaves outside the mask (shapes only, for a state from
    :func:`jax.eval_shape`)."""
    abstract = isinstance(self.ratios, jax.ShapeDtypeStruct)  # eval_shape

    def leaf(slot, layer):
      if slot is None:
        return layer
      if abstract:
        return jax.ShapeDtypeStruct((), self.ratios.dtype)
      return jnp.asarray(self.ratios)[slot]
    return jax.tree.map(leaf, self.slots, self.layer_ratios,
                        is_leaf=lambda x: x is None)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
  """What the engine does with one leaf (a pytree leaf itself).

  Attributes:
    adapt: Whether the trust ratio applies (else ``r = 1``).
    decay: Whether the leaf is decayed: the parameter norm is taken after
      the decoupled decay when :func:`scale_updates` gets ``param_decay``.
    layer_axes: Sorted axes that index layers (``()``: the leaf is one).
    axis_names: Mesh axes the squared norms are summed over.
  """

  adapt: bool = True
  decay: bool = False
  layer_axes: tuple[int, ...] = ()
  axis_names: tuple[str, ...] = ()


def leaf_specs(params: Any, *, adapt_mask: Any = None,
               adapt_mask_name: str = "trust_ratio_mask",
               decay_mask: Any = False,
               decay_mask_name: str = "weight_decay_mask",
               layer_axes: layers.LayerAxesArg = None,
               axis_name: layers.AxisNameArg = None) -> Any:
  """Resolves every per-leaf setting once: a params-shaped tree of
  :class:`LeafSpec`. Masks are trees, prefixes or callables (None: all,
  False: none); errors name the arguments as the public function does."""
  treedef = jax.tree.structure(params)
  n = treedef.num_leaves

  def mask(m, name):
    if m is False:
      return [False] * n
    return prefix.resolve_mask(m, params, name)

  adapt = mask(adapt_mask, adapt_mask_name)
  decay = mask(decay_mask, decay_mask_name)
  axes = layers.resolve_layer_axes(layer_axes, params)
  names = layers.resolve_axis_names(axis_name, params)
  return treedef.unflatten([LeafSpec(*spec) for spec in
                            zip(adapt, decay, axes, names)])


class TrustRatioOptions(NamedTuple):
  r"""How :func:`trust_ratio_from_norms` turns norms into ratios.

  Attributes:
    trust_coefficient: :math:`\eta`, multiplies the ratio.
    eps: Added to :math:`\|u\|` in the denominator.
    param_norm_bounds: ``(lo, hi)`` of :math:`\phi` or None; the values may
      be traced (torch-optimizer's ``clamp_value`` is ``(0, clamp_value)``).
    trust_ratio_bounds: ``(lo, hi)`` of :math:`r` or None; may be traced.
    bound_fallback: Whether ``trust_ratio_bounds`` also clip the ``r = 1``
      of a zero norm (True; DeepSpeed leaves it at 1: False).
  """

  trust_coefficient: Any = 1.0
  eps: Any = 0.0
  param_norm_bounds: Optional[tuple[Any, Any]] = None
  trust_ratio_bounds: Optional[tuple[Any, Any]] = None
  bound_fallback: bool = True


def trust_ratio_from_norms(
    param_norm: chex.Array,
    update_norm: chex.Array,
    options: TrustRatioOptions = TrustRatioOptions(),
    *,
    gate: Optional[chex.Array] = None,
) -> chex.Array:
  r"""The ratios :math:`r` of any number of layers, from their norms.

  .. math::

    r = \eta\,\phi(\|x\|) / (\|u\| + \epsilon), \quad
    r = 1 \text{ where } \phi(\|x\|) = 0 \text{ or } \|u\| = 0,

  then clipped to ``options.trust_ratio_bounds`` (the fallback 1 too unless
  ``bound_fallback=False``), and 1 wherever ``gate`` (a traced bool scalar:
  apex's and timm's "the decay is non-zero") is False.

  Args:
    param_norm: :math:`\|x\|` of each layer, any shape.
    update_norm: :math:`\|u\|`, the same shape.
    options: The :class:`TrustRatioOptions`.
    gate: Optional bool scalar; where False every ratio is 1.

  Returns:
    float32 ratios of the norms' shape.
  """
  phi = param_norm
  if options.param_norm_bounds is not None:
    lo, hi = options.param_norm_bounds
    phi = jnp.clip(phi, lo, hi)
  computed = (phi > 0) & (update_norm > 0)
  ratio = (options.trust_coefficient * phi
           / jnp.where(computed, update_norm + options.eps, 1.0))
  bounds = options.trust_ratio_bounds
  if options.bound_fallback or bounds is None:
    ratio = jnp.where(computed, ratio, 1.0)
    if bounds is not None:
      ratio = jnp.clip(ratio, bounds[0], bounds[1])
  else:
    ratio = jnp.where(computed, jnp.clip(ratio, bounds[0], bounds[1]), 1.0)
  if gate is not None:
    ratio = jnp.where(gate, ratio, 1.0)
  return ratio.astype(jnp.float32)


def layer_shape(x: chex.Array, spec: LeafSpec) -> tuple[int, ...]:
  """The shape of a leaf's ratios: that of its layer axes."""
  return tuple(x.shape[i] for i in spec.layer_axes)


def initial_state(params: Any, specs: Any) -> ScaleByTrustRatioState:
  """The state before a step: every ratio 1, and each one-layer leaf's
  slot."""
  leaves, treedef = jax.tree.flatten(params)
  slots, layer_ratios, n = [], [], 0
  for x, spec in zip(leaves, treedef.flatten_up_to(specs)):
    if spec.layer_axes:
      slots.append(None)
      layer_ratios.append(jnp.ones(layer_shape(x, spec), jnp.float32))
    else:
      slots.append(jnp.asarray(n, jnp.int32))
      layer_ratios.append(None)
      n += 1
  return ScaleByTrustRatioState(ratios=jnp.ones((n,), jnp.float32),
                                slots=treedef.unflatten(slots),
                                layer_ratios=treedef.unflatten(layer_ratios))


def expand_ratio(ratio: chex.Array, ndim: int,
                 layer_axes: tuple[int, ...]) -> chex.Array:
  """Reshapes per-layer ratios to broadcast against the leaf."""
  if not layer_axes:
    return ratio
  return jnp.expand_dims(
      ratio, tuple(i for i in range(ndim) if i not in layer_axes))


def _vector_norms(leaves: list[tuple[int, chex.Array, chex.Array, LeafSpec]]
                  ) -> list[tuple[list[int], Any, Any]]:
  """Squared norms of the adapted one-layer leaves, in parts.

  ``leaves`` holds ``(slot, x, u, spec)`` per leaf. Returns ``(slots, x_sq,
  u_sq)`` parts: the slots of the leaves in the part and their squared norms,
  vectors. A leaf of more than :data:`SMALL_LEAF_SIZE` elements is a part of
  its own; the smaller ones are stacked with the other leaves of their shape,
  compute dtype and mesh axes and reduced together. The mesh-axis checks of
  :func:`numerics.psum_over` run on each leaf, before it is stacked.
  """
  groups: dict[Any, list[tuple[int, chex.Array, chex.Array, LeafSpec]]] = {}
  for slot, x, u, spec in leaves:
    numerics.check_summable(x, spec.axis_names)
    numerics.check_summable(u, spec.axis_names)
    key = ((x.shape, numerics.compute_dtype(x.dtype), spec.axis_names)
           if x.size <= SMALL_LEAF_SIZE else slot)
    groups.setdefault(key, []).append((slot, x, u, spec))

  def norms(arrays, axis_names):
    squared = numerics.squared_norms(
        jnp.stack([numerics.upcast(a) for a in arrays]), (0,))
    return jax.lax.psum(squared, axis_names) if axis_names else squared

  parts = []
  for members in groups.values():
    slots, xs, us, specs = zip(*members)
    parts.append((list(slots), norms(xs, specs[0].axis_names),
                  norms(us, specs[0].axis_names)))
  return parts


def scale_updates(
    updates: Any,
    params: Any,
    specs: Any,
    state: ScaleByTrustRatioState,
    options: TrustRatioOptions = TrustRatioOptions(),
    *,
    gate: Optional[chex.Array] = None,
    param_decay: Optional[chex.Array] = None,
) -> tuple[Any, ScaleByTrustRatioState]:
  r"""The engine: every layer's update times its trust ratio.

  Each leaf's squared norms are reduced once (small leaves stacked by shape,
  see :data:`SMALL_LEAF_SIZE`); the ratios of all leaves that are one layer
  are computed in one vector operation (:func:`trust_ratio_from_norms`), and
  each leaf's step reads its ratio from that vector at the slot its state
  holds. Leaves with layer axes get their per-layer ratios from the same
  function, one array per leaf.

  Args:
    updates: The incoming updates :math:`u` (the params' structure).
    params: The parameters :math:`x`.
    specs: A params-shaped tree of :class:`LeafSpec` (:func:`leaf_specs`).
    state: The :class:`ScaleByTrustRatioState` (:func:`initial_state`),
      whose slots place each ratio.
    options: The :class:`TrustRatioOptions` of every ratio.
    gate: Optional traced bool scalar: where False every ratio is 1.
    param_decay: Optional scalar :math:`s`: on leaves whose spec has
      ``decay``, :math:`\phi` is the norm of :math:`x - s x` (Keras'
      decoupled decay, applied before the ratio).

  Returns:
    ``(scaled updates, new state)``: the updates in their dtypes, and the
    float32 ratios of this update.
  """
  us, treedef = jax.tree.flatten(updates)
  xs = treedef.flatten_up_to(params)
  flat_specs = treedef.flatten_up_to(specs)
  flat_slots = treedef.flatten_up_to(state.slots)

  def param_for_norm(x, spec):
    if param_decay is None or not spec.decay:
      return x
    x = numerics.upcast(x)
    return x - x * jnp.asarray(param_decay).astype(x.dtype)

  def ratio_of(x_sq, u_sq):
    return trust_ratio_from_norms(jnp.sqrt(x_sq), jnp.sqrt(u_sq), options,
                                  gate=gate)

  def scale(u, ratio, layer_axes=()):
    cdt = numerics.compute_dtype(u.dtype)
    return (u.astype(cdt) * expand_ratio(ratio.astype(cdt), u.ndim,
                                         layer_axes)).astype(u.dtype)

  # The vector: one ratio per leaf that is one layer, in leaf order (the
  # slots' order); the adapted ones from their norms, the others 1.
  one_layer = [i for i, spec in enumerate(flat_specs) if not spec.layer_axes]
  adapted = [(slot, i) for slot, i in enumerate(one_layer)
             if flat_specs[i].adapt]
  parts = _vector_norms([
      (slot, param_for_norm(xs[i], flat_specs[i]), us[i], flat_specs[i])
      for slot, i in adapted])
  by_dtype: dict[Any, list[Any]] = {}
  for part in parts:
    by_dtype.setdefault(part[1].dtype, []).append(part)
  positions, pieces = [], []
  for same_dtype in by_dtype.values():  # One vector operation per dtype.
    positions += [slot for part in same_dtype for slot in part[0]]
    pieces.append(ratio_of(jnp.concatenate([part[1] for part in same_dtype]),
                           jnp.concatenate([part[2] for part in same_dtype])))
  fixed = sorted(set(range(len(one_layer))) - {slot for slot, _ in adapted})
  if fixed:
    positions += fixed
    pieces.append(jnp.ones((len(fixed),), jnp.float32))
  ratios = (jnp.concatenate(pieces) if pieces
            else jnp.ones((0,), jnp.float32))
  if positions != sorted(positions):
    ratios = ratios[np.argsort(positions)]
  chex.assert_shape(ratios, (len(one_layer),))
  chex.assert_type(ratios, jnp.float32)

  out, layer_ratios = [], []
  for u, x, spec, slot in zip(us, xs, flat_specs, flat_slots):
    if not spec.layer_axes:
      out.append(scale(u, jax.lax.dynamic_index_in_dim(
          ratios, slot, keepdims=False)) if spec.adapt else u)
      layer_ratios.append(None)
    elif spec.adapt:
      ratio = ratio_of(
          numerics.squared_norms(param_for_norm(x, spec), spec.layer_axes,
                                 spec.axis_names),
          numerics.squared_norms(u, spec.layer_axes, spec.axis_names))
      chex.assert_shape(ratio, layer_shape(x, spec))
      out.append(scale(u, ratio, spec.layer_axes))
      layer_ratios.append(ratio)
    else:
      out.append(u)
      layer_ratios.append(jnp.ones(layer_shape(x, spec), jnp.float32))
  return treedef.unflatten(out), ScaleByTrustRatioState(
      ratios=ratios, slots=state.slots,
      layer_ratios=treedef.unflatten(layer_ratios))


def trust_ratio_transform(
    specs_fn: Callable[[Any], Any],
    options: TrustRatioOptions,
) -> optax.GradientTransformation:
  """The engine as a transform; ``specs_fn(params)`` gives the spec tree."""

  def init_fn(params):
    validation.check_float_leaves(params, "params")
    return initial_state(params, specs_fn(params))

  def update_fn(updates, state, params=None):
    validation.check_params_present(params, "scale_by_trust_ratio")
    validation.check_float_leaves(params, "params")
    validation.check_float_leaves(updates, "updates")
    validation.check_updates_match_params(updates, params)
    return scale_updates(updates, params, specs_fn(params), state, options)

  return optax.GradientTransformation(init_fn, update_fn)


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
  return trust_ratio_from_arguments(
      mask=mask, mask_name="mask", trust_coefficient=trust_coefficient,
      eps=eps, param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds, layer_axes=layer_axes,
      axis_name=axis_name)


def trust_ratio_from_arguments(
    *, mask: validation.MaskArg, mask_name: str,
    trust_coefficient: float = 1.0, eps: float = 0.0,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None) -> optax.GradientTransformation:
  """Checks a public function's trust-ratio arguments (its mask is called
  ``mask_name`` there) and builds the engine's transform."""
  validation.check_non_negative("trust_coefficient", trust_coefficient)
  validation.check_non_negative("eps", eps)
  options = TrustRatioOptions(
      trust_coefficient=trust_coefficient, eps=eps,
      param_norm_bounds=validation.check_bounds(
          "param_norm_bounds", param_norm_bounds),
      trust_ratio_bounds=validation.check_bounds(
          "trust_ratio_bounds", trust_ratio_bounds))
  specs_fn = functools.partial(leaf_specs, adapt_mask=mask,
                               adapt_mask_name=mask_name,
                               layer_axes=layer_axes, axis_name=axis_name)
  return trust_ratio_transform(specs_fn, options)
