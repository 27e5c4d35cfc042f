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

VERDICTS = ("reproduced", "partial", "fails", "untestable")
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


def target_eval_index(num_evals: int, fraction: float) -> int:
  """The 0-based index of the evaluation at ``fraction`` of the budget.

  The evaluations fall at ``1/num_evals, 2/num_evals, ..., 1`` of the run;
  this is the one nearest ``fraction`` (at least the first).
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"`target_fraction` must be in (0, 1], got {fraction!r}.")
  return max(1, round(fraction * num_evals)) - 1


def mid_budget_target(values: dict[str, float], higher_is_better: bool
                      ) -> float:
  """The steps-to-target target from the base batch.

  ``values[optimizer]`` is the tuned base-batch metric (the median over the
  report seeds, so that one diverged seed does not move it) at the
  evaluation of :func:`target_eval_index`; the target is the worst of them,
  so that every optimizer reaches it at the base batch by that point of its
  budget (and the slowest at about that point).
  """
  if higher_is_better:
    return min(values.values())
  return max(values.values())


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


def _resamples(num_seeds: int):
  """Index tuples of the seed bootstrap: all of them, or a fixed sample."""
  if num_seeds**num_seeds <= EXACT_BOOTSTRAP_LIMIT:
    return list(itertools.product(range(num_seeds), repeat=num_seeds))
  rng = random.Random(0)
  return [tuple(rng.randrange(num_seeds) for _ in range(num_seeds))
          for _ in range(EXACT_BOOTSTRAP_LIMIT)]


def _quantile(sorted_values: Sequence[int], q: float) -> int:
  """The smallest value whose empirical CDF is at least ``q``."""
  n = len(sorted_values)
  k = max(1, math.ceil(q * n - _REL_EPS * n))
  return sorted_values[min(k, n) - 1]


def bootstrap_critical_batch(
    batches: Sequence[int],
    steps_by_seed: dict[int, Sequence[Optional[float]]],
    overhead: float = CRITICAL_OVERHEAD,
    level: float = INTERVAL_LEVEL) -> dict[str, Any]:
  """The critical batch with its seed-bootstrap interval.

  ``steps_by_seed[B][i]`` is the steps to target of report seed i at batch
  B (None: censored), the same seeds at every batch. A resample draws n
  seed indices with replacement (n = the number of seeds) and uses those
  seeds at every batch: its critical batch is :func:`critical_batch` of the
  per-batch medians over the drawn seeds. The interval is the central
  ``level`` of the resamples' critical batches (the smallest value whose
  empirical CDF reaches (1 - level) / 2, and (1 + level) / 2).

  Returns:
    ``{"batch": the critical batch of the medians over all seeds,
    "interval": [low, high], "resamples": {batch: count}}`` (0 = no batch).
  """
  num_seeds = len(steps_by_seed[batches[0]])
  if any(len(steps_by_seed[b]) != num_seeds for b in batches):
    raise ValueError("bootstrap_critical_batch needs the same seeds at every "
                     "batch.")
  point = critical_batch(
      batches, {b: median_steps(steps_by_seed[b]) for b in batches}, overhead)
  values = []
  for draw in _resamples(num_seeds):
    medians = {b: median_steps([steps_by_seed[b][i] for i in draw])
               for b in batches}
    values.append(critical_batch(batches, medians, overhead))
  values.sort()
  counts = {}
  for v in values:
    counts[v] = counts.get(v, 0) + 1
  return {"batch": point,
          "interval": [_quantile(values, (1 - level) / 2),
                       _quantile(values, (1 + level) / 2)],
          "resamples": counts}


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
  largest = {arm: {} for arm in ("tuned", "transfer")}
  for arm in largest:
    for opt in optimizers:
      largest[arm][opt] = largest_kept_batch(
          batches, cells[arm][opt], cells["tuned"][opt][base], floor, higher)
  reasons = [
      f"gate: the best tuned base-batch result {gate['best']:.4g} beats the "
      f"baseline {gate['baseline']:.4g} by {gate['margin']:.4g} "
      f"({gate['margin_in_floors']:.1f} tau floors; needs {GATE_FACTOR}): "
      + ("passed." if gate["passed"] else "failed.")]
  wins = {"tuned": False, "transfer": False, "critical_batch": False}
  testable = [b for b in batches if b >= UNTESTABLE_RATIO * base]
  missing = [o for o in ("lamb",) + PAPER_BASELINES if o not in optimizers]
  if not missing:
    top = batches[-1]
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
        f"perfect scaling; {INTERVAL_LEVEL:.0%} seed-bootstrap interval): "
        + ", ".join(f"{o} {_batch_text(critical[o])}"
                    for o in ("lamb",) + PAPER_BASELINES)
        + "; LAMB's is " + ("" if wins["critical_batch"] else "not ")
        + "above both with a disjoint interval.")
  if not gate["passed"]:
    verdict = "untestable"
    reasons.append("the task fails the learnability gate: it says nothing "
                   "about the optimizers.")
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


def _batch_text(critical: dict[str, Any]) -> str:
  """``128 [64, 256]`` (``none`` for 0: the base batch is censored)."""
  def text(b):
    return "none" if b == 0 else str(b)
  low, high = critical["interval"]
  return f"{text(critical['batch'])} [{text(low)}, {text(high)}]"


def nado_reading(summary: dict[str, Any]) -> dict[str, dict[str, str]]:
  """Nado et al.'s check: every other optimizer against LAMB, tuned.

  ``{optimizer: {"final": "beats" | "matches" | "loses to",
  "critical_batch": "above" | "overlaps" | "below"}}``: the final metric at
  the largest batch, by tau, and the critical batch's interval against
  LAMB's.
  """
  top = summary["batches"][-1]
  higher = summary["higher_is_better"]
  floor = summary["tolerance_floor"]
  tuned = summary["cells"]["tuned"]
  critical = summary["critical"]
  if "lamb" not in tuned:
    return {}
  lamb = tuned["lamb"][top]
  out = {}
  for opt, cells in tuned.items():
    if opt == "lamb":
      continue
    other = cells[top]
    tau = tolerance(lamb["se"], other["se"], floor)
    gap = degradation(lamb["mean"], other["mean"], higher)  # > 0: other worse
    out[opt] = {
        "final": ("loses to" if gap > tau else
                  "beats" if gap < -tau else "matches"),
        "critical_batch": interval_order(critical[opt]["interval"],
                                         critical["lamb"]["interval"])}
  return out


def nado_text(reading: dict[str, dict[str, str]]) -> str:
  """One line: ``adamw matches LAMB (critical batch overlaps); ...``."""
  return "; ".join(
      f"{o} {r['final']} LAMB at the largest batch, critical batch "
      f"{r['critical_batch']} LAMB's" for o, r in reading.items())


def overall_verdict(verdicts: dict[str, str]) -> str:
  """Across tasks: the common verdict of the testable tasks, else "mixed"."""
  testable = {v for v in verdicts.values() if v != "untestable"}
  if not testable:
    return "untestable"
  if len(testable) == 1:
    return testable.pop()
  return "mixed"
