"""The batch-scaling study: its rules by hand, vmap = one trial, end to end."""

import contextlib
import io
import json
import math
import os
import pathlib
import shutil
import sys

import numpy as np
import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parents[1] / "examples" /
            "batch_scaling")
# Top-level module names of the example (run as a script, not a package);
# cleared around the import so another example's `configs` cannot be reused.
_MODULES = ("study", "tasks", "trials", "analysis", "plots", "configs",
            "configs.default", "configs.test", "configs.gpu")


@pytest.fixture(scope="module")
def example():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield {"analysis": load("analysis"), "study": load("study"),
           "tasks": load("tasks"), "trials": load("trials"),
           "default": load("configs.default"), "gpu": load("configs.gpu"),
           "test": load("configs.test")}


# ----------------------------------------------------------------------------
# The protocol's arithmetic, by hand.


def test_lr_grid_is_log_spaced_and_centred(example):
  a = example["analysis"]
  np.testing.assert_allclose(a.lr_grid(0.01, 5),
                             [0.0025, 0.005, 0.01, 0.02, 0.04], rtol=1e-12)
  np.testing.assert_allclose(a.lr_grid(1.0, 2), [2**-0.5, 2**0.5],
                             rtol=1e-12)
  with pytest.raises(ValueError, match="num_learning_rates"):
    a.lr_grid(0.01, 0)


def test_selection_is_by_the_mean_over_selection_seeds(example):
  a = example["analysis"]
  rows = [
      # lr 0.2 has the single best seed (0.80) but the mean 0.60.
      {"lr": 0.2, "final": {"accuracy": 0.80}},
      {"lr": 0.2, "final": {"accuracy": 0.40}},
      {"lr": 0.1, "final": {"accuracy": 0.70}},
      {"lr": 0.1, "final": {"accuracy": 0.60}},  # mean 0.65: the best
      {"lr": 0.05, "final": {"accuracy": 0.64}},
      {"lr": 0.05, "final": {"accuracy": 0.64}},
  ]
  means = a.mean_by_lr(rows, "accuracy")
  assert means == pytest.approx({0.2: 0.60, 0.1: 0.65, 0.05: 0.64})
  assert a.select(means, higher_is_better=True) == 0.1
  # A loss: the lowest mean wins; a tie goes to the smaller rate.
  assert a.select({0.1: 2.0, 0.2: 1.5, 0.4: 1.5}, False) == 0.2


def test_edge_extension_rule(example):
  a = example["analysis"]
  assert a.edge_extension([1.0, 2.0, 4.0], 1.0) == 0.5
  assert a.edge_extension([1.0, 2.0, 4.0], 4.0) == 8.0
  assert a.edge_extension([1.0, 2.0, 4.0], 2.0) is None


class _FakeTask:
  """A task whose final accuracy is -|log2(lr / 0.02)| + seed noise."""
  name = "mnist1d"
  metric = "accuracy"
  higher_is_better = True
  tolerance_floor = 0.005
  diverged_metrics = {"accuracy": 0.0}


def _fake_run_trials(calls):
  def run_trials(task, optimizer, hyper, schedule, lrs, seeds,
                 record_ratios=False, cache=None, **padding):
    del task, optimizer, hyper, cache, record_ratios, padding
    calls.append(list(zip(lrs, seeds)))
    out = []
    for lr, seed in zip(lrs, seeds):
      acc = -abs(math.log2(lr / 0.02)) + 0.001 * seed
      out.append({"curve": {"step": [schedule.total_steps],
                            "accuracy": [acc]}, "diverged": False})
    return out
  return run_trials


@pytest.mark.parametrize("max_extensions, chosen, extensions, unresolved", [
    (4, 0.02, 3, False),  # 0.005 -> 0.01 -> 0.02 -> 0.04 tried; 0.02 inside
    (2, 0.02, 2, True),   # stops with 0.02 tried and best: still an edge
])
def test_cell_extends_the_grid_until_the_best_is_inside(
    example, monkeypatch, max_extensions, chosen, extensions, unresolved):
  study = example["study"]
  config = example["test"].get_config()
  config.num_learning_rates = 3
  config.max_extensions = max_extensions
  calls = []
  monkeypatch.setattr(study.trials_lib, "run_trials", _fake_run_trials(calls))
  # Grid around 0.0025: 0.00125, 0.0025, 0.005 (best: the upper edge).
  cell = study.run_cell(_FakeTask(), "lamb", 128, config, center=0.0025,
                        transfer=0.0025)
  assert cell["chosen_lr"] == pytest.approx(chosen)
  assert cell["extensions"] == extensions
  assert cell["edge_unresolved"] is unresolved
  # Same-shape calls: the grid (3 rates x 2 seeds) + transfer (2 report
  # seeds), then one call per extension, then the report.
  assert len(calls[0]) == 3 * 2 + 2
  assert [lr for lr, _ in calls[0][6:]] == [0.0025, 0.0025]
  assert len(calls) == 1 + extensions + 1
  assert all(len(c) == 2 for c in calls[1:])
  assert {lr for lr, _ in calls[-1]} == {cell["chosen_lr"]}
  assert [s for _, s in calls[-1]] == list(config.report_seeds)
  roles = [r["role"] for r in cell["rows"]]
  assert roles.count("select") == (3 + extensions) * 2
  assert roles.count("transfer") == roles.count("report") == 2


