"""BERT masked-LM pre-training with LAMB: the recipe of You et al. (2020).

* Two phases (``config.seq_lengths``, short then long sequences), the
  learning rate warmed up from zero again at the start of each phase and then
  decayed polynomially (the paper's mixed-batch training):
  ``lamb_optax.schedules.mixed_batch``.
* ``lamb_optax.lamb`` with BERT's exclusions: no weight decay and no trust
  ratio on biases and LayerNorm parameters
  (``lamb_optax.masks.exclude_bias_and_norm``). With ``scan_layers`` the
  encoder's layers are one stacked array per tensor, and LAMB is given the
  stacked axis (``layer_axes``) so that it keeps one trust ratio per layer.
* The global batch is reached inside the jitted step by accumulating
  gradients over micro-batches (``lamb_optax.accumulate_gradients``); the
  loss is the mean over all masked tokens of the global batch, exactly.
* One ``jax.jit`` over a ``Mesh`` of all devices: the batch is sharded over
  the ``"data"`` axis; with ``fsdp`` the parameters and optimizer state are
  sharded over it too.
* The batch of step ``s`` is a pure function of ``(seed, s)``, so a run
  resumed from a checkpoint continues exactly as if never stopped.

Outputs in the workdir: ``metrics.jsonl``, TensorBoard events
(``tensorboard/``), ``training.png``, ``summary.json``, orbax checkpoints
(``checkpoints/``) and the cached tokenizer (``tokenizer/``).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import re
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import input_pipeline
import models
from configs import default as default_config

import lamb_optax

DATA_AXIS = "data"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
SUMMARY_FILE = "summary.json"
# TF BERT's exclude_from_weight_decay ("LayerNorm", "layer_norm", "bias") in
# this model's parameter names, for the "tensorflow" preset.
BERT_EXCLUDE_PATTERNS = ("bias", "norm")


# ----------------------------------------------------------------------------
# The plan: phases, schedule, optimizer.


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


def _per_phase(value, default, num_phases: int, name: str) -> list:
  values = list(value) if value else [default] * num_phases
  if len(values) != num_phases:
    raise ValueError(f"`{name}` needs {num_phases} values (one per phase), "
                     f"got {value!r}.")
  return values


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
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
  phases, first = [], 1
  for i in range(n):
    batch = batch_sizes[i]
    if config.num_micro_batches and config.micro_batch_size:
      raise ValueError("Set `micro_batch_size` or `num_micro_batches`, not "
                       "both.")
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


def make_optimizer(config: ml_collections.ConfigDict, schedule: optax.Schedule,
                   layer_axes: Any = None) -> optax.GradientTransformation:
  """LAMB (BERT's masks), AdamW, LARS or a ``lamb_optax.presets`` entry.

  ``layer_axes`` (for a scanned stack) is passed to every optimizer with a
  trust ratio (LAMB, LARS and every preset), so each layer of the stack keeps
  its own ratio.
  """
  name = config.optimizer
  bert_mask = lamb_optax.masks.exclude_bias_and_norm()
  if name == "adamw":
    return optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-6,
                       weight_decay=config.weight_decay, mask=bert_mask)
  if name == "lamb":
    factory = lamb_optax.lamb
    kwargs = dict(weight_decay=config.weight_decay,
                  weight_decay_mask=bert_mask, trust_ratio_mask=bert_mask)
    if config.max_grad_norm:
      kwargs["max_grad_norm"] = config.max_grad_norm
  elif name == "lars":
    factory = lamb_optax.lars
    kwargs = dict(weight_decay=config.weight_decay,
                  weight_decay_mask=bert_mask, trust_ratio_mask=bert_mask)
  else:
    factory = getattr(lamb_optax.presets, name, None)
    if name not in lamb_optax.presets.__all__ or not name.islower():
      raise ValueError(
          f"`optimizer` must be 'lamb', 'adamw', 'lars' or a name in "
          f"lamb_optax.presets, got {name!r}.")
    accepted = inspect.signature(factory).parameters
    # A preset keeps its library's numerics; BERT's exclusions are given the
    # way that library takes them.
    kwargs = {k: v for k, v in dict(
        weight_decay=config.weight_decay, weight_decay_mask=bert_mask,
        exclude_from_weight_decay=BERT_EXCLUDE_PATTERNS,
        exclude_from_layer_adaptation=BERT_EXCLUDE_PATTERNS).items()
              if k in accepted}
    if config.max_grad_norm and "max_grad_norm" in accepted:
      kwargs["max_grad_norm"] = config.max_grad_norm
  if layer_axes is not None:
    kwargs["layer_axes"] = layer_axes
  return factory(schedule, **kwargs)


def has_trust_ratios(opt_state) -> bool:
  try:
    lamb_optax.trust_ratios(opt_state)
  except ValueError:
    return False
  return True


# ----------------------------------------------------------------------------
# Devices.


def maybe_initialize_distributed(mode: str) -> None:
  """``jax.distributed.initialize()`` when asked or launched by a cluster.

  "auto" initialises when the environment of a multi-process launch is
  present (``JAX_COORDINATOR_ADDRESS``, Slurm with several tasks, Open MPI
  or a TPU pod), where JAX's auto-detection fills in the arguments.
  """
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"`distributed` must be 'auto', 'yes' or 'no', got "
                     f"{mode!r}.")
  env = os.environ
  launched = ("JAX_COORDINATOR_ADDRESS" in env
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
              or "TPU_WORKER_HOSTNAMES" in env)
  if mode == "yes" or (mode == "auto" and launched):
    if not getattr(maybe_initialize_distributed, "done", False):
      jax.distributed.initialize()
      maybe_initialize_distributed.done = True


def make_mesh(num_devices: int = 0) -> Mesh:
  devices = jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def param_sharding(boxed_params, mesh: Mesh, fsdp: bool, min_size: int):
  """Replicated, or (FSDP) each large leaf's largest divisible axis over data.

  The stacked ``"layers"`` axis of a scanned encoder is never sharded, so
  each device holds a slice of every layer.
  """
  n = mesh.shape[DATA_AXIS]

  def spec(x):
    shape, names = x.value.shape, x.names
    if not fsdp or n == 1 or math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    candidates = [i for i, d in enumerate(shape)
                  if d % n == 0 and names[i] != models.LAYERS_AXIS]
    if not candidates:
      return NamedSharding(mesh, P())
    axis = max(candidates, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*[DATA_AXIS if i == axis else None
                                   for i in range(len(shape))]))
  return jax.tree.map(spec, boxed_params,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host numpy (the same global batch on every process) -> global arrays."""
  return {k: jax.make_array_from_callback(v.shape, sharding,
                                          lambda index, v=v: v[index])
          for k, v in batch.items()}


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
  def eval_step(params, batch):
    logits = model.apply({"params": params}, batch["input_ids"],
                         batch["input_mask"], batch["masked_positions"])
    return mlm_sums(logits, batch)
  return eval_step


def add_example_index(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  batch = dict(batch)
  batch["example_index"] = np.arange(len(batch["input_ids"]), dtype=np.int32)
  return batch


def micro_batched(batch: dict[str, np.ndarray],
                  num_micro_batches: int) -> dict[str, np.ndarray]:
  return {k: v.reshape(num_micro_batches, -1, *v.shape[1:])
          for k, v in batch.items()}


# ----------------------------------------------------------------------------
# Logging.


def param_name(path) -> str:
  keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
          for k in path]
  return "/".join(keys)


def named_trust_ratios(opt_state, trust_mask) -> dict[str, Any]:
  """Trust ratios of the adapted leaves: a float, or a list per layer."""
  ratios = jax.device_get(lamb_optax.trust_ratios(opt_state))
  named = {}
  for (path, value), adapted in zip(
      jax.tree_util.tree_leaves_with_path(ratios),
      jax.tree.leaves(trust_mask)):
    if adapted:
      value = np.asarray(value, np.float64)
      named[param_name(path)] = (float(value) if value.ndim == 0
                                 else value.reshape(-1).tolist())
  return named


_LAYER = re.compile(r"(?:^|/)layer_(\d+)/")


def per_layer_ratios(named: dict[str, Any]) -> dict[str, float]:
  """Geometric mean of each encoder layer's kernel ratios, plus the rest."""
  groups: dict[str, list[float]] = {}
  for name, value in named.items():
    values = value if isinstance(value, list) else [value]
    match = _LAYER.search(name)
    for i, v in enumerate(values):
      if match:
        key = f"layer {int(match.group(1))}"
      elif isinstance(value, list):
        key = f"layer {i}"
      else:
        key = name.rsplit("/", 1)[0]
      groups.setdefault(key, []).append(max(v, 1e-12))
  return {k: float(np.exp(np.mean(np.log(v)))) for k, v in groups.items()}


class MetricsLog:
  """metrics.jsonl (resumable), TensorBoard and the plot."""

  def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.workdir = workdir
    self.enabled = enabled
    self.writer = None
    if not enabled:
      return
    # Keep the rows up to the restored step: rows a stopped run logged after
    # its last checkpoint are logged again by this run.
    rows = []
    if resume_step and os.path.exists(self.path):
      rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    with open(self.path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                purge_step=resume_step + 1 if resume_step
                                else None)

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    prefix = "eval" if row["kind"] == "eval" else "train"
    for key, value in row.items():
      if isinstance(value, (int, float)) and key not in ("step", "kind"):
        self.writer.add_scalar(f"{prefix}/{key}", value, row["step"])
    for key, value in per_layer_ratios(row.get("trust_ratios", {})).items():
      self.writer.add_scalar(f"trust_ratio/{key}", value, row["step"])

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def read_metrics(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_metrics(metrics_path: str, out_path: str) -> None:
  """Loss, learning rate and per-layer trust ratios against the step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_metrics(metrics_path)
  train = [r for r in rows if r["kind"] == "train"]
  evals = [r for r in rows if r["kind"] == "eval"]
  ratio_rows = [(r["step"], per_layer_ratios(r["trust_ratios"]))
                for r in train if r.get("trust_ratios")]
  panels = 3 if ratio_rows else 2
  fig, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True)
  ax = axes[0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train],
          label="train MLM loss")
  if evals:
    ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-",
            label="held-out MLM loss")
  boundaries = [b["step"] for a, b in zip(train, train[1:])
                if a["phase"] != b["phase"]]
  for ax_ in axes:
    for b in boundaries:
      ax_.axvline(b, color="gray", ls=":", lw=1)
  ax.set_ylabel("loss")
  ax.legend()
  axes[1].plot([r["step"] for r in train],
               [r["learning_rate"] for r in train])
  axes[1].set_ylabel("learning rate")
  if ratio_rows:
    ax = axes[2]
    keys = sorted({k for _, d in ratio_rows for k in d},
                  key=lambda k: (not k.startswith("layer"),
                                 int(k.split()[1]) if k.startswith("layer ")
                                 else 0, k))
    cmap = plt.get_cmap("viridis")
    num_layers = sum(k.startswith("layer ") for k in keys) or 1
    for k in keys:
      steps = [s for s, d in ratio_rows if k in d]
      values = [d[k] for _, d in ratio_rows if k in d]
      if k.startswith("layer "):
        ax.plot(steps, values, label=k,
                color=cmap(int(k.split()[1]) / max(1, num_layers - 1)))
      else:
        ax.plot(steps, values, label=k, ls="--")
    ax.set_yscale("log")
    ax.set_ylabel("trust ratio")
    ax.legend(fontsize=7, ncol=2)
  axes[-1].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out_path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------
# Training.


def model_config(config: ml_collections.ConfigDict) -> models.BertConfig:
  return models.BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      num_layers=config.num_layers, num_heads=config.num_heads,
      intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_position_embeddings,
      dropout_rate=config.dropout_rate, dtype=jnp.dtype(config.dtype),
      scan_layers=config.scan_layers, remat=config.remat)


def _as_config(config) -> ml_collections.ConfigDict:
  if isinstance(config, ml_collections.ConfigDict):
    return config
  base = default_config.get_config()
  base.update(dict(config))
  return base


def evaluate(eval_step, params, batches: list[dict[str, jax.Array]]
             ) -> dict[str, float]:
  totals = np.zeros(3)
  for batch in batches:
    totals += np.asarray(jax.device_get(eval_step(params, batch)),
                         np.float64)
  loss_sum, correct, count = totals
  return {"loss": loss_sum / max(count, 1.0),
          "mlm_accuracy": correct / max(count, 1.0),
          "masked_tokens": int(count)}


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
  maybe_initialize_distributed(config.distributed)
  is_chief = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)

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

  # Devices, model, optimizer.
  mesh = make_mesh(config.num_devices)
  num_devices = mesh.shape[DATA_AXIS]
  phases = make_phases(config, num_devices)
  schedule = learning_rate_schedule(phases)
  bert_config = model_config(config)
  boxed_shapes = models.init_shapes(bert_config)
  params_shape = nn.unbox(boxed_shapes)
  num_params = models.count_params(boxed_shapes)
  layer_axes = (lamb_optax.layer_axes_from_metadata(boxed_shapes)
                if config.scan_layers and config.optimizer != "adamw"
                else None)
  tx = make_optimizer(config, schedule, layer_axes)
  params_sharding = param_sharding(boxed_shapes, mesh, config.fsdp,
                                   config.fsdp_min_size)
  # Moments sharded like the params (FSDP), counts and ratios replicated.
  state_sharding = lamb_optax.state_shardings(tx, params_shape,
                                              params_sharding)
  replicated = NamedSharding(mesh, P())
  trust_mask = lamb_optax.masks.exclude_bias_and_norm()(params_shape)
  log_ratios = has_trust_ratios(jax.eval_shape(tx.init, params_shape))

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

  # Checkpoints.
  manager = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "checkpoints")),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=config.max_checkpoints_to_keep, create=True))
  start_step = 0
  latest = manager.latest_step()
  if latest is not None:
    target = {"params": params, "opt_state": opt_state,
              "step": np.asarray(0, np.int64),
              "data": {"seed": np.asarray(0, np.int64),
                       "next_step": np.asarray(0, np.int64)}}
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    restored = manager.restore(latest,
                               args=ocp.args.StandardRestore(abstract))
    params, opt_state = restored["params"], restored["opt_state"]
    start_step = int(restored["step"])
    if int(restored["data"]["seed"]) != config.seed:
      raise ValueError(
          f"The checkpoint in {workdir} was trained with seed "
          f"{int(restored['data']['seed'])}, not {config.seed}: the data "
          "stream would not continue. Use another workdir or that seed.")
    if is_chief:
      print(f"resuming from the checkpoint of step {start_step}", flush=True)
  total_steps = phases[-1].last_step
  end_step = (min(total_steps, config.stop_at_step) if config.stop_at_step
              else total_steps)

  def save(step):
    manager.save(step, args=ocp.args.StandardSave({
        "params": params, "opt_state": opt_state,
        "step": np.asarray(step, np.int64),
        "data": {"seed": np.asarray(config.seed, np.int64),
                 "next_step": np.asarray(step + 1, np.int64)}}))

  if is_chief:
    print(f"model: {num_params:,} parameters ({config.num_layers} layers, "
          f"hidden {config.hidden_size}{', scanned' if config.scan_layers else ''}); "
          f"{num_devices} device(s) ({jax.devices()[0].platform})"
          f"{', FSDP' if config.fsdp else ''}; optimizer {config.optimizer}",
          flush=True)
    for p in phases:
      print(f"phase {p.index + 1}: steps {p.first_step}-{p.last_step}, "
            f"sequence {p.seq_length}, batch {p.batch_size} "
            f"({p.num_micro_batches} x {p.batch_size // p.num_micro_batches}),"
            f" peak lr {p.peak_learning_rate:g}, warmup {p.warmup_steps}",
            flush=True)

  # Steps.
  train_model = models.BertMLM(bert_config, deterministic=False)
  eval_model = models.BertMLM(bert_config, deterministic=True)
  batch_sharding = NamedSharding(mesh, P(None, DATA_AXIS))
  metrics_sharding = replicated
  train_steps = {}

  def train_step_for(phase: Phase):
    if phase.index not in train_steps:
      step_fn = make_train_step(train_model, tx, phase.num_micro_batches,
                                config.seed, P(DATA_AXIS), mesh)
      train_steps[phase.index] = jax.jit(
          step_fn,
          in_shardings=(params_sharding, state_sharding, batch_sharding,
                        replicated),
          out_shardings=(params_sharding, state_sharding, metrics_sharding),
          donate_argnums=(0, 1))
    return train_steps[phase.index]

  eval_step = jax.jit(make_eval_step(eval_model),
                      in_shardings=(params_sharding,
                                    NamedSharding(mesh, P(DATA_AXIS))),
                      out_shardings=replicated)
  eval_sets = {}

  def eval_set(seq_length: int):
    if seq_length not in eval_sets:
      examples = input_pipeline.eval_batches(
          held_out_stream, seq_length, token_vocab, config.seed,
          config.eval_examples, config.mask_rate)
      baseline_id, baseline_acc = input_pipeline.constant_baseline(
          examples["masked_ids"], examples["masked_weights"])
      size = config.eval_batch_size
      size = max(num_devices, size - size % num_devices)
      count = len(examples["input_ids"])
      padded = -(-count // size) * size
      examples = {k: np.concatenate([v, np.zeros((padded - count,) + v.shape[1:], v.dtype)])
                  for k, v in examples.items()}  # weight-0 padding rows
      batches = [to_global({k: v[i:i + size] for k, v in examples.items()},
                           NamedSharding(mesh, P(DATA_AXIS)))
                 for i in range(0, padded, size)]
      eval_sets[seq_length] = (batches, baseline_id, baseline_acc, count)
    return eval_sets[seq_length]

  log = MetricsLog(workdir, start_step, enabled=is_chief)

  def run_eval(step: int, phase: Phase) -> dict[str, Any]:
    batches, baseline_id, baseline_acc, count = eval_set(phase.seq_length)
    result = evaluate(eval_step, params, batches)
    row = {"kind": "eval", "step": step, "phase": phase.index + 1,
           "seq_length": phase.seq_length, "loss": result["loss"],
           "mlm_accuracy": result["mlm_accuracy"],
           "baseline_accuracy": baseline_acc,
           "masked_tokens": result["masked_tokens"], "sequences": count,
           "baseline_token": tokenizer.id_to_token(baseline_id)}
    log.write(row)
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
    batch = to_global(micro_batched(add_example_index(batch),
                                    phase.num_micro_batches), batch_sharding)
    params, opt_state, metrics = train_step_for(phase)(
        params, opt_state, batch, jnp.int32(step))
    tokens_since_log += phase.batch_size * phase.seq_length
    steps_since_log += 1
    if step % config.log_every == 0 or step in (end_step, phase.last_step):
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      row = {"kind": "train", "step": step, "phase": phase.index + 1,
             "seq_length": phase.seq_length, "batch_size": phase.batch_size,
             "loss": float(metrics["loss"]),
             "mlm_accuracy": float(metrics["mlm_accuracy"]),
             "grad_norm": float(metrics["grad_norm"]),
             "learning_rate": float(schedule(step - 1)),
             "tokens_per_sec": tokens_since_log / (now - t_log),
             "steps_per_sec": steps_since_log / (now - t_log)}
      if log_ratios:
        row["trust_ratios"] = named_trust_ratios(opt_state, trust_mask)
      log.write(row)
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
      save(step)
  train_time = time.perf_counter() - t_train
  if progress is not None:
    progress.close()
  manager.wait_until_finished()
  manager.close()

  if eval_row is None:  # Nothing trained (already finished): evaluate now.
    eval_row = run_eval(max(start_step, end_step), phase_of(max(1, min(
        total_steps, max(start_step, end_step)))))
  log.close()
  if is_chief:
    plot_metrics(log.path, os.path.join(workdir, PLOT_FILE))
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
    with open(os.path.join(workdir, SUMMARY_FILE), "w",
              encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    tok_s = (f"{summary['tokens_per_sec']:,.0f} tokens/s"
             if summary["tokens_per_sec"] else "no steps run")
    print(f"\nsteps {start_step + 1}-{end_step} of {total_steps} in "
          f"{train_time:.1f} s ({tok_s}); wall time "
          f"{summary['wall_time_s']:.1f} s")
    if last_row:
      print(f"final training loss {summary['final_loss']:.3f}")
    print(f"held-out MLM accuracy {summary['mlm_accuracy']:.3f} (loss "
          f"{summary['eval_loss']:.3f}) vs {summary['baseline_accuracy']:.3f} "
          f"for always predicting {summary['baseline_token']!r}, the best "
          f"constant prediction (sequences of {summary['eval_seq_length']})",
          flush=True)
  return summary
