r"""The layer-wise trust ratio of LAMB and LARS: one transform for every caller.

Every per-leaf setting (is the leaf in the trust-ratio mask, in the
weight-decay mask, which axes index layers, which mesh axes its norm is summed
over) is resolved once per call into a params-shaped tree of
:class:`lamb_optax._src.alias.LeafSpec`. :func:`scale_updates` then reads as
the maths: each layer's squared norms, its ratio
(:func:`trust_ratio_from_norms`, the one ratio function), its scaled
update. :func:`scale_by_trust_ratio`, :func:`lamb_optax.lamb`,
:func:`lamb_optax.lars` and every preset use it; the presets' rules (a
run-time gate on the decay, ratio bounds that leave the fallback ``r = 1``
alone, traced bounds, the norm of decoupled-decayed params) are options of
:class:`TrustRatioOptions`.
"""

import collections
import functools
import warnings
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import alias
from lamb_optax._src import layers
from lamb_optax._src import numerics
from lamb_optax._src import validation

# Leaves of at most this many elements have their norms reduced together with
# the other leaves of their shape, CHUNK_SIZE at a time (one stacked reduction
# instead of three kernels per leaf): on BERT-base the biases and LayerNorm
# scales, 243 of 391 leaves. A small leaf alone of its shape is reduced on its
# own, as a large one is. Every chunk, of small or of large leaves, computes
# its ratios in one vector operation and hands them out in one reduction
# (_unstack), so that the distinct kernels XLA:CPU compiles do not grow with
# the number of leaves (docs/performance.md, "Compile time").
SMALL_LEAF_SIZE = 4096
CHUNK_SIZE = 32


class ScaleByTrustRatioState(NamedTuple):
  """State of :func:`scale_by_trust_ratio`, whatever its options.

  Attributes:
    count: The int32 number of updates so far (the step at which a preset's
      scheduled rule, such as a decay gate, is evaluated; as
      :func:`optax.add_decayed_weights` counts for a scheduled decay).
    trust_ratios: A params-shaped tree: each leaf's float32 ratio of the last
      update, a scalar, or an array of the layer axes' shape for a leaf with
      ``layer_axes``; 1 before the first update and for leaves outside the
      trust-ratio mask. Read it as ``state.trust_ratios`` or with
      :func:`lamb_optax.trust_ratios` from a whole optimizer state.
  """

  count: chex.Array
  trust_ratios: Any


class TrustRatioOptions(NamedTuple):
  r"""How :func:`trust_ratio_from_norms` turns norms into ratios.

  Attributes:
    min_norm: Both norms are raised to at least this value first
      (:func:`optax.scale_by_trust_ratio`'s ``min_norm``).
    trust_coefficient: :math:`c`, multiplies the ratio.
    eps: Added to :math:`\|u\|` in the denominator.
    param_norm_bounds: ``(lo, hi)`` of :math:`\phi` or None; the values may
      be traced (torch-optimizer's ``clamp_value`` is ``(0, clamp_value)``).
    trust_ratio_bounds: ``(lo, hi)`` of :math:`r` or None; may be traced.
    bound_fallback: Whether ``trust_ratio_bounds`` also clip the ``r = 1``
      of a zero norm (True; DeepSpeed leaves it at 1: False).
    decay_gate: A weight decay (a scalar, traced or not, or a schedule of
      the step): where its value is 0 every ratio is 1 (apex and timm apply
      the ratio only to layers whose decay is non-zero). None: no gate.
    decoupled_decay: ``(learning_rate, weight_decay)`` (scalars or
      schedules), or None: on the leaves in the weight-decay mask,
      :math:`\phi` is the norm of :math:`x - \eta_t \lambda_t x` (Keras'
      decoupled decay, applied before the ratio).
  """

  min_norm: Any = 0.0
  trust_coefficient: Any = 1.0
  eps: Any = 0.0
  param_norm_bounds: Optional[tuple[Any, Any]] = None
  trust_ratio_bounds: Optional[tuple[Any, Any]] = None
  bound_fallback: bool = True
  decay_gate: Optional[optax.ScalarOrSchedule] = None
  decoupled_decay: Optional[tuple[optax.ScalarOrSchedule,
                                  optax.ScalarOrSchedule]] = None


def _is_zero(value: Any) -> bool:
  return isinstance(value, (int, float)) and value == 0


