"""The study's text: the printed verdict and ``results.md``.

Both are functions of the summary alone (no timings), so that a rerun, or
:func:`study.rebuild_outputs` on the same cells, writes the same bytes.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import analysis


def verdict_text(summary: dict[str, Any]) -> str:
  """The verdict, per task with its reasons, as the study prints it."""
  lines = [f"VERDICT: {summary['verdict']}"]
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


def _task_markdown(name: str, task: dict[str, Any], num_seeds: int,
                   figures: Sequence[str]) -> list[str]:
  metric = task["metric"]
  batches = task["batches"]
  opts = list(task["cells"]["tuned"])
  higher = task["higher_is_better"]
  gate = task["gate"]
  out = [f"## {name}: {task['verdict']}", ""]
  out += [f"- {r}" for r in task["reasons"]]
  if task["nado"]:
    out.append("- Nado et al. check (tuned): "
               + analysis.nado_text(task["nado"]) + ".")
  out += [
      "",
      f"**Learnability gate.** Baseline, {task['baseline_name']}: "
      f"{metric} {gate['baseline']:.4f}"
      + "".join(f"; {k} {v:.4f}" for k, v in sorted(task["baselines"].items())
                if k != metric)
      + f". Best tuned base-batch {metric}: {gate['best']:.4f} "
      f"({task['best_base']['optimizer']}). Margin {gate['margin']:.4f} = "
      f"{gate['margin_in_floors']:.1f} tau floors (the gate needs "
      f"{analysis.GATE_FACTOR}): {'passed' if gate['passed'] else 'failed'}.",
      "",
      f"Held-out {metric} ({'higher' if higher else 'lower'} is better) at "
      f"the fixed budget of {task['budget_examples']:,} examples, mean ± "
      f"standard error over {num_seeds} fresh seeds; the peak learning rate "
      f"in brackets. Warmup: {task['warmup_steps']} steps at every batch "
      f"(LEGW). tau floor {task['tolerance_floor']}." + _beta2_text(task),
      ""]
  for arm in ("tuned", "transfer"):
    def final(o, b, arm=arm):
      s = task["cells"][arm][o][b]
      div = f", {s['diverged']} diverged" if s["diverged"] else ""
      return (f"{s['mean']:.3f} ± {s['se']:.3f} ({s['lr']:.3g}{div})")

    out += [f"**{arm}**" + (" (base best x sqrt(B/B0), no tuning)"
                            if arm == "transfer" else
                            " (best of the grid by the selection-seed mean)"),
            ""]
    out += _markdown_table(batches, opts, final,
                           steps=lambda b: str(task["steps"][b]))
    out.append("")
  level = f"{analysis.INTERVAL_LEVEL:.0%}"
  out += [f"**Critical batch** (tuned: the largest batch up to which the "
          f"median steps to target stay within "
          f"{analysis.CRITICAL_OVERHEAD}x of perfect scaling from the base "
          f"batch; {level} seed-bootstrap interval over the {num_seeds} "
          "report seeds; `none`: the base batch never reaches the target)",
          "",
          "| optimizer | critical batch | interval | median steps to target "
          f"at {batches[0]} |",
          "|---|---|---|---|"]
  for o in opts:
    c = task["critical"][o]
    base_steps = task["cells"]["tuned"][o][batches[0]][
        "median_steps_to_target"]
    out.append(f"| {o} | {_batch(c['batch'])} | [{_batch(c['interval'][0])}, "
               f"{_batch(c['interval'][1])}] | "
               + ("censored" if base_steps is None else f"{base_steps:.0f}")
               + " |")
  sign = ">=" if higher else "<="
  out += ["",
          f"**Steps to target** ({metric} {sign} {task['target']:.4f}: the "
          "worst optimizer's tuned base-batch median at "
          f"{task['target_fraction']:.0%} of the budget, step "
          f"{task['target_step_at_base']} of {task['steps'][batches[0]]}; a "
          "run's first crossing, interpolated between evaluations; median "
          "over seeds, a censored seed counting as never; `censored` when "
          "the median never reaches it; in brackets the overhead over "
          "perfect scaling from the base, tuned only; tuned / transfer)", ""]

  def steps_to_target(o, b):
    parts = []
    for arm in ("tuned", "transfer"):
      s = task["cells"][arm][o][b]
      m = s["median_steps_to_target"]
      n_cens = sum(v is None for v in s["steps_to_target"])
      text = "censored" if m is None else f"{m:.0f}"
      if arm == "tuned" and s["scaling_overhead"] is not None:
        text += f" ({s['scaling_overhead']:.2f}x)"
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
  out += ["", "Edge extensions in all: " + ", ".join(
      f"{o} {sum(task['cell_info'][o][b]['extensions'] for b in batches)}"
      for o in opts) + f" (total {total_ext}).", ""]
  for path in figures:
    out.append(f"![{os.path.basename(path)}]({os.path.basename(path)})")
  out.append("")
  return out


def results_markdown(config, summary: dict[str, Any],
                     figures: dict[str, list[str]]) -> str:
  """The tables of results.md (deterministic: no timings)."""
  out = ["# Batch-scaling study: results", "",
         f"**Verdict: {summary['verdict']}** "
         "(rule: examples/batch_scaling/README.md).", ""]
  for name, task in summary["tasks"].items():
    out += _task_markdown(name, task, len(config.report_seeds),
                          figures[name])
  return "\n".join(out)
