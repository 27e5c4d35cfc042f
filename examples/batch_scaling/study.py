"""The batch-scaling study: ``run_study(config, workdir)``.

For every task, batch size and optimizer (a *cell*, base batch first; each
optimizer up to its ``max_batch``), in the order of README.md's protocol:

1. *Grid*: ``num_learning_rates`` peak rates ``lr_factor`` apart, centred on
   ``initial_learning_rates`` at the base batch and, above it, on the base
   batch's rate chosen for steps to the target times ``sqrt(B / B0)`` (the
   *transfer* arm: that rate, untuned). Every rate trains on every seed,
   selection and report alike. At the base batch, the gradient noise scale
   is measured along every run (:mod:`noise_scale`).
2. *Choice*: two rates per cell, both on the selection seeds: the fewest
   median steps to the task's fixed ``target`` (the critical batch's), and
   the best mean final metric (the final-metric tables').
3. *Edge extension*: while either choice is at an edge of the grid, one
   more rate beyond it, on every seed (at most ``max_extensions``; counted
   and reported).

The report seeds' runs at the chosen rates are the results; the bootstrap
(:func:`analysis.bootstrap_critical_batch`) redoes the choice in every
resample of both seed sets.

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

import jax
import ml_collections

import lamb_optax

import analysis
import noise_scale
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


_TUNING_FIELDS = ("selection_seeds", "report_seeds", "num_learning_rates")


def _check_tuning(section, prefix: str) -> None:
  """The seeds and the grid size: global (``prefix`` empty, required) or a
  task's override (``prefix`` ``"<task>."``; None there: the global
  value)."""
  for field, check in (
      ("selection_seeds", lambda f, v: _check_seeds(f, v, 2)),
      ("report_seeds", lambda f, v: _check_seeds(f, v, 2)),
      ("num_learning_rates", _check_positive_int)):
    value = section.get(field)
    if value is not None or not prefix:
      check(f"{prefix}{field}", value)


def task_tuning(config, task_name: str) -> tuple[list[int], list[int], int]:
  """A task's selection seeds, report seeds and grid size: its own
  (``config.<task>.selection_seeds`` ...) where set, else the global ones."""
  section = config[task_name]

  def pick(field):
    value = section.get(field)
    return config[field] if value is None else value
  selection, report_seeds = (list(pick("selection_seeds")),
                             list(pick("report_seeds")))
  if set(selection) & set(report_seeds):
    # Blame the field that was set: the task's own, else the global one.
    field = next((f"{task_name}.{f}" for f in ("report_seeds",
                                                "selection_seeds")
                  if section.get(f) is not None), "report_seeds")
    _fail(field, "must be fresh: the selection seeds "
          f"{selection} and the report seeds {report_seeds} of "
          f"{task_name} share {sorted(set(selection) & set(report_seeds))}.")
  return selection, report_seeds, pick("num_learning_rates")


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
  _check_tuning(config, "")
  for name in config.tasks:
    _check_tuning(config[name], f"{name}.")
    task_tuning(config, name)  # The report seeds must be fresh.
  if not config.lr_factor > 1:
    _fail("lr_factor", f"must be > 1, got {config.lr_factor!r}.")
  _check_positive_int("max_extensions", config.max_extensions, 0)
  _check_positive_int("num_evals", config.num_evals)
  _check_positive_int("min_steps", config.min_steps)
  _check_positive_int("num_workers", config.num_workers)
  _check_positive_int("noise_every", config.noise_every)
  _check_positive_int("noise_seed", config.noise_seed, 0)
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
    target = section.get("target")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or (
        not math.isfinite(target)):
      _fail(f"{name}.target", "must be a finite number (the fixed "
            f"steps-to-target target, in {name}'s metric), got {target!r}.")
    for opt in optimizers:
      top = section.max_batch.get(opt)
      if top is not None and top not in batches[1:]:
        _fail(f"{name}.max_batch.{opt}", "must be one of the batch sizes "
              f"above the base, {tuple(batches[1:])!r}, or absent (every "
              f"batch), got {top!r}.")
    _check_positive_int(f"{name}.noise_examples", section.noise_examples, 0)
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


def _rows(task, optimizer, schedule, pairs, selection, results, target):
  rows = []
  for (lr, seed), result in zip(pairs, results):
    row = {"task": task.name, "optimizer": optimizer,
           "batch": schedule.batch_size, "lr": lr, "seed": seed,
           "role": "select" if seed in selection else "report",
           "steps": schedule.total_steps,
           "warmup_steps": schedule.warmup_steps,
           "examples": schedule.total_steps * schedule.batch_size,
           "diverged": result["diverged"], "curve": result["curve"],
           "final": trials_lib.final_metrics(task, result),
           "steps_to_target": analysis.steps_to_target(
               result["curve"], task.metric, target, task.higher_is_better)}
    if "trust_ratios" in result and row["role"] == "report":
      row["trust_ratios"] = result["trust_ratios"]
    if "probe" in result:
      row["noise"] = result["probe"]
    rows.append(row)
  return rows


def _choices(rows, metric: str, higher: bool) -> dict[str, Any]:
  """The rate each selection rule chooses from the selection rows."""
  select = [r for r in rows if r["role"] == "select"]
  means = analysis.mean_by_lr(select, metric)
  steps, finals = {}, {}
  for r in select:
    steps.setdefault(r["lr"], []).append(r["steps_to_target"])
    finals.setdefault(r["lr"], []).append(r["final"][metric])
  return {"final": analysis.select(means, higher),
          "steps": analysis.select_for_steps(steps, finals, higher),
          "means": means,
          "median_steps": {lr: analysis.median_steps(v)
                           for lr, v in steps.items()}}


def run_cell(task, optimizer: str, batch: int, config, center: float,
             probe=None) -> dict[str, Any]:
  """Grid on every seed, edge extensions: one cell.

  Every seed, selection and report alike, trains every rate, so that the
  bootstrap can redo the choice of the rate (README.md, "Protocol").
  ``center`` is the grid's centre: ``initial_learning_rates`` at the base
  batch, else the base batch's rate chosen for steps to the target times
  ``sqrt(B / B0)`` (the transfer arm). ``probe``: measured along the runs
  (the base batch's gradient noise scale), see :func:`trials.run_trials`.
  """
  section = config[task.name]
  base_batch = section.batch_sizes[0]
  schedule = trials_lib.make_schedule(
      batch, section.budget_examples, section.warmup_steps, config.num_evals,
      section.decay_power)
  selection, report_seeds, num_rates = task_tuning(config, task.name)
  seeds = selection + report_seeds
  grid = analysis.lr_grid(center, num_rates, config.lr_factor)
  cache: dict = {}
  pads = _pads(config, task.name)
  b2 = trials_lib.beta2_at(config.optimizer.b2, batch, base_batch,
                           config.optimizer.beta2_rule)
  extra = {} if probe is None else {"probe": probe,
                                    "probe_every": config.noise_every}
  num_runs = 0

  def run(lrs):
    nonlocal num_runs
    pairs = [(lr, s) for lr in lrs for s in seeds]
    num_runs += len(pairs)
    results = trials_lib.run_trials(
        task, optimizer, config.optimizer, schedule,
        [lr for lr, _ in pairs], [s for _, s in pairs], True, cache,
        micro_batch=base_batch, b2=b2, **pads, **extra)
    return _rows(task, optimizer, schedule, pairs, selection, results,
                 section.target)

  rows = run(grid)
  lrs = list(grid)
  extensions = 0
  while True:
    choice = _choices(rows, task.metric, task.higher_is_better)
    # The rule for steps first, then the one for the final metric.
    new_lr = (analysis.edge_extension(lrs, choice["steps"], config.lr_factor)
              or analysis.edge_extension(lrs, choice["final"],
                                         config.lr_factor))
    if new_lr is None or extensions >= config.max_extensions:
      break
    extensions += 1
    lrs.append(new_lr)
    rows += run([new_lr])
  return {
      "task": task.name, "optimizer": optimizer, "batch": batch,
      "metric": task.metric, "higher_is_better": task.higher_is_better,
      "tolerance_floor": task.tolerance_floor, "baselines": task.baselines,
      "target": section.target,
      "grid": grid, "learning_rates": sorted(lrs), "extensions": extensions,
      "edge_unresolved": new_lr is not None, "chosen_lr": choice["final"],
      "chosen_lr_steps": choice["steps"], "center_lr": center,
      "b2": b2 if optimizer in trials_lib.BETA2_OPTIMIZERS else None,
      "selection_means": {repr(lr): m
                          for lr, m in sorted(choice["means"].items())},
      "selection_median_steps": {
          repr(lr): m for lr, m in sorted(choice["median_steps"].items())},
      "num_runs": num_runs, "steps": schedule.total_steps,
      "eval_every": schedule.eval_every, "rows": rows,
  }


def _pads(config, task_name: str) -> dict[str, int]:
  """Argument sizes that fit every batch size of a task (one compile)."""
  schedules = _schedules(config, task_name)
  return {"pad_steps": max(s.eval_every for s in schedules),
          "pad_examples": max(s.eval_every * s.batch_size for s in schedules)}


def optimizer_batches(config, task_name: str, optimizer: str) -> list[int]:
  """The batch sizes ``optimizer`` trains on a task: those up to its
  ``max_batch`` (the rest are the cells that measure nothing: README.md)."""
  section = config[task_name]
  top = section.max_batch.get(optimizer) or section.batch_sizes[-1]
  return [b for b in section.batch_sizes if b <= top]


def _plan(config) -> list[tuple[str, str, int]]:
  """Cells in run order: per task, batch ascending (base first), optimizer."""
  return [(t, o, b) for t in config.tasks for b in config[t].batch_sizes
          for o in config.optimizers
          if b in optimizer_batches(config, t, o)]


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


def noise_probe(task, num_examples: int, seed: int):
  """``(stacked params, data) -> {trace_sigma, grad_sq, b_simple}`` per
  trial, on a fixed held-in sample (:func:`noise_scale.make_noise_probe`,
  with the finite population of :func:`noise_scale.sample_population`)."""
  _, probe_fn = noise_scale.make_noise_probe(task, num_examples, seed)
  population = noise_scale.sample_population(task)

  def one(params, data):
    return noise_scale.b_simple(probe_fn(params, data), population)
  return jax.jit(jax.vmap(one, in_axes=(0, None)))


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
    probe = None
    if batch == base_batch:
      center = section.initial_learning_rates[optimizer]
      if section.noise_examples:
        probe = noise_probe(built[task_name], section.noise_examples,
                            config.noise_seed)
    else:
      base = load_cell(workdir, cell_name(task_name, optimizer, base_batch))
      center = lamb_optax.schedules.sqrt_scaled(
          base["chosen_lr_steps"], base_batch_size=base_batch,
          batch_size=batch)
    name = cell_name(task_name, optimizer, batch)
    tic, tic_cpu = time.time(), cpu_seconds()
    cell = run_cell(built[task_name], optimizer, batch, config, center,
                    probe)
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


def _arm(rows, metric: str, lr: float, report_seeds) -> dict[str, Any]:
  """The report seeds' final metric and steps to the target at ``lr``."""
  rows = sorted((r for r in rows if r["role"] == "report" and r["lr"] == lr),
                key=lambda r: report_seeds.index(r["seed"]))
  values = [r["final"][metric] for r in rows]
  mean, se = analysis.mean_se(values)
  steps = [r["steps_to_target"] for r in rows]
  return {"mean": mean, "se": se, "values": values, "lr": lr,
          "diverged": sum(r["diverged"] for r in rows),
          "steps_to_target": steps,
          "median_steps_to_target": analysis.median_steps(steps)}


def _by_seed(rows, role: str, seeds, value) -> dict[float, list]:
  """``{lr: [value(row) for each seed of ``seeds``, in order]}``."""
  out: dict[float, dict] = {}
  for r in rows:
    if r["role"] == role:
      out.setdefault(r["lr"], {})[r["seed"]] = value(r)
  return {lr: [v[s] for s in seeds] for lr, v in sorted(out.items())}


def _noise(cell, critical, report_seeds, target_steps_of) -> dict[str, Any]:
  """B_simple along the base-batch runs at the rate chosen for steps.

  Per report seed: at every checkpoint and, interpolated in log between the
  two checkpoints around it, at the step where the run crosses the target;
  medians over the seeds.
  """
  lr = cell["chosen_lr_steps"]
  rows = sorted((r for r in cell["rows"] if r["role"] == "report"
                 and r["lr"] == lr and "noise" in r),
                key=lambda r: report_seeds.index(r["seed"]))
  if not rows:
    return {}
  steps = rows[0]["noise"]["step"]
  at_target = []
  for r in rows:
    crossing = target_steps_of(r)
    at_target.append(None if crossing is None else analysis.log_interpolate(
        steps, r["noise"]["b_simple"], crossing))
  # The median over the seeds that cross the target (B_simple may be inf
  # there), when more than half of them do.
  crossed = [v for v in at_target if v is not None]
  median = (statistics.median(crossed) if len(crossed) * 2 > len(rows)
            else None)

  def median_at(name, source):
    return [statistics.median(source(r, name)[i] for r in rows)
            for i in range(len(steps))]

  def curve_at(r, name):
    index = {s: i for i, s in enumerate(r["curve"]["step"])}
    return [r["curve"][name][index[s]] for s in steps]

  curve = {"step": steps,
           "b_simple": median_at("b_simple", lambda r, n: r["noise"][n]),
           "trace_sigma": median_at("trace_sigma",
                                    lambda r, n: r["noise"][n]),
           "grad_sq": median_at("grad_sq", lambda r, n: r["noise"][n]),
           "loss": median_at("loss", curve_at),
           cell["metric"]: median_at(cell["metric"], curve_at)}
  return {"lr": lr, "at_target": median, "at_target_by_seed": at_target,
          "crossing_steps": [target_steps_of(r) for r in rows],
          "critical": critical["batch"],
          "ratio": (critical["batch"] / median
                    if median and critical["batch"] else None),
          "agrees": analysis.noise_agreement(median, critical),
          "curve": curve}


def summarize(config, cells: list[dict[str, Any]]) -> dict[str, Any]:
  """Per task: cell statistics, gate, critical batches, noise scale, verdict."""
  out = {"tasks": {}}
  for task_name in config.tasks:
    section = config[task_name]
    selection, report_seeds, _ = task_tuning(config, task_name)
    task_cells = [c for c in cells if c["task"] == task_name]
    first = task_cells[0]
    metric, higher = first["metric"], first["higher_is_better"]
    floor = first["tolerance_floor"]
    batches = list(section.batch_sizes)
    base = batches[0]
    stats = {"tuned": {}, "transfer": {}, "steps": {}}
    info = {}
    boot = {}
    for c in task_cells:
      opt, batch, rows = c["optimizer"], c["batch"], c["rows"]
      stats["tuned"].setdefault(opt, {})[batch] = _arm(
          rows, metric, c["chosen_lr"], report_seeds)
      # The transfer arm: the base batch's rate for steps there, its
      # square-root scaling (the grid's centre) above.
      stats["transfer"].setdefault(opt, {})[batch] = _arm(
          rows, metric, c["chosen_lr_steps"] if batch == base
          else c["center_lr"], report_seeds)
      stats["steps"].setdefault(opt, {})[batch] = _arm(
          rows, metric, c["chosen_lr_steps"], report_seeds)
      boot.setdefault(opt, {})[batch] = {
          "select_steps": _by_seed(rows, "select", selection,
                                   lambda r: r["steps_to_target"]),
          "select_final": _by_seed(rows, "select", selection,
                                   lambda r: r["final"][metric]),
          "report_steps": _by_seed(rows, "report", report_seeds,
                                   lambda r: r["steps_to_target"])}
      info.setdefault(opt, {})[batch] = {
          "extensions": c["extensions"],
          "edge_unresolved": c["edge_unresolved"],
          "num_runs": c["num_runs"], "steps": c["steps"],
          "grid_trials": len(c["grid"]) * (len(selection)
                                           + len(report_seeds)),
          "selection_means": c["selection_means"],
          "selection_median_steps": c["selection_median_steps"]}
    optimizers = list(stats["tuned"])
    batches_of = {o: sorted(stats["tuned"][o]) for o in optimizers}
    # The learnability gate: the best tuned base-batch mean against the
    # task's strongest trivial baseline.
    base_means = {o: stats["tuned"][o][base]["mean"] for o in optimizers}
    best_opt = max(optimizers, key=lambda o: base_means[o] if higher
                   else -base_means[o])
    baselines = first["baselines"]
    strongest = tasks_lib.strongest_baseline(baselines, metric, higher)
    gate = analysis.learnability_gate(
        baselines[strongest][metric], base_means[best_opt], floor, higher)
    gate["baseline_name"] = strongest
    gate["baseline_label"] = f"the {strongest} baseline"
    critical, noise = {}, {}
    for opt in optimizers:
      critical[opt] = analysis.bootstrap_critical_batch(
          batches_of[opt], boot[opt], higher)
      arm = stats["steps"][opt]
      for b in batches_of[opt]:
        arm[b]["scaling_overhead"] = analysis.scaling_overhead(
            arm[b]["median_steps_to_target"],
            arm[base]["median_steps_to_target"], b, base)
      base_cell = next(c for c in task_cells
                       if c["optimizer"] == opt and c["batch"] == base)
      noise[opt] = _noise(base_cell, critical[opt], report_seeds,
                          lambda r: r["steps_to_target"])
    steps = {s.batch_size: s.total_steps
             for s in _schedules(config, task_name)}
    b2 = {c["batch"]: c["b2"] for c in task_cells if c["b2"] is not None}
    summary = {
        "selection_seeds": selection, "report_seeds": report_seeds,
        "metric": metric, "higher_is_better": higher,
        "tolerance_floor": floor, "batches": batches, "steps": steps,
        "optimizer_batches": batches_of,
        "baselines": baselines, "baseline": gate["baseline"],
        "baseline_name": strongest,
        "best_base": {"optimizer": best_opt, "value": gate["best"]},
        "margin": gate["margin"], "gate": gate,
        "target": section.target,
        "cells": stats, "cell_info": info, "critical": critical,
        "noise": noise,
        "budget_examples": section.budget_examples,
        "warmup_steps": section.warmup_steps,
        "beta2": {"rule": config.optimizer.beta2_rule,
                  "by_batch": {b: b2[b] for b in batches if b in b2}}}
    if "lamb" in noise and "adamw" in noise:
      summary["noise_relation"] = analysis.noise_relation(noise["lamb"],
                                                          noise["adamw"])
    summary.update(analysis.task_verdict(summary))
    summary["nado"] = analysis.nado_reading(summary)
    out["tasks"][task_name] = summary
  verdicts = {t: s["verdict"] for t, s in out["tasks"].items()}
  out["verdict"] = analysis.overall_verdict(verdicts)
  out["verdict_basis"] = analysis.verdict_basis(verdicts)
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
