"""The study's arithmetic: grids, selection, censoring, aggregation, verdict.

Pure Python on numbers (no JAX), so that every rule of the protocol in
README.md is a function with a unit test. Metrics are compared through
``higher_is_better``: accuracy (higher) or loss (lower).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from typing import Any, Optional, Sequence

VERDICTS = ("reproduced", "partial", "fails", "untestable", "uninformative")
# The optimizers the paper's claim is about (LAMB against these two), and
# the batch ratio at which "every optimizer degrades" makes a task
# untestable.
PAPER_BASELINES = ("adamw", "lars")
UNTESTABLE_RATIO = 8
# The learnability gate: the best tuned base-batch result must beat the
# task's trivial baseline by at least this many tau floors.
GATE_FACTOR = 10
# The critical batch: the largest batch whose steps to the target are at
# most this many times perfect scaling from the base, steps(B0) * B0 / B
# (Shallue et al., 2019; Zhang et al., 2024).
CRITICAL_OVERHEAD = 1.2
# Its seed-bootstrap interval: the central INTERVAL_LEVEL of the critical
# batches of every resample of the report seeds. All n**n resamples are
# enumerated (exact) up to EXACT_BOOTSTRAP_LIMIT; above, that many are drawn
# with a fixed seed.
INTERVAL_LEVEL = 0.95
EXACT_BOOTSTRAP_LIMIT = 50_000
# Relative slack in comparisons of equal rational numbers computed in floats
# (a margin exactly on the gate, a run exactly at 1.2x perfect scaling).
_REL_EPS = 1e-9


def lr_grid(center: float, num: int, factor: float = 2.0) -> list[float]:
  """``num`` log-spaced rates, ascending, ``factor`` apart, centred on ``center``.

  Rate ``i`` is ``center * factor ** (i - (num - 1) / 2)``; an odd ``num``
  contains ``center`` itself.
  """
  if num < 1:
    raise ValueError(f"`num_learning_rates` must be >= 1, got {num}.")
  return [center * factor ** (i - (num - 1) / 2) for i in range(num)]


def is_better(a: float, b: float, higher_is_better: bool) -> bool:
  return a > b if higher_is_better else a < b


def select(means_by_lr: dict[float, float], higher_is_better: bool) -> float:
  """The rate with the best mean (ties: the smaller rate)."""
  best = None
  for lr in sorted(means_by_lr):
    if best is None or is_better(means_by_lr[lr], means_by_lr[best],
                                 higher_is_better):
      best = lr
  return best


def mean_by_lr(rows: Sequence[dict[str, Any]], metric: str
               ) -> dict[float, float]:
  """Mean of ``final[metric]`` over the seeds of each learning rate."""
  by_lr: dict[float, list[float]] = {}
  for row in rows:
    by_lr.setdefault(row["lr"], []).append(row["final"][metric])
  return {lr: statistics.fmean(v) for lr, v in by_lr.items()}


def edge_extension(lrs: Sequence[float], best: float,
                   factor: float = 2.0) -> Optional[float]:
  """The next rate to try when ``best`` is on an edge of ``lrs``, else None.

  Below the smallest rate when it is the best, above the largest when it is
  (one rate per extension; a grid of one rate is extended downwards first).
  """
  lrs = sorted(lrs)
  if best == lrs[0]:
    return lrs[0] / factor
  if best == lrs[-1]:
    return lrs[-1] * factor
  return None


def steps_to_target(curve: dict[str, list[float]], metric: str,
                    target: float, higher_is_better: bool
                    ) -> Optional[float]:
  """The step at which the metric first reaches ``target``; None: censored.

  At the first evaluation k that reaches it, linearly interpolated between
  evaluation k - 1 (which does not) and k, so that the answer does not move
  in whole evaluation intervals:

    s_{k-1} + (target - v_{k-1}) / (v_k - v_{k-1}) * (s_k - s_{k-1}).

  The first evaluation's own step when it already reaches the target (or
  when the one before is not finite).
  """
  def reaches(value):
    return math.isfinite(value) and (value >= target if higher_is_better
                                     else value <= target)
  steps, values = curve["step"], curve[metric]
  for k, (step, value) in enumerate(zip(steps, values)):
    if reaches(value):
      if k == 0 or not math.isfinite(values[k - 1]):
        return float(step)
      before = values[k - 1]
      return steps[k - 1] + (target - before) / (value - before) * (
          step - steps[k - 1])
  return None


def median_steps(values: Sequence[Optional[float]]) -> Optional[float]:
  """Median over seeds, a censored seed counting as infinitely many steps.

  None (censored) when the median itself is censored.
  """
  if not values:
    return None
  median = statistics.median(math.inf if v is None else v for v in values)
  return None if math.isinf(median) else float(median)


def mean_se(values: Sequence[float]) -> tuple[float, float]:
  """Mean and standard error (sample std / sqrt(n); 0 for one value)."""
  mean = statistics.fmean(values)
  if len(values) < 2:
    return mean, 0.0
  return mean, statistics.stdev(values) / math.sqrt(len(values))


def tolerance(se_a: float, se_b: float, floor: float) -> float:
  """tau = max(2 standard errors of the difference, ``floor``)."""
  return max(2.0 * math.sqrt(se_a**2 + se_b**2), floor)


def degradation(base_mean: float, mean: float, higher_is_better: bool
                ) -> float:
  """How much worse ``mean`` is than ``base_mean`` (> 0: worse)."""
  return base_mean - mean if higher_is_better else mean - base_mean


def keeps(base: dict[str, float], cell: dict[str, float], floor: float,
          higher_is_better: bool) -> bool:
  """Whether ``cell`` (mean, se) is within tau of ``base`` (or better)."""
  return degradation(base["mean"], cell["mean"], higher_is_better) <= (
      tolerance(base["se"], cell["se"], floor))


def largest_kept_batch(batches: Sequence[int], stats: dict[int, dict],
                       base_stats: dict[str, float], floor: float,
                       higher_is_better: bool) -> int:
  """The largest batch B with every batch <= B within tau of the base."""
  kept = batches[0]
  for batch in batches:
    if not keeps(base_stats, stats[batch], floor, higher_is_better):
      break
    kept = batch
  return kept


def learnability_gate(baseline: float, best: float, floor: float,
                      higher_is_better: bool) -> dict[str, Any]:
  """Whether the best tuned base-batch result beats the trivial baseline.

  The margin is how much better ``best`` is than ``baseline`` (in the
  metric's better direction); the task passes when it is at least
  ``GATE_FACTOR`` tau floors (a margin exactly on the gate passes).
  """
  margin = degradation(best, baseline, higher_is_better)
  required = GATE_FACTOR * floor
  return {"baseline": baseline, "best": best, "margin": margin,
          "required": required, "margin_in_floors": margin / floor,
          "passed": margin >= required * (1 - _REL_EPS)}


def scaling_overhead(steps: Optional[float], base_steps: Optional[float],
                     batch: int, base_batch: int) -> Optional[float]:
  """``steps / (base_steps * base_batch / batch)``: 1 is perfect scaling.

  None when either is censored.
  """
  if steps is None or base_steps is None:
    return None
  return steps * batch / (base_steps * base_batch)


def critical_batch(batches: Sequence[int],
                   steps: dict[int, Optional[float]],
                   overhead: float = CRITICAL_OVERHEAD) -> int:
  """The largest batch B whose steps to target, and every smaller batch's,
  are within ``overhead`` x perfect scaling from the base batch.

  ``steps[B]`` is the median steps to target at B (None: censored). Perfect
  scaling from the base B0 is ``steps[B0] * B0 / B``; a censored batch is
  not within. Returns 0 when the base batch itself is censored (no batch
  reaches the target).
  """
  base = batches[0]
  if steps[base] is None:
    return 0
  kept = base
  for batch in batches[1:]:
    ratio = scaling_overhead(steps[batch], steps[base], batch, base)
    if ratio is None or ratio > overhead * (1 + _REL_EPS):
      break
    kept = batch
  return kept


def _draws(num_seeds: int) -> list[tuple[int, ...]]:
  """Every way to draw ``num_seeds`` seed indices with replacement."""
  return list(itertools.product(range(num_seeds), repeat=num_seeds))


def _resamples(num_selection: int, num_report: int
               ) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
  """(selection draw, report draw) pairs: all of them, or a fixed sample."""
  total = num_selection**num_selection * num_report**num_report
  if total <= EXACT_BOOTSTRAP_LIMIT:
    return list(itertools.product(_draws(num_selection), _draws(num_report)))
  rng = random.Random(0)
  return [(tuple(rng.randrange(num_selection) for _ in range(num_selection)),
           tuple(rng.randrange(num_report) for _ in range(num_report)))
          for _ in range(EXACT_BOOTSTRAP_LIMIT)]


def _quantile(sorted_values: Sequence[int], q: float) -> int:
  """The smallest value whose empirical CDF is at least ``q``."""
  n = len(sorted_values)
  k = max(1, math.ceil(q * n - _REL_EPS * n))
  return sorted_values[min(k, n) - 1]


def select_for_steps(steps_by_lr: dict[float, Sequence[Optional[float]]],
                     finals_by_lr: dict[float, Sequence[float]],
                     higher_is_better: bool) -> float:
  """The rate with the fewest median steps to the target (Shallue et al.).

  ``steps_by_lr[lr]`` holds the selection seeds' steps to the target (None:
  censored, counted as never); the median over them decides. Ties (every
  rate censored, say) go to the better mean final metric
  (``finals_by_lr[lr]``), then to the smaller rate.
  """
  def key(lr):
    steps = [math.inf if v is None else v for v in steps_by_lr[lr]]
    final = statistics.fmean(finals_by_lr[lr])
    return (statistics.median(steps), -final if higher_is_better else final,
            lr)
  return min(steps_by_lr, key=key)


def critical_bound(batch: int, batches: Sequence[int]) -> Optional[str]:
  """``"upper"`` for a critical batch at the grid's smallest batch (the
  truth is that batch or below: printed ``<= B``), ``"lower"`` at its
  largest (``>= B``), None inside (a measured value) or for 0 (none)."""
  if batch == 0:
    return None
  if batch == batches[0]:
    return "upper"
  if batch == batches[-1]:
    return "lower"
  return None


def bootstrap_critical_batch(
    batches: Sequence[int], cells: dict[int, dict[str, Any]],
    higher_is_better: bool, overhead: float = CRITICAL_OVERHEAD,
    level: float = INTERVAL_LEVEL) -> dict[str, Any]:
  """The critical batch, tuned for steps to the target, with an interval
  over the whole pipeline.

  ``cells[B]`` holds, for every rate ``lr`` of batch B's grid,
  ``"select_steps"[lr]`` and ``"select_final"[lr]`` (one value per
  selection seed, in seed order) and ``"report_steps"[lr]`` (one per report
  seed): every seed trains every rate. The estimate chooses each batch's
  rate on the selection seeds (:func:`select_for_steps`), takes the median
  steps over the report seeds at that rate, and reads :func:`critical_batch`
  off the medians. A resample draws the selection seeds and the report
  seeds with replacement (each its own pool; the same draw at every batch)
  and repeats the whole of that, the choice of the rate included. All
  ``nS**nS * nR**nR`` resamples are enumerated up to
  ``EXACT_BOOTSTRAP_LIMIT``; above, that many are drawn with a fixed seed.
  The interval is the central ``level`` of the resamples' critical batches.

  Returns:
    ``{"batch", "interval": [low, high], "resamples": {batch: count},
    "lr": {B: chosen rate}, "median_steps": {B: median or None},
    "censored": bool, "bound": None | "upper" | "lower",
    "interval_bounds": [bound of low, bound of high]}`` (0 = no batch).
  """
  first = cells[batches[0]]
  lrs0 = next(iter(first["select_steps"]))
  num_select = len(first["select_steps"][lrs0])
  num_report = len(first["report_steps"][lrs0])
  for b in batches:
    for key, n in (("select_steps", num_select), ("select_final", num_select),
                   ("report_steps", num_report)):
      if any(len(v) != n for v in cells[b][key].values()):
        raise ValueError("bootstrap_critical_batch needs the same seeds at "
                         "every batch and rate.")

  def estimate(select_draw, report_draw):
    chosen, medians = {}, {}
    for b in batches:
      c = cells[b]
      lr = select_for_steps(
          {r: [v[i] for i in select_draw] for r, v in c["select_steps"].items()},
          {r: [v[i] for i in select_draw] for r, v in c["select_final"].items()},
          higher_is_better)
      chosen[b] = lr
      medians[b] = median_steps([c["report_steps"][lr][i]
                                 for i in report_draw])
    return chosen, medians

  chosen, medians = estimate(tuple(range(num_select)),
                             tuple(range(num_report)))
  point = critical_batch(batches, medians, overhead)
  values = []
  memo: dict = {}
  for draw in _resamples(num_select, num_report):
    key = (tuple(sorted(draw[0])), tuple(sorted(draw[1])))
    if key not in memo:  # The estimate depends on the multisets only.
      memo[key] = critical_batch(batches, estimate(*draw)[1], overhead)
    values.append(memo[key])
  values.sort()
  counts = {}
  for v in values:
    counts[v] = counts.get(v, 0) + 1
  interval = [_quantile(values, (1 - level) / 2),
              _quantile(values, (1 + level) / 2)]
  bound = critical_bound(point, batches)
  return {"batch": point, "interval": interval, "resamples": counts,
          "lr": chosen, "median_steps": medians,
          "censored": bound is not None, "bound": bound,
          "interval_bounds": [critical_bound(v, batches) for v in interval]}


def interval_order(a: Sequence[int], b: Sequence[int]) -> str:
  """``"above"`` when interval a lies entirely above b, ``"below"`` when
  entirely below, else ``"overlaps"``."""
  if a[0] > b[1]:
    return "above"
  if a[1] < b[0]:
    return "below"
  return "overlaps"


def task_verdict(summary: dict[str, Any]) -> dict[str, Any]:
  """The verdict of one task from its aggregated cells (README's rule).

  ``summary`` has ``batches`` (ascending, the first is the base),
  ``higher_is_better``, ``tolerance_floor``, ``cells[arm][opt][batch]`` =
  ``{"mean", "se"}`` for arms ``"tuned"`` and ``"transfer"``, ``gate`` (from
  :func:`learnability_gate`) and ``critical[opt]`` = ``{"batch",
  "interval"}`` (from :func:`bootstrap_critical_batch`, tuned arm).

  Returns:
    ``{"verdict", "largest_kept", "lamb_wins", "reasons"}``; ``lamb_wins``
    holds the three criteria: ``"tuned"`` and ``"transfer"`` (at the fixed
    budget) and ``"critical_batch"``.
  """
  batches = list(summary["batches"])
  base = batches[0]
  higher = summary["higher_is_better"]
  floor = summary["tolerance_floor"]
  cells = summary["cells"]
  gate = summary["gate"]
  critical = summary["critical"]
  optimizers = list(cells["tuned"])
  batches_of = summary.get("optimizer_batches") or {
      o: batches for o in optimizers}
  largest = {arm: {} for arm in ("tuned", "transfer")}
  for arm in largest:
    for opt in optimizers:
      largest[arm][opt] = largest_kept_batch(
          batches_of[opt], cells[arm][opt], cells["tuned"][opt][base], floor,
          higher)
  baseline_label = gate.get("baseline_label", "the baseline")
  reasons = [
      f"gate: the best tuned base-batch result {gate['best']:.4g} beats "
      f"{baseline_label} {gate['baseline']:.4g} by {gate['margin']:.4g} "
      f"({gate['margin_in_floors']:.1f} tau floors; needs {GATE_FACTOR}): "
      + ("passed." if gate["passed"] else "failed.")]
  wins = {"tuned": False, "transfer": False, "critical_batch": False}
  testable = [b for b in batches if b >= UNTESTABLE_RATIO * base]
  missing = [o for o in ("lamb",) + PAPER_BASELINES if o not in optimizers]
  if not missing:
    # The largest batch that LAMB and both baselines trained.
    top = max(set.intersection(*(set(batches_of[o]) for o in
                                 ("lamb",) + PAPER_BASELINES)))
    for arm in ("tuned", "transfer"):
      lamb_kept = largest[arm]["lamb"]
      wider = all(lamb_kept > largest[arm][o] for o in PAPER_BASELINES)
      lamb_top = cells[arm]["lamb"][top]
      not_worse = all(
          degradation(cells[arm][o][top]["mean"], lamb_top["mean"], higher)
          <= tolerance(cells[arm][o][top]["se"], lamb_top["se"], floor)
          for o in PAPER_BASELINES)
      wins[arm] = wider and not_worse
      reasons.append(
          f"{arm}: LAMB within tau of its base up to batch {lamb_kept}; "
          + ", ".join(f"{o} up to {largest[arm][o]}" for o in PAPER_BASELINES)
          + f"; at batch {top} LAMB is "
          + ("not worse than" if not_worse else "worse than")
          + " " + " and ".join(PAPER_BASELINES) + " by more than tau.")
    lamb = critical["lamb"]
    above = [o for o in PAPER_BASELINES
             if lamb["batch"] > critical[o]["batch"]
             and interval_order(lamb["interval"], critical[o]["interval"])
             == "above"]
    wins["critical_batch"] = len(above) == len(PAPER_BASELINES)
    reasons.append(
        f"critical batch (steps to target within {CRITICAL_OVERHEAD}x of "
        f"perfect scaling; {INTERVAL_LEVEL:.0%} bootstrap interval over the "
        "whole pipeline): "
        + ", ".join(f"{o} {critical_text(critical[o])}"
                    for o in ("lamb",) + PAPER_BASELINES)
        + "; LAMB's is " + ("" if wins["critical_batch"] else "not ")
        + "above both with a disjoint interval.")
  if not gate["passed"]:
    verdict = "uninformative"
    reasons.append(f"the task does not beat {baseline_label} by "
                   f"{GATE_FACTOR} tau floors: it says nothing about the "
                   "optimizers, and the overall verdict leaves it out.")
  elif missing:
    verdict = "untestable"
    reasons.append(f"the claim needs {', '.join(missing)} in the study.")
  elif not testable:
    verdict = "untestable"
    reasons.append(f"no batch is {UNTESTABLE_RATIO}x the base batch {base}.")
  elif all(largest["tuned"][o] < testable[0] for o in optimizers):
    verdict = "untestable"
    reasons.append(
        f"every optimizer, tuned, degrades by batch {testable[0]} "
        f"(<= {UNTESTABLE_RATIO}x the base {base}).")
  elif wins["tuned"] and wins["critical_batch"]:
    verdict = "reproduced"
  elif any(wins.values()):
    verdict = "partial"
  else:
    verdict = "fails"
  return {"verdict": verdict, "largest_kept": largest, "lamb_wins": wins,
          "reasons": reasons}


def bound_text(batch: int, bound: Optional[str]) -> str:
  """``128``, ``<= 16`` (at the grid's smallest batch), ``>= 512`` (at its
  largest) or ``none`` (0: the base batch never reaches the target)."""
  if batch == 0:
    return "none"
  return {"upper": "<= ", "lower": ">= ", None: ""}[bound] + str(batch)


def critical_text(critical: dict[str, Any]) -> str:
  """``128 [64, 256]``, ``<= 16 [<= 16, 32]``: a value at a grid edge is a
  bound, never printed as a measurement."""
  low, high = critical["interval"]
  lb, hb = critical["interval_bounds"]
  return (f"{bound_text(critical['batch'], critical['bound'])} "
          f"[{bound_text(low, lb)}, {bound_text(high, hb)}]")


def nado_reading(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
  """Nado et al.'s check: every other optimizer against LAMB, tuned.

  ``{optimizer: {"final": "beats" | "matches" | "loses to", "batch": B,
  "critical_batch": "above" | "overlaps" | "below"}}``: the final metric at
  the largest batch both trained, by tau, and the critical batch's interval
  against LAMB's.
  """
  higher = summary["higher_is_better"]
  floor = summary["tolerance_floor"]
  tuned = summary["cells"]["tuned"]
  critical = summary["critical"]
  if "lamb" not in tuned:
    return {}
  out = {}
  for opt, cells in tuned.items():
    if opt == "lamb":
      continue
    top = max(set(cells) & set(tuned["lamb"]))
    lamb = tuned["lamb"][top]
    other = cells[top]
    tau = tolerance(lamb["se"], other["se"], floor)
    gap = degradation(lamb["mean"], other["mean"], higher)  # > 0: other worse
    out[opt] = {
        "final": ("loses to" if gap > tau else
                  "beats" if gap < -tau else "matches"), "batch": top,
        "critical_batch": interval_order(critical[opt]["interval"],
                                         critical["lamb"]["interval"])}
  return out


def nado_text(reading: dict[str, dict[str, str]]) -> str:
  """One line: ``adamw matches LAMB (critical batch overlaps); ...``."""
  return "; ".join(
      f"{o} {r['final']} LAMB at batch {r.get('batch', 'the largest')}, "
      "critical batch "
      f"{r['critical_batch']} LAMB's" for o, r in reading.items())


def overall_verdict(verdicts: dict[str, str]) -> str:
  """Across tasks: the common verdict of the tasks that test the claim (not
  ``untestable``, not ``uninformative``), else ``"mixed"``."""
  testable = {v for v in verdicts.values()
              if v not in ("untestable", "uninformative")}
  if not testable:
    return "untestable"
  if len(testable) == 1:
    return testable.pop()
  return "mixed"


def verdict_basis(verdicts: dict[str, str]) -> str:
  """What the overall verdict rests on, in one sentence."""
  used = [t for t, v in verdicts.items()
          if v not in ("untestable", "uninformative")]
  left = [f"{t} ({v})" for t, v in verdicts.items() if t not in used]
  text = ("rests on " + " and ".join(used) if used
          else "rests on no task")
  if left:
    text += "; left out: " + ", ".join(left)
  return text + "."


# The gradient noise scale beside the critical batch (README.md, "Gradient
# noise scale"): B_simple "predicts" an optimizer's critical batch when it
# lies within this factor of the critical batch's interval (one grid step
# of 2 each side; an end at a grid edge is open).
NOISE_AGREEMENT_FACTOR = 2.0


def log_interpolate(steps: Sequence[float], values: Sequence[float],
                    step: float) -> float:
  """``values`` at ``step``, linear in log(value) between the two
  checkpoints around it (the nearest one outside their range).

  A value that is not finite and positive (B_simple is inf where the sample
  cannot resolve |G|) is not interpolated: the neighbour that is finite is
  taken, inf when neither is.
  """
  def ok(v):
    return math.isfinite(v) and v > 0
  if step <= steps[0]:
    return values[0]
  if step >= steps[-1]:
    return values[-1]
  k = next(i for i, s in enumerate(steps) if s >= step)
  a, b = values[k - 1], values[k]
  if ok(a) and ok(b):
    t = (step - steps[k - 1]) / (steps[k] - steps[k - 1])
    return math.exp(math.log(a) + t * (math.log(b) - math.log(a)))
  if ok(a) or ok(b):
    return a if ok(a) else b
  return math.inf


def noise_agreement(b_simple: Optional[float],
                    critical: dict[str, Any]) -> Optional[bool]:
  """Whether B_simple lies within ``NOISE_AGREEMENT_FACTOR`` of the
  critical batch's interval (None when either is unmeasured, or when the
  interval runs from the smallest batch to the largest: it excludes no
  value)."""
  if b_simple is None or critical["batch"] == 0 or not math.isfinite(
      b_simple):
    return None
  (low, high), (low_bound, high_bound) = (critical["interval"],
                                          critical["interval_bounds"])
  if low_bound == "upper" and high_bound == "lower":
    return None  # The interval spans every batch: nothing to agree with.
  above_low = low_bound == "upper" or b_simple >= low / NOISE_AGREEMENT_FACTOR
  below_high = (high_bound == "lower"
                or b_simple <= high * NOISE_AGREEMENT_FACTOR)
  return above_low and below_high


# LAMB's relation between B_simple and the critical batch "differs" from
# AdamW's when one agrees and the other does not, or when their ratios
# C / B_simple differ by more than this factor (two grid steps).
NOISE_RELATION_FACTOR = 4.0


def noise_relation(lamb: dict[str, Any], adamw: dict[str, Any]
                   ) -> dict[str, Any]:
  """Whether LAMB's B_simple-to-critical-batch relation differs from
  AdamW's (README.md, "Gradient noise scale").

  ``lamb`` and ``adamw`` are a task summary's ``noise[optimizer]`` entries
  (``agrees`` and ``ratio`` = C / B_simple at the target crossing).
  ``differs`` is None when either reading is missing.
  """
  ratios = (lamb.get("ratio"), adamw.get("ratio"))
  agree = (lamb.get("agrees"), adamw.get("agrees"))
  if None in ratios or None in agree:
    return {"differs": None, "ratio_of_ratios": None}
  factor = ratios[0] / ratios[1]
  differs = (agree[0] != agree[1]
             or max(factor, 1 / factor) > NOISE_RELATION_FACTOR)
  return {"differs": differs, "ratio_of_ratios": factor}


def lands_inside(rerun: dict[str, Any], reference: dict[str, Any]) -> bool:
  """The pre-registered reproducibility check for one optimizer: whether
  the rerun's critical batch lies inside the reference run's interval.

  Bounds compare as their numbers: the grid is the same in both runs, so a
  rerun's ``<= 16`` lies inside an interval that starts at ``<= 16``, and
  outside one that starts at 32.
  """
  low, high = reference["interval"]
  return low <= rerun["batch"] <= high
