"""BERT masked-LM pre-training with LAMB: the recipe of You et al. (2020).

* Two phases (``config.seq_lengths``, short then long sequences), the
  learning rate warmed up from zero again at the start of each phase and then
  decayed polynomially (the paper's mixed-batch training):
  ``lamb_optax.schedules.mixed_batch``.
* ``lamb_optax.lamb`` with BERT's exclusions: no weight decay and no trust
  ratio on biases and LayerNorm parameters
  (``lamb_optax.masks.exclude_bias_and_norm``); ``OPTIMIZERS`` maps every
  name ``config.optimizer`` accepts to its factory, all called one way. With
  ``scan_layers`` the encoder's layers are one stacked array per tensor, and
  LAMB is given the stacked axis (``layer_axes``) so that it keeps one trust
  ratio per layer.
* The global batch is reached inside the jitted step by accumulating
  gradients over micro-batches (``lamb_optax.accumulate_gradients``); the
  loss is the mean over all masked tokens of the global batch, exactly.
* One ``jax.jit`` over a ``Mesh`` of all devices: the batch is sharded over
  the ``"data"`` axis; with ``fsdp`` the parameters and optimizer state are
  sharded over it too (``utils.py``).
* The batch of step ``s`` is a pure function of ``(seed, s)``, so a run
  resumed from a checkpoint continues exactly as if never stopped.

Outputs in the workdir: ``metrics.jsonl``, TensorBoard events
(``tensorboard/``), ``training.png``, ``summary.json`` (``metrics.py``),
orbax checkpoints (``checkpoints/``, ``utils.py``) and the cached tokenizer
(``tokenizer/``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import input_pipeline
import metrics as metrics_lib
import models
import utils
from configs import default as default_config

import lamb_optax

DATA_AXIS = utils.DATA_AXIS


# ----------------------------------------------------------------------------
# The plan: phases and schedule.


@dataclasses.dataclass(frozen=True)
class Phase:
  """One phase of the mixed-batch recipe (steps are 1-based, inclusive)."""
  index: int
  seq_length: int
  batch_size: int
  num_micro_batches: int
  peak_learning_rate: float
  warmup_steps: int
  num_steps: int
  first_step: int

  @property
  def last_step(self) -> int:
    return self.first_step + self.num_steps - 1

  @property
  def num_predictions(self) -> int:
    return input_pipeline.max_predictions(self.seq_length)

  def describe(self) -> str:
    return (f"phase {self.index + 1}: steps {self.first_step}-"
            f"{self.last_step}, sequence {self.seq_length}, batch "
            f"{self.batch_size} ({self.num_micro_batches} x "
            f"{self.batch_size // self.num_micro_batches}), peak lr "
            f"{self.peak_learning_rate:g}, warmup {self.warmup_steps}")


def _per_phase(value, default, num_phases: int, name: str) -> list:
  values = list(value) if value else [default] * num_phases
  if len(values) != num_phases:
    raise ValueError(f"`{name}` needs {num_phases} values (one per phase), "
                     f"got {value!r}.")
  return values


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
  """``config.learning_rate``, or the optimizer's default peak."""
  if config.learning_rate is not None:
    return float(config.learning_rate)
  return default_config.DEFAULT_LEARNING_RATES.get(
      config.optimizer, default_config.DEFAULT_LAMB_LEARNING_RATE)


