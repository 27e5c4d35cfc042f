r"""The pre-registered reproducibility check: a rerun against the reference.

Reads two studies' ``summary.json`` (the default run and its rerun on
disjoint seeds, ``configs/rerun.py``) and prints, per task that passes its
gate in the reference, each optimizer's critical batch in both runs and
whether the rerun's lies inside the reference's 95% interval
(:func:`analysis.lands_inside`), then the verdicts, the largest kept
batches and the noise-scale readings side by side::

  python examples/batch_scaling/reproducibility.py \
      --reference=examples/batch_scaling/results/summary.json \
      --rerun=examples/batch_scaling/results/rerun/summary.json

docs/batch_scaling.md shows its output; a test holds the two equal.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import app
from absl import flags

import analysis

_HERE = os.path.dirname(os.path.abspath(__file__))
# The order of the tables (trials.OPTIMIZERS, without importing JAX).
_ORDER = ("lamb", "adamw", "lars", "nesterov", "muon")
FLAGS = flags.FLAGS
flags.DEFINE_string("reference", os.path.join(_HERE, "results",
                                              "summary.json"),
                    "The default run's summary.json.")
flags.DEFINE_string("rerun", os.path.join(_HERE, "results", "rerun",
                                          "summary.json"),
                    "The rerun's summary.json.")


def _ratio(noise: dict[str, Any]) -> str:
  value = noise.get("at_target") if noise else None
  if value is None:
    return "—"
  return "> n" if value == float("inf") else f"{value:.0f}"


def _agrees(noise: dict[str, Any]) -> str:
  return {None: "—", True: "yes", False: "no"}[
      noise.get("agrees") if noise else None]


def comparison(reference: dict[str, Any], rerun: dict[str, Any]
               ) -> dict[str, Any]:
  """``{"tasks": {task: {"optimizers": {opt: {...}}, "passed": bool}},
  "passed": bool}``; only tasks that pass their gate in the reference are
  checked (an uninformative task says nothing to reproduce)."""
  out = {"tasks": {}}
  for name, ref in reference["tasks"].items():
    if not ref["gate"]["passed"]:
      continue
    new = rerun["tasks"][name]
    rows = {}
    for opt, critical in sorted(ref["critical"].items(),
                                key=lambda item: _ORDER.index(item[0])):
      rows[opt] = {"reference": critical, "rerun": new["critical"][opt],
                   "inside": analysis.lands_inside(new["critical"][opt],
                                                   critical)}
    out["tasks"][name] = {"optimizers": rows,
                          "passed": all(r["inside"] for r in rows.values())}
  out["passed"] = all(t["passed"] for t in out["tasks"].values())
  return out


def markdown(reference: dict[str, Any], rerun: dict[str, Any]) -> str:
  """The tables of docs/batch_scaling.md's "Reproducibility check"."""
  result = comparison(reference, rerun)
  lines = []
  for name, task in result["tasks"].items():
    ref, new = reference["tasks"][name], rerun["tasks"][name]
    lines += [f"**{name}** (check "
              + ("passed" if task["passed"] else "failed") + "):", "",
              "| optimizer | critical batch [95% interval], default seeds "
              "| rerun, disjoint seeds | rerun inside? | largest kept, "
              "tuned: default / rerun | B_simple at the target: default / "
              "rerun | predicts: default / rerun |",
              "|---|---|---|---|---|---|---|"]
    for opt, row in task["optimizers"].items():
      lines.append(
          f"| {opt} | {analysis.critical_text(row['reference'])} | "
          f"{analysis.critical_text(row['rerun'])} | "
          + ("yes" if row["inside"] else "**no**") + " | "
          f"{ref['largest_kept']['tuned'][opt]} / "
          f"{new['largest_kept']['tuned'][opt]} | "
          f"{_ratio(ref['noise'].get(opt))} / "
          f"{_ratio(new['noise'].get(opt))} | "
          f"{_agrees(ref['noise'].get(opt))} / "
          f"{_agrees(new['noise'].get(opt))} |")
    lines += ["", f"Verdict: {ref['verdict']} (default), {new['verdict']} "
              "(rerun).", ""]
  lines.append(f"Overall: {reference['verdict']} (default), "
               f"{rerun['verdict']} (rerun); the check "
               + ("passed" if result["passed"] else "failed") + ".")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  with open(FLAGS.reference, encoding="utf-8") as f:
    reference = json.load(f)
  with open(FLAGS.rerun, encoding="utf-8") as f:
    rerun = json.load(f)
  print(markdown(reference, rerun), end="")


if __name__ == "__main__":
  app.run(main)
