"""The batch-scaling study: ``run_study(config, workdir)``.

For every task, batch size and optimizer (a *cell*, base batch first), in the
order of README.md's protocol:

1. *Grid*: ``num_learning_rates`` peak rates ``lr_factor`` apart, centred on
   the base batch's best rate times ``sqrt(B / B0)`` (on
   ``initial_learning_rates`` at the base batch), each on every selection
   seed; in the same jitted call, the *transfer* arm (that square-root rate,
   untuned) on the report seeds.
2. *Edge extension*: while the best mean is at an edge of the grid, one
   more rate beyond it (at most ``max_extensions``; counted and reported).
3. *Report*: the chosen rate on the report seeds (fresh).

Each finished cell is written atomically to ``cells/``; a rerun skips it,
so a killed study loses at most the cell it was running. ``trials.jsonl``,
``summary.json``, ``results.md`` and the plots are rebuilt from the cells at
the end, and the verdict printed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Optional

import ml_collections

import analysis
import plots
import tasks as tasks_lib
import trials as trials_lib

CELLS_DIR = "cells"
# Fields that do not change what the study computes (so a rerun may differ).
_RUN_ONLY_FIELDS = ("progress_bar", "stop_after_cells")


# ----------------------------------------------------------------------------
# Config checks.


def _fail(field: str, message: str):
  raise ValueError(f"config.{field}: {message}")


def _check_positive_int(field: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    _fail(field, f"must be an int >= {minimum}, got {value!r}.")
  return value


def _check_names(field: str, values: Any, known: tuple[str, ...]) -> list:
  if isinstance(values, str) or not values:
    _fail(field, f"must be a non-empty list of names from {known}, got "
          f"{values!r}.")
  values = list(values)
  for v in values:
    if v not in known:
      _fail(field, f"unknown name {v!r}; expected one of {known}.")
  if len(set(values)) != len(values):
    _fail(field, f"has a repeated name: {values!r}.")
  return values


def _check_seeds(field: str, values: Any, minimum: int) -> list[int]:
  values = list(values) if not isinstance(values, (str, int)) else None
  if values is None or len(values) < minimum or any(
      isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values):
    _fail(field, f"must list at least {minimum} distinct ints >= 0.")
  if len(set(values)) != len(values):
    _fail(field, f"has a repeated seed: {values!r}.")
  return values


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  _check_names("tasks", config.tasks, tasks_lib.TASKS)
  optimizers = _check_names("optimizers", config.optimizers,
                            trials_lib.OPTIMIZERS)
  selection = _check_seeds("selection_seeds", config.selection_seeds, 2)
  report = _check_seeds("report_seeds", config.report_seeds, 2)
  if set(selection) & set(report):
    _fail("report_seeds", "must be fresh: disjoint from selection_seeds, "
          f"but both hold {sorted(set(selection) & set(report))}.")
  _check_positive_int("num_learning_rates", config.num_learning_rates)
  if not config.lr_factor > 1:
    _fail("lr_factor", f"must be > 1, got {config.lr_factor!r}.")
  _check_positive_int("max_extensions", config.max_extensions, 0)
  _check_positive_int("num_evals", config.num_evals)
  for opt in optimizers:
    wd = config.optimizer.weight_decay.get(opt)
    if wd is None or not wd >= 0:
      _fail(f"optimizer.weight_decay.{opt}", f"must be >= 0, got {wd!r}.")
  for name in config.tasks:
    section = config[name]
    batches = section.batch_sizes
    if not batches:
      _fail(f"{name}.batch_sizes", "must list at least two batch sizes.")
    for i, b in enumerate(batches):
      _check_positive_int(f"{name}.batch_sizes[{i}]", b)
    if len(batches) < 2 or list(batches) != sorted(set(batches)):
      _fail(f"{name}.batch_sizes", "must list at least two distinct batch "
            f"sizes in ascending order (the first is the base), got "
            f"{tuple(batches)!r}.")
    if any(b % batches[0] for b in batches):
      _fail(f"{name}.batch_sizes", "every batch size must be a multiple of "
            f"the base (first) one, {batches[0]}: larger batches are "
            f"accumulated over micro-batches of it; got {tuple(batches)!r}.")
    _check_positive_int(f"{name}.budget_examples", section.budget_examples)
    _check_positive_int(f"{name}.warmup_steps", section.warmup_steps, 0)
    for opt in optimizers:
      lr = section.initial_learning_rates.get(opt)
      if lr is None or not lr > 0:
        _fail(f"{name}.initial_learning_rates.{opt}",
              f"must be > 0, got {lr!r}.")
    if not section.target_slack >= 0:
      _fail(f"{name}.target_slack", "must be >= 0.")
    for b in batches:
      try:
        trials_lib.make_schedule(b, section.budget_examples,
                                 section.warmup_steps, config.num_evals)
      except ValueError as e:
        _fail(f"{name}.warmup_steps", str(e))


def _protocol(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  for field in _RUN_ONLY_FIELDS:
    d.pop(field, None)
  return d


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = []
    for k in sorted(set(a) | set(b)):
      out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
    return out
  return [] if a == b else [prefix.rstrip(".")]


def _write_json(path: str, value: Any) -> None:
  """Atomic: a reader sees the old file or the whole new one."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def _check_workdir(config, workdir: str) -> None:
  """Records the protocol; refuses a workdir made with another one."""
  path = os.path.join(workdir, "config.json")
  protocol = _protocol(config)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      previous = json.load(f)
    changed = _diff(previous, protocol)
    if changed:
      raise ValueError(
          f"workdir {workdir!r} holds a study with another config (fields "
          f"{', '.join(changed)} differ); use a fresh workdir.")
  else:
    _write_json(path, protocol)


