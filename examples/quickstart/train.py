"""Trains a character-level MLP on stdlib docstrings with LAMB.

The optimizer is ``lamb_optax.lamb`` with BERT's convention (no weight decay
and no trust ratio on biases and LayerNorm parameters), a linear warmup and a
cosine decay, and a large batch. AdamW and LARS can be chosen for comparison.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import input_pipeline
import models
from configs import default

import lamb_optax

EVAL_BATCH_SIZE = 4096
# Layers whose trust ratio is shown in the progress lines.
LOGGED_RATIOS = ("embed/embedding", "blocks/0/dense/kernel", "head/kernel")


def learning_rate_schedule(config: default.Config) -> optax.Schedule:
  warmup_steps = max(1, int(config.warmup_fraction * config.steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.peak_learning_rate,
      warmup_steps=warmup_steps,
      decay_steps=max(config.steps, warmup_steps + 1), end_value=0.0)


def make_optimizer(config: default.Config) -> optax.GradientTransformation:
  """LAMB (or LARS) with BERT's masks, or AdamW, on the warmup-cosine rate."""
  schedule = learning_rate_schedule(config)
  bert_mask = lamb_optax.masks.exclude_bias_and_norm()
  if config.optimizer == "lamb":
    return lamb_optax.lamb(
        schedule, weight_decay=config.weight_decay,
        weight_decay_mask=bert_mask, trust_ratio_mask=bert_mask)
  if config.optimizer == "lars":
    return lamb_optax.lars(
        schedule, weight_decay=config.weight_decay,
        weight_decay_mask=bert_mask, trust_ratio_mask=bert_mask)
  if config.optimizer == "adamw":
    return optax.adamw(schedule, eps=1e-6, weight_decay=config.weight_decay,
                       mask=bert_mask)
  raise ValueError(
      f"`optimizer` must be 'lamb', 'adamw' or 'lars', got "
      f"{config.optimizer!r}.")


def _loss(model: models.CharMLP, tokens: jax.Array,
          targets: jax.Array) -> jax.Array:
  logits = model(tokens)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, targets).mean()


