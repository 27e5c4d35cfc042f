r"""How many training tokens does the masked LM need to pass a bigram model?

The study's trivial baseline for ``mlm`` is a unigram model (3.82 nats on
the held-out masked targets); a left-neighbour bigram
(:func:`tasks.bigram_cross_entropy`) is much stronger. This probe trains the
study's MLM (``configs/default.py``'s ``mlm`` section, or a larger model
with ``--model=large``) at the base batch for a multiple of the study's
budget, with each optimizer at its base rate and twice it (one vmapped call
of :func:`trials.run_trials` per optimizer, seed 0), and records the
held-out loss against training tokens and where it first falls below the
bigram and below the bigram minus ``--gate_floors`` tolerance floors.

Tokens are counted as ``sequences x seq_length``: every token of every
training window, [CLS] and [SEP] included (32 per sequence at the default
size), not only the masked targets (4 per sequence at the default size).

  python examples/batch_scaling/probe_mlm.py --workdir=/tmp/bs_probe
  python examples/batch_scaling/probe_mlm.py --workdir=/tmp/bs_probe \
      --model=large --runs=adamw:1e-3,adamw:2e-3

Each invocation replaces its model's entry in ``--out_dir``'s
``probe_mlm.json`` and rewrites ``probe_mlm.md`` from every entry.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

import mlm_pipeline
import tasks as tasks_lib
import trials as trials_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

# The larger model of ``--model=large`` (the encoder's sizes).
LARGE_MODEL = {"hidden_size": 64, "num_heads": 4, "intermediate_size": 256,
               "num_layers": 2}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the tokenizer cache.")
flags.DEFINE_string("out_dir", os.path.join(_HERE, "results", "probe"),
                    "Where probe_mlm.json and probe_mlm.md go.")
flags.DEFINE_enum("model", "small", ["small", "large"],
                  "small: the study's mlm model; large: LARGE_MODEL.")
flags.DEFINE_list("runs", ["lamb:0.01", "lamb:0.02", "adamw:0.001",
                           "adamw:0.002", "muon:0.002", "muon:0.004"],
                  "optimizer:peak_rate, one trial each (seed 0).")
flags.DEFINE_integer("budget_multiplier", 8,
                     "Budget in multiples of the study's mlm budget.")
flags.DEFINE_float("budget_fraction", 1.0,
                   "Train only this fraction of the budget (for a timing "
                   "run; the results then go to --out_dir all the same).")
flags.DEFINE_integer("batch_size", 4, "Sequences per step (the study's base "
                     "batch).")
flags.DEFINE_integer("num_evals", 100, "Held-out evaluations per run.")
flags.DEFINE_integer("gate_floors", 10, "The second threshold is the bigram "
                     "minus this many tolerance floors (0.02 nats).")
flags.DEFINE_integer("table_points", 10, "Rows of the markdown table.")
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Study configuration (a configs/*.py file).", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def first_below(xs: Sequence[float], values: Sequence[float],
                threshold: float) -> Optional[float]:
  """``xs[i]`` of the first ``values[i] < threshold``; None if none is.

  A non-finite value (a diverged run) is never below.
  """
  for x, value in zip(xs, values):
    if np.isfinite(value) and value < threshold:
      return x
  return None


def parse_runs(runs: Sequence[str]) -> dict[str, list[float]]:
  """``["lamb:0.01", "lamb:0.02"]`` -> ``{"lamb": [0.01, 0.02]}`` (in order)."""
  out: dict[str, list[float]] = {}
  for run in runs:
    name, _, rate = run.partition(":")
    if not rate:
      raise ValueError(f"--runs: {run!r} is not optimizer:rate.")
    out.setdefault(name, []).append(float(rate))
  return out


def baselines(section, workdir: str, task) -> dict[str, float]:
  """The unigram and bigram cross-entropies of ``task``'s held-out targets."""
  corpus = mlm_pipeline.load_corpus(section.corpus, section.held_out_percent)
  tokenizer, _ = mlm_pipeline.cached_tokenizer(corpus, section.vocab_size,
                                               workdir)
  vocab_size = tokenizer.get_vocab_size()
  train_stream = mlm_pipeline.token_stream(tokenizer, corpus.train)
  held_out_stream = mlm_pipeline.token_stream(tokenizer, corpus.held_out)
  held_out = mlm_pipeline.eval_batches(
      held_out_stream, section.seq_length, vocab_size, seed=0,
      max_examples=section.eval_examples)
  windows = mlm_pipeline.eval_windows(held_out_stream, section.seq_length,
                                      max_examples=section.eval_examples)
  for key, value in held_out.items():  # The task scores these very targets.
    np.testing.assert_array_equal(np.asarray(task.data[key]), value)
  num_special = len(mlm_pipeline.SPECIAL_TOKENS)
  return {
      "bigram": tasks_lib.bigram_cross_entropy(
          train_stream, windows, held_out["masked_positions"],
          held_out["masked_ids"], held_out["masked_weights"], vocab_size,
          num_special),
      "unigram": tasks_lib.unigram_cross_entropy(
          train_stream, held_out["masked_ids"], held_out["masked_weights"],
          vocab_size, num_special),
      "num_targets": float(np.sum(held_out["masked_weights"])),
  }


