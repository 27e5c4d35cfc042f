"""The pre-registered reproducibility check of the batch-scaling study:
analysis.lands_inside by hand, reproducibility.py on summaries built here,
and docs/batch_scaling.md's tables held to the committed runs."""

import copy
import json
import pathlib
import re

import pytest

import helpers

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_EXAMPLE = _ROOT / "examples" / "batch_scaling"
_MODULES = ("analysis", "reproducibility")


@pytest.fixture(scope="module")
def example():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield {"analysis": load("analysis"),
           "reproducibility": load("reproducibility")}


def _critical(batch, low, high, batches=(16, 32, 64, 128)):
  def bound(b):
    return ("upper" if b == batches[0] else
            "lower" if b == batches[-1] else None)
  return {"batch": batch, "interval": [low, high], "bound": bound(batch),
          "interval_bounds": [bound(low), bound(high)]}


def test_lands_inside_by_hand(example):
  inside = example["analysis"].lands_inside
  reference = _critical(64, 32, 128)
  assert inside(_critical(32, 16, 64), reference)  # the low end
  assert inside(_critical(128, 64, 128), reference)  # the high end
  assert not inside(_critical(16, 16, 32), reference)  # below
  # Bounds compare as their numbers on the shared grid: a rerun's "<= 16"
  # lies inside "[<= 16, 64]" and outside "[32, 64]".
  assert inside(_critical(16, 16, 16), _critical(32, 16, 64))
  assert not inside(_critical(16, 16, 16), _critical(32, 32, 64))
  assert inside(_critical(128, 128, 128), _critical(64, 32, 128))


def _summary(critical, passed=True, verdict="fails"):
  noise = {o: {"at_target": 400.0, "agrees": o == "nesterov"}
           for o in critical}
  return {"verdict": verdict, "tasks": {"mnist1d": {
      "gate": {"passed": passed}, "verdict": verdict, "critical": critical,
      "largest_kept": {"tuned": {o: 64 for o in critical}},
      "noise": noise}}}


def test_comparison_and_markdown(example):
  rep = example["reproducibility"]
  reference = _summary({"lamb": _critical(64, 16, 128),
                        "adamw": _critical(32, 32, 64)})
  rerun = copy.deepcopy(reference)
  rerun["tasks"]["mnist1d"]["critical"]["adamw"] = _critical(128, 64, 128)
  result = rep.comparison(reference, rerun)
  rows = result["tasks"]["mnist1d"]["optimizers"]
  assert rows["lamb"]["inside"] and not rows["adamw"]["inside"]
  assert not result["passed"] and not result["tasks"]["mnist1d"]["passed"]
  text = rep.markdown(reference, rerun)
  assert "**mnist1d** (check failed)" in text
  assert ("| adamw | 32 [32, 64] | >= 128 [64, >= 128] | **no** | 64 / 64 "
          "| 400 / 400 | no / no |") in text
  assert text.index("| lamb |") < text.index("| adamw |")  # study order
  assert text.rstrip().endswith("the check failed.")
  # The same run against itself passes; a task that fails its gate in the
  # reference is not checked (it says nothing to reproduce).
  assert rep.comparison(reference, reference)["passed"]
  blocked = _summary(reference["tasks"]["mnist1d"]["critical"], passed=False)
  assert rep.comparison(blocked, rerun) == {"tasks": {}, "passed": True}


def test_docs_show_the_committed_check(example):
  """docs/batch_scaling.md's reproducibility tables are reproducibility.py's
  output on the committed default run and its committed rerun."""
  results = _EXAMPLE / "results"
  reference = json.loads((results / "summary.json").read_text())
  rerun = json.loads((results / "rerun" / "summary.json").read_text())
  docs = (_ROOT / "docs" / "batch_scaling.md").read_text()
  found = re.search(r"<!-- reproducibility:begin -->\n(.*?)"
                    r"<!-- reproducibility:end -->", docs, flags=re.S)
  assert found, "docs/batch_scaling.md lacks the reproducibility tables"
  assert found.group(1) == example["reproducibility"].markdown(reference,
                                                                rerun)
  # The rerun is the default config on disjoint seeds.
  assert rerun["protocol"] != reference["protocol"]
  for task in reference["tasks"]:
    ref, new = reference["tasks"][task], rerun["tasks"][task]
    assert not (set(ref["selection_seeds"] + ref["report_seeds"])
                & set(new["selection_seeds"] + new["report_seeds"]))
