r"""The gradient noise scale of a task at given parameters.

McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", arXiv
1812.06162) predict the critical batch from the *simple noise scale*

.. math:: B_\mathrm{simple} = \frac{\operatorname{tr}\Sigma}{|G|^2},

where :math:`G = \mathbb{E}[g]` is the true gradient and :math:`\Sigma` the
covariance of the per-example gradient :math:`g`. A batch of :math:`B`
independent examples has :math:`\mathbb{E}|G_B|^2 = |G|^2 +
\operatorname{tr}\Sigma / B`: below :math:`B_\mathrm{simple}` the noise
dominates the step, above it the gradient does.

Both terms are estimated from :math:`n` per-example gradients
:math:`g_1, \dots, g_n` at the same parameters, with
:math:`\bar g = \frac1n \sum_i g_i`:

.. math::

   S = \frac{1}{n-1} \sum_i |g_i - \bar g|^2, \qquad
   \widehat{|G|^2} = |\bar g|^2 - \frac{S}{n},

unbiased for :math:`\operatorname{tr}\Sigma` and :math:`|G|^2` (since
:math:`\mathbb{E}|\bar g|^2 = |G|^2 + \operatorname{tr}\Sigma / n`), and
:math:`\hat B_\mathrm{simple} = S / \widehat{|G|^2}` (a ratio of unbiased
estimates, so itself only consistent). Where :math:`\widehat{|G|^2} \le 0`
the sample cannot resolve :math:`|G|`: :math:`B_\mathrm{simple}` exceeds
what :math:`n` examples measure, and the estimate is ``+inf``.

:func:`per_example_stats` computes the sufficient statistics in JAX
(jittable, and vmappable over a leading trial axis of the parameters);
:func:`b_simple` turns them into the estimates; :func:`two_batch_estimates`
is the paper's Appendix A estimator from two batch sizes;
:func:`make_noise_probe` fixes a sample of a :class:`tasks.Task`'s training
inputs and returns the probe for it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_CHUNK = 128


def _accumulation_dtype():
  """float64 when x64 is enabled, else float32."""
  return jax.dtypes.canonicalize_dtype(jnp.float64)


def _tree_sum(tree) -> jax.Array:
  """The sum of every entry of ``tree``."""
  return sum((jnp.sum(x) for x in jax.tree.leaves(tree)),
             jnp.zeros([], _accumulation_dtype()))


def _sq_norm(tree) -> jax.Array:
  """The sum of the squares of every entry of ``tree``."""
  return _tree_sum(jax.tree.map(jnp.square, tree))


def per_example_stats(loss_fn: Callable[[Any, Any, Any], jax.Array], params,
                      examples, data, chunk: int = DEFAULT_CHUNK
                      ) -> dict[str, jax.Array]:
  r"""The moments of the per-example gradients that :func:`b_simple` needs.

  Example :math:`i`'s gradient is :math:`g_i = \nabla_\theta
  \mathrm{loss\_fn}(\theta, e_i, \mathrm{data})`, the loss of a batch of one
  (``e_i`` keeps a leading batch axis of size 1), computed with
  ``jax.vmap(jax.grad(...))`` over ``chunk`` examples at a time, in a
  ``lax.scan`` over :math:`\lceil n / \mathrm{chunk} \rceil` chunks, so
  that at most ``chunk`` gradients are held at once and the gradient is
  compiled once. When ``chunk`` does not divide ``n``, the last chunk is
  padded with copies of the first example, weighted 0 (at most
  ``chunk - 1`` wasted gradients).

  The chunks' moments are merged with Chan et al.'s (1979) pairwise update:
  a chunk :math:`b` of :math:`n_b` gradients with mean :math:`\bar g_b` and
  :math:`M_b = \sum_{i \in b} |g_i - \bar g_b|^2` joins the running
  :math:`(n_a, \bar g_a, M_a)` as

  .. math::

     n = n_a + n_b, \quad \delta = \bar g_b - \bar g_a, \quad
     \bar g = \bar g_a + \delta \, n_b / n, \quad
     M = M_a + M_b + |\delta|^2 n_a n_b / n.

  :math:`M = \sum_i |g_i - \bar g|^2` is thus a sum of non-negative terms,
  never the difference :math:`\sum_i |g_i|^2 - n|\bar g|^2`, which loses
  every digit of the spread when :math:`|\bar g|^2 \gg S` (a small noise
  scale) in float32. Accumulation is in float32, or float64 when x64 is
  enabled (the gradients are cast to it).

  Args:
    loss_fn: ``(params, batch, data) -> scalar``, e.g. ``Task.loss``; the
      leaves of ``batch`` have a leading batch axis.
    params: The parameters (a pytree) at which to take the gradients.
    examples: A pytree of arrays with a common leading axis of ``n >= 2``
      examples.
    data: Passed to ``loss_fn`` unchanged (``Task.data``).
    chunk: Examples per vmapped gradient evaluation.

  Returns:
    A dict of scalars (the accumulation dtype): ``n`` (the number of
    examples), ``mean_grad_sq`` :math:`|\bar g|^2`, ``sum_sq_dev``
    :math:`\sum_i |g_i - \bar g|^2` and ``sum_sq_norms``
    :math:`\sum_i |g_i|^2` (:math:`= M + n|\bar g|^2`, for reference).
  """
  leaves = jax.tree.leaves(examples)
  if not leaves:
    raise ValueError("per_example_stats: `examples` has no arrays.")
  n = int(leaves[0].shape[0])
  if any(int(x.shape[0]) != n for x in leaves):
    raise ValueError("per_example_stats: the leaves of `examples` differ in "
                     f"their leading (example) axis: "
                     f"{[x.shape[0] for x in leaves]}.")
  if n < 2:
    raise ValueError(f"per_example_stats needs at least 2 examples, got {n}.")
  if chunk < 1:
    raise ValueError(f"`chunk` must be >= 1, got {chunk}.")
  acc = _accumulation_dtype()
  chunk = min(chunk, n)

  def one_grad(example):
    batch = jax.tree.map(lambda x: x[None], example)
    return jax.grad(loss_fn)(params, batch, data)

  def moments(block, weight, count):
    """``(mean, sum of squared deviations)`` of a block's real gradients."""
    grads = jax.tree.map(lambda g: g.astype(acc), jax.vmap(one_grad)(block))
    weight = weight.astype(acc)

    def weighted(g):  # Broadcast the weights along the leaf's axes.
      return weight.reshape(-1, *([1] * (g.ndim - 1)))

    mean = jax.tree.map(lambda g: jnp.sum(weighted(g) * g, axis=0) / count,
                        grads)
    dev = _tree_sum(jax.tree.map(
        lambda g, m: weighted(g) * jnp.square(g - m[None]), grads, mean))
    return mean, dev

  def merge(running, block):
    """The running ``(n_a, mean, M)`` with one more block."""
    n_a, mean_a, m_a = running
    examples_b, weight, count = block
    mean_b, m_b = moments(examples_b, weight, count)
    total = n_a + count
    delta = jax.tree.map(jnp.subtract, mean_b, mean_a)
    mean = jax.tree.map(lambda m, d: m + d * (count / total), mean_a, delta)
    m = m_a + m_b + _sq_norm(delta) * (n_a * count / total)
    return (total, mean, m), None

  num_chunks = -(-n // chunk)
  pad = num_chunks * chunk - n

  def blocks(x):  # Padded with copies of example 0, weighted 0.
    if pad:
      x = jnp.concatenate([x, jnp.broadcast_to(x[:1], (pad, *x.shape[1:]))])
    return x.reshape(num_chunks, chunk, *x.shape[1:])

  weights = (np.arange(num_chunks * chunk) < n).reshape(num_chunks, chunk)
  counts = weights.sum(axis=1).astype(np.dtype(acc))
  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), acc), params)
  running = (jnp.zeros([], acc), zeros, jnp.zeros([], acc))
  running, _ = jax.lax.scan(
      merge, running, (jax.tree.map(blocks, examples), weights, counts))
  _, mean, sum_sq_dev = running
  mean_grad_sq = _sq_norm(mean)
  return {"n": jnp.asarray(n, acc), "mean_grad_sq": mean_grad_sq,
          "sum_sq_dev": sum_sq_dev,
          "sum_sq_norms": sum_sq_dev + n * mean_grad_sq}


def _ratio_or_inf(trace_sigma, grad_sq):
  """``trace_sigma / grad_sq``; ``+inf`` where ``grad_sq <= 0``, else 0 where
  ``trace_sigma <= 0`` (only :func:`two_batch_estimates`'s can be)."""
  resolved = grad_sq > 0
  safe = jnp.where(resolved, grad_sq, jnp.ones_like(grad_sq))
  ratio = jnp.maximum(trace_sigma, 0) / safe
  return jnp.where(resolved, ratio, jnp.inf)


def b_simple(stats: dict[str, Any], population_size: Optional[int] = None
             ) -> dict[str, jax.Array]:
  r"""Unbiased :math:`\operatorname{tr}\Sigma` and :math:`|G|^2`; their ratio.

  .. math::

     S = \frac{\sum_i |g_i - \bar g|^2}{n - 1}, \qquad
     \widehat{|G|^2} = |\bar g|^2 - \frac{S}{n}
       \left(1 - \frac{n}{N}\right), \qquad
     \hat B_\mathrm{simple} = S / \widehat{|G|^2},

  ``+inf`` where :math:`\widehat{|G|^2} \le 0` (the sample cannot resolve
  :math:`|G|`; :math:`B_\mathrm{simple}` exceeds what :math:`n` examples
  measure), never NaN.

  Without ``population_size`` (:math:`N = \infty`) the examples are taken to
  be independent draws (with replacement), as the ``mlm`` task's random
  windows are. With it, they are a sample without replacement from a
  finite population of :math:`N` examples whose mean gradient is
  :math:`G` (the ``mnist1d`` training set: a probe's sample is the start of
  one epoch's permutation); then :math:`\mathbb{E}|\bar g|^2 = |G|^2 +
  \frac{N - n}{N} \frac{\mathbb{E}S}{n}`, hence the factor, and
  :math:`\widehat{|G|^2} = |\bar g|^2` exactly when :math:`n = N`. In both
  cases :math:`\mathbb{E}S / B` is the noise :math:`\mathbb{E}|G_B - G|^2`
  of a batch of :math:`B \ll N`, so :math:`S` is the
  :math:`\operatorname{tr}\Sigma` of the noise scale. (Ignoring a finite
  :math:`N` biases :math:`\widehat{|G|^2}` low by
  :math:`\mathbb{E}S / N`, i.e. by :math:`B_\mathrm{simple} / N` of
  :math:`|G|^2`.)

  Written with ``jax.numpy``, so that it runs inside a jitted or vmapped
  probe (a leading trial axis broadcasts); on the host, values come back
  in the accumulation dtype (float64 only under x64).

  Args:
    stats: :func:`per_example_stats`'s dict (``n``, ``mean_grad_sq``,
      ``sum_sq_dev``), or the same keys from elsewhere.
    population_size: :math:`N`, or None for independent draws.

  Returns:
    ``trace_sigma`` (:math:`S`), ``grad_sq`` (:math:`\widehat{|G|^2}`) and
    ``b_simple``.
  """
  n = jnp.asarray(stats["n"])
  trace_sigma = jnp.asarray(stats["sum_sq_dev"]) / (n - 1)
  correction = trace_sigma / n
  if population_size is not None:
    correction = correction * (1 - n / population_size)
  grad_sq = jnp.asarray(stats["mean_grad_sq"]) - correction
  return {"trace_sigma": trace_sigma, "grad_sq": grad_sq,
          "b_simple": _ratio_or_inf(trace_sigma, grad_sq)}


def two_batch_estimates(g_small_sq, b_small, g_big_sq, b_big
                        ) -> dict[str, jax.Array]:
  r"""McCandlish et al.'s Appendix A: the noise scale from two batch sizes.

  With :math:`\mathbb{E}|G_B|^2 = |G|^2 + \operatorname{tr}\Sigma / B` for
  the gradient :math:`G_B` of a batch of :math:`B` independent examples, the
  squared norms at :math:`B_\mathrm{small} < B_\mathrm{big}` give the
  unbiased

  .. math::

     |\mathcal{G}|^2 = \frac{B_\mathrm{big} |G_{B_\mathrm{big}}|^2 -
       B_\mathrm{small} |G_{B_\mathrm{small}}|^2}
       {B_\mathrm{big} - B_\mathrm{small}}, \qquad
     \mathcal{S} = \frac{|G_{B_\mathrm{small}}|^2 -
       |G_{B_\mathrm{big}}|^2}{1 / B_\mathrm{small} - 1 / B_\mathrm{big}},

  and :math:`B_\mathrm{simple} = \mathcal{S} / |\mathcal{G}|^2`: ``+inf``
  where :math:`|\mathcal{G}|^2 \le 0` (the gradient is unresolved), else 0
  where :math:`\mathcal{S} \le 0` (the big batch no less noisy than the
  small one: the noise is unresolved, :math:`B_\mathrm{simple}` below what
  the two sizes measure; ``trace_sigma`` keeps its negative value). Unlike
  the per-example :math:`S`, :math:`\mathcal{S}` is a difference and can be
  negative. (The paper averages each squared norm over many batches, e.g.
  data-parallel workers, before the ratio.)
  With :math:`B_\mathrm{small} = 1`, :math:`|G_1|^2` the mean of
  :math:`|g_i|^2` and :math:`B_\mathrm{big} = n`, this is exactly
  :func:`b_simple` of those :math:`n` examples.

  Args:
    g_small_sq: :math:`|G_{B_\mathrm{small}}|^2`.
    b_small: :math:`B_\mathrm{small}`.
    g_big_sq: :math:`|G_{B_\mathrm{big}}|^2`.
    b_big: :math:`B_\mathrm{big}`, larger than ``b_small``.

  Returns:
    ``trace_sigma`` (:math:`\mathcal{S}`), ``grad_sq``
    (:math:`|\mathcal{G}|^2`) and ``b_simple``, as :func:`b_simple`.
  """
  if (isinstance(b_small, (int, float)) and isinstance(b_big, (int, float))
      and not 0 < b_small < b_big):
    raise ValueError("two_batch_estimates needs 0 < b_small < b_big, got "
                     f"{b_small} and {b_big}.")
  g_small_sq, g_big_sq = jnp.asarray(g_small_sq), jnp.asarray(g_big_sq)
  grad_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
  trace_sigma = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
  return {"trace_sigma": trace_sigma, "grad_sq": grad_sq,
          "b_simple": _ratio_or_inf(trace_sigma, grad_sq)}


def sample_population(task) -> Optional[int]:
  """The :math:`N` of :func:`b_simple` for a probe's sample of ``task``:
  ``mnist1d``'s training set (its sample draws distinct signals), None for
  ``mlm`` (independent windows)."""
  return task.num_train_examples if task.name == "mnist1d" else None


def make_noise_probe(task, num_examples: int, seed: int,
                     chunk: int = DEFAULT_CHUNK
                     ) -> tuple[Any, Callable[[Any, Any], dict]]:
  r"""A fixed sample of ``task``'s training inputs, and its probe.

  The sample is ``task.train_inputs(seed, num_examples, 1)`` without its
  step axis: for ``mnist1d`` the indices of the first ``num_examples``
  signals of the seed's first-epoch permutation (distinct signals, a sample
  without replacement from the ``task.num_train_examples`` training signals:
  pass that as ``population_size`` to :func:`b_simple`); for ``mlm``
  ``num_examples`` windows at random positions of the training stream
  (independent draws), with their masking fixed by the seed. A seed a trial
  trains with gives the examples of that trial's first step(s).

  ``probe_fn(params, data)`` is :func:`per_example_stats` of ``task.loss`` on
  that sample; it is pure JAX (jit it, or vmap it over a leading trial axis
  of ``params`` with ``in_axes=(0, None)``) and closes over the sample, so a
  jitted probe holds it as a constant. Feed its result to :func:`b_simple`.

  What the estimate counts: an *example* is what the task's loss averages
  over. ``mnist1d``'s loss is the mean over signals, so :math:`\bar g` is
  the sample's full-batch gradient and :math:`B_\mathrm{simple}` is in
  signals. ``mlm``'s loss is the mean over the batch's masked tokens, so
  here an example is a sequence and :math:`g_i` the gradient of that
  sequence's own mean over its masked tokens (zero for a sequence with none
  masked): :math:`\bar g` is the mean of per-sequence gradients, which is
  the batch's gradient (weighting each sequence by its masked tokens) only
  when every sequence has as many masked tokens (BERT's masking takes
  round(15%) of a window's non-special tokens, so windows differ only by
  the [SEP]s they hold), and :math:`B_\mathrm{simple}` is in sequences of
  the task's length.

  Args:
    task: A :class:`tasks.Task`.
    num_examples: The sample size :math:`n \ge 2` (for ``mnist1d`` at most
      ``task.num_train_examples``).
    seed: Fixes the sample.
    chunk: Per-example gradients evaluated at once.

  Returns:
    ``(examples, probe_fn)``: the sample (device arrays, leading axis
    ``num_examples``) and ``probe_fn(params, data) -> stats``.
  """
  population = sample_population(task)
  if population is not None and num_examples > population:
    raise ValueError(
        f"make_noise_probe: {num_examples} examples exceed the "
        f"{task.num_train_examples} mnist1d training signals (the sample "
        "would repeat signals).")
  inputs = task.train_inputs(seed, num_examples, 1)
  examples = jax.tree.map(lambda x: jnp.asarray(x[0]), inputs)
  loss_fn = task.loss

  def probe_fn(params, data):
    return per_example_stats(loss_fn, params, examples, data, chunk)

  return examples, probe_fn