# ----------------------------------------------------------------------------
# Cells.


def cell_name(task: str, optimizer: str, batch: int) -> str:
  return f"{task}-{optimizer}-{batch}"


def _cell_path(workdir: str, name: str) -> str:
  return os.path.join(workdir, CELLS_DIR, f"{name}.json")


def load_cell(workdir: str, name: str) -> Optional[dict[str, Any]]:
  path = _cell_path(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _rows(task, optimizer, schedule, lrs, seeds, role, results):
  rows = []
  for lr, seed, result in zip(lrs, seeds, results):
    row = {"task": task.name, "optimizer": optimizer,
           "batch": schedule.batch_size, "lr": lr, "seed": seed,
           "role": role, "steps": schedule.total_steps,
           "warmup_steps": schedule.warmup_steps,
           "examples": schedule.total_steps * schedule.batch_size,
           "diverged": result["diverged"], "curve": result["curve"],
           "final": trials_lib.final_metrics(task, result)}
    if "trust_ratios" in result and role == "report":
      row["trust_ratios"] = result["trust_ratios"]
    rows.append(row)
  return rows


def run_cell(task, optimizer: str, batch: int, config, center: float,
             transfer: Optional[float]) -> dict[str, Any]:
  """Grid (+ transfer arm), edge extensions, then report: one cell."""
  section = config[task.name]
  schedule = trials_lib.make_schedule(
      batch, section.budget_examples, section.warmup_steps, config.num_evals,
      section.decay_power)
  selection, report = list(config.selection_seeds), list(config.report_seeds)
  grid = analysis.lr_grid(center, config.num_learning_rates,
                          config.lr_factor)
  cache: dict = {}

  # Extensions and the report share one compiled shape: `small` trials
  # (the shorter list is padded with copies of its last trial, discarded).
  small = max(len(selection), len(report))

  pads = _pads(config, task.name)

  def run(lrs_and_seeds, record_ratios=False, pad_to=None):
    n = len(lrs_and_seeds)
    if pad_to is not None:
      lrs_and_seeds = lrs_and_seeds + [lrs_and_seeds[-1]] * (pad_to - n)
    lrs = [lr for lr, _ in lrs_and_seeds]
    seeds = [s for _, s in lrs_and_seeds]
    return trials_lib.run_trials(
        task, optimizer, config.optimizer, schedule, lrs, seeds,
        record_ratios, cache, micro_batch=section.batch_sizes[0], **pads)[:n]

  first = [(lr, s) for lr in grid for s in selection]
  if transfer is not None:
    first += [(transfer, s) for s in report]
  # The base cell has no transfer arm: padded to the same shape.
  results = run(first, record_ratios=True,
                pad_to=len(grid) * len(selection) + len(report))
  n_select = len(grid) * len(selection)
  rows = _rows(task, optimizer, schedule, *zip(*first[:n_select]), "select",
               results[:n_select])
  if transfer is not None:
    rows += _rows(task, optimizer, schedule, *zip(*first[n_select:]),
                  "transfer", results[n_select:])
  lrs = list(grid)
  extensions = 0
  while True:
    means = analysis.mean_by_lr(
        [r for r in rows if r["role"] == "select"], task.metric)
    best = analysis.select(means, task.higher_is_better)
    new_lr = analysis.edge_extension(lrs, best, config.lr_factor)
    if new_lr is None or extensions >= config.max_extensions:
      break
    extensions += 1
    lrs.append(new_lr)
    pairs = [(new_lr, s) for s in selection]
    rows += _rows(task, optimizer, schedule, *zip(*pairs), "select",
                  run(pairs, record_ratios=True, pad_to=small))
  pairs = [(best, s) for s in report]
  rows += _rows(task, optimizer, schedule, *zip(*pairs), "report",
                run(pairs, record_ratios=True, pad_to=small))
  return {
      "task": task.name, "optimizer": optimizer, "batch": batch,
      "metric": task.metric, "higher_is_better": task.higher_is_better,
      "tolerance_floor": task.tolerance_floor, "grid": grid, "learning_rates": sorted(lrs), "extensions": extensions,
      "edge_unresolved": new_lr is not None, "chosen_lr": best,
      "transfer_lr": transfer if transfer is not None else best,
      "selection_means": {repr(lr): m for lr, m in sorted(means.items())},
      "num_trials": len(rows), "steps": schedule.total_steps,
      "rows": rows,
  }


def _pads(config, task_name: str) -> dict[str, int]:
  """Argument sizes that fit every batch size of a task (one compile)."""
  section = config[task_name]
  schedules = [trials_lib.make_schedule(b, section.budget_examples,
                                        section.warmup_steps,
                                        config.num_evals, section.decay_power)
               for b in section.batch_sizes]
  return {"pad_steps": max(s.eval_every for s in schedules),
          "pad_examples": max(s.eval_every * s.batch_size for s in schedules)}


def _plan(config) -> list[tuple[str, str, int]]:
  """Cells in run order: per task, batch ascending (base first), optimizer."""
  return [(t, o, b) for t in config.tasks for b in config[t].batch_sizes
          for o in config.optimizers]


# ----------------------------------------------------------------------------
# The study.


def run_study(config: ml_collections.ConfigDict, workdir: str
              ) -> dict[str, Any]:
  """Runs (or resumes) the study in ``workdir``; returns the summary.

  Args:
    config: See ``configs/default.py``.
    workdir: Output directory; cells already there are skipped.

  Returns:
    The summary (also in ``summary.json``), with ``"verdict"`` and, under
    ``"run"``, the cells trained by this call.
  """
  check_config(config)
  os.makedirs(os.path.join(workdir, CELLS_DIR), exist_ok=True)
  _check_workdir(config, workdir)
  start = time.time()
  plan = _plan(config)
  done = {cell_name(*c) for c in plan
          if os.path.exists(_cell_path(workdir, cell_name(*c)))}
  built: dict[str, Any] = {}

  def task_of(name):
    if name not in built:
      task = tasks_lib.make_task(name, config[name], workdir)
      largest = config[name].batch_sizes[-1]
      if largest > task.num_train_examples:
        _fail(f"{name}.batch_sizes",
              f"batch {largest} exceeds the {task.num_train_examples} "
              "training examples.")
      print(task.description, flush=True)
      built[name] = task
    return built[name]

  bar = _progress(config, total=len(plan), initial=len(done))
  trained = []
  stopped = False
  for task_name, optimizer, batch in plan:
    name = cell_name(task_name, optimizer, batch)
    if name in done:
      continue
    if config.stop_after_cells and len(trained) >= config.stop_after_cells:
      stopped = True
      break
    task = task_of(task_name)
    base_batch = config[task_name].batch_sizes[0]
    if batch == base_batch:
      center = config[task_name].initial_learning_rates[optimizer]
      transfer = None
    else:
      base = load_cell(workdir, cell_name(task_name, optimizer, base_batch))
      transfer = center = analysis.transfer_lr(base["chosen_lr"],
                                               base_batch, batch)
    if bar is not None:
      bar.set_postfix_str(name)
    tic = time.time()
    cell = run_cell(task, optimizer, batch, config, center, transfer)
    cell["seconds"] = round(time.time() - tic, 1)
    _write_json(_cell_path(workdir, name), cell)
    trained.append(name)
    if bar is not None:
      bar.update(1)
    else:
      print(f"cell {name}: {cell['num_trials']} trials, chosen lr "
            f"{cell['chosen_lr']:.4g}, {cell['seconds']}s", flush=True)
  if bar is not None:
    bar.close()
  if stopped:
    print(f"stopped after {len(trained)} cells (stop_after_cells); rerun to "
          "continue.", flush=True)
    return {"run": {"trained": trained, "stopped": True}}

  cells = [load_cell(workdir, cell_name(*c)) for c in plan]
  summary = summarize(config, cells)
  write_outputs(config, workdir, cells, summary)
  seconds = time.time() - start
  timing_path = os.path.join(workdir, "timing.json")
  timing = {}
  if os.path.exists(timing_path):
    with open(timing_path, encoding="utf-8") as f:
      timing = json.load(f)
  timing.setdefault("runs", []).append(
      {"seconds": round(seconds, 1), "cells_trained": len(trained)})
  timing["cell_seconds"] = {cell_name(c["task"], c["optimizer"], c["batch"]):
                            c["seconds"] for c in cells}
  _write_json(timing_path, timing)
  print(verdict_text(summary), flush=True)
  print(f"wall time of this run: {seconds / 60:.1f} min "
        f"({len(trained)} cells trained, {len(plan) - len(trained)} "
        "resumed); outputs in " + workdir, flush=True)
  return {**summary, "run": {"trained": trained, "stopped": False,
                             "seconds": seconds}}


def _progress(config, total: int, initial: int):
  if not config.progress_bar:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, unit="cell", file=sys.stderr,
              dynamic_ncols=True, smoothing=0.0)


