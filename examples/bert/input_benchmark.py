r"""The input pipeline's throughput next to the train step's, and its memory.

Run from the repository root (a few minutes; BERT-base's step on a CPU
takes most of it):

  python examples/bert/input_benchmark.py --json=/tmp/input_benchmark.json
  python examples/bert/input_benchmark.py --parts=throughput --nobert_base_step

* ``throughput``: for the two phases of ``configs/default.py`` and of
  ``configs/bert_base.py`` (sequences of 128 and 512), the tokens per second
  that the grain pipeline of ``input_pipeline.train_dataset`` delivers
  (shards read, examples framed and masked, batched; in this process, and
  with ``--workers`` worker processes) next to the tokens per second that
  the jitted train step of ``train.make_train_step`` consumes on this
  machine, timed in interleaved rounds (so that a busy machine slows both
  alike), and their ratio, the pipeline's headroom. The pipeline's tokens
  per CPU-second (one core) are given too: on a shared machine they say
  more than the wall time.
* ``memory``: the peak resident memory of a process that prepares the
  shards (``prepare_data.prepare``) and of one that reads every training
  example of phase 1 once, for the built-in corpus and for a synthetic
  corpus ``--scale`` times larger (the built-in documents with their words
  shuffled, as JSON lines), each in a fresh process.

Shards are prepared once under ``--cache_dir``.
"""

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import corpus as corpus_lib
import input_pipeline
import models
import prepare_data
import train
from configs import bert_base
from configs import default

import lamb_optax

FLAGS = flags.FLAGS
flags.DEFINE_list("parts", ["throughput", "memory"], "What to measure.")
flags.DEFINE_string("cache_dir", os.path.join(tempfile.gettempdir(),
                                              "lamb_optax_input_benchmark"),
                    "Where the shards are prepared (kept between runs).")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds of pipeline and step.")
flags.DEFINE_integer("pipeline_steps", 30, "Batches read per row (all rounds).")
flags.DEFINE_integer("train_steps", 2, "Steps timed per round.")
flags.DEFINE_integer("workers", 2, "grain worker processes of the last "
                     "pipeline column (0: leave it out).")
flags.DEFINE_bool("bert_base_step", True, "Time BERT-base's step on this "
                  "machine (slow on a CPU).")
flags.DEFINE_integer("bert_base_batch", 4, "Sequences per BERT-base step "
                     "timed here (the pipeline's rate is per token).")
flags.DEFINE_integer("scale", 20, "The synthetic corpus: this many copies of "
                     "the built-in one.")
flags.DEFINE_string("json", None, "Also write the results here.")
flags.DEFINE_string("child", None, "(Internal) a measurement to run in this "
                    "fresh process: a JSON object.")


def _prepared(config: ml_collections.ConfigDict, name: str):
  config = config.copy_and_resolve_references()
  config.data_dir = os.path.join(FLAGS.cache_dir, name)
  prepare_data.prepare(config, config.data_dir)
  return config, prepare_data.load(config, config.data_dir)


# ----------------------------------------------------------------------------
# Throughput.


def _pipeline(data, seq_length: int, batch_size: int, num_micro_batches: int,
              workers: int, prefetch: int):
  dataset = input_pipeline.train_dataset(
      data.source("train", seq_length), data.masking(0.15),
      batch_size=batch_size, num_micro_batches=num_micro_batches, seed=0)
  return input_pipeline.make_iterator(dataset, workers=workers,
                                      prefetch=prefetch)


def _train_step(config: ml_collections.ConfigDict, data, phase: train.Phase):
  """A function running the jitted train step once on one device."""
  bert = train.model_config(config)
  # Scanned or not, initialised unscanned (as train.py does).
  init_model = models.BertMLM(dataclasses.replace(bert, scan_layers=False))
  ids = jnp.zeros((1, 8), jnp.int32)
  params = nn.unbox(jax.jit(init_model.init)(
      jax.random.key(0), ids, ids, jnp.zeros((1, 1), jnp.int32))["params"])
  if config.scan_layers:
    params = models.stack_layers(params, config.num_layers)
  layer_axes = (lamb_optax.layer_axes_from_metadata(models.init_shapes(bert))
                if config.scan_layers else None)
  tx = train.make_optimizer(config, train.learning_rate_schedule([phase]),
                            layer_axes)
  step = jax.jit(train.make_train_step(
      models.BertMLM(bert, deterministic=False), tx, phase.num_micro_batches,
      0), donate_argnums=(0, 1))
  iterator = _pipeline(data, phase.seq_length, phase.batch_size,
                       phase.num_micro_batches, 0, 0)
  batch = next(iterator)
  batch["example_index"] = train.local_example_index(phase, (0, 1))
  carry = {"params": params, "state": tx.init(params), "step": 1}

  def run():
    carry["params"], carry["state"], metrics = step(
        carry["params"], carry["state"], batch, jnp.int32(carry["step"]))
    carry["step"] += 1
    jax.block_until_ready(metrics)

  run()  # Compiles.
  return run


