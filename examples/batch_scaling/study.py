"""The batch-scaling study: ``run_study(config, workdir)``.

For every task, batch size and optimizer (a *cell*, base batch first), in the
order of README.md's protocol:

1. *Grid*: ``num_learning_rates`` peak rates ``lr_factor`` apart, centred on
   the base batch's best rate times ``sqrt(B / B0)`` (on
   ``initial_learning_rates`` at the base batch), each on every selection
   seed; in the same jitted call, the centre rate on the report seeds (above
   the base batch, that is the *transfer* arm: the square-root rate,
   untuned).
2. *Edge extension*: while the best mean is at an edge of the grid, one
   more rate beyond it (at most ``max_extensions``; counted and reported).
3. *Report*: the chosen rate on the report seeds (fresh). When the chosen
   rate is the centre, those runs were trained in step 1 and are reused.

The cells of one task and optimizer form a chain (each needs its base
cell); chains run on ``num_workers`` processes. Each finished cell is written
atomically to ``cells/``; a rerun skips it, so a killed study loses at most
the cells it was running. ``trials.jsonl``,
``summary.json``, ``results.md`` and the plots are rebuilt from the cells at
the end (or by :func:`rebuild_outputs` alone), and the verdict printed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from typing import Any, Optional

import ml_collections

import lamb_optax

import analysis
import plots
import report
import tasks as tasks_lib
import trials as trials_lib

CELLS_DIR = "cells"
# Fields that do not change what the study computes (so a rerun may differ).
_RUN_ONLY_FIELDS = ("progress_bar", "stop_after_cells", "num_workers")
RESULT_FILES = ("results.md", "summary.json")


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


def _schedules(config, name: str) -> list[trials_lib.Schedule]:
  section = config[name]
  return [trials_lib.make_schedule(b, section.budget_examples,
                                   section.warmup_steps, config.num_evals,
                                   section.decay_power)
          for b in section.batch_sizes]


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  _check_names("tasks", config.tasks, tasks_lib.TASKS)
  optimizers = _check_names("optimizers", config.optimizers,
                            trials_lib.OPTIMIZERS)
  selection = _check_seeds("selection_seeds", config.selection_seeds, 2)
  report_seeds = _check_seeds("report_seeds", config.report_seeds, 2)
  if set(selection) & set(report_seeds):
    _fail("report_seeds", "must be fresh: disjoint from selection_seeds, "
          f"but both hold {sorted(set(selection) & set(report_seeds))}.")
  _check_positive_int("num_learning_rates", config.num_learning_rates)
  if not config.lr_factor > 1:
    _fail("lr_factor", f"must be > 1, got {config.lr_factor!r}.")
  _check_positive_int("max_extensions", config.max_extensions, 0)
  _check_positive_int("num_evals", config.num_evals)
  _check_positive_int("min_steps", config.min_steps)
  _check_positive_int("num_workers", config.num_workers)
  if not 0 < config.max_warmup_fraction <= 1:
    _fail("max_warmup_fraction", "must be in (0, 1], got "
          f"{config.max_warmup_fraction!r}.")
  if config.optimizer.beta2_rule not in trials_lib.BETA2_RULES:
    _fail("optimizer.beta2_rule", f"must be one of {trials_lib.BETA2_RULES}, "
          f"got {config.optimizer.beta2_rule!r}.")
  if not 0 <= config.optimizer.b2 < 1:
    _fail("optimizer.b2", f"must be in [0, 1), got {config.optimizer.b2!r}.")
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
    if not 0 < section.target_fraction <= 1:
      _fail(f"{name}.target_fraction", "must be in (0, 1], got "
            f"{section.target_fraction!r}.")
    try:
      schedules = _schedules(config, name)
    except ValueError as e:
      _fail(f"{name}.warmup_steps", str(e))
    top = schedules[-1]
    if top.total_steps < config.min_steps:
      _fail(f"{name}.budget_examples",
            f"gives {top.total_steps} steps at the largest batch "
            f"{top.batch_size}; every batch needs at least min_steps = "
            f"{config.min_steps}.")
    if section.warmup_steps > config.max_warmup_fraction * top.total_steps:
      _fail(f"{name}.warmup_steps",
            f"{section.warmup_steps} is more than max_warmup_fraction = "
            f"{config.max_warmup_fraction} of the {top.total_steps} steps "
            f"at the largest batch {top.batch_size} (LEGW: the same warmup "
            "iterations at every batch size).")


def _protocol(config: ml_collections.ConfigDict) -> dict[str, Any]:
  d = json.loads(config.to_json_best_effort(sort_keys=True))
  for field in _RUN_ONLY_FIELDS:
    d.pop(field, None)
  return d


def protocol_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A hash of everything in ``config`` that changes what the study
  computes, recorded in ``summary.json`` so that results can be matched to
  the config that made them."""
  text = json.dumps(_protocol(config), sort_keys=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


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


def _check_workdir(config, workdir: str, create: bool = True) -> None:
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
  elif create:
    _write_json(path, protocol)
  else:
    raise ValueError(f"workdir {workdir!r} holds no study (no config.json).")


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


def _rows(task, optimizer, schedule, pairs, role, results):
  rows = []
  for (lr, seed), result in zip(pairs, results):
    row = {"task": task.name, "optimizer": optimizer,
           "batch": schedule.batch_size, "lr": lr, "seed": seed,
           "role": role, "steps": schedule.total_steps,
           "warmup_steps": schedule.warmup_steps,
           "examples": schedule.total_steps * schedule.batch_size,
           "diverged": result["diverged"], "curve": result["curve"],
           "final": trials_lib.final_metrics(task, result)}
    if "trust_ratios" in result and role != "select":
      row["trust_ratios"] = result["trust_ratios"]
    rows.append(row)
  return rows


def run_cell(task, optimizer: str, batch: int, config,
             center: float) -> dict[str, Any]:
  """Grid (+ centre on the report seeds), edge extensions, report: one cell.

  ``center`` is the grid's centre: ``initial_learning_rates`` at the base
  batch, else the base batch's chosen rate times ``sqrt(B / B0)``.
  """
  section = config[task.name]
  base_batch = section.batch_sizes[0]
  schedule = trials_lib.make_schedule(
      batch, section.budget_examples, section.warmup_steps, config.num_evals,
      section.decay_power)
  selection, report_seeds = (list(config.selection_seeds),
                             list(config.report_seeds))
  grid = analysis.lr_grid(center, config.num_learning_rates,
                          config.lr_factor)
  cache: dict = {}
  pads = _pads(config, task.name)
  # Extensions and the report share one compiled shape: `small` trials
  # (the shorter list is padded with copies of its last trial, discarded).
  small = max(len(selection), len(report_seeds))
  b2 = trials_lib.beta2_at(config.optimizer.b2, batch, base_batch,
                           config.optimizer.beta2_rule)
  num_runs = 0

  def run(pairs, pad_to):
    nonlocal num_runs
    num_runs += len(pairs)
    padded = pairs + [pairs[-1]] * (pad_to - len(pairs))
    return trials_lib.run_trials(
        task, optimizer, config.optimizer, schedule,
        [lr for lr, _ in padded], [s for _, s in padded], True, cache,
        micro_batch=base_batch, b2=b2, **pads)[:len(pairs)]

  # Above the base batch the centre is the transfer arm; at the base batch
  # it is the likeliest choice, trained now to save a report call.
  center_role = "transfer" if batch != base_batch else "center"
  first = ([(lr, s) for lr in grid for s in selection]
           + [(center, s) for s in report_seeds])
  results = run(first, len(first))
  n_select = len(grid) * len(selection)
  rows = _rows(task, optimizer, schedule, first[:n_select], "select",
               results[:n_select])
  center_rows = _rows(task, optimizer, schedule, first[n_select:],
                      center_role, results[n_select:])
  rows += center_rows
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
    rows += _rows(task, optimizer, schedule, pairs, "select",
                  run(pairs, small))
  if best == center:
    rows += [{**r, "role": "report", "reused": True} for r in center_rows]
  else:
    pairs = [(best, s) for s in report_seeds]
    rows += _rows(task, optimizer, schedule, pairs, "report",
                  run(pairs, small))
  return {
      "task": task.name, "optimizer": optimizer, "batch": batch,
      "metric": task.metric, "higher_is_better": task.higher_is_better,
      "tolerance_floor": task.tolerance_floor,
      "baseline": task.baseline, "baseline_name": task.baseline_name,
      "grid": grid, "learning_rates": sorted(lrs), "extensions": extensions,
      "edge_unresolved": new_lr is not None, "chosen_lr": best,
      "center_lr": center,
      "b2": b2 if optimizer in trials_lib.BETA2_OPTIMIZERS else None,
      "selection_means": {repr(lr): m for lr, m in sorted(means.items())},
      "num_runs": num_runs, "steps": schedule.total_steps,
      "eval_every": schedule.eval_every, "rows": rows,
  }


def _pads(config, task_name: str) -> dict[str, int]:
  """Argument sizes that fit every batch size of a task (one compile)."""
  schedules = _schedules(config, task_name)
  return {"pad_steps": max(s.eval_every for s in schedules),
          "pad_examples": max(s.eval_every * s.batch_size for s in schedules)}


def _plan(config) -> list[tuple[str, str, int]]:
  """Cells in run order: per task, batch ascending (base first), optimizer."""
  return [(t, o, b) for t in config.tasks for b in config[t].batch_sizes
          for o in config.optimizers]


def cpu_seconds(children: bool = False) -> float:
  """CPU time of this process (and of its finished worker processes)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  total = usage.ru_utime + usage.ru_stime
  if children:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total += usage.ru_utime + usage.ru_stime
  return total


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
  start, start_cpu = time.time(), cpu_seconds(children=True)
  plan = _plan(config)
  todo = [c for c in plan
          if not os.path.exists(_cell_path(workdir, cell_name(*c)))]
  if config.stop_after_cells:
    stopped = len(todo) > config.stop_after_cells
    todo = todo[:config.stop_after_cells]
  else:
    stopped = False
  built = {}
  for task_name in dict.fromkeys(t for t, _, _ in todo):
    task = tasks_lib.make_task(task_name, config[task_name], workdir)
    largest = config[task_name].batch_sizes[-1]
    if largest > task.num_train_examples:
      _fail(f"{task_name}.batch_sizes",
            f"batch {largest} exceeds the {task.num_train_examples} "
            "training examples.")
    print(task.description, flush=True)
    built[task_name] = task
  trained = _train_cells(config, workdir, plan, todo, built)
  if stopped:
    print(f"stopped after {len(trained)} cells (stop_after_cells); rerun to "
          "continue.", flush=True)
    return {"run": {"trained": trained, "stopped": True}}

  summary = _outputs(config, workdir)
  seconds = time.time() - start
  cpu = cpu_seconds(children=True) - start_cpu
  timing_path = os.path.join(workdir, "timing.json")
  timing = {}
  if os.path.exists(timing_path):
    with open(timing_path, encoding="utf-8") as f:
      timing = json.load(f)
  timing.setdefault("runs", []).append(
      {"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
       "cells_trained": len(trained), "num_workers": config.num_workers})
  for c in plan:
    name = cell_name(*c)
    cell = load_cell(workdir, name)
    timing.setdefault("cells", {})[name] = {
        k: cell.get(k) for k in ("seconds", "cpu_seconds", "num_runs")}
  _write_json(timing_path, timing)
  print(f"wall time of this run: {seconds / 60:.1f} min, CPU time "
        f"{cpu / 60:.1f} min ({len(trained)} cells trained, "
        f"{len(plan) - len(trained)} resumed); outputs in {workdir}",
        flush=True)
  return {**summary, "run": {"trained": trained, "stopped": False,
                             "seconds": seconds, "cpu_seconds": cpu}}


def _chains(config, todo) -> list[list[tuple[str, str, int]]]:
  """The cells of ``todo`` grouped by (task, optimizer), batch ascending.

  A cell above the base batch needs its optimizer's base cell (the centre of
  its grid comes from there), so a chain runs in order, on one worker; the
  chains are independent. Longest first (the masked LM before MNIST-1D,
  Muon, whose every step orthogonalises, first within a task), so that two
  workers finish together.
  """
  chains: dict[tuple[str, str], list] = {}
  for cell in todo:
    chains.setdefault(cell[:2], []).append(cell)

  def cost_rank(key):
    task_name, optimizer = key
    return (-list(tasks_lib.TASKS).index(task_name), optimizer != "muon",
            list(config.optimizers).index(optimizer))
  return [chains[k] for k in sorted(chains, key=cost_rank)]


def _train_chain(config, workdir: str, chain, built=None) -> list[str]:
  """Trains a chain's cells in order; returns their names."""
  built = {} if built is None else built
  trained = []
  for task_name, optimizer, batch in chain:
    if task_name not in built:
      built[task_name] = tasks_lib.make_task(task_name, config[task_name],
                                             workdir)
    section = config[task_name]
    base_batch = section.batch_sizes[0]
    if batch == base_batch:
      center = section.initial_learning_rates[optimizer]
    else:
      base = load_cell(workdir, cell_name(task_name, optimizer, base_batch))
      center = lamb_optax.schedules.sqrt_scaled(
          base["chosen_lr"], base_batch_size=base_batch, batch_size=batch)
    name = cell_name(task_name, optimizer, batch)
    tic, tic_cpu = time.time(), cpu_seconds()
    cell = run_cell(built[task_name], optimizer, batch, config, center)
    cell["seconds"] = round(time.time() - tic, 1)
    cell["cpu_seconds"] = round(cpu_seconds() - tic_cpu, 1)
    _write_json(_cell_path(workdir, name), cell)
    trained.append(name)
    if not config.progress_bar:
      print(f"cell {name}: {cell['num_runs']} runs, chosen lr "
            f"{cell['chosen_lr']:.4g}, {cell['seconds']}s", flush=True)
  return trained


