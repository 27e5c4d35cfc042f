r"""Gradient accumulation: over optimizer calls, and inside one train step.

Two forms of the same idea (a large batch seen as ``k`` micro-batches whose
gradients are averaged before one optimizer step):

* :func:`multi_steps` wraps an optimizer like :class:`optax.MultiSteps`: the
  user calls ``update`` once per micro-batch, and only every ``k``-th call
  runs the inner optimizer. Unlike :class:`optax.MultiSteps`, which computes
  the inner update on every call and then discards it with ``jnp.where``, the
  inner update here runs under ``lax.cond`` only on the emitting call, so a
  micro-step costs about one gradient add into the accumulator plus the zero
  updates.
* :func:`accumulate_gradients` splits the batch inside one jitted train step
  and averages the micro-batch gradients under ``jax.lax.scan``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lamb_optax._src import prefix
from lamb_optax._src import validation


ShouldSkipUpdateFn = Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def _check_every_k(every_k_schedule: Any) -> Callable[[jax.Array], Any]:
  """Returns ``every_k_schedule`` as a function of the gradient step."""
  if callable(every_k_schedule):
    return every_k_schedule
  k = validation.check_int(
      "every_k_schedule", every_k_schedule, 1,
      expected="an int >= 1 or a schedule (a callable of the gradient step)")
  return lambda step: k


def _check_inner(inner: Any) -> optax.GradientTransformationExtraArgs:
  if not (hasattr(inner, "init") and hasattr(inner, "update")
          and callable(inner.init) and callable(inner.update)):
    raise TypeError(
        "`inner` must be an optax.GradientTransformation (an object with "
        f"`init` and `update`), got {type(inner).__name__} {inner!r}.")
  return optax.with_extra_args_support(inner)


def _no_skip(updates, gradient_step, params):
  del updates, gradient_step, params
  return jnp.zeros([], jnp.bool_), ()


def multi_steps(
    inner: optax.GradientTransformation,
    every_k_schedule: Union[int, Callable[[jax.Array], Any]],
    *,
    use_grad_mean: bool = True,
    should_skip_update_fn: Optional[ShouldSkipUpdateFn] = None,
    accumulator_dtype: Any = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  r"""Accumulates gradients over ``k`` calls; runs ``inner`` on the ``k``-th.

  :class:`optax.MultiSteps` semantics with a cheap micro-step. With
  :math:`k_s` = ``every_k_schedule(s)`` at gradient step :math:`s` and the
  micro-step gradients :math:`g_1, \dots, g_{k_s}`, the accumulator holds

  .. math::

    a_j = a_{j-1} + \frac{g_j - a_{j-1}}{j}
    \quad\Big(= \frac{1}{j}\sum_{i \le j} g_i\Big), \qquad a_0 = 0,

  (the running mean, Welford's form, as optax; :math:`a_j = a_{j-1} + g_j`
  with ``use_grad_mean=False``), in ``accumulator_dtype``. Calls
  :math:`j < k_s` return zero updates and leave the inner state, its count and
  its schedules untouched; call :math:`j = k_s` returns
  ``inner.update(a_k, inner_state, params, **extra_args)`` (with :math:`a_k`
  cast to the gradients' dtype), advances the gradient step :math:`s` and
  resets the accumulator. Extra keyword arguments of ``update`` are passed to
  the inner update.

  The difference from :class:`optax.MultiSteps` is cost, not result:
  ``optax.MultiSteps`` computes the inner update on every call and selects
  with ``jnp.where(emit, new, old)`` over the inner state and ``emit *
  updates`` (so a LAMB micro-step reads and writes the moments and builds the
  update every time), while here the inner update sits in the emitting branch
  of a ``lax.cond`` and the micro-step branch only adds the gradient into the
  accumulator and writes zero updates. With the step jitted and the state
  donated (``jax.jit(step, donate_argnums=...)``), XLA passes the untouched
  inner state through without copying it, and the accumulator is updated in
  place after the ``cond``. See ``docs/accumulation.md`` for measured costs.
  One visible difference: a micro-step's updates are exact zeros, where
  ``optax.MultiSteps`` returns ``0 * inner_update`` (NaN if the discarded
  inner update was not finite).

  Values of a schedule ``every_k_schedule`` are cast to int32 and clipped to at
  least 1.

  Args:
    inner: The optimizer to wrap, an :class:`optax.GradientTransformation`
      (with or without extra-args support).
    every_k_schedule: The number of micro-steps per optimizer step: an int
      >= 1, or a schedule of the gradient step (``state.gradient_step``).
    use_grad_mean: Average the micro-step gradients (default); otherwise sum
      them.
    should_skip_update_fn: Optional ``fn(updates, gradient_step, params) ->
      (should_skip, skip_state)``, as in optax (e.g.
      :func:`optax.skip_not_finite`): a micro-step for which it returns True is
      dropped (zero updates, state unchanged but for ``skip_state``).
    accumulator_dtype: dtype of the accumulator (float32 by default, as
      optax), so bfloat16 gradients are averaged without losing precision.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is an
    :class:`optax.MultiStepsState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import lamb_optax
    >>> opt = lamb_optax.multi_steps(optax.sgd(1.0), every_k_schedule=2)
    >>> params = jnp.array([1.0, 2.0])
    >>> state = opt.init(params)
    >>> for grads in (jnp.array([1.0, 0.0]), jnp.array([3.0, 2.0])):
    ...   updates, state = opt.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(updates, int(state.gradient_step))
    [0. 0.] 0
    [-2. -1.] 1

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  inner = _check_inner(inner)
  every_k = _check_every_k(every_k_schedule)
  validation.check_bool("use_grad_mean", use_grad_mean)
  validation.check_optional_callable(
      "should_skip_update_fn", should_skip_update_fn,
      "(updates, gradient_step, params) -> (bool, skip_state)")
  skip_fn = should_skip_update_fn or _no_skip
  accumulator_dtype = validation.check_float_dtype("accumulator_dtype",
                                                   accumulator_dtype)

  def accumulated(grads, acc_grads, mini_step, should_skip):
    """The accumulator after this call's gradients (unchanged if skipped)."""

    def leaf(g, a):
      if use_grad_mean:
        new = a + (g - a) / (mini_step + 1)
      else:
        new = g + a
      return jnp.where(should_skip, a, new).astype(a.dtype)

    return jax.tree.map(leaf, grads, acc_grads)

  def init_fn(params):
    gradient_step = jnp.zeros([], jnp.int32)
    _, skip_state = skip_fn(optax.tree.zeros_like(params), gradient_step,
                            params)
    return optax.MultiStepsState(
        mini_step=jnp.zeros([], jnp.int32),
        gradient_step=gradient_step,
        inner_opt_state=inner.init(params),
        acc_grads=optax.tree.zeros_like(params, dtype=accumulator_dtype),
        skip_state=skip_state)

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, optax.MultiStepsState):
      raise TypeError(
          "`state` must be the optax.MultiStepsState made by this "
          f"transform's init, got {type(state).__name__}.")
    k_steps = jnp.maximum(
        jnp.asarray(every_k(state.gradient_step)).astype(jnp.int32), 1)
    should_skip, skip_state = skip_fn(updates, state.gradient_step, params)
    should_skip = jnp.asarray(should_skip)
    if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          "`should_skip_update_fn` must return a boolean scalar first, got "
          f"dtype {should_skip.dtype} and shape {should_skip.shape}.")
    emit = jnp.logical_and(jnp.logical_not(should_skip),
                           state.mini_step == k_steps - 1)

    def emit_branch(grads, acc_grads, inner_state, params, gradient_step):
      acc_grads = accumulated(grads, acc_grads, state.mini_step, should_skip)
      new_updates, new_inner_state = inner.update(
          optax.tree.cast_like(acc_grads, grads), inner_state, params,
          **extra_args)
      # lax.cond needs one type per output: keep the state's dtypes.
      new_inner_state = jax.tree.map(
          lambda new, old: jnp.asarray(new).astype(jnp.asarray(old).dtype),
          new_inner_state, inner_state)
      return (new_updates, new_inner_state,
              optax.safe_int32_increment(gradient_step))

    update_shapes = jax.eval_shape(
        emit_branch, updates, state.acc_grads, state.inner_opt_state, params,
        state.gradient_step)[0]

    def accumulate_branch(grads, acc_grads, inner_state, params,
                          gradient_step):
      del grads, acc_grads, params
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           update_shapes)
      return zeros, inner_state, gradient_step

    new_updates, inner_state, gradient_step = jax.lax.cond(
        emit, emit_branch, accumulate_branch, updates, state.acc_grads,
        state.inner_opt_state, params, state.gradient_step)
    # The accumulator is updated after the cond, not in its branches: had a
    # branch returned it, XLA would copy it (a fresh buffer per branch, then a
    # copy into the donated one). Depending on the cond's gradient_step orders
    # this update after the emitting branch's reads of the old accumulator, so
    # XLA writes it in place, in one pass with the reset. The emitting branch
    # evaluates `accumulated` itself rather than taking it as an operand:
    # computed once before the cond, the reset became a second pass over the
    # accumulator, and a micro-step (k - 1 calls in k) took 1.2x as long
    # (CPU, 8M float32 parameters, lamb inside, k = 2, paired runs).
    # (gradient_step saturates at 2**31 - 1, after which the accumulator would
    # no longer be reset: 2**31 steps are far.)
    emitted = gradient_step != state.gradient_step
    acc_grads = jax.tree.map(
        lambda a: jnp.where(emitted, jnp.zeros([], a.dtype), a),
        accumulated(updates, state.acc_grads, state.mini_step, should_skip))
    mini_step = jnp.where(
        should_skip, state.mini_step,
        optax.safe_int32_increment(state.mini_step) % k_steps)
    return new_updates, optax.MultiStepsState(
        mini_step=mini_step,
        gradient_step=gradient_step,
        inner_opt_state=inner_state,
        acc_grads=acc_grads,
        skip_state=skip_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_batch(batch: Any, num_micro_batches: int) -> int:
  """Returns the common leading dimension of the leaves of ``batch``."""
  leaves = jax.tree_util.tree_leaves_with_path(batch)
  if not leaves:
    raise ValueError("`batch` has no array leaves to split into micro-batches.")
  sizes = {}
  for path, leaf in leaves:
    name = prefix.path_str(path) or "<root>"
    if np.ndim(leaf) == 0:
      raise ValueError(
          f"`batch` leaf '{name}' is a scalar: every leaf of `batch` needs a "
          "leading batch axis to split into `num_micro_batches` micro-batches.")
    sizes[name] = np.shape(leaf)[0]
  if len(set(sizes.values())) > 1:
    raise ValueError(
        "The leaves of `batch` disagree on the batch size (leading "
        f"dimension): {sizes}.")
  size = next(iter(sizes.values()))
  if size % num_micro_batches:
    raise ValueError(
        f"The batch size of `batch` ({size}, the leading dimension of its "
        f"leaves) is not divisible by `num_micro_batches` "
        f"({num_micro_batches}).")
  return size


def accumulate_gradients(
    value_and_grad_fn: Callable[[Any, Any], tuple[Any, Any]],
    params: Any,
    batch: Any,
    num_micro_batches: int,
    *,
    accumulator_dtype: Any = jnp.float32,
    micro_batch_weight_fn: Optional[Callable[[Any], Any]] = None,
    accumulation_dtype: Any = None,
) -> tuple[Any, Any]:
  r"""Mean value and gradients over micro-batches, under ``jax.lax.scan``.

  Splits every leaf of ``batch`` along axis 0 into ``num_micro_batches``
  equal, contiguous micro-batches :math:`b_1, \dots, b_n` (micro-batch
  :math:`i` holds rows :math:`[i m, (i+1) m)`, :math:`m` = batch size /
  :math:`n`), calls ``value_and_grad_fn(params, b_i) -> (v_i, g_i)`` for each
  under one ``jax.lax.scan`` (traced once, so memory and compile time do not
  grow with :math:`n`), and returns

  .. math::

    \bar v = \frac{1}{n}\sum_i v_i, \qquad \bar g = \frac{1}{n}\sum_i g_i,

  with the sums kept in ``accumulator_dtype`` (or the gradients' dtype where
  that is wider) and :math:`\bar g` cast back to the gradients' dtype, so
  bfloat16 gradients are averaged without bfloat16 rounding at every add.
  ``v_i`` may be any pytree, e.g. ``(loss, metrics)`` from
  ``jax.value_and_grad(loss_fn, has_aux=True)``: floating leaves are averaged
  as above, integer leaves (counts) are summed, other leaves are rejected.

  :math:`\bar v, \bar g` are the loss and gradient of the whole batch only
  when each :math:`v_i` is normalised the same way, e.g. a mean over equally
  many examples. When micro-batches hold different numbers of real examples
  (padding, token masks), pass ``micro_batch_weight_fn(b_i) -> w_i`` (e.g.
  the number of real tokens in :math:`b_i`, a scalar >= 0) and the floating
  results are weighted means, :math:`\sum_i w_i v_i / \sum_i w_i` (zeros when
  all weights are zero); with :math:`v_i` the mean over the :math:`w_i` real
  examples of :math:`b_i`, that is the mean over all real examples of the
  batch.

  ``num_micro_batches=1`` calls ``value_and_grad_fn(params, batch)`` once,
  without a scan, and returns its result unchanged.

  Args:
    value_and_grad_fn: ``fn(params, micro_batch) -> (value, grads)``, e.g.
      ``jax.value_and_grad(loss_fn, has_aux=True)``.
    params: The parameters, passed unchanged to every call.
    batch: A pytree of arrays sharing a leading batch dimension divisible by
      ``num_micro_batches``.
    num_micro_batches: Number of micro-batches, a Python int >= 1.
    accumulator_dtype: Floating dtype of the running sums (float32 by
      default); the gradients' own dtype is used where it is wider. The name
      is :func:`multi_steps`' and :class:`optax.MultiSteps`'.
    micro_batch_weight_fn: Optional ``fn(micro_batch) -> scalar weight``; see
      above. None (default) weights micro-batches equally.
    accumulation_dtype: Deprecated: the former name of ``accumulator_dtype``
      (it warns).

  Returns:
    ``(value, grads)``: the mean value (a pytree like ``value_and_grad_fn``'s)
    and the mean gradients, in the gradients' dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import lamb_optax
    >>> def loss_fn(w, batch):
    ...   err = batch["x"] @ w - batch["y"]
    ...   return jnp.mean(err ** 2), {"max_err": jnp.max(jnp.abs(err))}
    >>> batch = {"x": jnp.arange(16.).reshape(8, 2), "y": jnp.ones(8)}
    >>> w = jnp.array([0.5, -0.25])
    >>> value_and_grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    >>> (loss, aux), grads = jax.jit(
    ...     lambda w, b: lamb_optax.accumulate_gradients(
    ...         value_and_grad_fn, w, b, num_micro_batches=4))(w, batch)
    >>> (full_loss, _), full_grads = value_and_grad_fn(w, batch)
    >>> print(f"{loss:.4f} {full_loss:.4f}", jnp.allclose(grads, full_grads))
    1.5625 1.5625 True

  References:
    You et al., `Large Batch Optimization for Deep Learning: Training BERT in
    76 minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
  """
  num_micro_batches = validation.check_int(
      "num_micro_batches", num_micro_batches, 1,
      expected="a Python int >= 1 (it fixes the shapes of the micro-batches)")
  if accumulation_dtype is not None:
    warnings.warn("accumulate_gradients' `accumulation_dtype` is now "
                  "`accumulator_dtype` (multi_steps' and optax's name); "
                  "`accumulation_dtype` will be removed.", DeprecationWarning,
                  stacklevel=2)
    accumulator_dtype = validation.check_float_dtype("accumulation_dtype",
                                                     accumulation_dtype)
  accumulator_dtype = validation.check_float_dtype("accumulator_dtype",
                                                   accumulator_dtype)
  validation.check_optional_callable("micro_batch_weight_fn",
                                     micro_batch_weight_fn,
                                     "micro_batch -> weight")
  batch_size = _check_batch(batch, num_micro_batches)
  if num_micro_batches == 1:
    return value_and_grad_fn(params, batch)

  micro_size = batch_size // num_micro_batches
  micro_batches = jax.tree.map(
      lambda x: jnp.reshape(
          x, (num_micro_batches, micro_size) + tuple(np.shape(x)[1:])),
      batch)
  first = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro_batches)
  value_shapes, grad_shapes = jax.eval_shape(value_and_grad_fn, params, first)

  def sum_dtype(leaf):
    return jnp.promote_types(leaf.dtype, accumulator_dtype)

  def check_value_leaf(path, leaf):
    dtype = jnp.dtype(leaf.dtype)
    if not (jnp.issubdtype(dtype, jnp.floating)
            or jnp.issubdtype(dtype, jnp.integer)):
      raise TypeError(
          f"The value of `value_and_grad_fn` has a leaf "
          f"'{prefix.path_str(path) or '<root>'}' of dtype {dtype}: "
          "floating leaves are averaged over micro-batches and integer "
          "leaves summed; other dtypes are not supported.")

  jax.tree_util.tree_map_with_path(check_value_leaf, value_shapes)
  is_float = lambda leaf: jnp.issubdtype(leaf.dtype, jnp.floating)
  value_init = jax.tree.map(
      lambda v: jnp.zeros(v.shape, sum_dtype(v) if is_float(v) else v.dtype),
      value_shapes)
  grad_init = jax.tree.map(lambda g: jnp.zeros(g.shape, sum_dtype(g)),
                           grad_shapes)
  weight_init = jnp.zeros([], accumulator_dtype)

  def body(carry, micro_batch):
    value_sum, grad_sum, weight_sum = carry
    value, grads = value_and_grad_fn(params, micro_batch)
    if micro_batch_weight_fn is None:
      weight = None
    else:
      weight = jnp.asarray(micro_batch_weight_fn(micro_batch))
      if weight.shape != ():
        raise ValueError(
            "`micro_batch_weight_fn` must return a scalar weight per "
            f"micro-batch, got shape {weight.shape}.")
      weight = weight.astype(accumulator_dtype)
      weight_sum = weight_sum + weight

    def add(total, x, weighted=True):
      x = jnp.asarray(x).astype(total.dtype)
      if weight is not None and weighted:
        x = weight.astype(total.dtype) * x
      return total + x

    value_sum = jax.tree.map(
        lambda t, v: add(t, v, weighted=is_float(t)), value_sum, value)
    grad_sum = jax.tree.map(add, grad_sum, grads)
    return (value_sum, grad_sum, weight_sum), None

  (value_sum, grad_sum, weight_sum), _ = jax.lax.scan(
      body, (value_init, grad_init, weight_init), micro_batches)

  def mean(total, like):
    if not is_float(like):
      return total
    if micro_batch_weight_fn is None:
      return (total / num_micro_batches).astype(like.dtype)
    denom = weight_sum.astype(total.dtype)
    safe = jnp.where(denom > 0, denom, jnp.ones_like(denom))
    return jnp.where(denom > 0, total / safe,
                     jnp.zeros_like(total)).astype(like.dtype)

  return (jax.tree.map(mean, value_sum, value_shapes),
          jax.tree.map(mean, grad_sum, grad_shapes))