def measure(config: ml_collections.ConfigDict, data, phase: train.Phase,
            time_step: bool) -> dict[str, float]:
  """The pipeline's and the step's tokens/s, timed in interleaved rounds.

  The pipeline reads at a per-process batch of at least 256 rows, in this
  thread with nothing read ahead (its time is its cost); the step runs
  ``train_steps`` times per round. Medians over ``rounds``; then the
  pipeline once more with ``--workers`` worker processes.
  """
  batch = max(phase.batch_size, 256)
  micro = phase.num_micro_batches if batch == phase.batch_size else 1
  iterator = _pipeline(data, phase.seq_length, batch, micro, 0, 0)
  next(iterator)
  run = _train_step(config, data, phase) if time_step else None
  per_round = max(1, FLAGS.pipeline_steps // FLAGS.rounds)
  pipeline_wall, pipeline_cpu, step_wall = [], [], []
  for _ in range(FLAGS.rounds):
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(per_round):
      next(iterator)
    pipeline_wall.append(time.perf_counter() - wall)
    pipeline_cpu.append(time.process_time() - cpu)
    if run is not None:
      wall = time.perf_counter()
      for _ in range(FLAGS.train_steps):
        run()
      step_wall.append(time.perf_counter() - wall)
  tokens = per_round * batch * phase.seq_length
  row = {"pipeline_tokens_per_s": tokens / np.median(pipeline_wall),
         "pipeline_tokens_per_cpu_s": tokens / np.median(pipeline_cpu)}
  if run is not None:
    row["step_tokens_per_s"] = (FLAGS.train_steps * phase.batch_size
                                * phase.seq_length / np.median(step_wall))
    row["headroom"] = (row["pipeline_tokens_per_s"]
                       / row["step_tokens_per_s"])
  if FLAGS.workers:
    workers = _pipeline(data, phase.seq_length, batch, micro, FLAGS.workers,
                        4)
    next(workers)  # Start-up (worker processes, first reads) not timed.
    wall = time.perf_counter()
    for _ in range(FLAGS.pipeline_steps):
      next(workers)
    row["pipeline_workers_tokens_per_s"] = (
        FLAGS.pipeline_steps * batch * phase.seq_length
        / (time.perf_counter() - wall))
    train._close(workers)  # pylint: disable=protected-access
  return row


def throughput() -> list[dict]:
  """The rows of the throughput table."""
  config, data = _prepared(default.get_config(), "builtin-default")
  rows = [("default", config, data, phase)
          for phase in train.make_phases(config)]
  base = bert_base.get_config()
  base.dtype = "float32"  # bfloat16 matmuls are slower on a CPU.
  base.remat = False
  base_config, base_data = _prepared(base, "builtin-bert_base")
  rows += [("bert_base", base_config, base_data,
            train.Phase(index, length, FLAGS.bert_base_batch, 1, 1e-3, 1, 10,
                        1))
           for index, length in enumerate(base.seq_lengths)]
  results = []
  for name, config, data, phase in rows:
    row = {"config": name, "phase": phase.index + 1,
           "seq_length": phase.seq_length, "step_batch": phase.batch_size,
           "micro_batches": phase.num_micro_batches}
    row.update(measure(config, data, phase,
                       name == "default" or FLAGS.bert_base_step))
    results.append(row)
    print(json.dumps(row), flush=True)
  return results


# ----------------------------------------------------------------------------
# Memory, each measurement in a fresh process.


def _synthetic_corpus(path: str, scale: int) -> None:
  """``scale`` copies of the built-in documents, words shuffled, as JSON lines."""
  docs = corpus_lib.builtin_documents()
  rng = np.random.default_rng(0)
  with open(path, "w", encoding="utf-8") as f:
    for _ in range(scale):
      for doc in docs:
        words = doc.split()
        rng.shuffle(words)
        f.write(json.dumps({"text": " ".join(words)}) + "\n")


def _child(task: dict) -> dict:
  """Runs one measurement; its peak RSS is this process's."""
  config = default.get_config()
  config.corpus = task["corpus"]
  config.data_dir = task["data_dir"]
  wall, cpu = time.perf_counter(), time.process_time()
  if task["what"] == "prepare":
    prepare_data.prepare(config, config.data_dir)
    data = prepare_data.load(config, config.data_dir)
    examples = data.num_examples("train", config.seq_lengths[0])
    rss_before = None
  else:
    data = prepare_data.load(config, config.data_dir)
    phase = train.make_phases(config)[0]
    examples = data.num_examples("train", phase.seq_length)
    dataset = input_pipeline.train_dataset(
        data.source("train", phase.seq_length), data.masking(0.15),
        batch_size=phase.batch_size, num_micro_batches=1)
    iterator = input_pipeline.make_iterator(dataset, prefetch=4)
    next(iterator)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(-(-examples // phase.batch_size) - 1):
      next(iterator)
    train._close(iterator)  # pylint: disable=protected-access
  return {"what": task["what"], "corpus_chars": task["chars"],
          "examples": examples, "wall_s": time.perf_counter() - wall,
          "cpu_s": time.process_time() - cpu,
          "peak_rss_mb": resource.getrusage(
              resource.RUSAGE_SELF).ru_maxrss / 1024,
          "rss_before_reading_mb": rss_before and rss_before / 1024}


def memory() -> list[dict]:
  os.makedirs(FLAGS.cache_dir, exist_ok=True)
  synthetic = os.path.join(FLAGS.cache_dir, f"synthetic-x{FLAGS.scale}.jsonl")
  if not os.path.exists(synthetic):
    _synthetic_corpus(synthetic, FLAGS.scale)
  builtin_chars = sum(map(len, corpus_lib.builtin_documents()))
  results = []
  for name, corpus, chars in (
      ("builtin", "builtin", builtin_chars),
      (f"synthetic x{FLAGS.scale}", synthetic,
       sum(len(json.loads(line)["text"]) for line in open(synthetic)))):
    data_dir = os.path.join(FLAGS.cache_dir,
                            f"memory-{name.replace(' ', '')}")
    for what in ("prepare", "read"):
      if what == "prepare" and os.path.exists(data_dir):
        subprocess.run(["rm", "-rf", data_dir], check=True)
      task = {"what": what, "corpus": corpus, "data_dir": data_dir,
              "chars": chars}
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__),
           f"--child={json.dumps(task)}"], capture_output=True, text=True,
          check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
      row = json.loads(out.stdout.strip().splitlines()[-1])
      row["corpus"] = name
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def main(argv):
  del argv
  if FLAGS.child:
    print(json.dumps(_child(json.loads(FLAGS.child))), flush=True)
    return
  results = {"platform": jax.devices()[0].platform,
             "cpu_count": os.cpu_count(),
             "load_average": os.getloadavg()}
  if "throughput" in FLAGS.parts:
    results["throughput"] = throughput()
    print("\n| config | phase | sequence | pipeline tokens/s (thread) | "
          "per CPU-second | with "
          f"{FLAGS.workers} workers | train step tokens/s | headroom |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["throughput"]:
      step = r.get("step_tokens_per_s")
      print(f"| {r['config']} | {r['phase']} | {r['seq_length']} | "
            f"{r['pipeline_tokens_per_s']:,.0f} | "
            f"{r['pipeline_tokens_per_cpu_s']:,.0f} | "
            f"{r.get('pipeline_workers_tokens_per_s', 0):,.0f} | "
            + (f"{step:,.0f} | {r['headroom']:,.0f}x |" if step else
               "not timed | |"))
  if "memory" in FLAGS.parts:
    results["memory"] = memory()
    print("\n| corpus | characters | step | examples (phase 1) | wall s | "
          "CPU s | peak RSS MB | RSS before reading MB |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in results["memory"]:
      before = r["rss_before_reading_mb"]
      print(f"| {r['corpus']} | {r['corpus_chars']:,} | {r['what']} | "
            f"{r['examples']:,} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | "
            + (f"{before:.0f} |" if before else "|"))
  if FLAGS.json:
    with open(FLAGS.json, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