# ----------------------------------------------------------------------------
# Aggregation and outputs.


def summarize(config, cells: list[dict[str, Any]]) -> dict[str, Any]:
  """Per task: cell statistics, target, steps to target, verdict."""
  out = {"tasks": {}}
  for task_name in config.tasks:
    section = config[task_name]
    task_cells = [c for c in cells if c["task"] == task_name]
    metric = task_cells[0]["metric"]
    higher = task_cells[0]["higher_is_better"]
    floor = task_cells[0]["tolerance_floor"]
    batches = list(section.batch_sizes)
    base = batches[0]
    stats = {"tuned": {}, "transfer": {}}
    info = {}
    for c in task_cells:
      opt, batch = c["optimizer"], c["batch"]
      report = [r for r in c["rows"] if r["role"] == "report"]
      transfer = ([r for r in c["rows"] if r["role"] == "transfer"]
                  if batch != base else report)
      for arm, rows in (("tuned", report), ("transfer", transfer)):
        values = [r["final"][metric] for r in rows]
        mean, se = analysis.mean_se(values)
        stats[arm].setdefault(opt, {})[batch] = {
            "mean": mean, "se": se, "values": values,
            "lr": rows[0]["lr"],
            "diverged": sum(r["diverged"] for r in rows)}
      info.setdefault(opt, {})[batch] = {
          "extensions": c["extensions"],
          "edge_unresolved": c["edge_unresolved"],
          "num_trials": c["num_trials"], "steps": c["steps"],
          "grid_trials": len(c["grid"]) * len(config.selection_seeds),
          "selection_means": c["selection_means"]}
    base_means = {o: stats["tuned"][o][base]["mean"] for o in stats["tuned"]}
    target = analysis.target_value(base_means, section.target_slack, higher)
    for c in task_cells:
      for row in c["rows"]:
        row["steps_to_target"] = analysis.steps_to_target(
            row["curve"], metric, target, higher)
    for c in task_cells:
      opt, batch = c["optimizer"], c["batch"]
      for arm, role in (("tuned", "report"), ("transfer", "transfer")):
        if batch == base:
          role = "report"
        steps = [r["steps_to_target"] for r in c["rows"] if r["role"] == role]
        stats[arm][opt][batch]["steps_to_target"] = steps
        stats[arm][opt][batch]["median_steps_to_target"] = (
            analysis.median_steps(steps))
    summary = {"metric": metric, "higher_is_better": higher,
               "tolerance_floor": floor, "batches": batches,
               "target": target, "cells": stats, "cell_info": info,
               "budget_examples": section.budget_examples,
               "warmup_steps": section.warmup_steps}
    summary.update(analysis.task_verdict(summary))
    summary["nado"] = analysis.nado_reading(summary)
    out["tasks"][task_name] = summary
  out["verdict"] = analysis.overall_verdict(
      {t: s["verdict"] for t, s in out["tasks"].items()})
  return out