def make_phases(config: ml_collections.ConfigDict,
                num_devices: int = 1) -> list[Phase]:
  """The phases of ``config``, validated."""
  seq_lengths = list(config.seq_lengths)
  n = len(seq_lengths)
  if config.phase_steps:
    steps = list(config.phase_steps)
    if len(steps) != n or sum(steps) != config.total_steps:
      raise ValueError(
          f"`phase_steps` {tuple(steps)} must have {n} values summing to "
          f"`total_steps` ({config.total_steps}).")
  else:
    fractions = _per_phase(config.phase_fractions, 1.0 / n, n,
                           "phase_fractions")
    steps = list(lamb_optax.schedules.split_steps(config.total_steps,
                                                   tuple(fractions)))
  batch_sizes = _per_phase(config.phase_batch_sizes, config.global_batch_size,
                           n, "phase_batch_sizes")
  peaks = _per_phase(config.phase_learning_rates, peak_learning_rate(config),
                     n, "phase_learning_rates")
  warmups = (_per_phase(config.warmup_steps, 0, n, "warmup_steps")
             if config.warmup_steps else
             [max(1, int(round(config.warmup_fraction * s))) for s in steps])
  if config.num_micro_batches and config.micro_batch_size:
    raise ValueError("Set `micro_batch_size` or `num_micro_batches`, not "
                     "both.")
  phases, first = [], 1
  for i in range(n):
    batch = batch_sizes[i]
    if config.num_micro_batches:
      num_micro = config.num_micro_batches
    elif config.micro_batch_size:
      num_micro = max(1, batch // config.micro_batch_size)
    else:
      num_micro = 1
    if batch % num_micro or (batch // num_micro) % num_devices:
      raise ValueError(
          f"Phase {i + 1}: the global batch {batch} must split into "
          f"{num_micro} micro-batches whose size is a multiple of the "
          f"{num_devices} devices.")
    if seq_lengths[i] > config.max_position_embeddings:
      raise ValueError(f"Sequence length {seq_lengths[i]} exceeds "
                       f"`max_position_embeddings`.")
    if steps[i] < 1:
      raise ValueError(f"Phase {i + 1} has {steps[i]} steps; raise "
                       "`total_steps`.")
    phases.append(Phase(i, seq_lengths[i], batch, num_micro, float(peaks[i]),
                        min(warmups[i], steps[i]), steps[i], first))
    first += steps[i]
  return phases


def learning_rate_schedule(phases: Sequence[Phase]) -> optax.Schedule:
  """Warmup from 0 and polynomial decay within each phase (mixed batch)."""
  return lamb_optax.schedules.mixed_batch(
      [p.peak_learning_rate for p in phases],
      [p.warmup_steps for p in phases], [p.num_steps for p in phases])


# ----------------------------------------------------------------------------
# Optimizers: every name `config.optimizer` accepts, called one way.


def adamw(learning_rate: optax.ScalarOrSchedule, *, weight_decay: float,
          weight_decay_mask: Any = None, trust_ratio_mask: Any = None,
          max_grad_norm: Optional[float] = None,
          layer_axes: Any = None) -> optax.GradientTransformation:
  """``optax.adamw`` with BERT's betas and eps, in the others' vocabulary.

  AdamW has no trust ratio: ``trust_ratio_mask`` and ``layer_axes`` have
  nothing to act on.
  """
  del trust_ratio_mask, layer_axes
  tx = optax.adamw(learning_rate, b1=0.9, b2=0.999, eps=1e-6,
                   weight_decay=weight_decay, mask=weight_decay_mask)
  if max_grad_norm is None:
    return tx
  return optax.chain(optax.clip_by_global_norm(max_grad_norm), tx)


# name -> factory. Every factory takes lamb_optax's one vocabulary (the
# schedule, then weight_decay, weight_decay_mask, trust_ratio_mask,
# max_grad_norm and layer_axes); a preset keeps its library's LAMB numerics.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "lamb": lamb_optax.lamb,
    "lars": lamb_optax.lars,
    "adamw": adamw,
    "nvlamb": lamb_optax.presets.nvlamb,
    "timm": lamb_optax.presets.timm,
    "torch_optimizer": lamb_optax.presets.torch_optimizer,
    "deepspeed": lamb_optax.presets.deepspeed,
    "tensorflow": lamb_optax.presets.tensorflow,
    "keras": lamb_optax.presets.keras,
}


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   layer_axes: Any = None) -> optax.GradientTransformation:
  """``OPTIMIZERS[config.optimizer]`` with BERT's exclusions.

  No weight decay and no trust ratio on biases and LayerNorm parameters
  (``lamb_optax.masks.exclude_bias_and_norm``); ``config.max_grad_norm``
  when it is not 0 (at 0 each factory's default stands: ``nvlamb`` and
  ``timm`` clip at 1.0, as their libraries do).

  Args:
    config: The configuration (``optimizer``, ``weight_decay``,
      ``max_grad_norm``).
    schedule: The learning rate schedule.
    layer_axes: For a scanned stack (``lamb_optax.layer_axes_from_metadata``),
      so that each layer of the stack keeps its own trust ratio.

  Returns:
    A :class:`optax.GradientTransformation` object.
  """
  factory = OPTIMIZERS.get(config.optimizer)
  if factory is None:
    raise ValueError(
        f"`config.optimizer` must be one of {', '.join(OPTIMIZERS)}, got "
        f"{config.optimizer!r}.")
  bert_mask = lamb_optax.masks.exclude_bias_and_norm()
  kwargs = dict(weight_decay=config.weight_decay, weight_decay_mask=bert_mask,
                trust_ratio_mask=bert_mask, layer_axes=layer_axes)
  if config.max_grad_norm:
    kwargs["max_grad_norm"] = config.max_grad_norm
  return factory(schedule, **kwargs)


