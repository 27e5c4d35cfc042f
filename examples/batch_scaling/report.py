"""The study's text: the printed verdict and ``results.md``.

Both are functions of the summary alone (no timings), so that a rerun, or
:func:`study.rebuild_outputs` on the same cells, writes the same bytes.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Callable, Optional, Sequence

import analysis


def verdict_text(summary: dict[str, Any]) -> str:
  """The verdict, per task with its reasons, as the study prints it."""
  lines = [f"VERDICT: {summary['verdict']} ({summary['verdict_basis']})"]
  for name, task in summary["tasks"].items():
    lines.append(f"  {name}: {task['verdict']}")
    for reason in task["reasons"]:
      lines.append(f"    - {reason}")
    if task["nado"]:
      lines.append("    - Nado et al. check (tuned): "
                   + analysis.nado_text(task["nado"]))
  return "\n".join(lines)


def _markdown_table(batches: Sequence[int], opts: Sequence[str],
                    cell: Callable[[str, int], str],
                    steps: Optional[Callable[[int], str]] = None
                    ) -> list[str]:
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


def _batch(b: int) -> str:
  return "none" if b == 0 else str(b)


def _beta2_text(task: dict[str, Any]) -> str:
  by_batch = task["beta2"]["by_batch"]
  if not by_batch:
    return ""
  return (f" beta2 of LAMB, AdamW and Muon's AdamW fallback "
          f"({task['beta2']['rule']}): "
          + ", ".join(f"{b2:.4g} at {b}" for b, b2 in by_batch.items()) + ".")


def _missing(cell: Callable[[str, int], str], task: dict[str, Any]
             ) -> Callable[[str, int], str]:
  """``cell``, or an em dash where the optimizer does not train the batch."""
  def wrapped(o, b):
    return cell(o, b) if b in task["optimizer_batches"][o] else "—"
  return wrapped


def _number(value: Optional[float]) -> str:
  if value is None:
    return "censored"
  if math.isinf(value):
    return "> n"
  return f"{value:.3g}"


def _task_markdown(name: str, task: dict[str, Any], config,
                   figures: Sequence[str]) -> list[str]:
  metric = task["metric"]
  batches = task["batches"]
  opts = list(task["cells"]["tuned"])
  higher = task["higher_is_better"]
  gate = task["gate"]
  del config
  num_select, num_report = (len(task["selection_seeds"]),
                            len(task["report_seeds"]))
  out = [f"## {name}: {task['verdict']}", ""]
  out += [f"- {r}" for r in task["reasons"]]
  if task["nado"]:
    out.append("- Nado et al. check (tuned): "
               + analysis.nado_text(task["nado"]) + ".")
  baselines = "; ".join(
      f"{n}, {b['description']}: {metric} {b[metric]:.4f}"
      + "".join(f", {k} {v:.4f}" for k, v in sorted(b.items())
                if k not in (metric, "description"))
      for n, b in task["baselines"].items())
  out += [
      "",
      f"**Learnability gate.** Trivial baselines: {baselines}. The gate "
      f"uses the strongest, the {gate['baseline_name']} ({metric} "
      f"{gate['baseline']:.4f}). Best tuned base-batch {metric}: "
      f"{gate['best']:.4f} ({task['best_base']['optimizer']}). Margin "
      f"{gate['margin']:.4f} = {gate['margin_in_floors']:.1f} tau floors (the "
      f"gate needs {analysis.GATE_FACTOR}): "
      f"{'passed' if gate['passed'] else 'failed: the task is uninformative'}.",
      "",
      f"Held-out {metric} ({'higher' if higher else 'lower'} is better) at "
      f"the fixed budget of {task['budget_examples']:,} examples, mean ± "
      f"standard error over {num_report} report seeds; the peak learning "
      f"rate in brackets; — where the optimizer does not train the batch. "
      f"Warmup: {task['warmup_steps']} steps at every batch (LEGW). tau "
      f"floor {task['tolerance_floor']}." + _beta2_text(task),
      ""]
  for arm in ("tuned", "transfer"):
    def final(o, b, arm=arm):
      s = task["cells"][arm][o][b]
      div = f", {s['diverged']} diverged" if s["diverged"] else ""
      return (f"{s['mean']:.3f} ± {s['se']:.3f} ({s['lr']:.3g}{div})")

    out += [f"**{arm}**" + (" (the base batch's rate for steps x "
                            "sqrt(B/B0), no tuning)"
                            if arm == "transfer" else
                            " (best of the grid by the selection-seed mean "
                            "final metric)"),
            ""]
    out += _markdown_table(batches, opts, _missing(final, task),
                           steps=lambda b: str(task["steps"][b]))
    out.append("")
  level = f"{analysis.INTERVAL_LEVEL:.0%}"
  resamples = min(num_select**num_select * num_report**num_report,
                  analysis.EXACT_BOOTSTRAP_LIMIT)
  out += [f"**Critical batch** (each batch's rate chosen for the median "
          f"steps to the target on the {num_select} selection seeds; the "
          "largest batch up to which the report seeds' median steps to "
          f"target stay within {analysis.CRITICAL_OVERHEAD}x of perfect "
          f"scaling from the base batch; {level} bootstrap interval over "
          f"the whole pipeline: {resamples:,} resamples of the selection "
          "and the report seeds, the rate chosen again in each; `<= B`, "
          "`>= B`: at an edge of the optimizer's batches, a bound; `none`: "
          "the base batch never reaches the target)",
          "",
          "| optimizer | critical batch | interval | median steps to target "
          f"at {batches[0]} |",
          "|---|---|---|---|"]
  for o in opts:
    c = task["critical"][o]
    base_steps = task["cells"]["steps"][o][batches[0]][
        "median_steps_to_target"]
    low, high = c["interval"]
    lb, hb = c["interval_bounds"]
    out.append(f"| {o} | {analysis.bound_text(c['batch'], c['bound'])} | "
               f"[{analysis.bound_text(low, lb)}, "
               f"{analysis.bound_text(high, hb)}] | "
               + ("censored" if base_steps is None else f"{base_steps:.0f}")
               + " |")
  sign = ">=" if higher else "<="
  out += ["",
          f"**Steps to target** ({metric} {sign} {task['target']:.4g}, "
          "fixed before the run from the base batch alone: README.md, "
          "\"Protocol\"; a run's first crossing, interpolated between "
          "evaluations; median over the report seeds, a censored seed "
          "counting as never; `censored` when the median never reaches it; "
          "in brackets the overhead over perfect scaling from the base and "
          "the rate; tuned for steps / transfer)", ""]

  def steps_to_target(o, b):
    parts = []
    for arm in ("steps", "transfer"):
      s = task["cells"][arm][o][b]
      m = s["median_steps_to_target"]
      n_cens = sum(v is None for v in s["steps_to_target"])
      text = "censored" if m is None else f"{m:.0f}"
      if arm == "steps":
        if s["scaling_overhead"] is not None:
          text += f" ({s['scaling_overhead']:.2f}x, {s['lr']:.3g})"
        else:
          text += f" ({s['lr']:.3g})"
      if n_cens and m is not None:
        text += f" ({n_cens} censored)"
      parts.append(text)
    return " / ".join(parts)

  def budget(o, b):
    i = task["cell_info"][o][b]
    return (f"{i['grid_trials']} + {i['extensions']} ext"
            + (" !" if i["edge_unresolved"] else ""))

  out += _markdown_table(batches, opts, _missing(steps_to_target, task))
  out += _noise_markdown(task, opts)
  out += ["", f"**Tuning budget** (trials per cell: the grid on every seed, "
          f"{num_select} selection + {num_report} report, + edge "
          "extensions of one rate each, again on every seed; `!` = a best "
          "rate still on an edge after the last extension)", ""]
  out += _markdown_table(batches, opts, _missing(budget, task))
  total_ext = sum(task["cell_info"][o][b]["extensions"]
                  for o in opts for b in task["optimizer_batches"][o])
  out += ["", "Edge extensions in all: " + ", ".join(
      f"{o} {sum(task['cell_info'][o][b]['extensions'] for b in task['optimizer_batches'][o])}"
      for o in opts) + f" (total {total_ext}).", ""]
  for path in figures:
    out.append(f"![{os.path.basename(path)}]({os.path.basename(path)})")
  out.append("")
  return out


def _noise_markdown(task: dict[str, Any], opts: Sequence[str]) -> list[str]:
  """The gradient noise scale beside the critical batch."""
  noise = task.get("noise") or {}
  opts = [o for o in opts if noise.get(o)]
  if not opts:
    return []
  steps = noise[opts[0]]["curve"]["step"]
  total = steps[-1]
  marks = [i for i, s in enumerate(steps)
           if s in (steps[0], steps[len(steps) // 4], steps[len(steps) // 2],
                    total)]
  out = ["", "**Gradient noise scale** (B_simple = tr(Sigma)/|G|^2 "
         "(McCandlish et al., 2018) from per-example gradients on a fixed "
         "held-in sample, along the base-batch runs at the rate chosen for "
         "steps; median over the report seeds; at the target crossing "
         "interpolated in log between the checkpoints around it; `> n`: "
         "the sample cannot resolve |G|. *Agrees*: B_simple at the crossing "
         f"within {analysis.NOISE_AGREEMENT_FACTOR:g}x of the critical "
         "batch's interval)", "",
         "| optimizer | rate | " + " | ".join(
             f"B_simple at step {steps[i]}" for i in marks)
         + " | at the target crossing (step) | critical batch [interval] "
         "| critical / B_simple | agrees |",
         "|---|---|" + "---|" * len(marks) + "---|---|---|---|"]
  for o in opts:
    n = noise[o]
    crossing = [s for s in n["crossing_steps"] if s is not None]
    step_text = (f"{statistics.median(crossing):.0f}" if crossing
                 else "never")
    ratio = "—" if n["ratio"] is None else f"{n['ratio']:.2g}"
    agrees = {None: "—", True: "yes", False: "no"}[n["agrees"]]
    out.append(
        f"| {o} | {n['lr']:.3g} | "
        + " | ".join(_number(n["curve"]["b_simple"][i]) for i in marks)
        + f" | {_number(n['at_target'])} ({step_text}) | "
        + analysis.critical_text(task["critical"][o])
        + f" | {ratio} | {agrees} |")
  relation = task.get("noise_relation")
  if relation and relation["differs"] is not None:
    out += ["", "LAMB's relation between B_simple and its critical batch "
            + ("differs from" if relation["differs"] else "does not differ "
               "from")
            + " AdamW's (their ratios C / B_simple differ by a factor "
            f"{relation['ratio_of_ratios']:.2g}; the rule: README.md, "
            "\"Gradient noise scale\")."]
  return out


def results_markdown(config, summary: dict[str, Any],
                     figures: dict[str, list[str]]) -> str:
  """The tables of results.md (deterministic: no timings)."""
  out = ["# Batch-scaling study: results", "",
         f"**Verdict: {summary['verdict']}**, {summary['verdict_basis']} "
         "(rule: examples/batch_scaling/README.md).", ""]
  for name, task in summary["tasks"].items():
    out += _task_markdown(name, task, config, figures[name])
  return "\n".join(out)