def trust_ratio_from_norms(
    param_norm: chex.Array,
    update_norm: chex.Array,
    options: TrustRatioOptions = TrustRatioOptions(),
    *,
    gate: Optional[chex.Array] = None,
) -> chex.Array:
  r"""The ratios :math:`r` of any number of layers, from their norms.

  .. math::

    r = c\,\phi(\|x\|) / (\|u\| + \epsilon), \quad
    r = 1 \text{ where } \phi(\|x\|) = 0 \text{ or } \|u\| = 0,

  with both norms first raised to ``options.min_norm``, then :math:`r`
  clipped to ``options.trust_ratio_bounds`` (the fallback 1 too unless
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
  if not _is_zero(options.min_norm):
    param_norm = jnp.maximum(param_norm, options.min_norm)
    update_norm = jnp.maximum(update_norm, options.min_norm)
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


def layer_shape(x: chex.Array, spec: alias.LeafSpec) -> tuple[int, ...]:
  """The shape of a leaf's ratios: that of its layer axes."""
  return tuple(x.shape[i] for i in spec.layer_axes)


def initial_state(params: Any, specs: Any) -> ScaleByTrustRatioState:
  """The state before a step: a zero count, every ratio 1."""
  return ScaleByTrustRatioState(
      count=jnp.zeros([], jnp.int32),
      trust_ratios=jax.tree.map(
          lambda x, spec: jnp.ones(layer_shape(x, spec), jnp.float32),
          params, specs))


def expand_ratio(ratio: chex.Array, ndim: int,
                 layer_axes: tuple[int, ...]) -> chex.Array:
  """Reshapes per-layer ratios to broadcast against the leaf."""
  if not layer_axes:
    return ratio
  return jnp.expand_dims(
      ratio, tuple(i for i in range(ndim) if i not in layer_axes))


# A leaf waiting for its norms: (its index, x as the norm reads it, u, spec).
_Leaf = tuple[int, chex.Array, chex.Array, alias.LeafSpec]


def _chunks(leaves: list[_Leaf], *, small: bool) -> list[list[_Leaf]]:
  """Leaves in chunks of at most :data:`CHUNK_SIZE` leaves whose norms can
  be stacked: of one shape (small leaves, reduced together) or one norm
  dtype, compute dtype and mesh axes."""
  groups: dict[Any, list[_Leaf]] = {}
  for leaf in leaves:
    groups.setdefault(_chunk_key(leaf, small=small), []).append(leaf)
  return [members[i:i + CHUNK_SIZE] for members in groups.values()
          for i in range(0, len(members), CHUNK_SIZE)]


def _chunk_key(leaf: _Leaf, *, small: bool) -> tuple[Any, ...]:
  _, x, u, spec = leaf
  return (x.shape if small else numerics.real_dtype(x.dtype),
          numerics.compute_dtype(x.dtype), numerics.compute_dtype(u.dtype),
          spec.axis_names)


def _unstack(vector: chex.Array) -> tuple[chex.Array, ...]:
  """The entries of ``vector``, each a scalar of its own, from one kernel.

  A compiler device, not maths: entry :math:`j` is the sum of ``vector``
  with every other entry replaced by 0, which is exactly ``vector[j]``
  (``inf`` and NaN included), all :math:`k` sums in one variadic reduction.
  Were each entry sliced out instead, the slice's constant offset would land
  in every kernel that reads it, so the step kernels of two leaves of one
  shape would differ, and XLA:CPU compiles each distinct kernel anew
  (docs/performance.md, "Compile time"). From this reduction every leaf's
  step reads its ratio as a buffer of its own, and the steps of all leaves
  of one shape are one kernel.
  """
  k = vector.shape[0]
  iota = jax.lax.iota(jnp.int32, k)
  zero = jnp.zeros((), vector.dtype)
  return jax.lax.reduce(
      tuple(jnp.where(iota == j, vector, zero) for j in range(k)),
      (zero,) * k, _add_each, (0,))


def _add_each(totals: tuple[chex.Array, ...], values: tuple[chex.Array, ...]
              ) -> tuple[chex.Array, ...]:
  # A module-level function, so that JAX caches the traced reduction.
  return tuple(a + b for a, b in zip(totals, values))