def model_config(config: ml_collections.ConfigDict) -> models.BertConfig:
  """The model fields of ``config`` as a ``models.BertConfig``."""
  return models.BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_layers=config.num_layers, num_heads=config.num_heads,
      intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_position_embeddings,
      dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype),
      scan_layers=config.scan_layers, remat=config.remat)


# ----------------------------------------------------------------------------
# Steps.


def mlm_sums(logits: jax.Array, batch) -> tuple[jax.Array, jax.Array,
                                                jax.Array]:
  """Summed loss, correct predictions and count over the masked tokens."""
  weights = batch["masked_weights"]
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["masked_ids"])
  correct = jnp.argmax(logits, axis=-1) == batch["masked_ids"]
  return (jnp.sum(losses * weights), jnp.sum(correct * weights),
          jnp.sum(weights))


def make_train_step(model: models.BertMLM, tx: optax.GradientTransformation,
                    num_micro_batches: int, seed: int,
                    batch_spec: P = P(DATA_AXIS), mesh: Optional[Mesh] = None
                    ) -> Callable:
  """``(params, opt_state, batch, step) -> (params, opt_state, metrics)``.

  ``batch`` leaves have shape ``(num_micro_batches, micro_batch, ...)``.
  Each micro-batch's loss is the mean over its masked tokens, and
  accumulation weights micro-batches by their masked-token counts, so the
  loss and gradient are BERT's token-mean over the whole global batch however
  the masked tokens fall into micro-batches.
  """
  def train_step(params, opt_state, batch, step):
    flat = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch)
    step_key = jax.random.fold_in(jax.random.key(seed), step)

    def loss_fn(params, micro):
      if mesh is not None:
        micro = jax.lax.with_sharding_constraint(
            micro, NamedSharding(mesh, batch_spec))
      # Micro-batch i's dropout key: from the index of its first example.
      key = jax.random.fold_in(step_key, micro["example_index"][0])
      logits = model.apply({"params": params}, micro["input_ids"],
                           micro["input_mask"], micro["masked_positions"],
                           rngs={"dropout": key})
      loss_sum, correct, count = mlm_sums(logits, micro)
      return loss_sum / jnp.maximum(count, 1.0), (
          correct.astype(jnp.int32), count.astype(jnp.int32))

    (loss, (correct, count)), grads = lamb_optax.accumulate_gradients(
        jax.value_and_grad(loss_fn, has_aux=True), params, flat,
        num_micro_batches,
        micro_batch_weight_fn=lambda b: jnp.sum(b["masked_weights"]))
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss,
               "mlm_accuracy": correct / jnp.maximum(count, 1),
               "masked_tokens": count,
               "grad_norm": optax.tree.norm(grads)}
    return params, opt_state, metrics

  return train_step


def make_eval_step(model: models.BertMLM) -> Callable:
  """``(params, batch) -> (loss_sum, correct, count)`` (see ``mlm_sums``)."""
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["input_ids"],
                         batch["input_mask"], batch["masked_positions"])
    return mlm_sums(logits, batch)
  return eval_step


