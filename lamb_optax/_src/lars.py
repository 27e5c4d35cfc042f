r"""LARS (Algorithm 1 of You et al., 2020): momentum rescaled per layer."""

from typing import Optional

import jax
import jax.numpy as jnp
import optax

from lamb_optax._src import alias
from lamb_optax._src import docstrings
from lamb_optax._src import layers
from lamb_optax._src import numerics
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation


@docstrings.with_shared_args
def lars(
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: validation.MaskArg = None,
    trust_coefficient: float = 1.0,
    eps: float = 0.0,
    trust_ratio_mask: validation.MaskArg = None,
    momentum: float = 0.9,
    nesterov: bool = False,
    *,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
) -> optax.GradientTransformationExtraArgs:
  r"""The LARS optimizer as written in Algorithm 1 of You et al. (2020).

  A *layer* is one leaf of the parameter pytree (or one slice of a stacked
  leaf, see ``layer_axes``). At step :math:`t`:

  .. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1)(g_t + \lambda x_t), \\
    x_{t+1} &= x_t - \eta_t \, \frac{c \, \phi(\|x_t\|)}{\|d_t\| + \epsilon}
      \, d_t,

  with :math:`d_t = m_t` (the paper's Algorithm 1), or with ``nesterov=True``
  the Nesterov direction of the same damped momentum,

  .. math::

    d_t = \beta_1 m_t + (1-\beta_1)(g_t + \lambda x_t),

  with :math:`\beta_1` the ``momentum``, :math:`\lambda` the
  ``weight_decay`` (on the leaves of ``weight_decay_mask``), :math:`c` the
  ``trust_coefficient``, :math:`\phi` the identity or a clip to
  ``param_norm_bounds``, the ratio 1 where :math:`\phi(\|x\|)=0` or
  :math:`\|d\|=0`, then clipped to ``trust_ratio_bounds``; leaves outside
  ``trust_ratio_mask`` take the plain momentum step. It is the
  :func:`optax.named_chain` of ``'clip'`` (``max_grad_norm``, or the
  identity), ``'weight_decay'`` (:func:`optax.add_decayed_weights`),
  ``'momentum'`` (the damped momentum: :math:`d_t`, without ``nesterov``
  what ``optax.ema(momentum, debias=False)`` computes, with the state dtype
  kept fixed), ``'trust_ratio'`` (:func:`lamb_optax.scale_by_trust_ratio`)
  and ``'learning_rate'`` (:func:`optax.scale_by_learning_rate`), with the
  inputs checked once; the state's components are found by these names
  (``state['momentum'].ema``) whatever the options.

  How it differs from :func:`optax.lars`: the positional arguments are
  optax's, in optax's order, but the algorithm is the paper's. optax
  follows the classic LARS of You, Gitman & Ginsburg (2017): the ratio
  :math:`10^{-3}\|x\|/\|g + \lambda x\|` is applied to the gradient
  *before* a heavy-ball trace :math:`m_t = \beta m_{t-1} + \text{step}` (no
  :math:`1-\beta` damping). Here, as in the paper's Algorithm 1, the
  momentum averages the decayed gradient with :math:`1-\beta_1` damping and
  the ratio is computed from, and applied to, the momentum itself, so every
  step moves a layer by :math:`\eta_t c\,\phi(\|x_t\|)`; the default
  trust coefficient is the paper's 1 (optax's is 1e-3: pass
  ``trust_coefficient=1e-3`` for optax's step sizes). ``nesterov=True``
  acts on this damped momentum too: :math:`d_t` is :math:`1-\beta_1` times
  the direction of optax's Nesterov trace (:math:`\beta t_t + g'` with
  :math:`t_t = \beta t_{t-1} + g'`), and the ratio is computed from and
  applied to :math:`d_t`, where optax applies its ratio to :math:`g'` before
  the trace. Without the ratio (``trust_ratio_mask=False``) and with a
  constant learning rate, the steps are :math:`1-\beta_1` times optax's. Like
  optax's, ``update`` accepts extra keyword arguments.

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    weight_decay_mask: The leaves that get weight decay: a bool pytree
      (or prefix, or callable); None (or True, optax's default): every leaf.
    trust_coefficient: :math:`c` >= 0.
    eps: Added to :math:`\|m_t\|` in the denominator, >= 0.
    trust_ratio_mask: The leaves that get the ratio, in the same forms; None
      (or True): every leaf.
    momentum: :math:`\beta_1` in [0, 1).
    nesterov: Whether the direction is the Nesterov one, :math:`d_t =
      \beta_1 m_t + (1-\beta_1)(g_t + \lambda x_t)`, instead of :math:`m_t`.
    <shared args: max_grad_norm layer_axes axis_name>
    param_norm_bounds: Optional ``(lo, hi)`` bounds of :math:`\phi`.
    trust_ratio_bounds: Optional ``(lo, hi)`` bounds of the ratio.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lamb_optax
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = lamb_optax.lars(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jax.grad(f)(params), state, params)
    >>> # each step moves the layer by exactly lr * ||x||:
    >>> print(f"{float(jnp.linalg.norm(updates)):.4f}")
    0.3742

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020 (Algorithm 1).
  """
  validation.check_learning_rate(learning_rate)
  validation.check_unit_interval("momentum", momentum)
  validation.check_bool("nesterov", nesterov)
  validation.check_finite_non_negative("weight_decay", weight_decay)
  alias.check_max_grad_norm(max_grad_norm)
  options = trust_ratio.check_arguments(
      trust_coefficient=trust_coefficient, eps=eps,
      param_norm_bounds=param_norm_bounds,
      trust_ratio_bounds=trust_ratio_bounds)
  def build(specs):
    return optax.named_chain(
        ("clip", alias.clip(max_grad_norm, specs)),
        ("weight_decay", optax.add_decayed_weights(
            weight_decay, alias.weight_decay_mask(specs, weight_decay_mask))),
        ("momentum", damped_momentum(momentum, nesterov=nesterov)),
        ("trust_ratio", trust_ratio.trust_ratio_transform(specs, options)),
        ("learning_rate", optax.scale_by_learning_rate(learning_rate)),
    )

  return alias.alias("lars", build, trust_ratio_mask=trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     layer_axes=layer_axes, axis_name=axis_name)