def verdict_text(summary: dict[str, Any]) -> str:
  lines = [f"VERDICT: {summary['verdict']}"]
  for name, task in summary["tasks"].items():
    lines.append(f"  {name}: {task['verdict']}")
    for reason in task["reasons"]:
      lines.append(f"    - {reason}")
    if task["nado"]:
      lines.append("    - Nado et al. check (tuned, largest batch): "
                   + "; ".join(f"{o} {r} LAMB"
                               for o, r in task["nado"].items()))
  return "\n".join(lines)


def write_outputs(config, workdir: str, cells: list[dict[str, Any]],
                  summary: dict[str, Any]) -> None:
  """trials.jsonl, summary.json, results.md and the plots."""
  lines = []
  for c in cells:
    for row in c["rows"]:
      lines.append(json.dumps(row, sort_keys=True))
  _write_text(os.path.join(workdir, "trials.jsonl"), "\n".join(lines) + "\n")
  _write_json(os.path.join(workdir, "summary.json"), summary)
  figures = {}
  for task_name, task_summary in summary["tasks"].items():
    figures[task_name] = plots.plot_task(
        task_name, task_summary, cells, workdir, dpi=config.plot_dpi)
  _write_text(os.path.join(workdir, "results.md"),
              results_markdown(config, summary, figures))


