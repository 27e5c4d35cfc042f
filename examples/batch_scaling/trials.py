"""Training many trials of one (optimizer, batch size) cell in one jitted step.

A *trial* is one training run: a peak learning rate and a seed. All trials of
a call share the optimizer, the batch size and the schedule's shape, so they
are stacked along a leading trial axis and trained by one ``jax.vmap``-ed
step, the learning rate entering through :func:`optax.inject_hyperparams`
(each trial's ``hyperparams["learning_rate"]`` is set to its peak times the
schedule's value before every update). Steps between two evaluations run in
one ``lax.scan``.
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

OPTIMIZERS = ("lamb", "adamw", "lars", "nesterov")
# Optimizers whose state holds per-layer trust ratios.
TRUST_RATIO_OPTIMIZERS = ("lamb", "lars")


def make_optimizer(name: str, hyper: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """``name`` with BERT's exclusions and a learning rate to inject.

  Biases and LayerNorm parameters get no weight decay (all four) and no
  trust ratio (LAMB, LARS): :func:`lamb_optax.masks.exclude_bias_and_norm`.
  The returned transform's state holds ``hyperparams["learning_rate"]``
  (initially 0), which the caller sets before each update.
  """
  mask = lamb_optax.masks.exclude_bias_and_norm()
  wd = hyper.weight_decay[name]
  if name == "lamb":
    def factory(learning_rate):
      return lamb_optax.lamb(
          learning_rate, b1=hyper.b1, b2=hyper.b2, eps=hyper.eps,
          weight_decay=wd, weight_decay_mask=mask, trust_ratio_mask=mask)
  elif name == "adamw":
    def factory(learning_rate):
      return optax.adamw(learning_rate, b1=hyper.b1, b2=hyper.b2,
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
    raise ValueError(f"`optimizers` has an unknown optimizer {name!r}; "
                     f"expected one of {OPTIMIZERS}.")
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


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def trust_ratio_layers(params) -> list[str]:
  """Names of the leaves that get a trust ratio (BERT's exclusions)."""
  mask = lamb_optax.masks.exclude_bias_and_norm()(params)
  return [_path_name(p) for p, m in
          jax.tree_util.tree_leaves_with_path(mask) if m]


def _compiled_chunk(loss_fn, evaluate_fn, tx, schedule: Schedule,
                    record_ratios: bool) -> Callable:
  """The jitted ``eval_every`` steps of every trial, then their evaluation."""
  shape_fn = schedule.shape()

  def one_trial(carry, inputs, peak, data):
    def step(carry, step_inputs):
      params, opt_state, count, bad = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, step_inputs, data)
      hyperparams = dict(opt_state.hyperparams)
      hyperparams["learning_rate"] = (peak * shape_fn(count)).astype(
          hyperparams["learning_rate"].dtype)
      opt_state = opt_state._replace(hyperparams=hyperparams)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      bad = bad | ~jnp.isfinite(loss)
      return (params, opt_state, count + 1, bad), loss

    carry, losses = jax.lax.scan(step, carry, inputs)
    metrics = evaluate_fn(carry[0], data)
    metrics["train_loss"] = jnp.mean(losses)
    if record_ratios:
      ratios = lamb_optax.trust_ratios(carry[1])
      metrics["trust_ratios"] = ratios
    return carry, metrics

  return jax.jit(jax.vmap(one_trial, in_axes=(0, 0, 0, None)),
                 donate_argnums=(0,))


def run_trials(task, optimizer: str, hyper: ml_collections.ConfigDict,
               schedule: Schedule, learning_rates: Sequence[float],
               seeds: Sequence[int], record_ratios: bool = False,
               inputs_cache: Optional[dict] = None) -> list[dict[str, Any]]:
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

  Returns:
    One dict per trial: ``curve`` (``{"step": [...], metric: [...]}`` at
    every evaluation), ``diverged`` and, with ``record_ratios``,
    ``trust_ratios`` (``{layer: [ratio at each evaluation]}``).
  """
  if len(learning_rates) != len(seeds) or not seeds:
    raise ValueError("run_trials needs one seed per learning rate, got "
                     f"{len(learning_rates)} and {len(seeds)}.")
  record_ratios = record_ratios and optimizer in TRUST_RATIO_OPTIMIZERS
  tx, chunk = _chunk_fn(task, optimizer, hyper, schedule, record_ratios)
  inputs_cache = {} if inputs_cache is None else inputs_cache

  def inputs_of(seed):
    key = (seed, schedule.batch_size, schedule.total_steps)
    if key not in inputs_cache:
      inputs_cache[key] = task.train_inputs(seed, schedule.batch_size,
                                            schedule.total_steps)
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

  curves = [{"step": []} for _ in seeds]
  ratio_curves = [dict() for _ in seeds]
  for end in schedule.eval_steps:
    start = end - schedule.eval_every
    chunk_inputs = jax.tree.map(
        lambda *xs: np.stack([x[start:end] for x in xs]), *all_inputs)
    carry, metrics = chunk(carry, chunk_inputs, peaks, task.data)
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
    results.append(result)
  return results


# (task, optimizer, hyperparameters, schedule, ratios) -> (tx, jitted chunk),
# so that every call of one cell shape reuses one compiled function.
_CHUNK_CACHE: dict[Any, tuple[optax.GradientTransformation, Callable]] = {}


def _chunk_fn(task, optimizer, hyper, schedule, record_ratios):
  key = (task, optimizer, repr(sorted(hyper.to_dict().items())),
         schedule, record_ratios)
  if key not in _CHUNK_CACHE:
    tx = make_optimizer(optimizer, hyper)
    _CHUNK_CACHE[key] = (tx, _compiled_chunk(
        task.loss, task.evaluate, tx, schedule, record_ratios))
  return _CHUNK_CACHE[key]


def _named_ratios(ratios, params_like) -> dict[str, np.ndarray]:
  """``{layer: ratios over trials}`` for the leaves that get a ratio."""
  mask = lamb_optax.masks.exclude_bias_and_norm()(params_like)
  named = {}
  for (path, value), adapted in zip(
      jax.tree_util.tree_leaves_with_path(ratios), jax.tree.leaves(mask)):
    if adapted:
      named[_path_name(path)] = np.asarray(value, np.float64).reshape(
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
