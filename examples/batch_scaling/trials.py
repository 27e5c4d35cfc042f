"""Training many trials of one (optimizer, batch size) cell in one jitted step.

A *trial* is one training run: a peak learning rate and a seed. All trials of
a call share the optimizer, the batch size and the schedule's shape, so they
are stacked along a leading trial axis and trained by one ``jax.vmap``-ed
step, the learning rate entering through :func:`optax.inject_hyperparams`
(each trial's ``hyperparams["learning_rate"]`` is set to its peak times the
schedule's value before every update). The steps between two evaluations
run in one ``lax.fori_loop``; a step's gradient is the mean over
micro-batches of the task's base batch size, so that one compiled program
(per optimizer and number of trials) serves every batch size: on a CPU,
compiling dominates a small study otherwise.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import lamb_optax

import tasks as tasks_lib

OPTIMIZERS = ("lamb", "adamw", "lars", "nesterov", "muon")
# Optimizers whose state holds per-layer trust ratios.
TRUST_RATIO_OPTIMIZERS = ("lamb", "lars")
# The optimizers with an Adam second moment (Muon: its AdamW fallback),
# whose beta2 follows BETA2_RULES across batch sizes.
BETA2_OPTIMIZERS = ("lamb", "adamw", "muon")
BETA2_RULES = ("half_life", "fixed")
# Muon's update RMS matched to AdamW's (Liu et al., 2025, "Muon is scalable
# for LLM training"), so that one learning rate serves its orthogonalised
# matrices and its AdamW fallback.
MUON_CONSISTENT_RMS = 0.2


def muon_dimension_numbers(orthogonalised: Callable[[Any], Any]
                           ) -> Callable[[Any], Any]:
  """``params -> {leaf: MuonDimensionNumbers() or None}`` for optax's muon.

  ``orthogonalised(params)`` is a tree of bools: True for the 2-D weight
  matrices of hidden layers (Muon's Newton-Schulz update), False for the
  leaves that get its AdamW fallback.
  """
  def dimension_numbers(params):
    return jax.tree.map(
        lambda m: optax.contrib.MuonDimensionNumbers() if m else None,
        orthogonalised(params))
  return dimension_numbers


def beta2_at(b2: float, batch_size: int, base_batch_size: int,
             rule: str) -> float:
  r"""The Adam-family beta2 at ``batch_size``.

  ``"half_life"`` (Marek et al., 2025, arXiv 2507.07101): the second
  moment's half-life in examples (tokens, at a fixed sequence length) stays
  that of ``b2`` at the base batch,

  .. math:: \beta_2(B) = \beta_2(B_0)^{B / B_0},

  so that under a fixed budget it is the same fraction of the run at every
  batch size. ``"fixed"``: ``b2`` everywhere (the paper's recipe).
  """
  if rule not in BETA2_RULES:
    raise ValueError(f"`beta2_rule` must be one of {BETA2_RULES}, got "
                     f"{rule!r}.")
  if rule == "fixed":
    return b2
  return b2 ** (batch_size / base_batch_size)


def make_optimizer(name: str, hyper: ml_collections.ConfigDict,
                   orthogonalised: Optional[Callable[[Any], Any]] = None
                   ) -> optax.GradientTransformation:
  """``name`` with BERT's exclusions and a learning rate to inject.

  Biases and LayerNorm parameters get no weight decay (LAMB, AdamW, LARS,
  Nesterov) and no trust ratio (LAMB, LARS):
  :func:`lamb_optax.masks.exclude_bias_and_norm`. Muon
  (:func:`optax.contrib.muon`) orthogonalises the leaves where
  ``orthogonalised(params)`` is True (the hidden layers' 2-D weight
  matrices) and gives every other leaf (embeddings, the output head, biases,
  LayerNorm) its AdamW fallback, with one learning rate for both
  (``consistent_rms``) and, as optax's muon does, the fallback's weight
  decay on all of its leaves. The returned transform's state holds
  ``hyperparams["learning_rate"]`` (initially 0), which the caller sets
  before each update, and for :data:`BETA2_OPTIMIZERS`
  ``hyperparams["b2"]`` (initially ``hyper.b2``), which the caller sets to
  the batch size's (:func:`beta2_at`).
  """
  mask = lamb_optax.masks.exclude_bias_and_norm()
  if name not in OPTIMIZERS:
    raise ValueError(f"`optimizers` has an unknown optimizer {name!r}; "
                     f"expected one of {OPTIMIZERS}.")
  wd = hyper.weight_decay[name]
  if name == "lamb":
    def factory(learning_rate, b2):
      return lamb_optax.lamb(
          learning_rate, b1=hyper.b1, b2=b2, eps=hyper.eps,
          weight_decay=wd, weight_decay_mask=mask, trust_ratio_mask=mask)
  elif name == "adamw":
    def factory(learning_rate, b2):
      return optax.adamw(learning_rate, b1=hyper.b1, b2=b2,
                         eps=hyper.eps, weight_decay=wd, mask=mask)
  elif name == "lars":
    def factory(learning_rate):
      return lamb_optax.lars(learning_rate, momentum=hyper.momentum,
                             weight_decay=wd, weight_decay_mask=mask,
                             trust_ratio_mask=mask)
  elif name == "nesterov":
    def factory(learning_rate):
      return optax.chain(
          optax.add_decayed_weights(wd, mask),
          optax.sgd(learning_rate, momentum=hyper.momentum, nesterov=True))
  else:
    if orthogonalised is None:
      raise ValueError("make_optimizer('muon') needs `orthogonalised`, the "
                       "leaves to orthogonalise.")
    dimension_numbers = muon_dimension_numbers(orthogonalised)

    def factory(learning_rate, b2):
      return optax.contrib.muon(
          learning_rate, beta=hyper.muon_beta, eps=hyper.eps,
          weight_decay=wd, adam_b1=hyper.b1, adam_b2=b2,
          adam_weight_decay=wd, consistent_rms=MUON_CONSISTENT_RMS,
          muon_weight_dimension_numbers=dimension_numbers)
  if name in BETA2_OPTIMIZERS:
    return optax.inject_hyperparams(factory)(learning_rate=0.0, b2=hyper.b2)
  return optax.inject_hyperparams(factory)(learning_rate=0.0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """The run length and the learning-rate schedule of one batch size.

  Attributes:
    batch_size: Examples per step.
    total_steps: Steps of the run (a whole number of evaluation intervals).
    warmup_steps: Linear-warmup steps (LEGW: the same at every batch size).
    eval_every: Steps between two held-out evaluations.
    decay_power: Power of the polynomial decay after warmup.
  """
  batch_size: int
  total_steps: int
  warmup_steps: int
  eval_every: int
  decay_power: float = 1.0

  @property
  def eval_steps(self) -> list[int]:
    return list(range(self.eval_every, self.total_steps + 1, self.eval_every))

  def shape(self) -> optax.Schedule:
    """The schedule with peak 1: ``warmup_polynomial_decay(1, W, T, p)``."""
    return lamb_optax.schedules.warmup_polynomial_decay(
        1.0, self.warmup_steps, self.total_steps, power=self.decay_power)


def make_schedule(batch_size: int, budget_examples: int, warmup_steps: int,
                  num_evals: int, decay_power: float = 1.0) -> Schedule:
  """The run at ``batch_size`` for a budget of ``budget_examples``.

  ``ceil(budget / batch_size)`` steps, rounded up to a multiple of
  ``num_evals`` so that every evaluation interval has the same length (at
  most ``num_evals - 1`` extra steps), evaluated ``num_evals`` times.
  """
  steps = -(-budget_examples // batch_size)
  eval_every = -(-steps // num_evals)
  total = eval_every * num_evals
  if warmup_steps > total:
    raise ValueError(
        f"`warmup_steps` ({warmup_steps}) exceeds the {total} steps of the "
        f"run at batch size {batch_size}: LEGW keeps the warmup iterations "
        "fixed, so the largest batch bounds them.")
  return Schedule(batch_size=batch_size, total_steps=total,
                  warmup_steps=warmup_steps, eval_every=eval_every,
                  decay_power=decay_power)


def trust_ratio_layers(params) -> list[str]:
  """Names of the leaves that get a trust ratio (BERT's exclusions)."""
  mask = lamb_optax.masks.exclude_bias_and_norm()(params)
  return [tasks_lib.path_name(p) for p, m in
          jax.tree_util.tree_leaves_with_path(mask) if m]


def _compiled_chunk(loss_fn, evaluate_fn, tx, micro_batch: int,
                    record_ratios: bool) -> Callable:
  """The jitted steps of every trial up to an evaluation, then the evaluation.

  One compiled program serves every batch size, step count and schedule of
  a task: the steps (``num_steps``), the micro-batches per step
  (``num_micro``, a step's gradient is the mean over ``num_micro`` slices
  of ``micro_batch`` examples) and the schedule's values (``lr_scale``,
  computed on the host by :mod:`lamb_optax.schedules`) are arguments, and
  the examples come as one flat array per trial, padded to a fixed length.
  """

  def one_trial(carry, inputs, peak, data, lr_scale, num_steps, num_micro,
                b2):
    def step(i, carry):
      params, opt_state, count, bad, loss_sum = carry
      batch_size = num_micro * micro_batch

      def micro(j, acc):
        loss_acc, grad_acc = acc
        start = i * batch_size + j * micro_batch
        batch = jax.tree.map(
            lambda x: jax.lax.dynamic_slice_in_dim(x, start, micro_batch),
            inputs)
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, data)
        return (loss_acc + loss,
                jax.tree.map(jnp.add, grad_acc, grads))

      zeros = jax.tree.map(jnp.zeros_like, params)
      loss, grads = jax.lax.fori_loop(0, num_micro, micro,
                                      (jnp.zeros([], jnp.float32), zeros))
      scale = 1.0 / num_micro.astype(jnp.float32)
      loss = loss * scale
      grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
      hyperparams = dict(opt_state.hyperparams)
      hyperparams["learning_rate"] = (peak * lr_scale[i]).astype(
          hyperparams["learning_rate"].dtype)
      if "b2" in hyperparams:
        hyperparams["b2"] = b2.astype(hyperparams["b2"].dtype)
      opt_state = opt_state._replace(hyperparams=hyperparams)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      bad = bad | ~jnp.isfinite(loss)
      return params, opt_state, count + 1, bad, loss_sum + loss

    params, opt_state, count, bad = carry
    params, opt_state, count, bad, loss_sum = jax.lax.fori_loop(
        0, num_steps, step,
        (params, opt_state, count, bad, jnp.zeros([], jnp.float32)))
    metrics = evaluate_fn(params, data)
    metrics["train_loss"] = loss_sum / num_steps.astype(jnp.float32)
    if record_ratios:
      metrics["trust_ratios"] = lamb_optax.trust_ratios(opt_state)
    return (params, opt_state, count, bad), metrics

  return jax.jit(jax.vmap(one_trial,
                          in_axes=(0, 0, 0, None, None, None, None, None)),
                 donate_argnums=(0,))


def run_trials(task, optimizer: str, hyper: ml_collections.ConfigDict,
               schedule: Schedule, learning_rates: Sequence[float],
               seeds: Sequence[int], record_ratios: bool = False,
               inputs_cache: Optional[dict] = None,
               micro_batch: Optional[int] = None,
               pad_steps: int = 0, pad_examples: int = 0,
               b2: Optional[float] = None,
               probe: Optional[Callable[[Any, Any], dict[str, Any]]] = None,
               probe_every: int = 1) -> list[dict[str, Any]]:
  """Trains trial i (``learning_rates[i]``, ``seeds[i]``) for all i at once.

  Args:
    task: A :class:`tasks.Task`.
    optimizer: One of :data:`OPTIMIZERS`.
    hyper: The config's ``optimizer`` section.
    schedule: The run (:func:`make_schedule`).
    learning_rates: Peak learning rate of each trial.
    seeds: Seed of each trial (initialisation and data order).
    record_ratios: Also return the per-layer trust ratios at every
      evaluation (LAMB and LARS only).
    inputs_cache: Optional dict, ``(seed, batch, steps) -> inputs``, reused
      across calls.
    micro_batch: Examples per gradient evaluation (must divide the batch);
      None: the whole batch. The study uses the task's base batch, so that
      one compiled program serves every batch size.
    pad_steps: Pad the per-evaluation step arguments to at least this many
      steps (the same shapes, hence one compile, for every batch size).
    pad_examples: Likewise for the examples of one evaluation interval.
    b2: The Adam-family beta2 at this batch size (:func:`beta2_at`); None:
      ``hyper.b2``. An argument of the compiled step, so one program serves
      every value.
    probe: Optional jitted ``(stacked params, data) -> {name: (trials,)
      array}``, measured on the trials' parameters at the first evaluation
      and at every ``probe_every``-th one (the gradient noise scale:
      :mod:`noise_scale`); its values come back under ``"probe"``.
    probe_every: See ``probe``.

  Returns:
    One dict per trial: ``curve`` (``{"step": [...], metric: [...]}`` at
    every evaluation), ``diverged`` and, with ``record_ratios``,
    ``trust_ratios`` (``{layer: [ratio at each evaluation]}``); with
    ``probe``, ``probe`` (``{"step": [...], name: [...]}``).
  """
  if len(learning_rates) != len(seeds) or not seeds:
    raise ValueError("run_trials needs one seed per learning rate, got "
                     f"{len(learning_rates)} and {len(seeds)}.")
  batch = schedule.batch_size
  micro_batch = batch if micro_batch is None else micro_batch
  if batch % micro_batch:
    raise ValueError(f"micro_batch {micro_batch} must divide the batch "
                     f"size {batch}.")
  record_ratios = record_ratios and optimizer in TRUST_RATIO_OPTIMIZERS
  tx, chunk = _chunk_fn(task, optimizer, hyper, micro_batch, record_ratios)
  inputs_cache = {} if inputs_cache is None else inputs_cache

  def inputs_of(seed):
    key = (seed, batch, schedule.total_steps)
    if key not in inputs_cache:
      inputs = task.train_inputs(seed, batch, schedule.total_steps)
      inputs_cache[key] = jax.tree.map(
          lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), inputs)
    return inputs_cache[key]

  unique_seeds = sorted(set(seeds))
  per_seed_params = {s: task.init(jax.random.key(s)) for s in unique_seeds}
  params = jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[per_seed_params[s] for s in seeds])
  opt_state = jax.vmap(tx.init)(params)
  num_trials = len(seeds)
  carry = (params, opt_state, jnp.zeros([num_trials], jnp.int32),
           jnp.zeros([num_trials], bool))
  peaks = jnp.asarray(learning_rates, jnp.float32)
  all_inputs = [inputs_of(s) for s in seeds]
  shape_fn = schedule.shape()
  lr_scale = np.asarray(jax.device_get(jax.vmap(shape_fn)(
      jnp.arange(schedule.total_steps))), np.float32)
  interval = schedule.eval_every
  steps_len = max(interval, pad_steps)
  examples_len = max(interval * batch, pad_examples)
  num_micro = np.int32(batch // micro_batch)
  b2 = np.float32(hyper.b2 if b2 is None else b2)

  curves = [{"step": []} for _ in seeds]
  ratio_curves = [dict() for _ in seeds]
  probes = [{"step": []} for _ in seeds]
  for k, end in enumerate(schedule.eval_steps):
    start = end - interval

    def window(x, start=start, end=end):
      piece = x[start * batch:end * batch]
      pad = [(0, examples_len - len(piece))] + [(0, 0)] * (piece.ndim - 1)
      return np.pad(piece, pad)

    chunk_inputs = jax.tree.map(
        lambda *xs: np.stack([window(x) for x in xs]), *all_inputs)
    scale = np.zeros([steps_len], np.float32)
    scale[:interval] = lr_scale[start:end]
    carry, metrics = chunk(carry, chunk_inputs, peaks, task.data, scale,
                           np.int32(interval), num_micro, b2)
    if probe is not None and (k == 0 or (k + 1) % probe_every == 0):
      values = jax.device_get(probe(carry[0], task.data))
      for i in range(num_trials):
        probes[i]["step"].append(end)
        for name, value in values.items():
          probes[i].setdefault(name, []).append(float(value[i]))
    metrics = jax.device_get(metrics)
    ratios = metrics.pop("trust_ratios", None)
    for i in range(num_trials):
      curves[i]["step"].append(end)
      for name, values in metrics.items():
        curves[i].setdefault(name, []).append(float(values[i]))
    if ratios is not None:
      named = _named_ratios(ratios, params_like=per_seed_params[seeds[0]])
      for i in range(num_trials):
        for layer, values in named.items():
          ratio_curves[i].setdefault(layer, []).append(float(values[i]))
  bad = np.asarray(jax.device_get(carry[3]))
  final_params_finite = np.asarray(jax.device_get(jax.tree.reduce(
      lambda a, b: a & b,
      jax.tree.map(lambda x: jnp.all(jnp.isfinite(x.reshape(num_trials, -1)),
                                     axis=1), carry[0]))))
  results = []
  for i in range(num_trials):
    result = {"curve": curves[i],
              "diverged": bool(bad[i] or not final_params_finite[i])}
    if record_ratios:
      result["trust_ratios"] = ratio_curves[i]
    if probe is not None:
      result["probe"] = probes[i]
    results.append(result)
  return results


# (task, optimizer, hyperparameters, micro-batch, ratios) -> (tx, jitted
# chunk): one compiled program per shape of its arguments.
_CHUNK_CACHE: dict[Any, tuple[optax.GradientTransformation, Callable]] = {}


def _chunk_fn(task, optimizer, hyper, micro_batch, record_ratios):
  key = (task, optimizer, repr(sorted(hyper.to_dict().items())),
         micro_batch, record_ratios)
  if key not in _CHUNK_CACHE:
    tx = make_optimizer(optimizer, hyper, task.orthogonalised)
    _CHUNK_CACHE[key] = (tx, _compiled_chunk(
        task.loss, task.evaluate, tx, micro_batch, record_ratios))
  return _CHUNK_CACHE[key]


def _named_ratios(ratios, params_like) -> dict[str, np.ndarray]:
  """``{layer: ratios over trials}`` for the leaves that get a ratio."""
  mask = lamb_optax.masks.exclude_bias_and_norm()(params_like)
  named = {}
  for (path, value), adapted in zip(
      jax.tree_util.tree_leaves_with_path(ratios), jax.tree.leaves(mask)):
    if adapted:
      named[tasks_lib.path_name(path)] = np.asarray(value, np.float64).reshape(
          value.shape[0])
  return named


def final_metrics(task, result: dict[str, Any]) -> dict[str, float]:
  """The metrics at the end of the budget; a diverged trial's fixed scores."""
  if result["diverged"]:
    return dict(task.diverged_metrics)
  out = {}
  for name in task.diverged_metrics:
    value = result["curve"][name][-1]
    out[name] = value if math.isfinite(value) else task.diverged_metrics[name]
  return out
