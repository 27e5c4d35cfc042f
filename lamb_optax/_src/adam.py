r"""Adam moments and direction for LAMB, with the variants LAMB users use."""

import math
from typing import Any, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import alias
from lamb_optax._src import numerics
from lamb_optax._src import validation

ScaleByAdamState = optax.ScaleByAdamState


def one_minus_power(base: Any, count: chex.Array) -> chex.Array:
  r""":math:`1 - \beta^t` in float32, accurate even for :math:`\beta` near 1.

  For a Python number :math:`\beta`, :math:`\log\beta` is taken in double
  precision and :math:`1-\beta^t = -\mathrm{expm1}(t\log\beta)`: rounding
  :math:`\beta = 0.999` to float32 first (as ``1 - b2 ** t`` in float32 does)
  would make :math:`1-\beta^1` off by 1.3e-5 relative. Traced values (under
  ``optax.inject_hyperparams``) are already float32 and use the same formula.
  """
  t = count.astype(jnp.float32)
  if isinstance(base, (int, float)) and not isinstance(base, bool):
    if base == 0:
      return jnp.ones([], jnp.float32)
    return -jnp.expm1(t * jnp.float32(math.log(base)))
  base = jnp.asarray(base, jnp.float32)
  log_base = jnp.log(jnp.where(base > 0, base, 1.0))
  return jnp.where(base > 0, -jnp.expm1(t * log_base), 1.0)


class AdamScalars(NamedTuple):
  """Per-step scalars of the bias-corrected (or raw) moments.

  With ``bias_correction=False`` all four are 1.
  """

  c1: chex.Array       # 1 - b1^t
  c2: chex.Array       # 1 - b2^t
  c1_next: chex.Array  # 1 - b1^(t+1)
  c2_next: chex.Array  # 1 - b2^(t+1)


def adam_scalars(count: chex.Array, b1: Any, b2: Any,
                 bias_correction: bool) -> AdamScalars:
  """The scalars of step ``count`` (already incremented: t >= 1)."""
  if not bias_correction:
    one = jnp.ones([], jnp.float32)
    return AdamScalars(one, one, one, one)
  return AdamScalars(
      c1=one_minus_power(b1, count), c2=one_minus_power(b2, count),
      c1_next=one_minus_power(b1, count + 1),
      c2_next=one_minus_power(b2, count + 1))


def moments(g, mu, nu, b1, b2):
  r"""New moments ``(m, v)``: :math:`m` in the compute dtype of ``g``,
  :math:`v` (an average of :math:`|g|^2`) in its real dtype."""
  cdt = numerics.compute_dtype(g.dtype)
  g = g.astype(cdt)
  m = b1 * mu.astype(cdt) + (1.0 - b1) * g
  nu = nu.real if jnp.iscomplexobj(nu) else nu  # optax keeps nu complex.
  v = (b2 * nu.astype(numerics.real_dtype(g.dtype))
       + (1.0 - b2) * numerics.abs_sq(g))
  return m, v


