r"""Adam moments and direction for LAMB, with the variants LAMB users rely on."""

from __future__ import annotations

from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import validation

ScaleByAdamState = optax.ScaleByAdamState


def compute_dtype(dtype: Any) -> jnp.dtype:
  """The dtype arithmetic runs in: at least float32 (bf16/fp16 are upcast)."""
  return jnp.promote_types(dtype, jnp.float32)


def _power(base: float, count: chex.Array) -> chex.Array:
  return jnp.asarray(base, jnp.float32) ** count.astype(jnp.float32)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    *,
    bias_correction: bool = True,
    nesterov: Optional[str] = None,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's moments: the direction :math:`u` of LAMB.

  With :math:`t` the step (starting at 1) and :math:`g_t` the gradient,

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

  and the returned direction is

  .. math::

    u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon},

  where, with ``bias_correction=True`` (Algorithm 2 of You et al.),
  :math:`\hat m_t = m_t / (1-\beta_1^t)` and :math:`\hat v_t = v_t /
  (1-\beta_2^t)`; with ``bias_correction=False``, :math:`\hat m_t = m_t` and
  :math:`\hat v_t = v_t` (the raw moments of torch-optimizer and DeepSpeed).

  ``nesterov="n"`` (N-LAMB, Appendix of You et al.) uses a Nesterov first
  moment, as NAdam:

  .. math::

    \hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}}
      + \frac{(1-\beta_1) g_t}{1-\beta_1^t},

  and ``nesterov="nn"`` (NN-LAMB) does the same for the second moment:

  .. math::

    \hat v_t = \frac{\beta_2 v_t}{1-\beta_2^{t+1}}
      + \frac{(1-\beta_2) g_t^2}{1-\beta_2^t}.

  Without bias correction the denominators of these two forms are 1.

  ``eps`` sits outside the square root (as in the paper and Adam);
  ``eps_root`` inside it. Arithmetic runs in at least float32 whatever the
  gradient dtype, the moments are stored in ``mu_dtype``/``nu_dtype`` (default:
  the parameter dtype, as optax) and the direction comes back in the
  gradient's dtype.

  Args:
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Term added to the denominator outside the square root, >= 0.
    eps_root: Term added to the second moment inside the square root, >= 0.
    bias_correction: Whether to divide the moments by :math:`1-\beta^t`.
    nesterov: None, ``"n"`` (Nesterov first moment) or ``"nn"`` (Nesterov
      first and second moments).
    mu_dtype: Optional dtype of the first moment (e.g. ``jnp.bfloat16``).
    nu_dtype: Optional dtype of the second moment.

  Returns:
    A :class:`optax.GradientTransformation` object whose state is an
    :class:`optax.ScaleByAdamState`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import lamb_optax
    >>> tx = lamb_optax.scale_by_adam()
    >>> params = {'w': jnp.ones((2, 3))}
    >>> state = tx.init(params)
    >>> u, state = tx.update({'w': jnp.full((2, 3), 0.5)}, state)
    >>> u['w'].round(4)  # m_hat / (sqrt(v_hat) + eps) = g / (|g| + eps)
    Array([[1., 1., 1.],
           [1., 1., 1.]], dtype=float32)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020 (Algorithm 2
    and Appendix: N-LAMB, NN-LAMB).

    Dozat, `Incorporating Nesterov Momentum into Adam
    <https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ>`_, 2016.
  """
  validation.check_unit_interval("b1", b1)
  validation.check_unit_interval("b2", b2)
  validation.check_non_negative("eps", eps)
  validation.check_non_negative("eps_root", eps_root)
  validation.check_choice("nesterov", nesterov, (None, "n", "nn"))
  if not isinstance(bias_correction, bool):
    raise TypeError(
        f"`bias_correction` must be a bool, got {bias_correction!r}.")
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)

  def init_fn(params):
    validation.check_float_leaves(params, "params")
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params),
        nu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params),
    )

  def update_fn(updates, state, params=None):
    del params
    validation.check_float_leaves(updates, "updates")
    validation.check_same_structure(state.mu, updates, "updates",
                                    "the params given to init")
    count = optax.safe_int32_increment(state.count)
    if bias_correction:
      c1, c2 = 1.0 - _power(b1, count), 1.0 - _power(b2, count)
      c1_next = 1.0 - _power(b1, count + 1)
      c2_next = 1.0 - _power(b2, count + 1)
    else:
      c1 = c2 = c1_next = c2_next = jnp.ones([], jnp.float32)

    def leaf(g, mu, nu):
      cdt = compute_dtype(g.dtype)
      g32 = g.astype(cdt)
      m = b1 * mu.astype(cdt) + (1.0 - b1) * g32
      v = b2 * nu.astype(cdt) + (1.0 - b2) * jnp.square(g32)
      if nesterov is None:
        m_hat = m / c1.astype(cdt)
      else:
        m_hat = b1 * m / c1_next.astype(cdt) + (1.0 - b1) * g32 / c1.astype(cdt)
      if nesterov == "nn":
        v_hat = (b2 * v / c2_next.astype(cdt)
                 + (1.0 - b2) * jnp.square(g32) / c2.astype(cdt))
      else:
        v_hat = v / c2.astype(cdt)
      u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
      return u.astype(g.dtype), m.astype(mu.dtype), v.astype(nu.dtype)

    out = jax.tree.map(leaf, updates, state.mu, state.nu)
    u, mu, nu = jax.tree.transpose(
        jax.tree.structure(updates), jax.tree.structure((0, 0, 0)), out)
    return u, ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
