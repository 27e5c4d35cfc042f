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
* The data: tokenised shards prepared once (``prepare_data.py``; on first
  use into ``WORKDIR/data``, by process 0) and read with grain
  (``input_pipeline.train_dataset``): each process reads only its own rows
  of every global batch, and the global arrays are assembled from them
  (``utils.global_batch``). The grain iterator's state is saved with each
  checkpoint, so a resumed run continues exactly as if never stopped.

Outputs in the workdir: ``metrics.jsonl``, TensorBoard events
(``tensorboard/``), ``training.png``, ``summary.json`` (``metrics.py``),
orbax checkpoints (``checkpoints/``, ``utils.py``) and, unless
``config.data_dir`` points elsewhere, the shards and tokenizer (``data/``).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import grain
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
import prepare_data
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
          f"`global_batch_size`/`phase_batch_sizes`, phase {i + 1}: the "
          f"global batch {batch} must split into {num_micro} micro-batches "
          f"(`num_micro_batches`/`micro_batch_size`) whose size is a "
          f"multiple of the {num_devices} devices.")
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


def learning_rate_schedule(phases: Sequence[Phase],
                           power: float = 1.0) -> optax.Schedule:
  """Warmup from 0 and polynomial decay within each phase (mixed batch).

  Args:
    phases: The phases (``make_phases``).
    power: ``config.schedule_power``: the power of each phase's decay after
      its warmup (1: linear, as BERT).
  """
  return lamb_optax.schedules.mixed_batch(
      [p.peak_learning_rate for p in phases],
      [p.warmup_steps for p in phases], [p.num_steps for p in phases],
      power=power)


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
  With ``mesh``, each micro-batch and the model's activations keep the
  batch sharded over ``batch_spec`` (``utils.activation_sharding``), so no
  device ever holds a whole micro-batch's activations. Each micro-batch's loss is the mean over its masked tokens, and
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
      # (Its smallest index: a reduction, where indexing the first row of a
      # sharded array would gather the whole micro-batch onto every device.)
      key = jax.random.fold_in(step_key, jnp.min(micro["example_index"]))
      with utils.activation_sharding(mesh):
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


def make_eval_step(model: models.BertMLM,
                   mesh: Optional[Mesh] = None) -> Callable:
  """``(params, batch) -> (sums, target_counts)``.

  ``sums``: ``(loss_sum, correct, count)`` (see ``mlm_sums``);
  ``target_counts``: how often each token id is a masked target, for the
  best constant prediction (``input_pipeline.best_constant``). With
  ``mesh``, the activations keep the batch sharded over its ``"data"``
  axis (``utils.activation_sharding``).
  """
  def eval_step(params, batch):
    with utils.activation_sharding(mesh):
      logits = model.apply({"params": params}, batch["input_ids"],
                           batch["input_mask"], batch["masked_positions"])
    target_counts = jnp.zeros(model.config.vocab_size, jnp.float32).at[
        batch["masked_ids"].reshape(-1)].add(
            batch["masked_weights"].reshape(-1))
    return jnp.stack(mlm_sums(logits, batch)), target_counts
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
             ) -> dict[str, Any]:
  """Held-out loss, accuracy and the best constant over ``batches``.

  Returns:
    ``loss`` and ``mlm_accuracy`` over all masked tokens, their number
    ``masked_tokens``, and ``baseline_id``/``baseline_accuracy``: the most
    frequent masked target and the accuracy of always predicting it.
  """
  totals, target_counts = np.zeros(3), 0.0
  for batch in batches:
    sums, counts = jax.device_get(eval_step(params, batch))
    totals += np.asarray(sums, np.float64)
    target_counts = target_counts + np.asarray(counts, np.float64)
  loss_sum, correct, count = totals
  baseline_id, baseline_accuracy = input_pipeline.best_constant(target_counts)
  return {"loss": loss_sum / max(count, 1.0),
          "mlm_accuracy": correct / max(count, 1.0),
          "masked_tokens": int(count), "baseline_id": baseline_id,
          "baseline_accuracy": baseline_accuracy}


# ----------------------------------------------------------------------------
# The plan: what the jitted steps are built from, for one config and mesh.


