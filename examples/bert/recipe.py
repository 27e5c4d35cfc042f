"""The recipe of the BERT example: phases, schedule, optimizers, model.

* ``Phase``, ``make_phases``: the mixed-batch phases of a config (sequence
  length, global batch, micro-batches, peak learning rate, warmup, steps),
  validated.
* ``learning_rate_schedule``: warmup from zero and polynomial decay within
  each phase (``lamb_optax.schedules.mixed_batch``).
* ``OPTIMIZERS``, ``make_optimizer``: every name ``config.optimizer``
  accepts, called one way, with BERT's exclusions.
* ``model_config``: the model fields of a config.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence

import jax.numpy as jnp
import ml_collections
import optax

import masking
import models
from configs import default as default_config

import lamb_optax


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
    return masking.max_predictions(self.seq_length)

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