def _train_cells(config, workdir: str, plan, todo, built) -> list[str]:
  """Trains the cells of ``todo``, chain by chain, on ``num_workers``
  processes (in this one when 1). Each cell's numbers do not depend on the
  worker that trains it."""
  chains = _chains(config, todo)
  workers = min(config.num_workers, len(chains))
  bar = _progress(config, total=len(plan), initial=len(plan) - len(todo))
  trained = []
  try:
    if workers <= 1:
      for chain in chains:
        for name in _train_chain(config, workdir, chain, built):
          trained.append(name)
          if bar is not None:
            bar.update(1)
      return trained
    # Worker processes: XLA runs these small programs on about one core
    # each, so two processes use a 2-core machine where one cannot.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context) as pool:
      pending = {pool.submit(_train_chain, config, workdir, chain)
                 for chain in chains}
      while pending:
        finished, pending = concurrent.futures.wait(
            pending, timeout=5,
            return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
          if future.exception() is not None:
            for other in pending:  # Chains not started yet: never.
              other.cancel()
            raise future.exception()
          trained += future.result()
        if bar is not None:
          bar.n = len(plan) - len(todo) + sum(
              os.path.exists(_cell_path(workdir, cell_name(*c)))
              for c in todo)
          bar.refresh()
    order = {cell_name(*c): i for i, c in enumerate(plan)}
    return sorted(trained, key=order.get)
  finally:
    if bar is not None:
      bar.close()


def rebuild_outputs(config: ml_collections.ConfigDict, workdir: str
                    ) -> dict[str, Any]:
  """Rewrites every output of a finished study from its cells alone.

  ``trials.jsonl``, ``summary.json``, ``results.md`` and the plots come out
  byte for byte as the run wrote them; nothing is trained.

  Raises:
    ValueError: the workdir holds another config, or misses a cell.
  """
  check_config(config)
  _check_workdir(config, workdir, create=False)
  missing = [cell_name(*c) for c in _plan(config)
             if load_cell(workdir, cell_name(*c)) is None]
  if missing:
    raise ValueError(f"workdir {workdir!r} misses the cells "
                     f"{', '.join(missing)}; run the study to train them.")
  return _outputs(config, workdir)


def _outputs(config, workdir: str) -> dict[str, Any]:
  cells = [load_cell(workdir, cell_name(*c)) for c in _plan(config)]
  summary = summarize(config, cells)
  write_outputs(config, workdir, cells, summary)
  print(report.verdict_text(summary), flush=True)
  return summary


def _progress(config, total: int, initial: int):
  if not config.progress_bar:
    return None
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, initial=initial, unit="cell", file=sys.stderr,
              dynamic_ncols=True, smoothing=0.0)