@dataclasses.dataclass(frozen=True)
class Plan:
  """The phases, model, optimizer and shardings of ``config`` on ``mesh``.

  ``train_and_evaluate`` jits its steps with ``jit_train_step`` and
  ``jit_eval_step``; ``train_compile.py`` compiles exactly the same functions
  with the same shardings ahead of time, for a TPU topology, from the
  shapes alone (``abstract_state``, ``train_batch_shapes``).
  """
  config: ml_collections.ConfigDict
  mesh: Mesh
  phases: list[Phase]
  schedule: optax.Schedule
  bert_config: models.BertConfig
  boxed_shapes: Any  # nn.Partitioned-boxed parameter shapes.
  tx: optax.GradientTransformation
  params_sharding: Any
  state_sharding: Any

  @property
  def num_devices(self) -> int:
    return self.mesh.shape[DATA_AXIS]

  @property
  def params_shape(self) -> Any:
    return nn.unbox(self.boxed_shapes)

  @property
  def num_params(self) -> int:
    return models.count_params(self.boxed_shapes)

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def train_batch_sharding(self) -> NamedSharding:
    """``(num_micro_batches, micro_batch, ...)``: micro-batch rows on data."""
    return NamedSharding(self.mesh, P(None, DATA_AXIS))

  @property
  def eval_batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(DATA_AXIS))

  def init_params(self, key: jax.Array) -> Any:
    """The initial parameters (scanned or not, the same weights)."""
    config = self.config
    init_model = models.BertMLM(dataclasses.replace(self.bert_config,
                                                    scan_layers=False))
    ids = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(init_model.init(key, ids, ids,
                                      jnp.zeros((1, 1), jnp.int32))["params"])
    if config.scan_layers:
      params = models.stack_layers(params, config.num_layers)
    return params

  def jit_train_step(self, phase: Phase) -> Callable:
    """Phase ``phase``'s train step, jitted with its shardings (donating)."""
    step_fn = make_train_step(
        models.BertMLM(self.bert_config, deterministic=False), self.tx,
        phase.num_micro_batches, self.config.seed, P(DATA_AXIS), self.mesh)
    return jax.jit(
        step_fn,
        in_shardings=(self.params_sharding, self.state_sharding,
                      self.train_batch_sharding, self.replicated),
        out_shardings=(self.params_sharding, self.state_sharding,
                       self.replicated),
        donate_argnums=(0, 1))

  def jit_eval_step(self) -> Callable:
    """The eval step, jitted with its shardings."""
    return jax.jit(
        make_eval_step(models.BertMLM(self.bert_config, deterministic=True),
                       self.mesh),
        in_shardings=(self.params_sharding, self.eval_batch_sharding),
        out_shardings=self.replicated)

  def abstract_state(self) -> tuple[Any, Any]:
    """``(params, opt_state)`` as ``jax.ShapeDtypeStruct`` with shardings."""
    params = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        self.params_shape, self.params_sharding)
    state = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        jax.eval_shape(self.tx.init, self.params_shape), self.state_sharding)
    return params, state

  def train_batch_shapes(self, phase: Phase) -> dict[str, jax.ShapeDtypeStruct]:
    """Phase ``phase``'s global batch, as ``train_and_evaluate`` feeds it."""
    micro = phase.batch_size // phase.num_micro_batches
    shape = (phase.num_micro_batches, micro)
    return {k: jax.ShapeDtypeStruct(shape + s, d,
                                    sharding=self.train_batch_sharding)
            for k, (s, d) in _batch_fields(phase.seq_length).items()}

  def eval_batch_shapes(self, batch_size: int, seq_length: int
                        ) -> dict[str, jax.ShapeDtypeStruct]:
    """An eval batch of ``batch_size`` sequences of ``seq_length``."""
    fields = _batch_fields(seq_length)
    del fields["example_index"]
    return {k: jax.ShapeDtypeStruct((batch_size,) + s, d,
                                    sharding=self.eval_batch_sharding)
            for k, (s, d) in fields.items()}