def probe(config, model: str, runs: dict[str, list[float]], workdir: str
          ) -> dict:
  """Trains every run and returns its curves and crossings."""
  section = config.mlm.copy_and_resolve_references()
  if model == "large":
    with section.unlocked():
      section.update(LARGE_MODEL)
  task = tasks_lib.mlm_task(section, workdir)
  print(task.description, flush=True)
  base = baselines(section, workdir, task)
  floor = task.tolerance_floor
  gate = base["bigram"] - FLAGS.gate_floors * floor
  print(f"unigram {base['unigram']:.4f}, bigram {base['bigram']:.4f}, gate "
        f"threshold {gate:.4f} nats ({int(base['num_targets'])} held-out "
        "masked targets)", flush=True)
  budget = int(round(section.budget_examples * FLAGS.budget_multiplier
                     * FLAGS.budget_fraction))
  schedule = trials_lib.make_schedule(
      FLAGS.batch_size, budget, section.warmup_steps, FLAGS.num_evals,
      section.decay_power)
  tokens_per_step = FLAGS.batch_size * section.seq_length
  bound = schedule.total_steps * tokens_per_step
  print(f"{schedule.total_steps} steps at batch {FLAGS.batch_size} "
        f"({bound:,} tokens), evaluated every {schedule.eval_every}",
        flush=True)
  out = {"model": model, "description": task.description,
         "model_sizes": {k: section[k] for k in LARGE_MODEL},
         "batch_size": FLAGS.batch_size, "seq_length": section.seq_length,
         "steps": schedule.total_steps, "eval_every": schedule.eval_every,
         "warmup_steps": schedule.warmup_steps,
         "decay_power": schedule.decay_power,
         "budget_sequences": schedule.total_steps * FLAGS.batch_size,
         "budget_tokens": bound, "tokens": "sequences x seq_length (every "
         "window token, [CLS] and [SEP] included)",
         "optimizer_hyperparameters": config.optimizer.to_dict(),
         "seed": 0, "micro_batch": FLAGS.batch_size,
         "tolerance_floor": floor, "gate_floors": FLAGS.gate_floors,
         "gate_threshold": gate, **base, "runs": []}
  for optimizer, rates in runs.items():
    tic, tic_cpu = time.time(), time.process_time()
    results = trials_lib.run_trials(
        task, optimizer, config.optimizer, schedule, rates, [0] * len(rates),
        micro_batch=FLAGS.batch_size)
    seconds, cpu = time.time() - tic, time.process_time() - tic_cpu
    for rate, result in zip(rates, results):
      curve = result["curve"]
      tokens = [s * tokens_per_step for s in curve["step"]]
      loss = curve["loss"]
      run = {"optimizer": optimizer, "learning_rate": rate,
             "diverged": result["diverged"], "tokens": tokens, "loss": loss,
             "accuracy": curve["accuracy"], "train_loss": curve["train_loss"],
             "final_loss": loss[-1], "min_loss": float(np.nanmin(loss)),
             "first_below_bigram": first_below(tokens, loss, base["bigram"]),
             "first_below_gate": first_below(tokens, loss, gate),
             "cpu_seconds_of_call": cpu, "seconds_of_call": seconds,
             "trials_in_call": len(rates)}
      out["runs"].append(run)
      print(f"{optimizer} {rate:g}: final {loss[-1]:.4f}, min "
            f"{run['min_loss']:.4f}; below the bigram at "
            f"{_crossing(run['first_below_bigram'], bound)}, below the gate "
            f"at {_crossing(run['first_below_gate'], bound)}", flush=True)
    print(f"  {optimizer}: {cpu:.0f} CPU s, {seconds:.0f} s for "
          f"{len(rates)} trials", flush=True)
    out.setdefault("cpu_seconds_by_optimizer", {})[optimizer] = cpu
  out["cpu_seconds"] = sum(out["cpu_seconds_by_optimizer"].values())
  return out