class SquaredNorms(NamedTuple):
  r"""The squared norms :math:`\|x\|^2, \|u\|^2` of the layers of some leaves.

  Attributes:
    leaves: The indices of the leaves (in flatten order).
    params: The squared parameter norms.
    updates: The squared update norms, the same shape.
    stacked: True: entry :math:`j` of each vector is leaf ``leaves[j]``'s
      (a chunk of leaves that are one layer each). False: one leaf with
      layer axes, whose norms have its layers' shape.
  """

  leaves: tuple[int, ...]
  params: chex.Array
  updates: chex.Array
  stacked: bool


def grouped_squared_norms(xs: list[chex.Array], us: list[chex.Array],
                          specs: list[alias.LeafSpec]) -> list[SquaredNorms]:
  r"""The squared norms of every layer of the leaves in the trust-ratio mask,
  grouped so that the kernels XLA:CPU compiles stay few.

  What the grouping steers is compile time, not numbers
  (docs/performance.md, "Compile time"): a leaf with layer axes is its own
  group; a leaf of more than :data:`SMALL_LEAF_SIZE` elements reduces its
  own norms, chunked with leaves of its dtypes and mesh axes into one
  vector; smaller leaves (biases, LayerNorm scales) are reduced together,
  :data:`CHUNK_SIZE` leaves of one shape at a time, and a small leaf alone
  of its shape is reduced as a large one is.

  Args:
    xs: Each leaf's parameters as its norm reads them.
    us: Each leaf's update.
    specs: Each leaf's :class:`lamb_optax._src.alias.LeafSpec`.

  Returns:
    A list of :class:`SquaredNorms`, which together cover every leaf in the
    trust-ratio mask once.
  """

  def stacked_norms(arrays, axis_names):
    squared = numerics.squared_norms(
        jnp.stack([numerics.upcast(a) for a in arrays]), (0,))
    return jax.lax.psum(squared, axis_names) if axis_names else squared

  groups, small, big = [], [], []
  for i, (x, u, spec) in enumerate(zip(xs, us, specs)):
    if not spec.trust_ratio_mask:
      continue
    if spec.layer_axes:
      groups.append(SquaredNorms(
          (i,), numerics.squared_norms(x, spec.layer_axes, spec.axis_names),
          numerics.squared_norms(u, spec.layer_axes, spec.axis_names),
          stacked=False))
    else:
      # The mesh-axis checks of numerics.psum_over, on each leaf.
      numerics.check_summable(x, spec.axis_names)
      numerics.check_summable(u, spec.axis_names)
      (small if x.size <= SMALL_LEAF_SIZE else big).append((i, x, u, spec))
  # A small leaf alone of its kind shares no kernel with another: stacking
  # its norms would only add kernels, so it is reduced as the big ones are.
  kinds = collections.Counter(_chunk_key(leaf, small=True) for leaf in small)
  big += [leaf for leaf in small if kinds[_chunk_key(leaf, small=True)] == 1]
  small = [leaf for leaf in small if kinds[_chunk_key(leaf, small=True)] > 1]
  for chunk in _chunks(small, small=True):
    indices, chunk_xs, chunk_us, chunk_specs = zip(*chunk)
    names = chunk_specs[0].axis_names
    if (numerics.compute_dtype(chunk_xs[0].dtype)
        == numerics.compute_dtype(chunk_us[0].dtype)):
      # One reduction of the x's and u's stacked together: besides saving a
      # kernel, a stack of two or more arrays keeps XLA from recomputing a
      # cheap last step of u (the decay) inside the reduction, so that the
      # norm and the step read the same u, as with store_direction=True.
      squared = stacked_norms(chunk_xs + chunk_us, names)
      groups.append(SquaredNorms(indices, squared[:len(indices)],
                                 squared[len(indices):], stacked=True))
    else:
      groups.append(SquaredNorms(indices, stacked_norms(chunk_xs, names),
                                 stacked_norms(chunk_us, names),
                                 stacked=True))
  for chunk in _chunks(big, small=False):
    indices, chunk_xs, chunk_us, chunk_specs = zip(*chunk)
    # The x's and the u's norms in one vector: one concatenation a chunk.
    squared = jnp.stack([numerics.squared_norms(a, (), spec.axis_names)
                         for arrays in (chunk_xs, chunk_us)
                         for a, spec in zip(arrays, chunk_specs)])
    groups.append(SquaredNorms(indices, squared[:len(indices)],
                               squared[len(indices):], stacked=True))
  return groups


