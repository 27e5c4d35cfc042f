r"""LAMB: Adam's direction rescaled per layer by a trust ratio."""

from typing import Any, Optional, Union

import jax
import optax

from lamb_optax._src import adam
from lamb_optax._src import alias
from lamb_optax._src import docstrings
from lamb_optax._src import layers
from lamb_optax._src import stored_direction
from lamb_optax._src import trust_ratio
from lamb_optax._src import validation


@docstrings.with_shared_args
def lamb(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    weight_decay_mask: validation.MaskArg = None,
    *,
    mask: validation.MaskArg = None,
    trust_ratio_mask: validation.MaskArg = None,
    max_grad_norm: Optional[float] = None,
    layer_axes: layers.LayerAxesArg = None,
    axis_name: layers.AxisNameArg = None,
    bias_correction: bool = True,
    nesterov: Optional[Union[str, bool]] = None,
    param_norm_bounds: Optional[tuple[float, float]] = None,
    trust_ratio_bounds: Optional[tuple[float, float]] = None,
    mu_dtype: Optional[Any] = None,
    nu_dtype: Optional[Any] = None,
    store_direction: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The LAMB optimizer (Algorithm 2 of You et al., 2020).

  A *layer* is one leaf of the parameter pytree (or one slice of a stacked
  leaf, see ``layer_axes``). At step :math:`t`, for each
  layer with parameters :math:`x_t` and gradient :math:`g_t` (globally
  clipped to ``max_grad_norm`` first when it is set, NVIDIA's
  pre-normalisation):

  .. math::

    m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \\
    u_t &= \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}
           + \lambda x_t, \\
    r_t &= \frac{\phi(\|x_t\|)}{\|u_t\|}, \\
    x_{t+1} &= x_t - \eta_t \, r_t \, u_t,

  with :math:`\hat m, \hat v` the bias-corrected moments (see
  :func:`lamb_optax.scale_by_adam` for ``bias_correction`` and the N-LAMB /
  NN-LAMB ``nesterov`` forms), :math:`\lambda` the ``weight_decay`` (inside
  the norm, as in the paper), :math:`\phi` the identity or a clip to
  ``param_norm_bounds``, :math:`r_t = 1` where :math:`\phi(\|x\|)=0` or
  :math:`\|u\|=0`, then :math:`r_t` clipped to ``trust_ratio_bounds``. The
  sole :math:`\epsilon` sits outside the square root (``eps_root`` inside
  it). Layers outside ``weight_decay_mask`` get no decay; layers outside
  ``trust_ratio_mask`` get :math:`r_t = 1` (a plain Adam(+decay) step). For
  BERT's convention (no decay and no ratio on biases and LayerNorm) pass
  :func:`lamb_optax.masks.exclude_bias_and_norm` to both masks. Complex
  parameters work as in optax: the norms are those of :math:`|x|` and
  :math:`|u|`.

  It is::

    optax.named_chain(
        ('clip', optax.clip_by_global_norm(max_grad_norm)),  # or identity
        ('adam', lamb_optax.scale_by_adam(b1, b2, eps, eps_root, ...)),
        ('weight_decay', optax.add_decayed_weights(weight_decay,
                                                   weight_decay_mask)),
        ('direction', <u kept in the state with store_direction>),
        ('trust_ratio', lamb_optax.scale_by_trust_ratio(
            trust_ratio_mask=trust_ratio_mask, ...)),
        ('learning_rate', optax.scale_by_learning_rate(learning_rate)),
    )

  with the inputs checked once and the masks resolved once per call. Every
  link is there whatever the options, so a component of the state is found
  by its name: ``state['adam'].mu``, ``state['trust_ratio'].trust_ratios``. The
  positional arguments are :func:`optax.lamb`'s, with its defaults, which
  are the paper's; its seventh, ``mask``, is ``weight_decay_mask`` here (the
  name every lamb_optax optimizer uses), and ``mask=`` is accepted as
  optax's keyword for it. The rest are keyword-only. With the defaults it
  computes what :func:`optax.lamb` computes (with a more accurate
  :math:`1-\beta^t`, see :func:`lamb_optax.scale_by_adam`), and like it
  ``update`` accepts extra keyword arguments.

  ``store_direction=True`` is the fast path on CPU: :math:`u_t` is kept in a
  params-shaped buffer of the optimizer state (``state['direction']``, a
  :class:`lamb_optax.StoredDirectionState`) instead of a temporary of the
  step, which makes a jitted step that donates the state faster on CPU
  (docs/performance.md says why, and what it measured). The updates are the
  same numbers either way. The cost is memory: one more params-shaped array
  of state for the leaves in ``trust_ratio_mask`` (4 bytes per parameter, in
  float32 for float32 and bfloat16 params alike), held between steps.
  Without it, ``state['direction']`` holds no array. The state's layout
  never depends on the backend.

  Args:
    learning_rate: :math:`\eta_t`, a scalar or an optax schedule.
    b1: Decay rate of the first moment, in [0, 1).
    b2: Decay rate of the second moment, in [0, 1).
    eps: Added to the denominator outside the square root, >= 0.
    eps_root: Added to the second moment inside the square root, >= 0.
    weight_decay: :math:`\lambda` >= 0, a scalar or a schedule.
    <shared args: weight_decay_mask>
    mask: optax's name for ``weight_decay_mask`` (pass one of the two).
    <shared args: trust_ratio_mask max_grad_norm>
    <shared args: layer_axes axis_name>
    bias_correction: Whether the moments are bias corrected.
    nesterov: None, ``"n"`` (N-LAMB; True means it too, as in
      :func:`optax.scale_by_adam`) or ``"nn"`` (NN-LAMB).
    param_norm_bounds: Optional ``(lo, hi)`` bounds of :math:`\phi`.
    trust_ratio_bounds: Optional ``(lo, hi)`` bounds of :math:`r`.
    mu_dtype: Optional floating dtype of the first moment (e.g.
      ``jnp.bfloat16`` to halve its memory); None keeps the params' dtype.
    nu_dtype: Optional floating dtype of the second moment; None keeps the
      params' dtype.
    store_direction: Keep :math:`u_t` in the optimizer state (the fast path
      on CPU; 4 more bytes of state per float32 parameter; see above).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lamb_optax
    >>> def f(x): return jnp.sum(x ** 2)
    >>> opt = lamb_optax.lamb(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> state = opt.init(params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(jax.grad(f)(params), state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f"{f(params):.3f}")
    7.942

    The state's components are found by name, whatever the options:

    >>> opt = lamb_optax.lamb(0.1, max_grad_norm=1.0, store_direction=True)
    >>> state = opt.init(params)
    >>> list(state)  # doctest: +NORMALIZE_WHITESPACE
    ['clip', 'adam', 'weight_decay', 'direction', 'trust_ratio',
     'learning_rate']
    >>> state['adam'].mu.shape
    (3,)

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  weight_decay_mask = _optax_mask(mask, weight_decay_mask)
  validation.check_learning_rate(learning_rate)
  adam.check_arguments(b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                       bias_correction=bias_correction, mu_dtype=mu_dtype,
                       nu_dtype=nu_dtype)
  nesterov = adam.nesterov_form(nesterov)
  validation.check_finite_non_negative("weight_decay", weight_decay)
  alias.check_max_grad_norm(max_grad_norm)
  validation.check_bool("store_direction", store_direction)
  options = trust_ratio.check_arguments(param_norm_bounds=param_norm_bounds,
                                        trust_ratio_bounds=trust_ratio_bounds)
  def build(specs):
    stored = alias.trust_ratio_mask(specs)
    if not store_direction:
      stored = jax.tree.map(lambda _: False, stored)
    return optax.named_chain(
        ("clip", alias.clip(max_grad_norm, specs)),
        ("adam", adam.adam_transform(
            b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
            nu_dtype=nu_dtype, nesterov=nesterov,
            bias_correction=bias_correction)),
        ("weight_decay", optax.add_decayed_weights(
            weight_decay, alias.weight_decay_mask(specs, weight_decay_mask))),
        ("direction", stored_direction.store_in_state(stored)),
        ("trust_ratio", trust_ratio.trust_ratio_transform(specs, options)),
        ("learning_rate", optax.scale_by_learning_rate(learning_rate)),
    )

  return alias.alias("lamb", build, trust_ratio_mask=trust_ratio_mask,
                     weight_decay_mask=weight_decay_mask,
                     layer_axes=layer_axes, axis_name=axis_name)


def _optax_mask(mask: Any, weight_decay_mask: Any) -> Any:
  """``weight_decay_mask``, or optax's ``mask`` given in its place."""
  if mask is None:
    return weight_decay_mask
  if weight_decay_mask is not None:
    raise ValueError(
        "Pass either `mask` (optax's name) or `weight_decay_mask`, not both: "
        "they are the same argument, the leaves that get weight decay.")
  return mask
