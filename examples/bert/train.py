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

import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import input_pipeline
import metrics as metrics_lib
import prepare_data
import utils
from configs import default as default_config
# The recipe (recipe.py) and the steps (steps.py) under the training
# script's names too: train.make_phases, train.make_plan, ...
# pylint: disable=unused-import
from recipe import (OPTIMIZERS, Phase, adamw, learning_rate_schedule,
                    make_optimizer, make_phases, model_config,
                    peak_learning_rate)
from steps import (Plan, add_example_index, evaluate, make_eval_step,
                   make_plan, make_train_step, micro_batched, mlm_sums)
# pylint: enable=unused-import

import lamb_optax

DATA_AXIS = utils.DATA_AXIS


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