def _at(value: Any, count: chex.Array) -> Any:
  """A scalar or a schedule evaluated at the 0-based ``count``."""
  return value(count) if callable(value) else value


def scale_updates(
    updates: Any,
    params: Any,
    specs: Any,
    options: TrustRatioOptions = TrustRatioOptions(),
    count: Optional[chex.Array] = None,
) -> tuple[Any, Any]:
  r"""Every layer's update times its trust ratio: norms, ratios, scale.

  The squared norms of each layer (:func:`grouped_squared_norms`), the
  ratios from them (:func:`trust_ratio_from_norms`; 1 for leaves outside the
  trust-ratio mask), and each update times its layer's ratio.

  Args:
    updates: The incoming updates :math:`u` (the params' structure).
    params: The parameters :math:`x`.
    specs: A params-shaped tree of :class:`lamb_optax._src.alias.LeafSpec`.
    options: The :class:`TrustRatioOptions` of every ratio.
    count: The 0-based step, for the options' schedules.

  Returns:
    ``(scaled updates, ratios)``: the updates in their dtypes, and the
    params-shaped tree of the float32 ratios of this update.
  """
  us, treedef = jax.tree.flatten(updates)
  xs = treedef.flatten_up_to(params)
  flat_specs = treedef.flatten_up_to(specs)
  gate = param_decay = None
  if options.decay_gate is not None:
    gate = jnp.asarray(_at(options.decay_gate, count)) != 0
  if options.decoupled_decay is not None:
    learning_rate, weight_decay = options.decoupled_decay
    param_decay = (jnp.asarray(_at(learning_rate, count))
                   * jnp.asarray(_at(weight_decay, count)))

  def param_for_norm(x, spec):
    if param_decay is None or not spec.weight_decay_mask or not (
        spec.trust_ratio_mask):
      return x
    x = numerics.upcast(x)
    return x - x * jnp.asarray(param_decay).astype(x.dtype)

  # Norms.
  norms = grouped_squared_norms(
      [param_for_norm(x, spec) for x, spec in zip(xs, flat_specs)], us,
      flat_specs)
  # Ratios.
  ratios = [None if spec.trust_ratio_mask
            else jnp.ones(layer_shape(x, spec), jnp.float32)
            for x, spec in zip(xs, flat_specs)]
  for group in norms:
    ratio = trust_ratio_from_norms(jnp.sqrt(group.params),
                                   jnp.sqrt(group.updates), options, gate=gate)
    for i, leaf_ratio in zip(group.leaves,
                             _unstack(ratio) if group.stacked else (ratio,)):
      ratios[i] = leaf_ratio
  # Scale.
  out = []
  for u, x, spec, ratio in zip(us, xs, flat_specs, ratios):
    chex.assert_shape(ratio, layer_shape(x, spec))
    chex.assert_type(ratio, jnp.float32)
    if not spec.trust_ratio_mask:
      out.append(u)
      continue
    cdt = numerics.compute_dtype(u.dtype)
    out.append((u.astype(cdt) * expand_ratio(ratio.astype(cdt), u.ndim,
                                             spec.layer_axes)).astype(u.dtype))
  return treedef.unflatten(out), treedef.unflatten(ratios)