def _fmt(value: float, metric: str) -> str:
  return f"{value:.3f}" if metric == "accuracy" else f"{value:.3f}"


def _markdown_table(batches, opts, cell, steps=None) -> list[str]:
  """A table with a row per batch and a column per optimizer, ``cell(o, b)``
  in each cell, and a ``steps`` column after the batch if given."""
  steps_head, steps_rule = ("steps | ", "---|") if steps else ("", "")
  rows = ["| batch | " + steps_head + " | ".join(opts) + " |",
          "|---|" + steps_rule + "---|" * len(opts)]
  for b in batches:
    steps_cell = f"{steps(b)} | " if steps else ""
    rows.append(f"| {b} | " + steps_cell
                + " | ".join(cell(o, b) for o in opts) + " |")
  return rows


def results_markdown(config, summary: dict[str, Any],
                     figures: dict[str, list[str]]) -> str:
  """The tables of results.md (deterministic: no timings)."""
  out = ["# Batch-scaling study: results", "",
         f"**Verdict: {summary['verdict']}** "
         "(rule: examples/batch_scaling/README.md).", ""]
  for name, task in summary["tasks"].items():
    metric = task["metric"]
    batches = task["batches"]
    opts = list(task["cells"]["tuned"])
    better = "higher" if task["higher_is_better"] else "lower"
    out += [f"## {name}: {task['verdict']}", ""]
    out += [f"- {r}" for r in task["reasons"]]
    if task["nado"]:
      out.append("- Nado et al. check (tuned, largest batch): " + "; ".join(
          f"{o} {r} LAMB" for o, r in task["nado"].items()) + ".")
    out += ["",
            f"Held-out {metric} ({better} is better) at the fixed budget of "
            f"{task['budget_examples']:,} examples, mean ± standard error over "
            f"{len(config.report_seeds)} fresh seeds; the peak learning rate "
            f"in brackets. Warmup: {task['warmup_steps']} steps at every batch "
            f"(LEGW). tau floor {task['tolerance_floor']}.", ""]
    for arm in ("tuned", "transfer"):
      def final(o, b, arm=arm):
        s = task["cells"][arm][o][b]
        div = f", {s['diverged']} diverged" if s["diverged"] else ""
        return (f"{_fmt(s['mean'], metric)} ± "
                f"{_fmt(s['se'], metric)} ({s['lr']:.3g}{div})")

      out += [f"**{arm}**" + (" (base best x sqrt(B/B0), no tuning)"
                              if arm == "transfer" else
                              " (best of the grid by the selection-seed mean)"),
              ""]
      out += _markdown_table(
          batches, opts, final,
          steps=lambda b: task["cell_info"][opts[0]][b]["steps"])
      out.append("")
    out += [f"**Steps to target** ({metric} {'>=' if task['higher_is_better'] else '<='} "
            f"{task['target']:.4f}; median over seeds, censored seeds "
            "count as never; `censored` when the median never reaches it; "
            "tuned / transfer)", ""]

    def steps_to_target(o, b):
      parts = []
      for arm in ("tuned", "transfer"):
        s = task["cells"][arm][o][b]
        m = s["median_steps_to_target"]
        n_cens = sum(v is None for v in s["steps_to_target"])
        text = "censored" if m is None else f"{m:.0f}"
        if n_cens and m is not None:
          text += f" ({n_cens} censored)"
        parts.append(text)
      return " / ".join(parts)

    def budget(o, b):
      i = task["cell_info"][o][b]
      return (f"{i['grid_trials']} + {i['extensions']} ext"
              + (" !" if i["edge_unresolved"] else ""))

    out += _markdown_table(batches, opts, steps_to_target)
    out += ["", "**Tuning budget** (trials per cell: grid + edge "
            "extensions, then the report seeds; `!` = best still on an edge "
            "after the last extension)", ""]
    out += _markdown_table(batches, opts, budget)
    total_ext = sum(task["cell_info"][o][b]["extensions"]
                    for o in opts for b in batches)
    out += ["", f"Edge extensions in all: " + ", ".join(
        f"{o} {sum(task['cell_info'][o][b]['extensions'] for b in batches)}"
        for o in opts) + f" (total {total_ext}).", ""]
    for path in figures[name]:
      out.append(f"![{os.path.basename(path)}]({os.path.basename(path)})")
    out.append("")
  return "\n".join(out)