@nnx.jit
def train_step(model: models.CharMLP, optimizer: nnx.Optimizer,
               tokens: jax.Array, targets: jax.Array) -> jax.Array:
  loss, grads = nnx.value_and_grad(_loss)(model, tokens, targets)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_step(model: models.CharMLP, tokens: jax.Array, targets: jax.Array,
              weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Summed loss and number of correct predictions over weighted examples."""
  logits = model(tokens)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  correct = jnp.argmax(logits, axis=-1) == targets
  return jnp.sum(losses * weights), jnp.sum(correct * weights)


def evaluate(model: models.CharMLP, tokens: np.ndarray,
             targets: np.ndarray) -> dict[str, float]:
  """Mean loss and accuracy, in fixed-size (padded) batches."""
  total_loss, total_correct = 0.0, 0.0
  for start in range(0, len(targets), EVAL_BATCH_SIZE):
    x = tokens[start:start + EVAL_BATCH_SIZE]
    y = targets[start:start + EVAL_BATCH_SIZE]
    weights = np.ones(len(y), np.float32)
    pad = EVAL_BATCH_SIZE - len(y)
    if pad:
      x = np.pad(x, ((0, pad), (0, 0)))
      y = np.pad(y, (0, pad))
      weights = np.pad(weights, (0, pad))
    loss, correct = eval_step(model, x, y, weights)
    total_loss += float(loss)
    total_correct += float(correct)
  return {"loss": total_loss / len(targets),
          "accuracy": total_correct / len(targets)}


def named_trust_ratios(optimizer: nnx.Optimizer) -> dict[str, float]:
  """The last step's trust ratios, by '/'-joined parameter path."""
  ratios = lamb_optax.trust_ratios(optimizer.opt_state)
  named = {}
  for path, value in jax.tree_util.tree_leaves_with_path(ratios):
    named[lamb_optax.param_path(path)] = float(value)
  return named


def baselines(corpus: input_pipeline.Corpus,
              held_out_targets: np.ndarray) -> dict[str, Any]:
  """The best constant predictions, fitted on the training text.

  Accuracy: always predict the most frequent training character. Loss: the
  unigram distribution of the training text (add-one smoothed).
  """
  counts = np.bincount(corpus.train, minlength=input_pipeline.VOCAB_SIZE)
  most_frequent = int(np.argmax(counts))
  unigram = (counts + 1.0) / (counts.sum() + len(counts))
  return {
      "baseline_char": input_pipeline.VOCAB[most_frequent],
      "baseline_accuracy": float(np.mean(held_out_targets == most_frequent)),
      "unigram_loss": float(-np.mean(np.log(unigram[held_out_targets]))),
  }


def greedy_sample(model: models.CharMLP, prompt: str, context: int,
                  length: int) -> str:
  """Greedy continuation of ``prompt`` (left-padded with spaces)."""
  @nnx.jit
  def next_char(model, tokens):
    return jnp.argmax(model(tokens[None])[0])

  ids = list(input_pipeline.encode(" " * context + prompt))
  for _ in range(length):
    ids.append(int(next_char(model, np.asarray(ids[-context:], np.int32))))
  return input_pipeline.decode(ids[context + len(prompt):])


def _as_config(config: Union[default.Config, Mapping[str, Any]]
               ) -> default.Config:
  if isinstance(config, default.Config):
    return config
  return dataclasses.replace(default.get_config(), **dict(config))


def train_and_evaluate(config: Union[default.Config, Mapping[str, Any]],
                       workdir: Optional[str] = None) -> dict[str, Any]:
  """Trains the model and returns the final metrics.

  Args:
    config: A :class:`configs.default.Config`, or a dict of fields that
      override the defaults.
    workdir: Optional directory; ``metrics.json`` (config, history, final
      metrics) is written there.

  Returns:
    A dict with the held-out ``initial_eval_loss``, ``eval_loss`` and
    ``eval_accuracy`` (every held-out position unless
    ``final_eval_examples`` is set), the last logged ``train_loss``, the
    constant-prediction baselines, timings and the logged ``history``.
  """
  config = _as_config(config)
  t_start = time.perf_counter()
  corpus = input_pipeline.load_corpus(config.held_out_percent)
  print(f"data: {len(corpus.modules)} stdlib modules, "
        f"{sum(corpus.num_docstrings)} docstrings; train "
        f"{len(corpus.train):,} chars ({corpus.num_docstrings[0]} docs), "
        f"held out {len(corpus.held_out):,} chars "
        f"({corpus.num_docstrings[1]} docs)")
  log_tokens, log_targets = input_pipeline.eval_windows(
      corpus.held_out, config.context, config.eval_examples)
  final_tokens, final_targets = input_pipeline.eval_windows(
      corpus.held_out, config.context, config.final_eval_examples)

  model = models.CharMLP(
      input_pipeline.VOCAB_SIZE, config.context, config.embed_dim,
      config.hidden, config.num_layers, rngs=nnx.Rngs(config.seed))
  num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model,
                                                             nnx.Param)))
  optimizer = nnx.Optimizer(model, make_optimizer(config), wrt=nnx.Param)
  schedule = learning_rate_schedule(config)
  print(f"model: {num_params:,} params; optimizer {config.optimizer}, peak "
        f"lr {config.peak_learning_rate:g}, batch {config.batch_size}, "
        f"{config.steps} steps")

  initial = evaluate(model, final_tokens, final_targets)
  batches = input_pipeline.train_batches(
      corpus.train, config.batch_size, config.context, config.seed)
  history, pending_losses = [], []
  train_loss = float("nan")
  t_train = time.perf_counter()
  t_log = t_train
  for step in range(1, config.steps + 1):
    tokens, targets = next(batches)
    pending_losses.append(train_step(model, optimizer, tokens, targets))
    if step % config.log_every == 0 or step == config.steps:
      train_loss = float(np.mean(jax.device_get(pending_losses)))
      steps_per_s = len(pending_losses) / (time.perf_counter() - t_log)
      pending_losses = []
      held_out = evaluate(model, log_tokens, log_targets)
      entry = {"step": step, "train_loss": train_loss,
               "eval_loss": held_out["loss"],
               "eval_accuracy": held_out["accuracy"],
               "learning_rate": float(schedule(step - 1))}
      line = (f"step {step:5d} | train loss {train_loss:.3f} | held-out "
              f"loss {held_out['loss']:.3f} acc {held_out['accuracy']:.3f} | "
              f"lr {entry['learning_rate']:.2e}")
      if config.optimizer in ("lamb", "lars"):
        ratios = named_trust_ratios(optimizer)
        entry["trust_ratios"] = {k: ratios[k] for k in LOGGED_RATIOS}
        line += " | trust ratio " + ", ".join(
            f"{k.rsplit('/', 1)[0]} {v:.3g}"
            for k, v in entry["trust_ratios"].items())
      print(line + f" | {steps_per_s:.0f} steps/s", flush=True)
      history.append(entry)
      t_log = time.perf_counter()
  train_time = time.perf_counter() - t_train

  final = evaluate(model, final_tokens, final_targets)
  metrics = {
      "initial_eval_loss": initial["loss"],
      "initial_eval_accuracy": initial["accuracy"],
      "eval_loss": final["loss"],
      "eval_accuracy": final["accuracy"],
      "train_loss": train_loss,
      **baselines(corpus, final_targets),
      "num_params": num_params,
      "eval_positions": int(len(final_targets)),
      "train_time_s": train_time,
      "total_time_s": time.perf_counter() - t_start,
      "history": history,
  }
  prompt = "Return the "
  sample = greedy_sample(model, prompt, config.context, 60)
  print(f"\nheld-out accuracy {metrics['eval_accuracy']:.3f} vs "
        f"{metrics['baseline_accuracy']:.3f} for always predicting "
        f"{metrics['baseline_char']!r} (the most frequent character); "
        f"held-out loss {metrics['eval_loss']:.3f} vs "
        f"{metrics['unigram_loss']:.3f} nats/char for the unigram "
        f"distribution ({metrics['eval_positions']:,} positions).")
  print(f"{config.steps} steps in {train_time:.1f} s "
        f"({metrics['total_time_s']:.1f} s in all). Greedy sample: "
        f"{prompt!r} -> {sample!r}")
  metrics["sample"] = prompt + sample

  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.json"), "w",
              encoding="utf-8") as f:
      json.dump({"config": dataclasses.asdict(config), **metrics}, f,
                indent=2)
  return metrics