def damped_momentum(momentum: float, *,
                    nesterov: bool = False) -> optax.GradientTransformation:
  r"""The damped momentum of LARS: :math:`m_t = \beta m_{t-1} + (1-\beta) u_t`.

  Returns :math:`m_t`, or with ``nesterov`` the Nesterov direction
  :math:`\beta m_t + (1-\beta) u_t`. Arithmetic runs in at least float32;
  the momentum keeps the dtype it was initialised with (the parameter dtype)
  and the output the incoming dtype, so state dtypes never change across
  steps, even when ``momentum`` is a float32 array
  (``optax.inject_hyperparams``) and the parameters bf16. The state is an
  :class:`optax.EmaState`.
  """

  def init_fn(params):
    return optax.EmaState(count=jnp.zeros([], jnp.int32),
                          ema=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params

    def leaf(u, m):
      cdt = numerics.compute_dtype(u.dtype)
      new = momentum * m.astype(cdt) + (1.0 - momentum) * u.astype(cdt)
      out = (momentum * new + (1.0 - momentum) * u.astype(cdt) if nesterov
             else new)
      return out.astype(u.dtype), new.astype(m.dtype)

    out = jax.tree.map(leaf, updates, state.ema)
    new_updates, new_ema = jax.tree.transpose(
        jax.tree.structure(updates), jax.tree.structure((0, 0)), out)
    return new_updates, optax.EmaState(
        count=optax.safe_int32_increment(state.count), ema=new_ema)

  return optax.GradientTransformation(init_fn, update_fn)