def direction(m, v, g, sc: AdamScalars, *, b1, b2, eps, eps_root,
              nesterov: Optional[str]):
  r"""Adam's direction :math:`\hat m / (\sqrt{\hat v + \epsilon_{root}} +
  \epsilon)` from the new moments (``g`` is used by the Nesterov forms)."""
  g = g.astype(m.dtype)
  if nesterov is None:
    m_hat = m / sc.c1
  else:
    m_hat = b1 * m / sc.c1_next + (1.0 - b1) * g / sc.c1
  if nesterov == "nn":
    v_hat = b2 * v / sc.c2_next + (1.0 - b2) * numerics.abs_sq(g) / sc.c2
  else:
    v_hat = v / sc.c2
  if not (isinstance(eps_root, (int, float)) and eps_root == 0):
    v_hat = v_hat + eps_root
  return m_hat / (jnp.sqrt(v_hat) + eps)


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Optional[Any] = None,
    *,
    nesterov: Optional[Union[str, bool]] = None,
    bias_correction: bool = True,
    nu_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Rescales updates by Adam's moments: the direction :math:`u` of LAMB.

  With :math:`t` the step (starting at 1) and :math:`g_t` the gradient,

  .. math::

    m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) |g_t|^2,

  and the returned direction is

  .. math::

    u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon},

  where, with ``bias_correction=True`` (Algorithm 2 of You et al.),
  :math:`\hat m_t = m_t / (1-\beta_1^t)` and :math:`\hat v_t = v_t /
  (1-\beta_2^t)`; with ``bias_correction=False``, :math:`\hat m_t = m_t` and
  :math:`\hat v_t = v_t` (the raw moments of torch-optimizer and DeepSpeed).

  ``nesterov="n"`` (N-LAMB, Appendix of You et al.), or ``True`` as in
  optax, uses a Nesterov first moment, as NAdam:

  .. math::

    \hat m_t = \frac{\beta_1 m_t}{1-\beta_1^{t+1}}
      + \frac{(1-\beta_1) g_t}{1-\beta_1^t},

  and ``nesterov="nn"`` (NN-LAMB) does the same for the second moment:

  .. math::

    \hat v_t = \frac{\beta_2 v_t}{1-\beta_2^{t+1}}
      + \frac{(1-\beta_2) |g_t|^2}{1-\beta_2^t}.

  Without bias correction the denominators of these two forms are 1.

  ``eps`` sits outside the square root (as in the paper and Adam);
  ``eps_root`` inside it. The positional arguments and their defaults are
  :func:`optax.scale_by_adam`'s (``eps=1e-8``; :func:`lamb_optax.lamb`
  passes the paper's 1e-6), and with the defaults this computes what optax
  computes, with a more accurate :math:`1-\beta^t` (see
  :func:`one_minus_power`). Arithmetic runs in at least float32 whatever the
  gradient dtype, the moments are stored in ``mu_dtype``/``nu_dtype``
  (default: the parameter dtype, as optax) and the direction comes back in
  the gradient's dtype. Complex gradients work as in optax: :math:`m` is
  complex, :math:`v` averages :math:`|g|^2` in the real dtype (float32 for
  complex64) and is stored in ``nu_dtype`` (the complex parameter dtype by
  default, as optax stores it).

  Args:
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Term added to the denominator outside the square root, >= 0.
    eps_root: Term added to the second moment inside the square root, >= 0.
    mu_dtype: Optional floating dtype of the first moment (e.g.
      ``jnp.bfloat16``; complex for complex params).
    nesterov: None or False (optax's default), ``"n"`` or True (Nesterov
      first moment, optax's ``nesterov=True``) or ``"nn"`` (Nesterov first
      and second moments).
    bias_correction: Whether to divide the moments by :math:`1-\beta^t`.
    nu_dtype: Optional floating dtype of the second moment.

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
  check_arguments(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                  bias_correction=bias_correction, mu_dtype=mu_dtype,
                  nu_dtype=nu_dtype)
  return alias.with_input_checks(
      adam_transform(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                     mu_dtype=mu_dtype, nu_dtype=nu_dtype,
                     nesterov=nesterov_form(nesterov),
                     bias_correction=bias_correction),
      "scale_by_adam", updates_like=lambda state: state.mu)


def check_arguments(*, b1: Any, b2: Any, eps: Any, eps_root: Any,
                    bias_correction: Any, mu_dtype: Any = None,
                    nu_dtype: Any = None) -> None:
  """The argument checks of every function that takes Adam's arguments.

  A moment dtype must be floating (complex for complex params): an int8
  first moment would be stored as zeros, silently dropping the momentum.
  """
  validation.check_unit_interval("b1", b1)
  validation.check_unit_interval("b2", b2)
  validation.check_non_negative("eps", eps)
  validation.check_non_negative("eps_root", eps_root)
  validation.check_bool("bias_correction", bias_correction)
  for name, dtype in (("mu_dtype", mu_dtype), ("nu_dtype", nu_dtype)):
    if dtype is not None:
      validation.check_float_dtype(name, dtype, allow_complex=True)


def nesterov_form(nesterov: Any) -> Optional[str]:
  """``nesterov`` as None, ``"n"`` or ``"nn"``: optax's False and True are
  None and ``"n"`` (the same Nesterov first moment)."""
  if nesterov is None or nesterov is False:
    return None
  if nesterov is True:
    return "n"
  if isinstance(nesterov, str) and nesterov in ("n", "nn"):
    return nesterov
  raise ValueError(f"`nesterov` must be one of [None, False, True, 'n', "
                   f"'nn'], got {nesterov!r}.")


def adam_transform(*, b1: Any, b2: Any, eps: Any, eps_root: Any,
                   mu_dtype: Any = None, nu_dtype: Any = None,
                   nesterov: Optional[str] = None,
                   bias_correction: bool = True
                   ) -> optax.GradientTransformation:
  """:func:`scale_by_adam` of checked arguments, trusting the input checks of
  its caller (:func:`lamb_optax._src.alias.with_input_checks`)."""
  mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
  nu_dtype = None if nu_dtype is None else jnp.dtype(nu_dtype)

  def init_fn(params):
    return ScaleByAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params),
        nu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params),
    )

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    sc = adam_scalars(count, b1, b2, bias_correction)

    def leaf(g, mu, nu):
      m, v = moments(g, mu, nu, b1, b2)
      u = direction(m, v, g, sc, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                    nesterov=nesterov)
      return u.astype(g.dtype), m.astype(mu.dtype), v.astype(nu.dtype)

    out = jax.tree.map(leaf, updates, state.mu, state.nu)
    u, mu, nu = jax.tree.transpose(
        jax.tree.structure(updates), jax.tree.structure((0, 0, 0)), out)
    return u, ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