def trust_ratio_transform(specs: Any, options: TrustRatioOptions
                          ) -> optax.GradientTransformation:
  """The trust ratio of resolved settings ``specs`` (a params-shaped tree of
  :class:`lamb_optax._src.alias.LeafSpec`), as a transform that trusts the
  checks of its alias."""

  def init_fn(params):
    return initial_state(params, specs)

  def update_fn(updates, state, params=None):
    scaled, ratios = scale_updates(updates, params, specs, options,
                                   state.count)
    return scaled, ScaleByTrustRatioState(
        count=optax.safe_int32_increment(state.count), trust_ratios=ratios)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_trust_ratio(
    min_norm: float = 0.0,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    *,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_mask: validation.MaskArg = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    mask: validation.MaskArg = None,
) -> optax.GradientTransformation:
  r"""Scales each layer's update by its trust ratio.

  A *layer* is one leaf of the parameter pytree, or with ``layer_axes`` one
  slice of a leaf that stacks several layers. For a layer with parameters
  :math:`x` and incoming update :math:`u`,

  .. math::

    r = c \, \frac{\phi(\|x\|_2)}{\|u\|_2 + \epsilon}, \qquad
    \phi(z) = \min(\max(z, \phi_{lo}), \phi_{hi}),

  with :math:`c` the ``trust_coefficient``, :math:`\phi` the identity
  unless ``param_norm_bounds=(lo, hi)`` is given, and :math:`r = 1` where
  :math:`\phi(\|x\|) = 0` or :math:`\|u\| = 0` (so that zero-initialised
  parameters still move, as in the authors' code). :math:`r` is then clipped
  to ``trust_ratio_bounds=(lo, hi)`` when given (DeepSpeed's min/max
  coefficient; ``(0, 1)`` is timm's ``trust_clip``). Layers outside
  ``trust_ratio_mask`` get :math:`r = 1`. The transform returns
  :math:`r\,u`. ``min_norm`` raises both norms to at least that value first,
  as in :func:`optax.scale_by_trust_ratio`, whose positional arguments and
  defaults these are: with the defaults both compute the same ratios.

  Norms are computed in float32 (float64 for float64 leaves) from the leaf's
  values whatever its dtype, and of :math:`|x|` for complex leaves (float32
  for complex64, float64 for complex128); the scaled update keeps the
  update's dtype and the ratios are kept in the state as float32 (see
  :func:`lamb_optax.trust_ratios`).

  Non-finite updates give non-finite ratios and updates; wrap the optimizer in
  :func:`optax.apply_if_finite` to skip such steps.

  Args:
    min_norm: Lower bound of both norms, >= 0 (optax's ``min_norm``).
    trust_coefficient: :math:`c`, a multiplier of the ratio (LARS'
      trust coefficient; 1 in LAMB).
    eps: Added to :math:`\|u\|` in the denominator, >= 0.
    param_norm_bounds: Optional ``(lo, hi)`` with ``0 <= lo <= hi``: the
      bounds of :math:`\phi` (the paper's :math:`\gamma_l, \gamma_u`).
    trust_ratio_bounds: Optional ``(lo, hi)`` with ``0 <= lo <= hi``: bounds
      on the ratio itself.
    trust_ratio_mask: Pytree of bools with the params' structure (or a
      prefix), or a callable ``params -> such a tree``: True where the ratio
      applies. None applies it to every leaf. A masked-out stacked leaf gets
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
    mask: Deprecated: the former name of ``trust_ratio_mask`` (it warns;
      pass one of the two).

  Returns:
    A :class:`optax.GradientTransformation` object whose state is a
    :class:`lamb_optax.ScaleByTrustRatioState`.

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
  if mask is not None:
    if trust_ratio_mask is not None:
      raise ValueError("Pass either `trust_ratio_mask` or `mask` (its former "
                       "name), not both.")
    warnings.warn("scale_by_trust_ratio's `mask` is now `trust_ratio_mask`; "
                  "`mask` will be removed.", DeprecationWarning, stacklevel=2)
    trust_ratio_mask = mask
  options = check_arguments(
      min_norm=min_norm, trust_coefficient=trust_coefficient, eps=eps,
      param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds)
  return alias.alias(
      "scale_by_trust_ratio",
      functools.partial(trust_ratio_transform, options=options),
      trust_ratio_mask=trust_ratio_mask, layer_axes=layer_axes,
      axis_name=axis_name)


def check_arguments(
    *, min_norm: Any = 0.0, trust_coefficient: Any = 1.0, eps: Any = 0.0,
    param_norm_bounds: Any = None, trust_ratio_bounds: Any = None
) -> TrustRatioOptions:
  """Checks a public function's trust-ratio arguments; returns them as
  :class:`TrustRatioOptions`."""
  validation.check_non_negative("min_norm", min_norm)
  validation.check_non_negative("trust_coefficient", trust_coefficient)
  validation.check_non_negative("eps", eps)
  return TrustRatioOptions(
      min_norm=min_norm, trust_coefficient=trust_coefficient, eps=eps,
      param_norm_bounds=validation.check_bounds(
          "param_norm_bounds", param_norm_bounds),
      trust_ratio_bounds=validation.check_bounds(
          "trust_ratio_bounds", trust_ratio_bounds))
