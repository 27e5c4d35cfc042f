r"""LAMB's share of the BERT example's step time, against AdamW.

Times, in one process and interleaved round by round (so that a busy
machine slows both alike):

* the full jitted training step of the configuration's first phase
  (forward, backward over the micro-batches, optimizer update), with LAMB
  (BERT's masks), LAMB with ``store_direction=True`` and ``optax.adamw``;
* the optimizer update alone (``tx.update`` + ``optax.apply_updates`` on the
  model's parameters, jitted).

Run from the repository root:

  python examples/bert/benchmark.py --config=examples/bert/configs/default.py
  python examples/bert/benchmark.py --rounds=30 --json=/tmp/bench.json
"""

import json
import os
import statistics
import time

from absl import app
from absl import flags
from ml_collections import config_flags

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import masking
import models
import train
import wordpiece

import lamb_optax

_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Configuration whose first phase is timed.", lock_config=False)
flags.DEFINE_integer("rounds", 20, "Timed rounds (each times every variant).")
flags.DEFINE_integer("update_repeats", 20,
                     "Optimizer updates per round of the update-only timing.")
flags.DEFINE_string("json", None, "Also write the results here.")

VARIANTS = ("lamb", "lamb_store_direction", "adamw")


def make_tx(config, variant, schedule):
  if variant == "lamb_store_direction":
    mask = lamb_optax.masks.exclude_bias_and_norm()
    return lamb_optax.lamb(schedule, weight_decay=config.weight_decay,
                           weight_decay_mask=mask, trust_ratio_mask=mask,
                           store_direction=True)
  config = config.copy_and_resolve_references()
  config.optimizer = variant
  return train.make_optimizer(config, schedule)


def main(argv):
  del argv
  config = FLAGS.config
  phase = train.make_phases(config)[0]
  schedule = train.learning_rate_schedule(train.make_phases(config))
  bert = train.model_config(config)
  model = models.BertMLM(bert, deterministic=False)
  init_model = models.BertMLM(bert)
  ids = jnp.zeros((1, 8), jnp.int32)
  params0 = nn.unbox(jax.jit(init_model.init)(
      jax.random.key(0), ids, ids, jnp.zeros((1, 1), jnp.int32))["params"])
  rng = np.random.default_rng(0)
  windows = rng.integers(len(wordpiece.SPECIAL_TOKENS), config.vocab_size,
                         (phase.batch_size, phase.seq_length - 2))
  batch = masking.mask_tokens(masking.frame(windows.astype(np.int32)), rng,
                              config.vocab_size)
  batch = jax.device_put(train.micro_batched(train.add_example_index(batch),
                                             phase.num_micro_batches))
  grads = jax.tree.map(lambda x: 1e-3 * jnp.ones_like(x), params0)

  steps, updates, states = {}, {}, {}
  for variant in VARIANTS:
    tx = make_tx(config, variant, schedule)
    steps[variant] = jax.jit(
        train.make_train_step(model, tx, phase.num_micro_batches, 0),
        donate_argnums=(0, 1))

    def update_loop(params, state, grads, tx=tx):
      def body(_, carry):
        params, state = carry
        upd, state = tx.update(grads, state, params)
        return optax.apply_updates(params, upd), state
      return jax.lax.fori_loop(0, FLAGS.update_repeats, body, (params, state))

    updates[variant] = jax.jit(update_loop, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, params0)
    states[variant] = (params, tx.init(params))

  step_times = {v: [] for v in VARIANTS}
  update_times = {v: [] for v in VARIANTS}
  for round_index in range(FLAGS.rounds + 1):  # Round 0 compiles.
    for variant in VARIANTS:
      params, state = states[variant]
      t = time.perf_counter()
      params, state, metrics = steps[variant](params, state, batch,
                                              jnp.int32(1))
      jax.block_until_ready((params, state, metrics))
      step_time = time.perf_counter() - t
      t = time.perf_counter()
      params, state = updates[variant](params, state, grads)
      jax.block_until_ready((params, state))
      update_time = (time.perf_counter() - t) / FLAGS.update_repeats
      states[variant] = (params, state)
      if round_index:
        step_times[variant].append(step_time)
        update_times[variant].append(update_time)

  num_params = sum(x.size for x in jax.tree.leaves(params0))
  results = {
      "config": {"num_params": int(num_params),
                 "batch": phase.batch_size, "seq_length": phase.seq_length,
                 "micro_batches": phase.num_micro_batches,
                 "rounds": FLAGS.rounds, "device": jax.devices()[0].platform,
                 "num_devices": 1},
  }
  for variant in VARIANTS:
    results[variant] = {
        "step_ms_median": 1e3 * statistics.median(step_times[variant]),
        "step_ms_min": 1e3 * min(step_times[variant]),
        "update_ms_median": 1e3 * statistics.median(update_times[variant]),
        "update_ms_min": 1e3 * min(update_times[variant]),
    }
  base = results["adamw"]
  print(f"\nBERT example, phase 1: {num_params:,} parameters, batch "
        f"{phase.batch_size} x {phase.seq_length} tokens in "
        f"{phase.num_micro_batches} micro-batches, "
        f"{jax.devices()[0].platform}, {FLAGS.rounds} interleaved rounds "
        "(median; min in brackets)\n")
  header = ("| optimizer | full step (ms) | vs AdamW | update alone (ms) | "
            "vs AdamW | update share of step |")
  print(header)
  print("|---|---:|---:|---:|---:|---:|")
  for variant in VARIANTS:
    r = results[variant]
    r["step_ratio"] = r["step_ms_median"] / base["step_ms_median"]
    r["update_ratio"] = r["update_ms_median"] / base["update_ms_median"]
    r["update_share"] = r["update_ms_median"] / r["step_ms_median"]
    print(f"| {variant} | {r['step_ms_median']:.1f} ({r['step_ms_min']:.1f})"
          f" | {r['step_ratio']:.3f}x | {r['update_ms_median']:.2f} "
          f"({r['update_ms_min']:.2f}) | {r['update_ratio']:.2f}x | "
          f"{100 * r['update_share']:.1f}% |")
  print(f"\nLAMB step / AdamW step: {results['lamb']['step_ratio']:.3f} "
        f"(target <= 1.05); LAMB with store_direction=True: "
        f"{results['lamb_store_direction']['step_ratio']:.3f}")
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
