"""The jitted steps of the BERT example, and the plan that jits them.

* ``make_train_step``: the train step (gradient accumulation over
  micro-batches, BERT's token-mean loss, the optimizer update);
  ``make_eval_step`` and ``evaluate``: held-out loss and accuracy.
* ``Plan``, ``make_plan``: a config's phases, model, optimizer and
  shardings on a mesh, with the jitted train and eval steps and their
  abstract inputs: ``train.py`` runs them and ``train_compile.py`` compiles
  them ahead of time for a TPU slice.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import input_pipeline
import models
import utils
from recipe import (Phase, learning_rate_schedule, make_optimizer,
                    make_phases, model_config)

import lamb_optax

DATA_AXIS = utils.DATA_AXIS


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