def test_transfer_rate_is_the_square_root_rule(example):
  a = example["analysis"]
  assert a.transfer_lr(0.01, 32, 2048) == pytest.approx(0.08)
  assert a.transfer_lr(0.01, 32, 64) == pytest.approx(0.01 * 2**0.5)
  assert a.transfer_lr(0.01, 32, 32) == 0.01


def test_censoring(example):
  a = example["analysis"]
  curve = {"step": [10, 20, 30], "accuracy": [0.5, 0.7, 0.9],
           "loss": [2.0, 1.0, float("nan")]}
  assert a.steps_to_target(curve, "accuracy", 0.7, True) == 20
  assert a.steps_to_target(curve, "accuracy", 0.95, True) is None
  assert a.steps_to_target(curve, "loss", 1.5, False) == 20
  assert a.steps_to_target(curve, "loss", 0.5, False) is None  # nan: no
  # A censored seed counts as never; the median decides the cell.
  assert a.median_steps([100, 200, None]) == 200
  assert a.median_steps([100, None, None]) is None
  assert a.median_steps([300, 100, 200]) == 200
  assert a.target_value({"lamb": 0.70, "adamw": 0.66}, 0.01, True) == (
      pytest.approx(0.65))
  assert a.target_value({"lamb": 2.0, "adamw": 2.5}, 0.05, False) == (
      pytest.approx(2.55))


def test_mean_se_and_tolerance(example):
  a = example["analysis"]
  mean, se = a.mean_se([0.70, 0.72, 0.74])
  assert mean == pytest.approx(0.72)
  assert se == pytest.approx(0.02 / math.sqrt(3))
  # 2 * sqrt(se^2 + se^2) = 0.0327 beats the 0.005 floor; tiny se: floor.
  assert a.tolerance(se, se, 0.005) == pytest.approx(
      2 * math.sqrt(2) * 0.02 / math.sqrt(3))
  assert a.tolerance(0.001, 0.001, 0.005) == 0.005


def _summary(tuned, transfer=None, batches=(32, 256, 2048)):
  """A task summary with se 0 (tau = the floor 0.005)."""
  def cells(table):
    return {o: {b: {"mean": m, "se": 0.0} for b, m in zip(batches, ms)}
            for o, ms in table.items()}
  return {"batches": list(batches), "higher_is_better": True,
          "tolerance_floor": 0.005, "cells": {
              "tuned": cells(tuned),
              "transfer": cells(transfer if transfer else tuned)}}