def _batch_fields(seq_length: int) -> dict[str, tuple[tuple[int, ...], Any]]:
  """Per-example shape and dtype of each batch field (input_pipeline.py)."""
  predictions = input_pipeline.max_predictions(seq_length)
  return {"input_ids": ((seq_length,), jnp.int32),
          "input_mask": ((seq_length,), jnp.int32),
          "masked_positions": ((predictions,), jnp.int32),
          "masked_ids": ((predictions,), jnp.int32),
          "masked_weights": ((predictions,), jnp.float32),
          "example_index": ((), jnp.int32)}


def make_plan(config: ml_collections.ConfigDict, mesh: Mesh,
              vocab_size: Optional[int] = None) -> Plan:
  """The plan of ``config`` on ``mesh`` (a one-axis ``"data"`` mesh).

  Args:
    config: The configuration.
    mesh: The mesh (``utils.make_mesh``, or one of a TPU topology's
      devices).
    vocab_size: The embedding rows (default ``config.vocab_size``; a user's
      tokenizer sets it, ``prepare_data.model_vocab_size``).

  Returns:
    A :class:`Plan`.
  """
  phases = make_phases(config, mesh.shape[DATA_AXIS])
  schedule = learning_rate_schedule(phases, config.schedule_power)
  bert_config = model_config(config)
  if vocab_size is not None:
    bert_config = dataclasses.replace(bert_config, vocab_size=vocab_size)
  boxed_shapes = models.init_shapes(bert_config)
  layer_axes = (lamb_optax.layer_axes_from_metadata(boxed_shapes)
                if config.scan_layers else None)
  tx = make_optimizer(config, schedule, layer_axes)
  params_sharding = utils.param_sharding(boxed_shapes, mesh, config.fsdp,
                                         config.fsdp_min_size)
  # Moments sharded like the params (FSDP), counts and ratios replicated.
  state_sharding = lamb_optax.state_shardings(tx, nn.unbox(boxed_shapes),
                                              params_sharding)
  return Plan(config, mesh, phases, schedule, bert_config, boxed_shapes, tx,
              params_sharding, state_sharding)


# ----------------------------------------------------------------------------
# Data: this process's rows (input_pipeline.py), global arrays (utils.py).


def train_iterator(config: ml_collections.ConfigDict,
                   data: prepare_data.PreparedData, phase: Phase,
                   rows: tuple[int, int]) -> grain.DatasetIterator:
  """The phase's batches: this process's block ``rows`` of each, by grain."""
  dataset = input_pipeline.train_dataset(
      data.source("train", phase.seq_length), data.masking(config.mask_rate),
      batch_size=phase.batch_size, num_micro_batches=phase.num_micro_batches,
      shard_index=rows[0], shard_count=rows[1], seed=config.seed,
      phase=phase.index)
  return input_pipeline.make_iterator(dataset, workers=config.data_workers,
                                      prefetch=config.prefetch_batches)


def local_example_index(phase: Phase, rows: tuple[int, int]) -> np.ndarray:
  """Each local row's index in the global batch (``add_example_index``)."""
  index = micro_batched(
      add_example_index({"input_ids": np.zeros(phase.batch_size)}),
      phase.num_micro_batches)["example_index"]
  block = index.shape[1] // rows[1]
  return index[:, rows[0] * block:(rows[0] + 1) * block]


def held_out_batches(config: ml_collections.ConfigDict,
                     data: prepare_data.PreparedData, seq_length: int,
                     mesh: Mesh, rows: tuple[int, int]
                     ) -> tuple[list[dict[str, jax.Array]], int]:
  """Held-out examples of one length as global batches, and their number.

  Up to ``config.eval_examples`` examples, each once, in batches of
  ``config.eval_batch_size`` rounded down to a multiple of the devices (at
  least one example per device); the last batch is padded with weightless
  rows (``input_pipeline.eval_dataset``).
  """
  num_devices = mesh.shape[DATA_AXIS]
  size = max(num_devices, config.eval_batch_size
             - config.eval_batch_size % num_devices)
  source = data.source("held_out", seq_length)
  dataset = input_pipeline.eval_dataset(
      source, data.masking(config.mask_rate), batch_size=size,
      max_examples=config.eval_examples or None, shard_index=rows[0],
      shard_count=rows[1], seed=config.seed)
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  iterator = input_pipeline.make_iterator(dataset)
  batches = [utils.global_batch(local, sharding) for local in iterator]
  _close(iterator)
  return batches, min(len(source), config.eval_examples or len(source))


