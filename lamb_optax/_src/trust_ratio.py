r"""The layer-wise trust ratio of LAMB and LARS."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import adam
from lamb_optax._src import validation


class ScaleByTrustRatioState(NamedTuple):
  """State of :func:`scale_by_trust_ratio`.

  Attributes:
    trust_ratios: float32 pytree shaped like the params (one scalar per leaf):
      the ratios applied by the last update (1 before the first update and for
      leaves outside the trust-ratio mask). Read it with
      :func:`lamb_optax.trust_ratios`.
  """

  trust_ratios: Any


def layer_squared_norms(x: chex.Array) -> chex.Array:
  r"""Squared L2 norm of one layer, computed in (at least) float32.

  A layer is one leaf: the reduction runs over every axis and gives a scalar.
  The values are upcast before squaring, so bfloat16/float16 parameters get
  float32-accurate norms.
  """
  x = x.astype(adam.compute_dtype(x.dtype))
  return jnp.sum(jnp.square(x))


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
) -> optax.GradientTransformation:
  r"""Scales each layer's update by its trust ratio.

  A *layer* is one leaf of the parameter pytree. For a layer with parameters
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
      None applies it to every leaf.

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
      trust_ratio_bounds=trust_ratio_bounds, mask=mask, mask_name="mask")


def trust_ratio_transform(*, trust_coefficient, eps, param_norm_bounds,
                          trust_ratio_bounds, mask, mask_name):
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
    return ScaleByTrustRatioState(
        trust_ratios=jax.tree.map(
            lambda _: jnp.ones([], jnp.float32), params))

  def update_fn(updates, state, params=None):
    validation.check_params_present(params, "scale_by_trust_ratio")
    validation.check_same_structure(params, updates, "updates")
    validation.check_float_leaves(params, "params")
    validation.check_float_leaves(updates, "updates")
    treedef = jax.tree.structure(params)
    flat_params = treedef.flatten_up_to(params)
    flat_updates = treedef.flatten_up_to(updates)
    if mask is None:
      flat_mask = [True] * len(flat_params)
    else:
      flat_mask = validation.resolve_mask(mask, params, mask_name)

    new_updates, ratios = [], []
    for u, x, adapt in zip(flat_updates, flat_params, flat_mask):
      if not adapt:
        new_updates.append(u)
        ratios.append(jnp.ones([], jnp.float32))
        continue
      param_norm = jnp.sqrt(layer_squared_norms(x))
      update_norm = jnp.sqrt(layer_squared_norms(u))
      ratio = trust_ratio_from_norms(
          param_norm, update_norm,
          trust_coefficient=trust_coefficient, eps=eps,
          param_norm_bounds=param_norm_bounds,
          trust_ratio_bounds=trust_ratio_bounds)
      chex.assert_shape(ratio, ())
      chex.assert_type(ratio, jnp.float32)
      cdt = adam.compute_dtype(u.dtype)
      new_updates.append((u.astype(cdt) * ratio.astype(cdt)).astype(u.dtype))
      ratios.append(ratio)
    return (treedef.unflatten(new_updates),
            ScaleByTrustRatioState(trust_ratios=treedef.unflatten(ratios)))

  return optax.GradientTransformation(init_fn, update_fn)