def test_verdict_rule(example):
  a = example["analysis"]
  flat = [0.80, 0.80, 0.80]
  drop_at_8x = [0.80, 0.70, 0.60]
  drop_at_64x = [0.80, 0.798, 0.70]
  # LAMB keeps its base accuracy to 2048; AdamW and LARS drop at 256.
  v = a.task_verdict(_summary({"lamb": flat, "adamw": drop_at_8x,
                               "lars": drop_at_8x, "nesterov": flat}))
  assert v["verdict"] == "reproduced"
  assert v["largest_kept"]["tuned"] == {"lamb": 2048, "adamw": 32,
                                        "lars": 32, "nesterov": 2048}
  # Nado et al.'s reading: tuned Nesterov matches LAMB at the largest batch.
  assert a.nado_reading(_summary({"lamb": flat, "adamw": drop_at_8x,
                                  "lars": drop_at_8x, "nesterov": flat})) == {
                                      "adamw": "loses to", "lars": "loses to",
                                      "nesterov": "matches"}
  # Tuned, AdamW keeps up: fails, unless only the untuned arm shows LAMB
  # ahead (partial).
  tuned = {"lamb": flat, "adamw": flat, "lars": drop_at_8x}
  assert a.task_verdict(_summary(tuned))["verdict"] == "fails"
  transfer = {"lamb": flat, "adamw": drop_at_8x, "lars": drop_at_8x}
  assert a.task_verdict(_summary(tuned, transfer))["verdict"] == "partial"
  # Within tau: 0.80 -> 0.796 is kept (0.004 <= 0.005), 0.70 is not.
  v = a.task_verdict(_summary({"lamb": drop_at_64x, "adamw": drop_at_8x,
                               "lars": drop_at_8x}))
  assert v["largest_kept"]["tuned"]["lamb"] == 256
  assert v["verdict"] == "reproduced"
  # LAMB keeps longer but ends worse than AdamW at the largest batch: fails.
  v = a.task_verdict(_summary({"lamb": [0.80, 0.80, 0.50],
                               "adamw": [0.90, 0.70, 0.60],
                               "lars": drop_at_8x}))
  assert v["largest_kept"]["tuned"]["lamb"] == 256
  assert v["lamb_wins"]["tuned"] is False and v["verdict"] == "fails"
  # Every optimizer already degrades at 8x: untestable.
  everyone_drops = {o: drop_at_8x for o in ("lamb", "adamw", "lars")}
  assert a.task_verdict(_summary(everyone_drops))["verdict"] == "untestable"
  # No batch 8x the base: untestable too.
  short = _summary({o: [0.8, 0.8] for o in ("lamb", "adamw", "lars")},
                   batches=(32, 128))
  assert a.task_verdict(short)["verdict"] == "untestable"
  # Across tasks.
  assert a.overall_verdict({"a": "reproduced", "b": "untestable"}) == (
      "reproduced")
  assert a.overall_verdict({"a": "reproduced", "b": "fails"}) == "mixed"
  assert a.overall_verdict({"a": "untestable"}) == "untestable"


def test_verdict_for_a_loss_uses_the_lower_is_better_direction(example):
  a = example["analysis"]
  summary = _summary({"lamb": [2.0, 2.01, 2.015], "adamw": [2.0, 2.3, 2.5],
                      "lars": [2.0, 2.2, 2.4]})
  summary["higher_is_better"] = False
  summary["tolerance_floor"] = 0.02
  assert a.task_verdict(summary)["verdict"] == "reproduced"


# ----------------------------------------------------------------------------
# Config errors name the field.


@pytest.mark.parametrize("field, value, message", [
    ("tasks", ("mnist1d", "imagenet"), "config.tasks"),
    ("optimizers", ("lamb", "adagrad"), "config.optimizers"),
    ("num_learning_rates", 0, "config.num_learning_rates"),
    ("report_seeds", (1, 2, 3), "config.report_seeds"),  # overlaps selection
    ("selection_seeds", (0,), "config.selection_seeds"),
])
def test_bad_config_names_the_field(example, tmp_path, field, value,
                                    message):
  config = example["test"].get_config()
  config[field] = value
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    example["study"].run_study(config, str(tmp_path))


def test_bad_task_config_names_the_field(example, tmp_path):
  study = example["study"]
  config = example["test"].get_config()
  config.mnist1d.warmup_steps = 10_000
  with pytest.raises(ValueError, match=r"config\.mnist1d\.warmup_steps"):
    study.run_study(config, str(tmp_path / "a"))
  config = example["test"].get_config()
  config.mnist1d.batch_sizes = (16, 128, 16)
  with pytest.raises(ValueError, match=r"config\.mnist1d\.batch_sizes"):
    study.run_study(config, str(tmp_path / "b"))
  config = example["test"].get_config()
  config.tasks = ("mnist1d",)
  config.mnist1d.batch_sizes = (16, 4096)  # 800 training signals
  config.mnist1d.warmup_steps = 1
  with pytest.raises(ValueError, match=r"config\.mnist1d\.batch_sizes.*800"):
    study.run_study(config, str(tmp_path / "c"))


def test_shipped_configs_pass_their_checks(example):
  for name in ("default", "gpu", "test"):
    example["study"].check_config(example[name].get_config())
  default = example["default"].get_config()
  # The minimum protocol.
  assert len(default.mnist1d.batch_sizes) >= 7
  assert default.mnist1d.batch_sizes[-1] >= 64 * default.mnist1d.batch_sizes[0]
  assert len(default.mlm.batch_sizes) >= 4
  assert default.mlm.batch_sizes[-1] >= 64 * default.mlm.batch_sizes[0]
  assert len(default.selection_seeds) >= 2 and len(default.report_seeds) >= 3
  assert default.lr_factor == 2.0


# ----------------------------------------------------------------------------
# Training: a vmapped trial is the trial run alone.


@pytest.fixture(scope="module")
def tiny_mnist1d(example):
  config = example["test"].get_config()
  return example["tasks"].mnist1d_task(config.mnist1d), config