def add_example_index(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Adds each example's index in the global batch (for its dropout key)."""
  batch = dict(batch)
  batch["example_index"] = np.arange(len(batch["input_ids"]), dtype=np.int32)
  return batch


def micro_batched(batch: dict[str, np.ndarray],
                  num_micro_batches: int) -> dict[str, np.ndarray]:
  """``(batch, ...)`` leaves -> ``(num_micro_batches, micro_batch, ...)``."""
  return {k: v.reshape(num_micro_batches, -1, *v.shape[1:])
          for k, v in batch.items()}


def evaluate(eval_step, params, batches: list[dict[str, jax.Array]]
             ) -> dict[str, float]:
  """Held-out loss and accuracy over all masked tokens of ``batches``."""
  totals = np.zeros(3)
  for batch in batches:
    totals += np.asarray(jax.device_get(eval_step(params, batch)),
                         np.float64)
  loss_sum, correct, count = totals
  return {"loss": loss_sum / max(count, 1.0),
          "mlm_accuracy": correct / max(count, 1.0),
          "masked_tokens": int(count)}


# ----------------------------------------------------------------------------
# Training.


def _as_config(config) -> ml_collections.ConfigDict:
  """A ConfigDict as is; a dict as overrides of ``configs/default.py``."""
  if isinstance(config, ml_collections.ConfigDict):
    return config
  base = default_config.get_config()
  base.update(dict(config))
  return base


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Pre-trains BERT (MLM) per ``config``; resumes from ``workdir``.

  Args:
    config: An ``ml_collections.ConfigDict`` (``configs/*.py``), or a dict of
      fields overriding ``configs/default.py``.
    workdir: Directory of the outputs and checkpoints; a run with a
      checkpoint there continues from it.

  Returns:
    A summary dict: ``final_loss`` (last logged training loss),
    ``eval_loss``/``mlm_accuracy`` on the held-out split, the best constant
    prediction's ``baseline_accuracy``, step counts, ``wall_time_s``,
    ``tokens_per_sec``, ``num_params`` and where the run started.
  """
  config = _as_config(config)
  t_start = time.perf_counter()
  utils.maybe_initialize_distributed(config.distributed)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

  # Devices, phases, model, optimizer (before the data: a bad config fails
  # in a second, not after the tokenizer is trained).
  mesh = utils.make_mesh(config.num_devices)
  num_devices = mesh.shape[DATA_AXIS]
  phases = make_phases(config, num_devices)
  schedule = learning_rate_schedule(phases)
  bert_config = model_config(config)
  boxed_shapes = models.init_shapes(bert_config)
  params_shape = nn.unbox(boxed_shapes)
  num_params = models.count_params(boxed_shapes)
  layer_axes = (lamb_optax.layer_axes_from_metadata(boxed_shapes)
                if config.scan_layers else None)
  tx = make_optimizer(config, schedule, layer_axes)
  params_sharding = utils.param_sharding(boxed_shapes, mesh, config.fsdp,
                                         config.fsdp_min_size)
  # Moments sharded like the params (FSDP), counts and ratios replicated.
  state_sharding = lamb_optax.state_shardings(tx, params_shape,
                                              params_sharding)
  replicated = NamedSharding(mesh, P())
  trust_mask = lamb_optax.masks.exclude_bias_and_norm()(params_shape)
  log_ratios = metrics_lib.has_trust_ratios(
      jax.eval_shape(tx.init, params_shape))

  # Data.
  corpus = input_pipeline.load_corpus(config.corpus, config.held_out_percent)
  tokenizer, tokenizer_cached = input_pipeline.cached_tokenizer(
      corpus, config.vocab_size, os.path.join(workdir, "tokenizer"),
      config.lowercase)
  token_vocab = tokenizer.get_vocab_size()
  train_stream = input_pipeline.token_stream(tokenizer, corpus.train)
  held_out_stream = input_pipeline.token_stream(tokenizer, corpus.held_out)
  if is_chief:
    print(input_pipeline.describe(corpus, tokenizer, train_stream,
                                  held_out_stream)
          + (" (cached)" if tokenizer_cached else " (trained)"), flush=True)

  # Scanned or not, the same initial weights (see models.stack_layers).
  init_model = models.BertMLM(dataclasses.replace(bert_config,
                                                  scan_layers=False))

  def init_params(key):
    ids = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(init_model.init(key, ids, ids,
                                      jnp.zeros((1, 1), jnp.int32))["params"])
    if config.scan_layers:
      params = models.stack_layers(params, config.num_layers)
    return params

  params = jax.jit(init_params, out_shardings=params_sharding)(
      jax.random.key(config.seed))
  opt_state = jax.jit(tx.init, out_shardings=state_sharding)(params)

  # Checkpoints: resume from the latest.
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_checkpoints_to_keep, create=True))
  start_step = 0
  if manager.latest_step() is not None:
    params, opt_state, start_step = utils.restore_checkpoint(
        manager, manager.latest_step(), params, opt_state, config.seed)
    if is_chief:
      print(f"resuming from the checkpoint of step {start_step}", flush=True)
  total_steps = phases[-1].last_step
  end_step = (min(total_steps, config.stop_at_step) if config.stop_at_step
              else total_steps)

  if is_chief:
    scanned = ", scanned" if config.scan_layers else ""
    print(f"model: {num_params:,} parameters ({config.num_layers} layers, "
          f"hidden {config.hidden_size}{scanned}); "
          f"{num_devices} device(s) ({jax.devices()[0].platform})"
          f"{', FSDP' if config.fsdp else ''}; optimizer {config.optimizer}",
          flush=True)
    for phase in phases:
      print(phase.describe(), flush=True)

  # Steps: one compiled train step per phase (its batch shape).
  train_model = models.BertMLM(bert_config, deterministic=False)
  eval_model = models.BertMLM(bert_config, deterministic=True)
  batch_sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  train_steps = {}

  def train_step_for(phase: Phase):
    if phase.index not in train_steps:
      step_fn = make_train_step(train_model, tx, phase.num_micro_batches,
                                config.seed, P(DATA_AXIS), mesh)
      train_steps[phase.index] = jax.jit(
          step_fn,
          in_shardings=(params_sharding, state_sharding, batch_sharding,
                        replicated),
          out_shardings=(params_sharding, state_sharding, replicated),
          donate_argnums=(0, 1))
    return train_steps[phase.index]

  eval_step = jax.jit(make_eval_step(eval_model),
                      in_shardings=(params_sharding,
                                    NamedSharding(mesh, P(DATA_AXIS))),
                      out_shardings=replicated)
  eval_sets = {}  # seq_length -> (batches, baseline id and accuracy, count)
  writer = metrics_lib.MetricWriter(workdir, start_step, enabled=is_chief)

  def run_eval(step: int, phase: Phase) -> dict[str, Any]:
    if phase.seq_length not in eval_sets:
      examples = input_pipeline.eval_batches(
          held_out_stream, phase.seq_length, token_vocab, config.seed,
          config.eval_examples, config.mask_rate)
      eval_sets[phase.seq_length] = (
          utils.global_eval_batches(examples, config.eval_batch_size, mesh),
          *input_pipeline.constant_baseline(examples["masked_ids"],
                                            examples["masked_weights"]),
          len(examples["input_ids"]))
    batches, baseline_id, baseline_acc, count = eval_sets[phase.seq_length]
    result = evaluate(eval_step, params, batches)
    row = {"kind": "eval", "step": step, "phase": phase.index + 1,
           "seq_length": phase.seq_length, "loss": result["loss"],
           "mlm_accuracy": result["mlm_accuracy"],
           "baseline_accuracy": baseline_acc,
           "masked_tokens": result["masked_tokens"], "sequences": count,
           "baseline_token": tokenizer.id_to_token(baseline_id)}
    writer.write(row)
    return row

  def phase_of(step: int) -> Phase:
    return next(p for p in phases if p.first_step <= step <= p.last_step)

  progress = None
  if is_chief and config.progress_bar and end_step > start_step:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    progress = tqdm(total=end_step, initial=start_step, unit="step",
                    dynamic_ncols=True)
  last_row, eval_row = None, None
  tokens_run, t_train = 0, time.perf_counter()
  t_log, tokens_since_log, steps_since_log = t_train, 0, 0
  for step in range(start_step + 1, end_step + 1):
    phase = phase_of(step)
    batch = input_pipeline.train_batch(
        train_stream, step, phase.batch_size, phase.seq_length, token_vocab,
        config.seed, config.mask_rate)
    batch = utils.to_global(micro_batched(add_example_index(batch),
                                          phase.num_micro_batches),
                            batch_sharding)
    params, opt_state, step_metrics = train_step_for(phase)(
        params, opt_state, batch, jnp.int32(step))
    tokens_since_log += phase.batch_size * phase.seq_length
    steps_since_log += 1
    if step % config.log_every == 0 or step in (end_step, phase.last_step):
      step_metrics = jax.device_get(step_metrics)
      now = time.perf_counter()
      row = {"kind": "train", "step": step, "phase": phase.index + 1,
             "seq_length": phase.seq_length, "batch_size": phase.batch_size,
             "loss": float(step_metrics["loss"]),
             "mlm_accuracy": float(step_metrics["mlm_accuracy"]),
             "grad_norm": float(step_metrics["grad_norm"]),
             "learning_rate": float(schedule(step - 1)),
             "tokens_per_sec": tokens_since_log / (now - t_log),
             "steps_per_sec": steps_since_log / (now - t_log)}
      if log_ratios:
        row["trust_ratios"] = metrics_lib.named_trust_ratios(opt_state,
                                                             trust_mask)
      writer.write(row)
      last_row = row
      tokens_run += tokens_since_log
      t_log, tokens_since_log, steps_since_log = now, 0, 0
      if progress is not None:
        progress.set_postfix(loss=f"{row['loss']:.3f}", phase=row["phase"],
                             tok_s=f"{row['tokens_per_sec']:,.0f}")
    if progress is not None:
      progress.update(1)
    if (step % config.eval_every == 0 or step == phase.last_step
        or step == end_step):
      eval_row = run_eval(step, phase)
      if progress is not None:
        progress.write(
            f"step {step}: held-out MLM accuracy "
            f"{eval_row['mlm_accuracy']:.3f} (loss {eval_row['loss']:.3f}, "
            f"best constant {eval_row['baseline_accuracy']:.3f})")
    if step % config.checkpoint_every == 0 or step == end_step:
      utils.save_checkpoint(manager, step, params, opt_state, config.seed)
  train_time = time.perf_counter() - t_train
  if progress is not None:
    progress.close()
  manager.wait_until_finished()
  manager.close()

  if eval_row is None:  # Nothing trained (already finished): evaluate now.
    eval_row = run_eval(max(start_step, end_step), phase_of(max(1, min(
        total_steps, max(start_step, end_step)))))
  writer.close()
  if is_chief:
    metrics_lib.plot_metrics(writer.path,
                             os.path.join(workdir, metrics_lib.PLOT_FILE))
  summary = {
      "final_loss": last_row["loss"] if last_row else None,
      "eval_loss": eval_row["loss"],
      "mlm_accuracy": eval_row["mlm_accuracy"],
      "baseline_accuracy": eval_row["baseline_accuracy"],
      "baseline_token": eval_row["baseline_token"],
      "eval_seq_length": eval_row["seq_length"],
      "start_step": start_step,
      "end_step": end_step,
      "total_steps": total_steps,
      "num_params": num_params,
      "num_devices": num_devices,
      "optimizer": config.optimizer,
      "train_time_s": train_time,
      "wall_time_s": time.perf_counter() - t_start,
      "tokens_per_sec": tokens_run / train_time if tokens_run else None,
      "tokenizer_cached": tokenizer_cached,
  }
  if is_chief:
    metrics_lib.write_summary(workdir, summary)
  return summary
