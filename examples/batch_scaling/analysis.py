"""The study's arithmetic: grids, selection, censoring, aggregation, verdict.

Pure Python on numbers (no JAX), so that every rule of the protocol in
README.md is a function with a unit test. Metrics are compared through
``higher_is_better``: accuracy (higher) or loss (lower).
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Optional, Sequence

VERDICTS = ("reproduced", "partial", "fails", "untestable")
# The optimizers the paper's claim is about (LAMB against these two), and
# the batch ratio at which "every optimizer degrades" makes a task
# untestable.
PAPER_BASELINES = ("adamw", "lars")
UNTESTABLE_RATIO = 8


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


def transfer_lr(base_lr: float, base_batch: int, batch: int) -> float:
  """LEGW's square-root rule (the paper's Table 4): ``lr * sqrt(B / B0)``."""
  return base_lr * math.sqrt(batch / base_batch)


def steps_to_target(curve: dict[str, list[float]], metric: str,
                    target: float, higher_is_better: bool
                    ) -> Optional[int]:
  """The first evaluated step whose metric reaches ``target``; None: censored."""
  for step, value in zip(curve["step"], curve[metric]):
    if math.isfinite(value) and (value >= target if higher_is_better
                                 else value <= target):
      return step
  return None


def median_steps(values: Sequence[Optional[int]]) -> Optional[float]:
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


def target_value(base_means: dict[str, float], slack: float,
                 higher_is_better: bool) -> float:
  """The steps-to-target target: the worst tuned base-batch mean, eased by
  ``slack`` (so that every optimizer reaches it at the base batch)."""
  if higher_is_better:
    return min(base_means.values()) - slack
  return max(base_means.values()) + slack


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


def task_verdict(summary: dict[str, Any]) -> dict[str, Any]:
  """The verdict of one task from its aggregated cells (README's rule).

  ``summary`` has ``batches`` (ascending, the first is the base),
  ``higher_is_better``, ``tolerance_floor`` and ``cells[arm][opt][batch]``
  = ``{"mean", "se"}`` for arms ``"tuned"`` and ``"transfer"``.

  Returns:
    ``{"verdict", "largest_kept", "lamb_wins", "reasons"}``.
  """
  batches = list(summary["batches"])
  base = batches[0]
  higher = summary["higher_is_better"]
  floor = summary["tolerance_floor"]
  cells = summary["cells"]
  optimizers = list(cells["tuned"])
  largest = {arm: {} for arm in ("tuned", "transfer")}
  for arm in largest:
    for opt in optimizers:
      largest[arm][opt] = largest_kept_batch(
          batches, cells[arm][opt], cells["tuned"][opt][base], floor, higher)
  reasons = []
  wins = {}
  testable = [b for b in batches if b >= UNTESTABLE_RATIO * base]
  missing = [o for o in ("lamb",) + PAPER_BASELINES if o not in optimizers]
  for arm in ("tuned", "transfer"):
    if missing:
      wins[arm] = False
      continue
    lamb_kept = largest[arm]["lamb"]
    wider = all(lamb_kept > largest[arm][o] for o in PAPER_BASELINES)
    top = batches[-1]
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
  if missing:
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
  elif wins["tuned"]:
    verdict = "reproduced"
  elif wins["transfer"]:
    verdict = "partial"
  else:
    verdict = "fails"
  return {"verdict": verdict, "largest_kept": largest, "lamb_wins": wins,
          "reasons": reasons}


def nado_reading(summary: dict[str, Any]) -> dict[str, str]:
  """Nado et al.'s check: at the largest batch, tuned, against LAMB.

  ``{optimizer: "beats" | "matches" | "loses to"}`` for every optimizer
  other than LAMB, by tau.
  """
  top = summary["batches"][-1]
  higher = summary["higher_is_better"]
  floor = summary["tolerance_floor"]
  tuned = summary["cells"]["tuned"]
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
    out[opt] = ("loses to" if gap > tau else
                "beats" if gap < -tau else "matches")
  return out


def overall_verdict(verdicts: dict[str, str]) -> str:
  """Across tasks: the common verdict of the testable tasks, else "mixed"."""
  testable = {v for v in verdicts.values() if v != "untestable"}
  if not testable:
    return "untestable"
  if len(testable) == 1:
    return testable.pop()
  return "mixed"