@pytest.mark.parametrize("optimizer", ["lamb", "nesterov"])
def test_vmapped_trial_equals_the_trial_alone(example, tiny_mnist1d,
                                              optimizer):
  trials = example["trials"]
  task, config = tiny_mnist1d
  schedule = trials.make_schedule(16, 256, 2, 4)
  together = trials.run_trials(task, optimizer, config.optimizer, schedule,
                               [0.01, 0.05, 0.0], [0, 1, 1],
                               record_ratios=True)
  alone = trials.run_trials(task, optimizer, config.optimizer, schedule,
                            [0.05], [1], record_ratios=True)[0]
  for key in ("accuracy", "loss", "train_loss"):
    np.testing.assert_allclose(together[1]["curve"][key],
                               alone["curve"][key], rtol=2e-5, atol=1e-6)
  if optimizer == "lamb":
    for layer, values in alone["trust_ratios"].items():
      np.testing.assert_allclose(together[1]["trust_ratios"][layer], values,
                                 rtol=2e-5)
  # The injected rate is the one used: rate 0 never moves the parameters.
  zero = together[2]["curve"]
  assert len(set(zero["loss"])) == 1 and len(set(zero["accuracy"])) == 1
  assert together[1]["curve"]["loss"][-1] < zero["loss"][-1]
  # Other rates or seeds do give other runs.
  assert together[0]["curve"]["loss"] != together[1]["curve"]["loss"]


def test_schedule_keeps_warmup_fixed_and_the_budget(example):
  trials = example["trials"]
  s32 = trials.make_schedule(32, 80_000, 8, 20)
  s2048 = trials.make_schedule(2048, 80_000, 8, 20)
  assert (s32.total_steps, s32.eval_every) == (2500, 125)
  assert (s2048.total_steps, s2048.eval_every) == (40, 2)  # ceil(39.06)=40
  assert s32.warmup_steps == s2048.warmup_steps == 8
  with pytest.raises(ValueError, match="warmup_steps"):
    trials.make_schedule(2048, 80_000, 41, 20)


# ----------------------------------------------------------------------------
# End to end on configs/test.py, resume, and reproducibility.


@pytest.fixture(scope="module")
def finished_study(example, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("batch_scaling"))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    summary = example["study"].run_study(example["test"].get_config(),
                                         workdir)
  return workdir, summary, printed.getvalue()