def _crossing(tokens: Optional[int], bound: int) -> str:
  if tokens is None:
    return f"not within {bound / 1e6:.2f}M tokens"
  return f"{tokens:,} tokens"


def markdown(entries: dict[str, dict], points: int) -> str:
  """Loss against tokens at about ``points`` evaluations, and crossings."""
  lines = ["# Masked LM against a bigram: held-out loss vs training tokens",
           "", "Written by `probe_mlm.py`. Tokens = sequences x sequence "
           "length (every window token, [CLS] and [SEP] included; 4 of a "
           "default sequence's 32 tokens are masked targets). Loss: "
           "held-out masked-target cross-entropy (nats) on the study's "
           "held-out set. One run per (optimizer, peak rate), seed 0, "
           "linear warmup then linear decay to zero over the whole budget."]
  for name, entry in entries.items():
    runs = entry["runs"]
    hyper = entry["optimizer_hyperparameters"]
    decays = sorted({hyper["weight_decay"][r["optimizer"]] for r in runs})
    eval_tokens = entry["eval_every"] * entry["batch_size"] * entry[
        "seq_length"]
    lines += ["", f"## {name}: {entry['description']}", "",
              f"unigram {entry['unigram']:.4f}, bigram "
              f"{entry['bigram']:.4f}, gate threshold (bigram - "
              f"{entry['gate_floors']} x {entry['tolerance_floor']}) "
              f"{entry['gate_threshold']:.4f} nats "
              f"({int(entry['num_targets'])} held-out masked targets). "
              f"Batch {entry['batch_size']}, {entry['steps']:,} steps "
              f"({entry['budget_tokens']:,} tokens), warmup "
              f"{entry['warmup_steps']} steps; b1 {hyper['b1']}, b2 "
              f"{hyper['b2']}, eps {hyper['eps']}, weight decay "
              f"{', '.join(f'{d:g}' for d in decays)}. "
              f"Evaluated every {entry['eval_every']} steps "
              f"({eval_tokens:,} tokens): the crossings are at that "
              f"resolution. {entry['cpu_seconds'] / 60:.1f} CPU minutes "
              "of training.", ""]
    header = ["tokens"] + [f"{r['optimizer']} {r['learning_rate']:g}"
                           for r in runs]
    lines += ["| " + " | ".join(header) + " |",
              "|" + "---|" * len(header)]
    num = len(runs[0]["tokens"])
    picks = sorted({min(num - 1, round((k + 1) * num / points) - 1)
                    for k in range(points)})
    for i in picks:
      lines.append(f"| {runs[0]['tokens'][i]:,} | " + " | ".join(
          f"{r['loss'][i]:.3f}" for r in runs) + " |")
    lines += ["", "| run | final | min | first < bigram | first < gate |",
              "|---|---|---|---|---|"]
    for r in runs:
      lines.append(
          f"| {r['optimizer']} {r['learning_rate']:g}"
          f"{' (diverged)' if r['diverged'] else ''} | "
          f"{r['final_loss']:.3f} | {r['min_loss']:.3f} | "
          f"{_crossing(r['first_below_bigram'], entry['budget_tokens'])} | "
          f"{_crossing(r['first_below_gate'], entry['budget_tokens'])} |")
  return "\n".join(lines) + "\n"


def write_markdown(out_dir: str, entries: dict[str, dict],
                   points: int) -> None:
  """``out_dir/probe_mlm.md`` from the entries of ``probe_mlm.json``."""
  with open(os.path.join(out_dir, "probe_mlm.md"), "w",
            encoding="utf-8") as f:
    f.write(markdown(entries, points))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  os.makedirs(FLAGS.workdir, exist_ok=True)
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  tic_cpu = time.process_time()
  entry = probe(config, FLAGS.model, parse_runs(FLAGS.runs), FLAGS.workdir)
  entry["budget_fraction"] = FLAGS.budget_fraction
  entry["process_cpu_seconds"] = time.process_time() - tic_cpu
  path = os.path.join(FLAGS.out_dir, "probe_mlm.json")
  saved = {"config": json.loads(config.to_json_best_effort()), "models": {}}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      saved["models"] = json.load(f)["models"]
  saved["models"][FLAGS.model] = entry
  with open(path, "w", encoding="utf-8") as f:
    json.dump(saved, f, indent=1)
  write_markdown(FLAGS.out_dir, saved["models"], FLAGS.table_points)
  print(f"{entry['process_cpu_seconds']:.0f} CPU s in all; written to "
        f"{FLAGS.out_dir}", flush=True)


if __name__ == "__main__":
  app.run(main)