def _close(iterator) -> None:
  """Stops a grain iterator's prefetching (threads, worker processes)."""
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


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

  # Devices, phases, model, optimizer, shardings (before the data: a bad
  # config fails in a second, not after the tokenizer is trained).
  mesh = utils.make_mesh(config.num_devices)
  rows = utils.process_rows(mesh)  # This process's block of every batch.
  # A user's tokenizer (config.tokenizer) sets the vocabulary size.
  plan = make_plan(config, mesh, prepare_data.model_vocab_size(config))
  phases, schedule, tx = plan.phases, plan.schedule, plan.tx
  num_devices, num_params = plan.num_devices, plan.num_params
  params_shape = plan.params_shape
  trust_mask = lamb_optax.masks.exclude_bias_and_norm()(params_shape)
  log_ratios = metrics_lib.has_trust_ratios(
      jax.eval_shape(tx.init, params_shape))

  # Data: the shards, prepared by process 0 unless already there.
  data = prepare_data.prepare_and_load(
      config, prepare_data.data_directory(config, workdir), is_chief=is_chief,
      wait=utils.sync_processes)
  if is_chief:
    print(data.describe(), flush=True)

  params = jax.jit(plan.init_params, out_shardings=plan.params_sharding)(
      jax.random.key(config.seed))
  opt_state = jax.jit(tx.init, out_shardings=plan.state_sharding)(params)

  # Checkpoints: resume from the latest.
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_checkpoints_to_keep, create=True))
  total_steps = phases[-1].last_step

  def phase_of(step: int) -> Phase:
    return next(p for p in phases if p.first_step <= step <= p.last_step)

  start_step, iterator, iterator_phase = 0, None, None
  latest = manager.latest_step()
  if latest is not None:
    # The data iterator continues where it was, unless a phase starts.
    if latest < total_steps and phase_of(latest + 1) == phase_of(latest):
      iterator_phase = phase_of(latest)
      iterator = train_iterator(config, data, iterator_phase, rows)
    params, opt_state, start_step = utils.restore_checkpoint(
        manager, latest, params, opt_state, config.seed, iterator)
    if is_chief:
      print(f"resuming from the checkpoint of step {start_step}", flush=True)
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
  batch_sharding = plan.train_batch_sharding
  train_steps = {}

  def train_step_for(phase: Phase):
    if phase.index not in train_steps:
      train_steps[phase.index] = plan.jit_train_step(phase)
    return train_steps[phase.index]

  eval_step = plan.jit_eval_step()
  eval_sets = {}  # seq_length -> (global batches, number of sequences)
  writer = metrics_lib.MetricWriter(workdir, start_step, enabled=is_chief)

  def run_eval(step: int, phase: Phase) -> dict[str, Any]:
    if phase.seq_length not in eval_sets:
      eval_sets[phase.seq_length] = held_out_batches(
          config, data, phase.seq_length, mesh, rows)
    batches, count = eval_sets[phase.seq_length]
    result = evaluate(eval_step, params, batches)
    row = {"kind": "eval", "step": step, "phase": phase.index + 1,
           "seq_length": phase.seq_length, "loss": result["loss"],
           "mlm_accuracy": result["mlm_accuracy"],
           "baseline_accuracy": result["baseline_accuracy"],
           "masked_tokens": result["masked_tokens"], "sequences": count,
           "baseline_token": data.tokenizer.id_to_token(
               result["baseline_id"])}
    writer.write(row)
    return row

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
    if phase != iterator_phase:
      _close(iterator)
      iterator, iterator_phase = (train_iterator(config, data, phase, rows),
                                  phase)
    local = next(iterator)  # This process's rows of the step's batch.
    local["example_index"] = local_example_index(phase, rows)
    batch = utils.global_batch(local, batch_sharding)
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
      utils.save_checkpoint(manager, step, params, opt_state, config.seed,
                            iterator)
  train_time = time.perf_counter() - t_train
  _close(iterator)
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
      "data_prepared": data.prepared_now,
  }
  if is_chief:
    metrics_lib.write_summary(workdir, summary)
  return summary