def test_study_writes_every_output_and_a_verdict(example, finished_study):
  workdir, summary, printed = finished_study
  # The verdict, computed from the study's own numbers, is printed.
  assert f"VERDICT: {summary['verdict']}\n  mnist1d: " in printed
  assert summary["tasks"]["mnist1d"]["verdict"] in example["analysis"].VERDICTS
  a = example["analysis"]
  config = example["test"].get_config()
  assert summary["verdict"] in a.VERDICTS + ("mixed",)
  for name in ("trials.jsonl", "summary.json", "results.md", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for task in config.tasks:
    for kind in ("final_metric", "steps_to_target", "lr_heatmap",
                 "trust_ratios"):
      path = os.path.join(workdir, f"{task}_{kind}.png")
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  results = pathlib.Path(workdir, "results.md").read_text()
  assert f"**Verdict: {summary['verdict']}**" in results
  rows = [json.loads(line) for line in
          pathlib.Path(workdir, "trials.jsonl").read_text().splitlines()]
  keys = {"task", "optimizer", "batch", "lr", "seed", "role", "curve",
          "final", "steps_to_target", "steps", "examples", "diverged"}
  assert all(keys <= set(r) for r in rows)
  for task in config.tasks:
    batches = config[task].batch_sizes
    for opt in config.optimizers:
      cell_rows = [r for r in rows if r["task"] == task
                   and r["optimizer"] == opt]
      base_report = [r for r in cell_rows if r["batch"] == batches[0]
                     and r["role"] == "report"]
      base_lr = base_report[0]["lr"]
      for b in batches[1:]:
        transfer = [r for r in cell_rows if r["batch"] == b
                    and r["role"] == "transfer"]
        # The transfer arm: base best x sqrt(B / B0), on the report seeds.
        assert [r["seed"] for r in transfer] == list(config.report_seeds)
        for r in transfer:
          assert r["lr"] == pytest.approx(base_lr * math.sqrt(b / batches[0]))
      for b in batches:
        report = [r for r in cell_rows if r["batch"] == b
                  and r["role"] == "report"]
        select = [r for r in cell_rows if r["batch"] == b
                  and r["role"] == "select"]
        assert [r["seed"] for r in report] == list(config.report_seeds)
        assert {r["seed"] for r in select} == set(config.selection_seeds)
        # Same grid size for every optimizer: extensions come on top.
        assert len({r["lr"] for r in select}) >= config.num_learning_rates
        # The budget: at least the examples asked for, fewer steps at larger
        # batches.
        assert report[0]["examples"] >= config[task].budget_examples
  summary_file = json.loads(pathlib.Path(workdir, "summary.json").read_text())
  assert summary_file["verdict"] == summary["verdict"]


def test_rerun_skips_finished_cells_and_reproduces_results(example,
                                                           finished_study):
  study = example["study"]
  workdir, _, _ = finished_study
  config = example["test"].get_config()
  results = pathlib.Path(workdir, "results.md").read_bytes()
  summary = pathlib.Path(workdir, "summary.json").read_bytes()
  trials_file = pathlib.Path(workdir, "trials.jsonl").read_bytes()
  again = study.run_study(config, workdir)
  assert again["run"]["trained"] == []
  assert pathlib.Path(workdir, "results.md").read_bytes() == results
  # A study killed mid-way: the cells it finished are kept, and the rest,
  # run again (here: two cells, the first run stopping after one), give the
  # same numbers.
  copy = workdir + "_killed"
  shutil.copytree(workdir, copy)
  lost = ["mnist1d-adamw-128", "mnist1d-lars-128"]
  for name in lost:
    os.remove(os.path.join(copy, "cells", f"{name}.json"))
  os.remove(os.path.join(copy, "results.md"))
  config.stop_after_cells = 1
  stopped = study.run_study(config, copy)
  assert stopped["run"] == {"trained": [lost[0]], "stopped": True}
  assert not os.path.exists(os.path.join(copy, "results.md"))
  config.stop_after_cells = 0
  resumed = study.run_study(config, copy)
  assert resumed["run"]["trained"] == [lost[1]]
  assert pathlib.Path(copy, "results.md").read_bytes() == results
  assert pathlib.Path(copy, "summary.json").read_bytes() == summary
  assert pathlib.Path(copy, "trials.jsonl").read_bytes() == trials_file
  assert not [f for f in os.listdir(os.path.join(copy, "cells"))
              if ".tmp" in f]
  # Another protocol in the same workdir is refused, naming the fields.
  config.num_learning_rates = 5
  with pytest.raises(ValueError, match="num_learning_rates"):
    study.run_study(config, copy)


def test_mlm_task_uses_the_bert_example_and_learns(example, tmp_path):
  tasks, trials = example["tasks"], example["trials"]
  config = example["default"].get_config()
  section = config.mlm
  section.vocab_size, section.seq_length, section.eval_examples = 256, 16, 32
  section.hidden_size, section.num_layers, section.num_heads = 16, 1, 1
  section.intermediate_size = 32
  task = tasks.make_task("mlm", section, str(tmp_path))
  bert_models = sys.modules["batch_scaling_bert_models"]
  assert bert_models.__file__ == str(_EXAMPLE.parent / "bert" / "models.py")
  assert task.metric == "loss" and not task.higher_is_better
  schedule = trials.make_schedule(8, 8 * 48, 2, 2)
  first, zero = trials.run_trials(task, "lamb", config.optimizer, schedule,
                                  [1e-2, 0.0], [0, 0], record_ratios=True)
  assert not first["diverged"]
  assert first["curve"]["loss"][-1] < zero["curve"]["loss"][-1] - 0.05
  assert any("attention/query/kernel" in k for k in first["trust_ratios"])
  assert not any(k.endswith("bias") or "norm" in k
                 for k in first["trust_ratios"])


def test_micro_batches_and_padding_do_not_change_the_run(example,
                                                         tiny_mnist1d):
  trials = example["trials"]
  task, config = tiny_mnist1d
  schedule = trials.make_schedule(16, 256, 2, 4)
  whole = trials.run_trials(task, "adamw", config.optimizer, schedule,
                            [0.02, 0.05], [0, 1])
  # Batches of 16 as 4 micro-batches of 4, the arguments padded to the
  # sizes of a longer run: the same gradients, the same run.
  accumulated = trials.run_trials(task, "adamw", config.optimizer, schedule,
                                  [0.02, 0.05], [0, 1], micro_batch=4,
                                  pad_steps=9, pad_examples=300)
  for a, b in zip(whole, accumulated):
    for key in ("accuracy", "loss", "train_loss"):
      np.testing.assert_allclose(a["curve"][key], b["curve"][key],
                                 rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="micro_batch"):
    trials.run_trials(task, "adamw", config.optimizer, schedule, [0.1], [0],
                      micro_batch=5)
