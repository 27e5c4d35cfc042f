"""Reading the trust ratios back out of an optimizer state, for logging."""

from __future__ import annotations

from typing import Any, Optional

import jax

from lamb_optax._src import trust_ratio


def _is_trust_state(x: Any) -> bool:
  return isinstance(x, trust_ratio.ScaleByTrustRatioState)


def trust_ratios(opt_state: Any, *, index: Optional[int] = None) -> Any:
  """The float32 trust ratios of the last update, shaped like the params.

  Finds the :class:`lamb_optax.ScaleByTrustRatioState` wherever it sits in
  ``opt_state`` (``opt_state['trust_ratio']`` of ``lamb``, ``lars`` and
  every preset): inside :func:`optax.chain`, :func:`optax.named_chain`,
  :func:`optax.inject_hyperparams`, :class:`optax.MultiSteps`,
  :func:`optax.masked`, :func:`optax.apply_if_finite` or
  :func:`optax.multi_transform` states, or a Flax optimizer's state.

  Args:
    opt_state: An optimizer state containing a trust-ratio state.
    index: Which one to return when the state holds several (e.g. a
      ``multi_transform`` with two LAMBs), in pytree order.

  Returns:
    A pytree shaped like the params (one float32 scalar per leaf); leaves
    outside the trust-ratio mask hold 1.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import lamb_optax
    >>> opt = optax.inject_hyperparams(lamb_optax.lamb)(
    ...     learning_rate=0.1, max_grad_norm=1.0, store_direction=True)
    >>> params = {'w': jnp.full((2, 2), 3.0)}
    >>> state = opt.init(params)
    >>> _, state = opt.update({'w': jnp.ones((2, 2))}, state, params)
    >>> # ||x|| = 6 and the first Adam direction is sign(g): ||u|| = 2
    >>> print(f"{float(lamb_optax.trust_ratios(state)['w']):.4f}")
    3.0000
    >>> # The same, by name:
    >>> named = state.inner_state['trust_ratio'].trust_ratios
    >>> print(f"{float(named['w']):.4f}")
    3.0000
  """
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=_is_trust_state)
           if _is_trust_state(x)]
  if not found:
    raise ValueError(
        "`opt_state` holds no trust-ratio state: build the optimizer with "
        "lamb_optax.lamb, lamb_optax.lars or lamb_optax.scale_by_trust_ratio.")
  if index is None:
    if len(found) > 1:
      raise ValueError(
          f"`opt_state` holds {len(found)} trust-ratio states; pass "
          f"`index=` (0..{len(found) - 1}) to choose one.")
    index = 0
  if not 0 <= index < len(found):
    raise ValueError(
        f"`index` must be in [0, {len(found)}), got {index!r}.")
  return found[index].trust_ratios