# ----------------------------------------------------------------------------
# Aggregation and outputs.


def _value_at(row: dict[str, Any], metric: str, index: int) -> float:
  """The row's held-out metric at evaluation ``index`` (its diverged score
  when not finite)."""
  value = row["curve"][metric][index]
  return value if math.isfinite(value) else row["final"][metric]


def summarize(config, cells: list[dict[str, Any]]) -> dict[str, Any]:
  """Per task: cell statistics, gate, target, critical batches, verdict."""
  out = {"tasks": {}}
  report_seeds = list(config.report_seeds)
  for task_name in config.tasks:
    section = config[task_name]
    task_cells = [c for c in cells if c["task"] == task_name]
    first = task_cells[0]
    metric, higher = first["metric"], first["higher_is_better"]
    floor = first["tolerance_floor"]
    batches = list(section.batch_sizes)
    base = batches[0]
    stats = {"tuned": {}, "transfer": {}}
    info = {}
    by_role = {}
    for c in task_cells:
      opt, batch = c["optimizer"], c["batch"]
      rows = {role: sorted((r for r in c["rows"] if r["role"] == role),
                           key=lambda r: report_seeds.index(r["seed"]))
              for role in ("report", "transfer")}
      rows["transfer"] = rows["transfer"] if batch != base else rows["report"]
      by_role[opt, batch] = rows
      for arm, role in (("tuned", "report"), ("transfer", "transfer")):
        values = [r["final"][metric] for r in rows[role]]
        mean, se = analysis.mean_se(values)
        stats[arm].setdefault(opt, {})[batch] = {
            "mean": mean, "se": se, "values": values,
            "lr": rows[role][0]["lr"],
            "diverged": sum(r["diverged"] for r in rows[role])}
      info.setdefault(opt, {})[batch] = {
          "extensions": c["extensions"],
          "edge_unresolved": c["edge_unresolved"],
          "num_runs": c["num_runs"], "steps": c["steps"],
          "grid_trials": len(c["grid"]) * len(config.selection_seeds),
          "selection_means": c["selection_means"]}
    optimizers = list(stats["tuned"])
    # The learnability gate: the best tuned base-batch mean against the
    # task's trivial baseline.
    base_means = {o: stats["tuned"][o][base]["mean"] for o in optimizers}
    best_opt = max(optimizers, key=lambda o: base_means[o] if higher
                   else -base_means[o])
    gate = analysis.learnability_gate(
        first["baseline"][metric], base_means[best_opt], floor, higher)
    # The target: the worst optimizer's tuned base-batch median at the
    # evaluation nearest target_fraction of the budget.
    index = analysis.target_eval_index(config.num_evals,
                                       section.target_fraction)
    target = analysis.mid_budget_target(
        {o: statistics.median(_value_at(r, metric, index)
                              for r in by_role[o, base]["report"])
         for o in optimizers}, higher)
    for c in task_cells:
      for row in c["rows"]:
        row["steps_to_target"] = analysis.steps_to_target(
            row["curve"], metric, target, higher)
    for (opt, batch), rows in by_role.items():
      for arm, role in (("tuned", "report"), ("transfer", "transfer")):
        steps = [r["steps_to_target"] for r in rows[role]]
        stats[arm][opt][batch]["steps_to_target"] = steps
        stats[arm][opt][batch]["median_steps_to_target"] = (
            analysis.median_steps(steps))
    critical = {}
    for opt in optimizers:
      tuned = stats["tuned"][opt]
      critical[opt] = analysis.bootstrap_critical_batch(
          batches, {b: tuned[b]["steps_to_target"] for b in batches})
      for b in batches:
        tuned[b]["scaling_overhead"] = analysis.scaling_overhead(
            tuned[b]["median_steps_to_target"],
            tuned[base]["median_steps_to_target"], b, base)
    steps = {b: info[optimizers[0]][b]["steps"] for b in batches}
    b2 = {c["batch"]: c["b2"] for c in task_cells if c["b2"] is not None}
    summary = {
        "metric": metric, "higher_is_better": higher,
        "tolerance_floor": floor, "batches": batches, "steps": steps,
        "baseline": gate["baseline"], "baseline_name": first["baseline_name"],
        "baselines": first["baseline"],
        "best_base": {"optimizer": best_opt, "value": gate["best"]},
        "margin": gate["margin"], "gate": gate,
        "target": target, "target_fraction": section.target_fraction,
        "target_step_at_base": (index + 1) * (steps[base] // config.num_evals),
        "cells": stats, "cell_info": info, "critical": critical,
        "budget_examples": section.budget_examples,
        "warmup_steps": section.warmup_steps,
        "beta2": {"rule": config.optimizer.beta2_rule,
                  "by_batch": {b: b2[b] for b in batches if b in b2}}}
    summary.update(analysis.task_verdict(summary))
    summary["nado"] = analysis.nado_reading(summary)
    out["tasks"][task_name] = summary
  out["verdict"] = analysis.overall_verdict(
      {t: s["verdict"] for t, s in out["tasks"].items()})
  out["protocol"] = protocol_fingerprint(config)
  return out


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
              report.results_markdown(config, summary, figures))
