r"""Sizing the study without looking at how the optimizers scale.

Two probes, both blind to any batch above the base:

* ``--mode=pilot``: every optimizer, the same treatment, at the base batch
  only: a wide grid of peak rates (``--num_rates``, a factor 2 apart, centred
  on ``initial_learning_rates``) on one selection seed, with the study's
  schedule and budget. Prints, per optimizer, the held-out metric of every
  rate and the best, against the task's trivial baseline, and how much of
  the best was lost by the end of the budget (overfitting). This is the
  evidence the task sizes and the grid centres were chosen on.
* ``--mode=time``: trains the cells named by ``--cells`` exactly as the study
  does and prints their wall and CPU seconds, never their metrics (the
  results are dropped), for the time estimate in README.md. Above the base
  batch the grid is centred on the initial rate times ``sqrt(B / B0)``.

  python examples/batch_scaling/calibrate.py --mode=pilot --task=mlm \
      --workdir=/tmp/batch_scaling_pilot
  python examples/batch_scaling/calibrate.py --mode=time \
      --cells=mnist1d-lamb-16,mnist1d-lamb-1024 --workdir=/tmp/bs_time
"""

import json
import os
import time

from absl import app
from absl import flags
from ml_collections import config_flags

import lamb_optax

import analysis
import study
import tasks as tasks_lib
import trials as trials_lib

_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
flags.DEFINE_enum("mode", "pilot", ["pilot", "time"], "What to probe.")
flags.DEFINE_string("workdir", None, "Directory for the tokenizer cache and "
                    "the probe's JSON.")
flags.DEFINE_string("task", "mnist1d", "pilot: the task.")
flags.DEFINE_integer("num_rates", 7, "pilot: peak rates per optimizer.")
flags.DEFINE_list("cells", [], "time: cells as task-optimizer-batch.")
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Study configuration (a configs/*.py file).", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def pilot(config, task_name: str, num_rates: int, workdir: str) -> dict:
  """Base-batch grids for every optimizer, one selection seed."""
  section = config[task_name]
  task = tasks_lib.make_task(task_name, section, workdir)
  print(task.description, flush=True)
  base = section.batch_sizes[0]
  schedule = trials_lib.make_schedule(
      base, section.budget_examples, section.warmup_steps, config.num_evals,
      section.decay_power)
  seed = config.selection_seeds[0]
  metric, higher = task.metric, task.higher_is_better
  strongest = tasks_lib.strongest_baseline(task.baselines, metric, higher)
  baseline = task.baselines[strongest][metric]
  out = {"task": task.description, "baselines": task.baselines,
         "baseline_name": strongest, "batch": base,
         "steps": schedule.total_steps, "seed": seed, "optimizers": {}}
  for opt in config.optimizers:
    rates = analysis.lr_grid(section.initial_learning_rates[opt], num_rates,
                             config.lr_factor)
    tic, tic_cpu = time.time(), study.cpu_seconds()
    results = trials_lib.run_trials(task, opt, config.optimizer, schedule,
                                    rates, [seed] * len(rates),
                                    micro_batch=base)
    seconds, cpu = time.time() - tic, study.cpu_seconds() - tic_cpu
    finals = [trials_lib.final_metrics(task, r)[metric] for r in results]
    peaks = [max(r["curve"][metric]) if higher else min(r["curve"][metric])
             for r in results]
    best = analysis.select(dict(zip(rates, finals)), higher)
    i = rates.index(best)
    out["optimizers"][opt] = {
        "rates": rates, "final": finals, "best_during_run": peaks,
        "best_lr": best, "best": finals[i],
        "margin": analysis.degradation(finals[i], baseline, higher),
        "lost_by_the_end": analysis.degradation(peaks[i], finals[i], higher),
        "curve_of_best": results[i]["curve"][metric],
        "seconds": seconds, "cpu_seconds": cpu}
    print(f"{opt:9s} " + "  ".join(f"{lr:.3g}: {v:.4f}" for lr, v in
                                   zip(rates, finals))
          + f"\n          best {best:.3g}: {finals[i]:.4f} (margin over the "
          f"baseline {out['optimizers'][opt]['margin']:.4f}; best during the "
          f"run {peaks[i]:.4f}); {cpu:.0f} CPU s, {seconds:.0f} s",
          flush=True)
  best_opt = (max if higher else min)(
      out["optimizers"], key=lambda o: out["optimizers"][o]["best"])
  out["best_optimizer"] = best_opt
  out["margin"] = out["optimizers"][best_opt]["margin"]
  print(f"baseline ({out['baseline_name']}): {metric} {baseline:.4f}; best "
        f"{best_opt} {out['optimizers'][best_opt]['best']:.4f}, margin "
        f"{out['margin']:.4f}", flush=True)
  return out


def time_cells(config, cells, workdir: str) -> dict:
  """Wall and CPU seconds of cells trained as the study trains them."""
  built = {}
  out = {}
  for name in cells:
    task_name, optimizer, batch = name.rsplit("-", 2)
    batch = int(batch)
    if task_name not in built:
      built[task_name] = tasks_lib.make_task(task_name, config[task_name],
                                             workdir)
    section = config[task_name]
    center = lamb_optax.schedules.sqrt_scaled(
        section.initial_learning_rates[optimizer],
        base_batch_size=section.batch_sizes[0], batch_size=batch)
    tic, tic_cpu = time.time(), study.cpu_seconds()
    cell = study.run_cell(built[task_name], optimizer, batch, config, center)
    out[name] = {"seconds": time.time() - tic,
                 "cpu_seconds": study.cpu_seconds() - tic_cpu,
                 "num_runs": cell["num_runs"], "steps": cell["steps"]}
    del cell  # Never looked at.
    print(f"{name}: {out[name]['seconds']:.1f} s wall, "
          f"{out[name]['cpu_seconds']:.1f} s CPU, {out[name]['num_runs']} "
          f"runs of {out[name]['steps']} steps", flush=True)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  study.check_config(config)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.mode == "pilot":
    result = pilot(config, FLAGS.task, FLAGS.num_rates, FLAGS.workdir)
    path = os.path.join(FLAGS.workdir, f"pilot_{FLAGS.task}.json")
  else:
    result = time_cells(config, FLAGS.cells, FLAGS.workdir)
    path = os.path.join(FLAGS.workdir, "time.json")
  with open(path, "w", encoding="utf-8") as f:
    json.dump({"config": json.loads(config.to_json_best_effort()),
               "load_average": os.getloadavg(), "result": result}, f,
              indent=1)
  print(f"written to {path}", flush=True)


if __name__ == "__main__":
  app.run(main)
