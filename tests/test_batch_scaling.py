"""The batch-scaling study: its rules by hand, vmap = one trial, end to end."""

import collections
import contextlib
import io
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import jax
import numpy as np
import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parents[1] / "examples" /
            "batch_scaling")
# Top-level module names of the example (run as a script, not a package);
# cleared around the import so another example's `configs` cannot be reused.
_MODULES = ("study", "tasks", "trials", "analysis", "plots", "report",
            "mlm_pipeline", "noise_scale", "configs", "configs.default",
            "configs.test", "configs.gpu", "configs.rerun",
            # The BERT example's modules that mlm_pipeline imports.
            "corpus", "wordpiece", "masking")


@pytest.fixture(scope="module")
def example():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield {"analysis": load("analysis"), "study": load("study"),
           "tasks": load("tasks"), "trials": load("trials"),
           "mlm_pipeline": load("mlm_pipeline"),
           "report": load("report"),
           "default": load("configs.default"), "gpu": load("configs.gpu"),
           "test": load("configs.test"), "rerun": load("configs.rerun")}


# ----------------------------------------------------------------------------
# The masked-LM task's data in memory (mlm_pipeline.py).


def test_batches_are_a_function_of_seed_and_step(example):
  ip = example["mlm_pipeline"]
  stream = np.arange(10_000, dtype=np.int32) % 900 + len(ip.SPECIAL_TOKENS)
  a = ip.train_batch(stream, step=7, batch_size=8, seq_length=32,
                     vocab_size=1000, seed=3)
  b = ip.train_batch(stream, step=7, batch_size=8, seq_length=32,
                     vocab_size=1000, seed=3)
  c = ip.train_batch(stream, step=8, batch_size=8, seq_length=32,
                     vocab_size=1000, seed=3)
  d = ip.train_batch(stream, step=7, batch_size=8, seq_length=32,
                     vocab_size=1000, seed=4)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(a["input_ids"], c["input_ids"])
  assert not np.array_equal(a["input_ids"], d["input_ids"])
  assert np.all(a["input_ids"][:, 0] == ip.wordpiece.CLS_ID)
  assert np.all(a["input_ids"][:, -1] == ip.wordpiece.SEP_ID)


def test_builtin_corpus_is_split_by_document(example):
  ip = example["mlm_pipeline"]
  corpus = ip.load_corpus("builtin", held_out_percent=10)
  assert sum(map(len, corpus.train)) > 500_000  # characters of real text
  assert len(corpus.held_out) > 100
  assert not set(corpus.train) & set(corpus.held_out)
  fraction = len(corpus.held_out) / (len(corpus.train) + len(corpus.held_out))
  assert 0.05 < fraction < 0.15


def test_user_corpus_and_tokenizer_cache(example, tmp_path):
  ip = example["mlm_pipeline"]
  text_dir = tmp_path / "texts"
  text_dir.mkdir()
  words = ("the quick brown fox jumps over the lazy dog while a patient "
           "teacher explains the lesson to curious students").split()
  rng = np.random.default_rng(0)
  for i in range(3):
    paragraphs = [" ".join(rng.choice(words, 60)) for _ in range(40)]
    (text_dir / f"part{i}.txt").write_text("\n\n".join(paragraphs))
  corpus = ip.load_corpus(str(text_dir), held_out_percent=20)
  assert corpus.train and corpus.held_out
  cache = tmp_path / "tokenizer"
  tokenizer, cached = ip.cached_tokenizer(corpus, 200, str(cache))
  assert not cached
  [path] = list(cache.iterdir())
  mtime = path.stat().st_mtime_ns
  again, cached = ip.cached_tokenizer(corpus, 200, str(cache))
  assert cached
  assert path.stat().st_mtime_ns == mtime  # Loaded, not rewritten.
  assert again.get_vocab() == tokenizer.get_vocab()
  for token_id, token in enumerate(ip.SPECIAL_TOKENS):
    assert again.token_to_id(token) == token_id
  assert again.encode("the quick fox").tokens == ["the", "quick", "fox"]
  # Another vocabulary size is another tokenizer.
  _, cached = ip.cached_tokenizer(corpus, 150, str(cache))
  assert not cached and len(list(cache.iterdir())) == 2


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
  """A task whose accuracy rises on a straight line over the run, from
  S(lr) at step 0 to F(lr) at the last evaluation (each + 0.001 * (seed %
  100), so report seed 100 + x runs like selection seed x):

    F(lr) = 0.9 - 0.1 * |log2(lr / 0.02)|   (the best final: 0.02),
    S(lr) = 0.45 - 0.1 * |log2(lr / 0.08)|.

  Against the target 0.5 the curve crosses at the fraction
  (0.5 - S) / (F - S) of the run, exactly (a straight line is what
  steps_to_target interpolates), or at the first evaluation when that is
  later. With 4 evaluations (a quarter each), the fractions at seed 0:

    lr    0.00125 0.0025 0.005  0.01   0.02   0.04   0.08  0.16  0.32
    frac  1       11/13  9/13   7/13   5/13   1/3    1/4   3/5   1

  so the fewest steps are at 0.08 (its 1/5 is before the first
  evaluation), the best final at 0.02: the two choices differ.
  """
  name = "mnist1d"
  metric = "accuracy"
  higher_is_better = True
  tolerance_floor = 0.005
  diverged_metrics = {"accuracy": 0.0}
  baselines = {"constant": {"description": "a constant", "accuracy": 0.1}}


_FAKE_TARGET = 0.5


def _fake_run_trials(calls):
  def run_trials(task, optimizer, hyper, schedule, lrs, seeds,
                 record_ratios=False, cache=None, probe=None, probe_every=1,
                 **padding):
    del task, optimizer, hyper, cache, record_ratios, padding
    calls.append({"pairs": list(zip(lrs, seeds)), "probe": probe,
                  "probe_every": probe_every})
    steps = schedule.eval_steps
    n = len(steps)
    out = []
    for lr, seed in zip(lrs, seeds):
      shift = 0.001 * (seed % 100)
      final = 0.9 - 0.1 * abs(math.log2(lr / 0.02)) + shift
      start = 0.45 - 0.1 * abs(math.log2(lr / 0.08)) + shift
      acc = [final - (final - start) * (1 - (k + 1) / n) for k in range(n)]
      result = {"curve": {"step": list(steps), "accuracy": acc},
                "diverged": False}
      if probe is not None:
        result["probe"] = {"step": steps[::probe_every],
                           "b_simple": [lr * 1000 + seed] * len(
                               steps[::probe_every])}
      out.append(result)
    return out
  return run_trials


def _cell(example, monkeypatch, batch, center, max_extensions=4, probe=None):
  study = example["study"]
  config = example["test"].get_config()
  config.num_learning_rates = 3
  config.max_extensions = max_extensions
  config.mnist1d.target = _FAKE_TARGET
  calls = []
  monkeypatch.setattr(study.trials_lib, "run_trials", _fake_run_trials(calls))
  cell = study.run_cell(_FakeTask(), "lamb", batch, config, center=center,
                        probe=probe)
  return cell, calls, config


@pytest.mark.parametrize("center, max_extensions, added, unresolved", [
    # Grid 0.01, 0.02, 0.04: the final choice (0.02) is inside, the steps
    # choice (0.04) on the upper edge: 0.08 (steps: 0.08, an edge again),
    # then 0.16 (0.08 inside).
    (0.02, 4, [0.08, 0.16], False),
    (0.02, 1, [0.08], True),  # stops with 0.08 chosen, on the edge
    # Grid 0.02, 0.04, 0.08: the steps choice (0.08) on the upper edge and
    # the final one (0.02) on the lower: the steps rule extends first.
    (0.04, 4, [0.16, 0.01], False),
    # Grid 0.00125, 0.0025, 0.005: both choices climb to 0.02, the steps
    # choice on to 0.08.
    (0.0025, 5, [0.01, 0.02, 0.04, 0.08, 0.16], False),
    (0.0025, 4, [0.01, 0.02, 0.04, 0.08], True),
])
def test_cell_trains_every_rate_on_every_seed_and_extends_either_choice(
    example, monkeypatch, center, max_extensions, added, unresolved):
  cell, calls, config = _cell(example, monkeypatch, 128, center,
                              max_extensions)
  selection, report = list(config.selection_seeds), list(config.report_seeds)
  seeds = selection + report
  grid = [center / 2, center, center * 2]
  assert cell["chosen_lr"] == pytest.approx(0.02)
  assert cell["chosen_lr_steps"] == pytest.approx(0.08)
  assert cell["extensions"] == len(added)
  assert cell["edge_unresolved"] is unresolved
  assert cell["grid"] == pytest.approx(grid)
  assert cell["center_lr"] == center
  assert cell["learning_rates"] == pytest.approx(sorted(grid + added))
  # The grid on every seed (rate-major), then one call per extension with
  # the new rate on every seed; no report call, no probe above the base.
  assert len(calls) == 1 + len(added)
  assert len(calls[0]["pairs"]) == 3 * (2 + 2)
  assert [s for _, s in calls[0]["pairs"]] == seeds * 3
  assert [lr for lr, _ in calls[0]["pairs"]] == pytest.approx(
      [lr for lr in grid for _ in seeds])
  for call, lr in zip(calls[1:], added):
    assert [s for _, s in call["pairs"]] == seeds
    assert all(x == pytest.approx(lr) for x, _ in call["pairs"])
  assert all(c["probe"] is None for c in calls)
  # One row per (rate, seed); the role is the seed's.
  rows = cell["rows"]
  assert sorted((r["lr"], r["seed"]) for r in rows) == sorted(
      (lr, s) for lr in cell["learning_rates"] for s in seeds)
  assert all(r["role"] == ("select" if r["seed"] in selection else "report")
             for r in rows)
  assert cell["num_runs"] == len(rows) == (3 + len(added)) * 4
  assert not any("noise" in r for r in rows)


def test_cell_steps_to_target_and_selection_by_hand(example, monkeypatch):
  cell, _, config = _cell(example, monkeypatch, 128, 0.02)
  # Batch 128: 1024 / 128 = 8 steps, evaluated at 2, 4, 6 and 8.
  assert cell["steps"] == 8
  assert config.mnist1d.target == cell["target"] == 0.5
  by = {(r["lr"], r["seed"]): r for r in cell["rows"]}
  lr02 = next(lr for lr in cell["learning_rates"]
              if lr == pytest.approx(0.02))
  lr08 = next(lr for lr in cell["learning_rates"]
              if lr == pytest.approx(0.08))
  # 0.02 at seed 0: 0.25 -> 0.9, the target at 5/13 of 8 steps; seed 1
  # (and 101): 0.251 -> 0.901, at 0.249 / 0.65 of them.
  assert by[(lr02, 0)]["steps_to_target"] == pytest.approx(8 * 5 / 13)
  assert by[(lr02, 101)]["steps_to_target"] == pytest.approx(8 * 0.249 / 0.65)
  assert by[(lr02, 0)]["final"] == {"accuracy": pytest.approx(0.9)}
  # 0.08 crosses at 1/5 of the run, before the first evaluation (step 2).
  assert by[(lr08, 1)]["steps_to_target"] == 2.0
  # 0.16 at seed 100 (as seed 0): 0.35 -> 0.6, at 3/5 of 8 steps: 4.8.
  assert by[(cell["learning_rates"][-1], 100)]["steps_to_target"] == (
      pytest.approx(4.8))
  medians = {float(k): v for k, v in cell["selection_median_steps"].items()}
  means = {float(k): v for k, v in cell["selection_means"].items()}
  assert medians[lr02] == pytest.approx(8 * (0.25 + 0.249) / 2 / 0.65)
  assert medians[lr08] == 2.0
  assert means[lr02] == pytest.approx(0.9005)
  assert means[lr08] == pytest.approx(0.7005)


def test_base_cell_measures_the_probe_along_every_run(example, monkeypatch):
  probe = object()  # Handed to run_trials untouched.
  cell, calls, config = _cell(example, monkeypatch, 16, 0.02, probe=probe)
  assert len(calls) == 3  # the grid, then 0.08 and 0.16
  assert all(c["probe"] is probe and c["probe_every"] == config.noise_every
             for c in calls)
  # What the (fake) run_trials returned under "probe", as each row's
  # "noise": batch 16's evaluations 16, 32, 48, 64, every 3rd from the
  # first (noise_every 3).
  for r in cell["rows"]:
    assert r["noise"] == {"step": [16, 64],
                          "b_simple": [r["lr"] * 1000 + r["seed"]] * 2}


def test_censoring(example):
  a = example["analysis"]
  curve = {"step": [10, 20, 30], "accuracy": [0.5, 0.7, 0.9],
           "loss": [2.0, 1.0, float("nan")]}
  assert a.steps_to_target(curve, "accuracy", 0.7, True) == 20
  assert a.steps_to_target(curve, "accuracy", 0.95, True) is None
  # Between two evaluations: linear interpolation (0.6 is half-way from
  # 0.5 at step 10 to 0.7 at step 20); at or before the first: its step.
  assert a.steps_to_target(curve, "accuracy", 0.6, True) == pytest.approx(15)
  assert a.steps_to_target(curve, "accuracy", 0.85, True) == pytest.approx(
      27.5)
  assert a.steps_to_target(curve, "accuracy", 0.4, True) == 10
  assert a.steps_to_target(curve, "loss", 1.5, False) == pytest.approx(15)
  assert a.steps_to_target(curve, "loss", 0.5, False) is None  # nan: no
  # Not monotone: the first crossing counts (0.8 at 20 after 0.5 at 10).
  bumpy = {"step": [10, 20, 30, 40], "accuracy": [0.5, 0.8, 0.6, 0.9]}
  assert a.steps_to_target(bumpy, "accuracy", 0.7, True) == pytest.approx(
      10 + 10 * 2 / 3)
  # A non-finite evaluation before the crossing: that evaluation's step.
  broken = {"step": [10, 20], "loss": [float("nan"), 1.0]}
  assert a.steps_to_target(broken, "loss", 1.5, False) == 20
  # A censored seed counts as never; the median decides the cell.
  assert a.median_steps([100, 200, None]) == 200
  assert a.median_steps([100, None, None]) is None
  assert a.median_steps([300, 100, 200]) == 200
  assert a.median_steps([100, None]) is None  # (100 + never) / 2: never


def test_select_for_steps_by_hand(example):
  a = example["analysis"]
  # Censored seeds count as never: medians 30 (10, 30, never), 25 (20, 25,
  # never) and never (never, never, 5). Leaving them out would pick 0.4
  # (5) or take 0.1's median as 20.
  steps = {0.1: [10, None, 30], 0.2: [20, 25, None], 0.4: [None, None, 5]}
  finals = {0.1: [0.9, 0.9, 0.9], 0.2: [0.1, 0.1, 0.1], 0.4: [0.9, 0.9, 0.9]}
  assert a.select_for_steps(steps, finals, True) == 0.2
  # An even number of seeds: the mean of the middle two; 15 = 15 ties and
  # the better mean final decides: 0.2 (0.65) for an accuracy, 0.1 (0.6)
  # for a loss.
  steps = {0.1: [10, 20], 0.2: [14, 16], 0.4: [12, 30]}
  finals = {0.1: [0.5, 0.7], 0.2: [0.65, 0.65], 0.4: [0.99, 0.99]}
  assert a.select_for_steps(steps, finals, True) == 0.2
  assert a.select_for_steps(steps, finals, False) == 0.1
  # Every rate censored: the final metric decides.
  never = {0.1: [None, None], 0.2: [None, 50], 0.4: [None, None]}
  assert a.select_for_steps(never, {0.1: [0.3, 0.3], 0.2: [0.2, 0.2],
                                    0.4: [0.4, 0.4]}, True) == 0.4
  assert a.select_for_steps(never, {0.1: [0.3, 0.3], 0.2: [0.2, 0.2],
                                    0.4: [0.4, 0.4]}, False) == 0.2
  # Steps and final both tied: the smaller rate, whatever the order.
  tied = {0.4: [10, 20], 0.2: [15, 15], 0.8: [15, 15]}
  same = {0.4: [0.5, 0.5], 0.2: [0.5, 0.5], 0.8: [0.5, 0.5]}
  assert a.select_for_steps(tied, same, True) == 0.2
  assert a.select_for_steps(tied, same, False) == 0.2


def test_critical_bound_and_text(example):
  a = example["analysis"]
  batches = [16, 32, 64, 128, 256, 512]
  assert a.critical_bound(16, batches) == "upper"
  assert a.critical_bound(512, batches) == "lower"
  assert a.critical_bound(128, batches) is None
  assert a.critical_bound(0, batches) is None
  assert a.bound_text(16, "upper") == "<= 16"
  assert a.bound_text(512, "lower") == ">= 512"
  assert a.bound_text(128, None) == "128"
  assert a.bound_text(0, None) == "none"
  assert a.critical_text({"batch": 16, "bound": "upper", "interval": [16, 32],
                          "interval_bounds": ["upper", None]}) == (
                              "<= 16 [<= 16, 32]")
  assert a.critical_text({"batch": 128, "bound": None,
                          "interval": [64, 512],
                          "interval_bounds": [None, "lower"]}) == (
                              "128 [64, >= 512]")
  assert a.critical_text({"batch": 0, "bound": None, "interval": [0, 16],
                          "interval_bounds": [None, "upper"]}) == (
                              "none [none, <= 16]")


def test_log_interpolate_by_hand(example):
  a = example["analysis"]
  steps, values = [10, 20, 40], [100.0, 400.0, 1600.0]
  # Half-way in steps is the geometric mean of the two checkpoints.
  assert a.log_interpolate(steps, values, 15) == pytest.approx(200.0)
  assert a.log_interpolate(steps, values, 30) == pytest.approx(800.0)
  assert a.log_interpolate(steps, values, 35) == pytest.approx(
      400.0 * 4**0.75)
  assert a.log_interpolate(steps, values, 20) == pytest.approx(400.0)
  # Outside the checkpoints: the nearest one.
  assert a.log_interpolate(steps, values, 5) == 100.0
  assert a.log_interpolate(steps, values, 50) == 1600.0
  # An unresolved (inf) or non-positive neighbour: the other one; both: inf.
  inf = math.inf
  assert a.log_interpolate(steps, [100.0, inf, 1600.0], 15) == 100.0
  assert a.log_interpolate(steps, [100.0, inf, 1600.0], 30) == 1600.0
  assert a.log_interpolate(steps, [0.0, 400.0, 1600.0], 15) == 400.0
  assert a.log_interpolate(steps, [inf, inf, 1600.0], 15) == inf


def _crit(batch, low, high, batches=(16, 32, 64, 128, 256, 512)):
  def bound(b):
    return ("upper" if b == batches[0] else "lower" if b == batches[-1]
            else None) if b else None
  return {"batch": batch, "interval": [low, high], "bound": bound(batch),
          "interval_bounds": [bound(low), bound(high)]}


def test_noise_agreement_by_hand(example):
  a = example["analysis"]
  assert a.NOISE_AGREEMENT_FACTOR == 2.0
  inside = _crit(64, 32, 128)
  # Within 2x of [32, 128]: [16, 256], ends included.
  for b_simple, agrees in ((64.0, True), (16.0, True), (256.0, True),
                           (15.9, False), (256.5, False), (1.0, False)):
    assert a.noise_agreement(b_simple, inside) is agrees, b_simple
  # An end at a grid edge is open: [<= 16, 128] takes any small value...
  low_open = _crit(32, 16, 128)
  assert a.noise_agreement(0.5, low_open) is True
  assert a.noise_agreement(256.0, low_open) is True
  assert a.noise_agreement(300.0, low_open) is False
  # ... and [64, >= 512] any large one.
  high_open = _crit(128, 64, 512)
  assert a.noise_agreement(1e6, high_open) is True
  assert a.noise_agreement(32.0, high_open) is True
  assert a.noise_agreement(31.0, high_open) is False
  # Nothing to agree with: an interval over every batch, an unmeasured
  # B_simple (None or inf), no critical batch.
  assert a.noise_agreement(64.0, _crit(64, 16, 512)) is None
  assert a.noise_agreement(math.inf, inside) is None
  assert a.noise_agreement(None, inside) is None
  assert a.noise_agreement(64.0, _crit(0, 0, 32)) is None


def test_mean_se_and_tolerance(example):
  a = example["analysis"]
  mean, se = a.mean_se([0.70, 0.72, 0.74])
  assert mean == pytest.approx(0.72)
  assert se == pytest.approx(0.02 / math.sqrt(3))
  # 2 * sqrt(se^2 + se^2) = 0.0327 beats the 0.005 floor; tiny se: floor.
  assert a.tolerance(se, se, 0.005) == pytest.approx(
      2 * math.sqrt(2) * 0.02 / math.sqrt(3))
  assert a.tolerance(0.001, 0.001, 0.005) == 0.005


def test_noise_relation_by_hand(example):
  a = example["analysis"]
  assert a.NOISE_RELATION_FACTOR == 4.0
  # Both agree; C / B_simple 2 against 0.4: a factor 5 > 4 differs, 1
  # against 0.3 (3.3) does not, nor 0.25 against 1 (4, on the factor).
  def rel(lamb, adamw):
    return a.noise_relation(
        {"ratio": lamb[0], "agrees": lamb[1]},
        {"ratio": adamw[0], "agrees": adamw[1]})
  assert rel((2.0, True), (0.4, True)) == {
      "differs": True, "ratio_of_ratios": pytest.approx(5.0)}
  assert rel((1.0, True), (0.3, True)) == {
      "differs": False, "ratio_of_ratios": pytest.approx(10 / 3)}
  assert rel((0.25, False), (1.0, False)) == {
      "differs": False, "ratio_of_ratios": 0.25}
  # One agrees and the other does not: differs, at any ratio.
  assert rel((1.0, True), (1.0, False))["differs"] is True
  # A reading missing: unknown.
  assert rel((None, None), (1.0, True)) == {"differs": None,
                                            "ratio_of_ratios": None}
  assert rel((1.0, True), (1.0, None))["differs"] is None
  assert a.noise_relation({}, {"ratio": 1.0, "agrees": True})[
      "differs"] is None


def _critical(table, batches):
  """``{opt: (batch, low, high)}`` -> the summary's ``critical`` (a value
  at the smallest of ``batches`` an upper bound, at the largest a lower)."""
  return {o: _crit(b, lo, hi, batches) for o, (b, lo, hi) in table.items()}


# LAMB's critical batch above AdamW's and LARS's, intervals disjoint.
_LAMB_SCALES_FURTHER = {"lamb": (2048, 2048, 2048), "adamw": (256, 32, 256),
                        "lars": (32, 32, 256), "nesterov": (2048, 256, 2048),
                        "muon": (256, 256, 2048)}
# Everyone's the same.
_NO_DIFFERENCE = {o: (256, 32, 2048) for o in _LAMB_SCALES_FURTHER}


def _summary(tuned, transfer=None, batches=(32, 256, 2048),
             critical=None, gate_passed=True, optimizer_batches=None):
  """A task summary with se 0 (tau = the floor 0.005); an optimizer with
  fewer means than batches trains the first ones only."""
  def cells(table):
    return {o: {b: {"mean": m, "se": 0.0} for b, m in zip(batches, ms)}
            for o, ms in table.items()}
  critical = _LAMB_SCALES_FURTHER if critical is None else critical
  summary = {"batches": list(batches), "higher_is_better": True,
             "tolerance_floor": 0.005, "cells": {
                 "tuned": cells(tuned),
                 "transfer": cells(transfer if transfer else tuned)},
             "gate": {"baseline": 0.1, "best": 0.8 if gate_passed else 0.12,
                      "margin": 0.7 if gate_passed else 0.02,
                      "margin_in_floors": 140.0 if gate_passed else 4.0,
                      "passed": gate_passed,
                      "baseline_label": "the majority class baseline"},
             "critical": _critical({o: critical[o] for o in tuned},
                                   batches)}
  if optimizer_batches is not None:
    summary["optimizer_batches"] = optimizer_batches
  return summary


_FLAT = [0.80, 0.80, 0.80]
_DROP_AT_8X = [0.80, 0.70, 0.60]
_DROP_AT_64X = [0.80, 0.798, 0.70]


def test_verdict_rule(example):
  a = example["analysis"]
  # LAMB keeps its base accuracy to 2048; AdamW and LARS drop at 256; LAMB's
  # critical batch is above theirs with disjoint intervals.
  v = a.task_verdict(_summary({"lamb": _FLAT, "adamw": _DROP_AT_8X,
                               "lars": _DROP_AT_8X, "nesterov": _FLAT}))
  assert v["verdict"] == "reproduced"
  assert v["lamb_wins"] == {"tuned": True, "transfer": True,
                            "critical_batch": True}
  assert v["largest_kept"]["tuned"] == {"lamb": 2048, "adamw": 32,
                                        "lars": 32, "nesterov": 2048}
  # The fixed-budget win alone is partial when the critical batches do not
  # separate...
  v = a.task_verdict(_summary({"lamb": _FLAT, "adamw": _DROP_AT_8X,
                               "lars": _DROP_AT_8X},
                              critical=_NO_DIFFERENCE))
  assert v["verdict"] == "partial"
  assert v["lamb_wins"] == {"tuned": True, "transfer": True,
                            "critical_batch": False}
  # ... or when LAMB's is larger but the intervals touch (LARS's reaches
  # 2048 = LAMB's low end).
  touching = dict(_LAMB_SCALES_FURTHER, lars=(256, 32, 2048))
  v = a.task_verdict(_summary({"lamb": _FLAT, "adamw": _DROP_AT_8X,
                               "lars": _DROP_AT_8X}, critical=touching))
  assert v["lamb_wins"]["critical_batch"] is False
  assert v["verdict"] == "partial"
  # Tuned, AdamW keeps up at the fixed budget: partial on the critical batch
  # alone, fails when that does not separate either, partial again when the
  # untuned arm shows LAMB ahead.
  tuned = {"lamb": _FLAT, "adamw": _FLAT, "lars": _DROP_AT_8X}
  assert a.task_verdict(_summary(tuned))["verdict"] == "partial"
  assert a.task_verdict(_summary(tuned, critical=_NO_DIFFERENCE))[
      "verdict"] == "fails"
  transfer = {"lamb": _FLAT, "adamw": _DROP_AT_8X, "lars": _DROP_AT_8X}
  v = a.task_verdict(_summary(tuned, transfer, critical=_NO_DIFFERENCE))
  assert v["verdict"] == "partial"
  assert v["lamb_wins"] == {"tuned": False, "transfer": True,
                            "critical_batch": False}
  # Within tau: 0.80 -> 0.796 is kept (0.004 <= 0.005), 0.70 is not.
  v = a.task_verdict(_summary({"lamb": _DROP_AT_64X, "adamw": _DROP_AT_8X,
                               "lars": _DROP_AT_8X}))
  assert v["largest_kept"]["tuned"]["lamb"] == 256
  assert v["verdict"] == "reproduced"
  # LAMB keeps longer but ends worse than AdamW at the largest batch.
  v = a.task_verdict(_summary({"lamb": [0.80, 0.80, 0.50],
                               "adamw": [0.90, 0.70, 0.60],
                               "lars": _DROP_AT_8X}, critical=_NO_DIFFERENCE))
  assert v["largest_kept"]["tuned"]["lamb"] == 256
  assert v["lamb_wins"]["tuned"] is False and v["verdict"] == "fails"
  # Every optimizer already degrades at 8x: untestable.
  everyone_drops = {o: _DROP_AT_8X for o in ("lamb", "adamw", "lars")}
  assert a.task_verdict(_summary(everyone_drops))["verdict"] == "untestable"
  # No batch 8x the base: untestable too.
  short = _summary({o: [0.8, 0.8] for o in ("lamb", "adamw", "lars")},
                   batches=(32, 128))
  assert a.task_verdict(short)["verdict"] == "untestable"
  # Without AdamW there is no claim to test.
  assert a.task_verdict(_summary({"lamb": _FLAT, "lars": _DROP_AT_8X}))[
      "verdict"] == "untestable"
  # Across tasks: untestable and uninformative tasks are left out.
  assert a.overall_verdict({"a": "reproduced", "b": "untestable"}) == (
      "reproduced")
  assert a.overall_verdict({"a": "reproduced", "b": "uninformative"}) == (
      "reproduced")
  assert a.overall_verdict({"a": "fails", "b": "uninformative",
                            "c": "untestable"}) == "fails"
  assert a.overall_verdict({"a": "reproduced", "b": "fails"}) == "mixed"
  assert a.overall_verdict({"a": "partial", "b": "reproduced",
                            "c": "uninformative"}) == "mixed"
  assert a.overall_verdict({"a": "untestable"}) == "untestable"
  assert a.overall_verdict({"a": "uninformative"}) == "untestable"


def test_verdict_basis_names_the_tasks_used_and_left_out(example):
  a = example["analysis"]
  assert a.verdict_basis({"mnist1d": "reproduced", "mlm": "uninformative"}) == (
      "rests on mnist1d; left out: mlm (uninformative).")
  assert a.verdict_basis({"mnist1d": "fails", "mlm": "partial"}) == (
      "rests on mnist1d and mlm.")
  assert a.verdict_basis({"mnist1d": "untestable", "mlm": "uninformative"}) == (
      "rests on no task; left out: mnist1d (untestable), mlm "
      "(uninformative).")


def test_a_task_that_fails_the_gate_is_uninformative_never_fails(example):
  a = example["analysis"]
  # Everything else would be "reproduced" (and, below, "fails", then
  # "untestable": no AdamW).
  for tuned, critical in (
      ({"lamb": _FLAT, "adamw": _DROP_AT_8X, "lars": _DROP_AT_8X}, None),
      ({"lamb": _DROP_AT_8X, "adamw": _FLAT, "lars": _FLAT}, _NO_DIFFERENCE),
      ({"lamb": _FLAT, "lars": _DROP_AT_8X}, None)):
    v = a.task_verdict(_summary(tuned, critical=critical, gate_passed=False))
    assert v["verdict"] == "uninformative"
    assert v["reasons"][0] == (
        "gate: the best tuned base-batch result 0.12 beats the majority "
        "class baseline 0.1 by 0.02 (4.0 tau floors; needs 10): failed.")
    assert v["reasons"][-1] == (
        "the task does not beat the majority class baseline by 10 tau "
        "floors: it says nothing about the optimizers, and the overall "
        "verdict leaves it out.")
  v = a.task_verdict(_summary({"lamb": _FLAT, "adamw": _DROP_AT_8X,
                               "lars": _DROP_AT_8X}))
  assert v["reasons"][0].endswith("passed.")
  assert not any("leaves it out" in r for r in v["reasons"])


def test_verdict_prints_critical_batches_at_an_edge_as_bounds(example):
  a = example["analysis"]
  v = a.task_verdict(_summary({"lamb": _FLAT, "adamw": _DROP_AT_8X,
                               "lars": _DROP_AT_8X}))
  # Batches 32, 256, 2048: lamb (2048, 2048, 2048), adamw (256, 32, 256),
  # lars (32, 32, 256).
  [reason] = [r for r in v["reasons"] if r.startswith("critical batch")]
  assert ("lamb >= 2048 [>= 2048, >= 2048], adamw 256 [<= 32, 256], "
          "lars <= 32 [<= 32, 256]; LAMB's is above both") in reason


def test_verdict_compares_at_the_largest_batch_every_optimizer_trained(
    example):
  a = example["analysis"]
  # AdamW and LARS train 32 and 256 only; LAMB and Muon every batch. LAMB
  # drops at 2048 (0.5), but the comparison is at 256, where AdamW and LARS
  # (0.70) are worse than LAMB (0.80): the fixed-budget win holds.
  batches = {"lamb": [32, 256, 2048], "adamw": [32, 256],
             "lars": [32, 256], "muon": [32, 256, 2048]}
  summary = _summary({"lamb": [0.80, 0.80, 0.50], "adamw": [0.80, 0.70],
                      "lars": [0.80, 0.70], "muon": [0.80, 0.80, 0.80]},
                     optimizer_batches=batches)
  assert set(summary["cells"]["tuned"]["adamw"]) == {32, 256}
  v = a.task_verdict(summary)
  assert v["largest_kept"]["tuned"] == {"lamb": 256, "adamw": 32,
                                        "lars": 32, "muon": 2048}
  assert v["lamb_wins"] == {"tuned": True, "transfer": True,
                            "critical_batch": True}
  assert v["verdict"] == "reproduced"
  assert any("at batch 256 LAMB is not worse than adamw and lars" in r
             for r in v["reasons"])
  # Nado et al.: each optimizer against LAMB at the largest batch both
  # trained: AdamW at 256 (0.70 < 0.80: loses), Muon at 2048 (0.80 > 0.50:
  # beats).
  reading = a.nado_reading(summary)
  assert reading["adamw"]["batch"] == 256
  assert reading["adamw"]["final"] == "loses to"
  assert reading["muon"]["batch"] == 2048
  assert reading["muon"]["final"] == "beats"
  # AdamW better than LAMB at 256 by more than tau: LAMB is worse there.
  summary = _summary({"lamb": [0.80, 0.80, 0.80], "adamw": [0.90, 0.82],
                      "lars": [0.80, 0.70]}, optimizer_batches=batches)
  v = a.task_verdict(summary)
  assert v["lamb_wins"]["tuned"] is False
  assert any("at batch 256 LAMB is worse than adamw and lars" in r
             for r in v["reasons"])


@pytest.mark.parametrize("baseline, best, floor, higher, margin, passed", [
    # MNIST-1D: majority class 0.10; 10 x 0.005 = 0.05 needed.
    (0.10, 0.16, 0.005, True, 0.06, True),
    (0.10, 0.15, 0.005, True, 0.05, True),  # exactly on the gate
    (0.10, 0.1499, 0.005, True, 0.0499, False),
    (0.10, 0.08, 0.005, True, -0.02, False),  # worse than the baseline
    # Masked LM: unigram 4.0 nats; 10 x 0.02 = 0.2 needed.
    (4.0, 3.8, 0.02, False, 0.2, True),  # exactly on the gate
    (4.0, 3.81, 0.02, False, 0.19, False),
    (3.817, 3.417, 0.02, False, 0.4, True),
])
def test_learnability_gate(example, baseline, best, floor, higher, margin,
                           passed):
  gate = example["analysis"].learnability_gate(baseline, best, floor, higher)
  assert gate["margin"] == pytest.approx(margin, abs=1e-12)
  assert gate["required"] == pytest.approx(10 * floor)
  assert gate["margin_in_floors"] == pytest.approx(margin / floor)
  assert gate["passed"] is passed
  assert (gate["baseline"], gate["best"]) == (baseline, best)


def test_critical_batch(example):
  a = example["analysis"]
  batches = [16, 32, 64, 128]
  # Perfect scaling from 100 steps at 16: 50, 25, 12.5. 60 at 32 and 30 at
  # 64 are exactly 1.2x (within); 20 at 128 is 1.6x.
  steps = {16: 100, 32: 60, 64: 30, 128: 20}
  assert a.critical_batch(batches, steps) == 64
  assert a.scaling_overhead(60, 100, 32, 16) == pytest.approx(1.2)
  assert a.scaling_overhead(20, 100, 128, 16) == pytest.approx(1.6)
  assert a.scaling_overhead(None, 100, 128, 16) is None
  # Just above 1.2x at 32 stops it there: the base batch.
  assert a.critical_batch(batches, {**steps, 32: 60.5}) == 16
  # Perfect scaling all the way.
  assert a.critical_batch(batches, {16: 80, 32: 40, 64: 20, 128: 10}) == 128
  # Contiguous: a batch within 1.2x after one that is not does not count.
  assert a.critical_batch(batches, {16: 100, 32: 70, 64: 25, 128: 12}) == 16
  # Censored at 64: the critical batch is 32.
  assert a.critical_batch(batches, {**steps, 64: None}) == 32
  # The base batch never reaches the target: no critical batch (0).
  assert a.critical_batch(batches, {**steps, 16: None}) == 0
  # A stricter overhead.
  assert a.critical_batch(batches, steps, overhead=1.1) == 16


def _boot_cells(select_steps, report_steps, select_final=None):
  """``bootstrap_critical_batch``'s cells from ``{B: {lr: [...]}}``."""
  return {b: {"select_steps": select_steps[b],
              "select_final": (select_final or {}).get(
                  b, {lr: [0.5] * len(v) for lr, v in select_steps[b].items()}),
              "report_steps": report_steps[b]} for b in select_steps}


def test_critical_batch_bootstrap_by_hand(example):
  a = example["analysis"]
  batches = [16, 32, 64]
  lo, hi = 0.1, 0.2
  # Two selection seeds, two report seeds, two rates. Perfect scaling from
  # 100 steps at 16 is 50 at 32 and 25 at 64; within 1.2x: <= 60, <= 30.
  # 16: 0.1 is chosen (100 < 120); its report median is 100.
  # 32: the selection seeds give 0.1 (40, 80) and 0.2 (55, 55): medians 60
  #     and 55, so 0.2 is chosen; its report seeds take 55 (1.1x: within).
  #     A selection resample of seed 0 twice has 0.1 at 40 < 55: the choice
  #     flips to 0.1, whose report seeds take 70 (1.4x): critical batch 16.
  # 64: 0.1 is chosen (20 < 40) whatever the draw; its report seeds take 24
  #     and 40: a resample of seed 0 twice has 24 (0.96x: within), seed 1
  #     twice 40 (1.6x), one of each 32 (1.28x).
  select = {16: {lo: [100, 100], hi: [120, 120]},
            32: {lo: [40, 80], hi: [55, 55]},
            64: {lo: [20, 20], hi: [40, 40]}}
  report = {16: {lo: [100, 100], hi: [120, 120]},
            32: {lo: [70, 70], hi: [55, 55]},
            64: {lo: [24, 40], hi: [40, 40]}}
  cells = _boot_cells(select, report)
  boot = a.bootstrap_critical_batch(batches, cells, True)
  # The estimate: 0.2 at 32 (55 steps), 0.1 at 64 (median 32: 1.28x).
  assert boot["batch"] == 32
  assert boot["lr"] == {16: lo, 32: hi, 64: lo}
  assert boot["median_steps"] == {16: 100, 32: 55, 64: 32}
  assert boot["bound"] is None and boot["censored"] is False
  # The 4 x 4 = 16 resamples (selection draws 00, 01, 10, 11; report
  # draws the same): selection 00 (4 resamples) -> 16; the other 3
  # selection draws with report 00 (3) -> 64, with 01, 10, 11 (9) -> 32.
  # Holding the choice at 0.2 would give {32: 12, 64: 4}.
  assert boot["resamples"] == {16: 4, 32: 9, 64: 3}
  # 95%: the 1st (ceil(0.4)) and the 16th (ceil(15.6)) sorted values.
  assert boot["interval"] == [16, 64]
  assert boot["interval_bounds"] == ["upper", "lower"]
  assert a.critical_text(boot) == "32 [<= 16, >= 64]"
  # 50%: the 4th (16) and the 12th (32, the 5th to 13th) values; 20%: the
  # 7th and the 10th.
  assert a.bootstrap_critical_batch(batches, cells, True, level=0.5)[
      "interval"] == [16, 32]
  assert a.bootstrap_critical_batch(batches, cells, True, level=0.2)[
      "interval"] == [32, 32]
  # The selection finals decide a tie of the median steps: at 32, 0.1's
  # seeds at 50 and 60 (median 55, as 0.2's) with the better mean final
  # (an accuracy) make 0.1 the choice and its 70 steps end the scaling
  # at 16; for a loss, 0.2's lower final keeps it.
  tie = {**select, 32: {lo: [50, 60], hi: [55, 55]}}
  finals = {32: {lo: [0.9, 0.9], hi: [0.8, 0.8]}}
  cells = _boot_cells(tie, report, finals)
  assert a.bootstrap_critical_batch(batches, cells, True)["lr"][32] == lo
  assert a.bootstrap_critical_batch(batches, cells, True)["batch"] == 16
  assert a.bootstrap_critical_batch(batches, cells, False)["lr"][32] == hi
  assert a.bootstrap_critical_batch(batches, cells, False)["batch"] == 32
  # At the edges: perfect scaling to 64 is a lower bound (>= 64), in every
  # resample; no scaling at all an upper one (<= 16).
  one = {lo: [1, 1]}
  cells = _boot_cells({16: one, 32: one, 64: one},
                      {16: {lo: [100, 100]}, 32: {lo: [50, 50]},
                       64: {lo: [25, 25]}})
  boot = a.bootstrap_critical_batch(batches, cells, True)
  assert (boot["batch"], boot["bound"], boot["censored"]) == (64, "lower",
                                                              True)
  assert boot["resamples"] == {64: 16}
  assert a.critical_text(boot) == ">= 64 [>= 64, >= 64]"
  cells = _boot_cells({16: one, 32: one, 64: one},
                      {16: {lo: [100, 100]}, 32: {lo: [90, 90]},
                       64: {lo: [25, 25]}})
  boot = a.bootstrap_critical_batch(batches, cells, True)
  assert (boot["batch"], boot["bound"], boot["censored"]) == (16, "upper",
                                                              True)
  assert a.critical_text(boot) == "<= 16 [<= 16, <= 16]"
  # The base batch censored in one of the two report seeds: its median is
  # never in 3 of the 4 report draws (all but seed 0 twice): no critical
  # batch (0, "none") in 12 of the 16 resamples, nor in the estimate.
  cells = _boot_cells({16: one, 32: one, 64: one},
                      {16: {lo: [100, None]}, 32: {lo: [50, 50]},
                       64: {lo: [25, 25]}})
  boot = a.bootstrap_critical_batch(batches, cells, True)
  assert (boot["batch"], boot["bound"], boot["censored"]) == (0, None, False)
  assert boot["median_steps"][16] is None
  assert boot["resamples"] == {0: 12, 64: 4}
  assert a.critical_text(boot) == "none [none, >= 64]"
  with pytest.raises(ValueError, match="same seeds"):
    a.bootstrap_critical_batch(batches, _boot_cells(
        {16: one, 32: one, 64: {lo: [1]}}, {b: one for b in batches}), True)


def test_interval_order(example):
  a = example["analysis"]
  assert a.interval_order([64, 128], [16, 32]) == "above"
  assert a.interval_order([16, 32], [64, 128]) == "below"
  assert a.interval_order([32, 64], [64, 128]) == "overlaps"  # touching
  assert a.interval_order([0, 0], [16, 16]) == "below"


def test_nado_reading_covers_every_other_optimizer(example):
  a = example["analysis"]
  summary = _summary({"lamb": _FLAT, "adamw": _DROP_AT_8X,
                      "lars": _DROP_AT_8X, "nesterov": _FLAT,
                      "muon": [0.80, 0.81, 0.82]})
  assert a.nado_reading(summary) == {
      "adamw": {"final": "loses to", "batch": 2048,
                "critical_batch": "below"},
      "lars": {"final": "loses to", "batch": 2048, "critical_batch": "below"},
      "nesterov": {"final": "matches", "batch": 2048,
                   "critical_batch": "overlaps"},
      "muon": {"final": "beats", "batch": 2048, "critical_batch": "overlaps"}}
  assert ("muon beats LAMB at batch 2048, critical batch overlaps LAMB's" in
          a.nado_text(a.nado_reading(summary)))


def test_verdict_for_a_loss_uses_the_lower_is_better_direction(example):
  a = example["analysis"]
  summary = _summary({"lamb": [2.0, 2.01, 2.015], "adamw": [2.0, 2.3, 2.5],
                      "lars": [2.0, 2.2, 2.4]})
  summary["higher_is_better"] = False
  summary["tolerance_floor"] = 0.02
  assert a.task_verdict(summary)["verdict"] == "reproduced"
  # Losses going up by more than tau: LAMB's rises by 0.1 at 2048.
  summary["cells"]["tuned"]["lamb"][2048]["mean"] = 2.1
  summary["cells"]["transfer"]["lamb"][2048]["mean"] = 2.1
  assert a.task_verdict(summary)["largest_kept"]["tuned"]["lamb"] == 256


# ----------------------------------------------------------------------------
# Config errors name the field.


@pytest.mark.parametrize("field, value, message", [
    ("tasks", ("mnist1d", "imagenet"), "config.tasks"),
    ("optimizers", ("lamb", "adagrad"), "config.optimizers"),
    ("num_learning_rates", 0, "config.num_learning_rates"),
    ("report_seeds", (1, 2, 3), "config.report_seeds"),  # overlaps selection
    ("selection_seeds", (0,), "config.selection_seeds"),
    ("min_steps", 0, "config.min_steps"),
    ("num_workers", 0, "config.num_workers"),
    ("max_warmup_fraction", 1.5, "config.max_warmup_fraction"),
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
  config.min_steps = 1
  with pytest.raises(ValueError, match=r"config\.mnist1d\.batch_sizes.*800"):
    study.run_study(config, str(tmp_path / "c"))
  # Too few steps at the largest batch (8 at 128), or a warmup longer than a
  # quarter of them (3 > 8 / 4).
  config = example["test"].get_config()
  config.min_steps = 9
  with pytest.raises(ValueError, match=r"config\.mnist1d\.budget_examples.*"
                     r"8 steps at the largest batch 128"):
    study.run_study(config, str(tmp_path / "d"))
  config = example["test"].get_config()
  config.mnist1d.warmup_steps = 3
  with pytest.raises(ValueError, match=r"config\.mnist1d\.warmup_steps.*"
                     r"max_warmup_fraction"):
    study.run_study(config, str(tmp_path / "e"))


def _config_error(example, edit):
  config = example["test"].get_config()
  edit(config)
  with pytest.raises(ValueError) as error:
    example["study"].check_config(config)
  return str(error.value)


def test_bad_target_max_batch_and_task_tuning_name_the_field(example):
  def set_target(value):
    def edit(config):
      del config.mnist1d["target"]
      if value is not None:
        config.mnist1d.target = value
    return edit
  # The steps-to-target target: missing, not a number, not finite.
  for value in (None, "high", math.nan, math.inf):
    message = _config_error(example, set_target(value))
    assert message.startswith("config.mnist1d.target: must be a finite "
                              "number"), (value, message)
  # max_batch: one of the batch sizes above the base (here 128), or absent.
  for value in (100, 16, 256):
    message = _config_error(
        example, lambda c, v=value: setattr(c.mnist1d, "max_batch",
                                            {"adamw": v}))
    assert message.startswith("config.mnist1d.max_batch.adamw: must be one "
                              "of the batch sizes above the base, (128,)"), (
                                  value, message)
  config = example["test"].get_config()
  config.mnist1d.max_batch = {"adamw": 128, "nesterov": 16}  # not studied
  example["study"].check_config(config)
  # A task's own seeds and grid size: checked as the global ones, and its
  # report seeds fresh against its selection seeds (its own or global); an
  # overlap names the override that makes it.
  for field, value, name in (
      ("report_seeds", (0, 5), "mnist1d.report_seeds"),  # global selection
      ("selection_seeds", (3,), "mnist1d.selection_seeds"),
      ("report_seeds", (5, 5), "mnist1d.report_seeds"),
      ("num_learning_rates", 0, "mnist1d.num_learning_rates"),
      ("selection_seeds", (100, 7), "mnist1d.selection_seeds")):  # report
    message = _config_error(
        example, lambda c, f=field, v=value: setattr(c.mnist1d, f, v))
    assert message.startswith(f"config.{name}: "), (field, value, message)


def test_task_tuning_and_optimizer_batches(example):
  study = example["study"]
  config = example["default"].get_config()
  assert study.task_tuning(config, "mnist1d") == ([0, 1, 2], [100, 101, 102],
                                                   5)
  assert study.task_tuning(config, "mlm") == ([0, 1], [100, 101], 3)
  config.mnist1d.report_seeds = (7, 8)
  assert study.task_tuning(config, "mnist1d") == ([0, 1, 2], [7, 8], 5)
  config = example["default"].get_config()
  assert study.optimizer_batches(config, "mnist1d", "lamb") == [
      16, 32, 64, 128, 256, 512]
  assert study.optimizer_batches(config, "mnist1d", "muon") == [
      16, 32, 64, 128, 256, 512, 1024]
  # The masked LM: every optimizer at every batch (no max_batch).
  assert study.optimizer_batches(config, "mlm", "adamw") == [4, 16, 64]
  assert study.optimizer_batches(config, "mlm", "muon") == [4, 16, 64]
  config.mlm.max_batch = {"adamw": 16}
  assert study.optimizer_batches(config, "mlm", "adamw") == [4, 16]
  # The plan: 6 + 6 + 6 + 6 + 7 mnist1d cells, 5 x 3 mlm cells, per task
  # batch-ascending.
  plan = study._plan(example["default"].get_config())  # pylint: disable=protected-access
  assert len(plan) == 31 + 15
  assert ("mnist1d", "lamb", 1024) not in plan
  assert ("mnist1d", "muon", 1024) in plan
  for task in ("mnist1d", "mlm"):
    order = [b for t, _, b in plan if t == task]
    assert order == sorted(order)


def test_rerun_config_is_the_default_on_disjoint_seeds(example):
  study = example["study"]
  default, rerun = example["default"].get_config(), example["rerun"].get_config()
  study.check_config(rerun)
  for task in default.tasks:
    a = study.task_tuning(default, task)
    b = study.task_tuning(rerun, task)
    assert not set(a[0] + a[1]) & set(b[0] + b[1]), task
    assert (len(a[0]), len(a[1]), a[2]) == (len(b[0]), len(b[1]), b[2])
  # Nothing else differs but the seeds (and the noise probe's sample).
  seeds = {"selection_seeds", "report_seeds", "noise_seed",
           "mnist1d.selection_seeds", "mnist1d.report_seeds",
           "mlm.selection_seeds", "mlm.report_seeds"}
  diff = study._diff(  # pylint: disable=protected-access
      study._protocol(default), study._protocol(rerun))  # pylint: disable=protected-access
  assert diff and set(diff) <= seeds


def test_shipped_configs_pass_their_checks(example):
  study, trials = example["study"], example["trials"]
  for name in ("default", "gpu", "test", "rerun"):
    study.check_config(example[name].get_config())
  # The minimum protocol, for the CPU study and the GPU one (the
  # CPU study's masked LM: a smaller arm, 3 batch sizes over 16x, that can
  # still give a verdict: README.md, "Protocol").
  for name in ("default", "gpu"):
    config = example[name].get_config()
    assert tuple(config.optimizers) == trials.OPTIMIZERS  # all five
    assert len(config.mnist1d.batch_sizes) >= 7
    assert len(config.mlm.batch_sizes) >= (4 if name == "gpu" else 3)
    assert len(config.selection_seeds) >= 2 and len(config.report_seeds) >= 3
    assert config.lr_factor == 2.0 and config.min_steps >= 100
    for task in ("mnist1d", "mlm"):
      section = config[task]
      batches = section.batch_sizes
      selection, report, _ = study.task_tuning(config, task)
      assert len(selection) >= 2 and len(report) >= 2
      assert batches[-1] >= (16 if (name, task) == ("default", "mlm")
                             else 64) * batches[0]
      for batch in batches:
        schedule = trials.make_schedule(batch, section.budget_examples,
                                        section.warmup_steps,
                                        config.num_evals)
        # At least 100 steps, warmup at most a quarter of them, and the
        # same budget of examples at every batch size, exactly.
        assert schedule.total_steps >= 100, (name, task, batch)
        assert 4 * section.warmup_steps <= schedule.total_steps
        assert schedule.total_steps * batch == section.budget_examples
      # The steps-to-target target, fixed in the config: a value of the
      # task's metric (an accuracy, or nats below the uniform model's).
      assert 0 < section.target < (1 if task == "mnist1d" else
                                   math.log(section.vocab_size))
      # Every optimizer trains at least up to 8x its base batch (the
      # verdict's untestable ratio).
      for opt in config.optimizers:
        assert study.optimizer_batches(config, task, opt)[-1] >= (
            8 * batches[0])


# ----------------------------------------------------------------------------
# Training: a vmapped trial is the trial run alone.


@pytest.fixture(scope="module")
def tiny_mnist1d(example):
  config = example["test"].get_config()
  return example["tasks"].mnist1d_task(config.mnist1d), config


# A rate each optimizer trains the tiny MLP with.
_RATES = {"lamb": 0.05, "adamw": 0.01, "lars": 0.05, "nesterov": 0.05,
          "muon": 0.01}


@pytest.mark.parametrize("optimizer", list(_RATES))
def test_vmapped_trial_equals_the_trial_alone(example, tiny_mnist1d,
                                              optimizer):
  """All five optimizers: one vmapped call trains each trial as if alone."""
  trials = example["trials"]
  assert tuple(_RATES) == trials.OPTIMIZERS
  task, config = tiny_mnist1d
  lr = _RATES[optimizer]
  schedule = trials.make_schedule(16, 256, 2, 4)
  together = trials.run_trials(task, optimizer, config.optimizer, schedule,
                               [lr / 5, lr, 0.0], [0, 1, 1],
                               record_ratios=True)
  alone = trials.run_trials(task, optimizer, config.optimizer, schedule,
                            [lr], [1], record_ratios=True)[0]
  for key in ("accuracy", "loss", "train_loss"):
    np.testing.assert_allclose(together[1]["curve"][key],
                               alone["curve"][key], rtol=2e-5, atol=1e-6)
  assert ("trust_ratios" in alone) == (
      optimizer in trials.TRUST_RATIO_OPTIMIZERS)
  for layer, values in alone.get("trust_ratios", {}).items():
    np.testing.assert_allclose(together[1]["trust_ratios"][layer], values,
                               rtol=2e-5)
  # The injected rate is the one used: rate 0 never moves the parameters,
  # and the rate trains.
  zero = together[2]["curve"]
  assert len(set(zero["loss"])) == 1 and len(set(zero["accuracy"])) == 1
  assert not together[1]["diverged"]
  assert together[1]["curve"]["loss"][-1] < zero["loss"][-1] - 0.05
  # Other rates or seeds do give other runs.
  assert together[0]["curve"]["loss"] != together[1]["curve"]["loss"]


def test_beta2_rule(example, tiny_mnist1d):
  trials = example["trials"]
  # Marek et al.'s constant half-life: 0.999 ** (B / B0); a half-life of
  # ln(1/2) / ln(0.999) = 692.8 steps at 16 is 10.8 steps at 1024, the same
  # 11,085 examples.
  assert trials.beta2_at(0.999, 16, 16, "half_life") == 0.999
  assert trials.beta2_at(0.999, 1024, 16, "half_life") == pytest.approx(
      0.999**64)
  half_life = {b: math.log(0.5) / math.log(trials.beta2_at(0.999, b, 16,
                                                           "half_life"))
               for b in (16, 1024)}
  assert half_life[16] * 16 == pytest.approx(half_life[1024] * 1024)
  assert trials.beta2_at(0.999, 1024, 16, "fixed") == 0.999
  with pytest.raises(ValueError, match="beta2_rule"):
    trials.beta2_at(0.999, 32, 16, "linear")
  # The beta2 handed to a run is the one its optimizer uses: the same run as
  # an optimizer built with that beta2, another run than the default's.
  task, config = tiny_mnist1d
  schedule = trials.make_schedule(16, 256, 2, 4)
  injected = trials.run_trials(task, "adamw", config.optimizer, schedule,
                               [0.01], [0], b2=0.9)[0]["curve"]["loss"]
  default = trials.run_trials(task, "adamw", config.optimizer, schedule,
                              [0.01], [0])[0]["curve"]["loss"]
  hyper = config.optimizer.copy_and_resolve_references()
  hyper.b2 = 0.9
  built = trials.run_trials(task, "adamw", hyper, schedule, [0.01],
                            [0])[0]["curve"]["loss"]
  np.testing.assert_allclose(injected, built, rtol=1e-6)
  assert not np.allclose(injected, default, rtol=1e-4)


def _muon_leaves(state):
  """``{leaf path: "muon" | "adam"}`` from a muon state's two partitions."""
  inner = state.inner_state.inner_states
  out = {}
  for label in ("muon", "adam"):
    moments = inner[label].inner_state[0].mu
    for path, leaf in jax.tree_util.tree_leaves_with_path(
        moments, is_leaf=lambda x: type(x).__name__ == "MaskedNode"):
      if type(leaf).__name__ != "MaskedNode":
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        assert name not in out, name
        out[name] = label
  return out


def test_muon_orthogonalises_hidden_matrices_only(example, tiny_mnist1d,
                                                  tiny_mlm):
  """Muon's split: hidden layers' 2-D kernels; the AdamW fallback for
  embeddings, the output head, biases and LayerNorm."""
  trials = example["trials"]
  mlp, config = tiny_mnist1d
  params = mlp.init(jax.random.key(0))
  tx = trials.make_optimizer("muon", config.optimizer, mlp.orthogonalised)
  leaves = _muon_leaves(tx.init(params))
  # configs/test.py's MLP has one hidden layer (Dense_0), then the head.
  assert {k for k, v in leaves.items() if v == "muon"} == {"Dense_0/kernel"}
  assert {k for k, v in leaves.items() if v == "adam"} == {
      "Dense_0/bias", "Dense_1/bias", "Dense_1/kernel", "LayerNorm_0/bias",
      "LayerNorm_0/scale"}
  bert, _ = tiny_mlm
  params = bert.init(jax.random.key(0))
  leaves = _muon_leaves(trials.make_optimizer(
      "muon", config.optimizer, bert.orthogonalised).init(params))
  muon = {k for k, v in leaves.items() if v == "muon"}
  assert muon == {f"encoder/layer_0/{name}/kernel" for name in (
      "attention/query", "attention/key", "attention/value",
      "attention/output", "intermediate", "output")} | {
          "mlm_head/transform/kernel"}
  adam = {k for k, v in leaves.items() if v == "adam"}
  assert {"embeddings/word/embedding", "embeddings/position/embedding",
          "embeddings/segment/embedding", "mlm_head/bias"} <= adam
  assert all(k.endswith(("bias", "scale", "embedding")) for k in adam)
  with pytest.raises(ValueError, match="orthogonalised"):
    trials.make_optimizer("muon", config.optimizer)
  with pytest.raises(ValueError, match="adagrad"):
    trials.make_optimizer("adagrad", config.optimizer)


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


def _rows(workdir):
  return [json.loads(line) for line in
          pathlib.Path(workdir, "trials.jsonl").read_text().splitlines()]


def test_study_writes_every_output_and_a_verdict(example, finished_study):
  workdir, summary, printed = finished_study
  a, study = example["analysis"], example["study"]
  config = example["test"].get_config()
  # The verdict, computed from the study's own numbers, is printed with
  # what it rests on.
  assert f"VERDICT: {summary['verdict']} ({summary['verdict_basis']})\n" \
         "  mnist1d: " in printed
  verdict = summary["tasks"]["mnist1d"]["verdict"]
  assert verdict in a.VERDICTS
  assert summary["verdict"] in a.VERDICTS + ("mixed",)
  assert summary["verdict_basis"] == (
      "rests on mnist1d." if verdict not in ("untestable", "uninformative")
      else f"rests on no task; left out: mnist1d ({verdict}).")
  for name in ("trials.jsonl", "summary.json", "results.md", "config.json"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  for task in config.tasks:
    for kind in ("final_metric", "steps_to_target", "lr_heatmap",
                 "trust_ratios", "noise_scale"):
      path = os.path.join(workdir, f"{task}_{kind}.png")
      with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  results = pathlib.Path(workdir, "results.md").read_text()
  assert f"**Verdict: {summary['verdict']}**, {summary['verdict_basis']}" in (
      results)
  for kind in ("final_metric", "steps_to_target", "lr_heatmap",
               "trust_ratios", "noise_scale"):
    assert f"(mnist1d_{kind}.png)" in results
  rows = _rows(workdir)
  keys = {"task", "optimizer", "batch", "lr", "seed", "role", "curve",
          "final", "steps_to_target", "steps", "examples", "diverged"}
  assert all(keys <= set(r) for r in rows)
  selection, report = list(config.selection_seeds), list(config.report_seeds)
  task = summary["tasks"]["mnist1d"]
  batches = list(config.mnist1d.batch_sizes)
  base = batches[0]
  assert task["optimizer_batches"] == {o: batches for o in config.optimizers}
  for opt in config.optimizers:
    base_cell = study.load_cell(workdir, f"mnist1d-{opt}-{base}")
    assert base_cell["center_lr"] == (
        config.mnist1d.initial_learning_rates[opt])
    for b in batches:
      cell = study.load_cell(workdir, f"mnist1d-{opt}-{b}")
      cell_rows = [r for r in rows if r["optimizer"] == opt
                   and r["batch"] == b]
      # Above the base, the grid's centre is the base cell's rate for
      # steps x sqrt(B / B0): the transfer arm.
      if b > base:
        assert cell["center_lr"] == pytest.approx(
            base_cell["chosen_lr_steps"] * math.sqrt(b / base))
      assert cell["grid"] == pytest.approx(
          [cell["center_lr"] / 2, cell["center_lr"], cell["center_lr"] * 2])
      # Every rate on every seed, once; the role is the seed's.
      assert sorted((r["lr"], r["seed"]) for r in cell_rows) == sorted(
          (lr, s) for lr in cell["learning_rates"] for s in selection + report)
      assert len(cell["learning_rates"]) == 3 + cell["extensions"]
      assert cell["extensions"] <= config.max_extensions
      assert all(r["role"] == ("select" if r["seed"] in selection
                               else "report") for r in cell_rows)
      assert cell["num_runs"] == len(cell_rows)
      assert task["cell_info"][opt][b]["grid_trials"] == 3 * 4
      # The two choices, from the selection rows: the best mean final; the
      # fewest median steps (a censored seed is never).
      sel = [r for r in cell_rows if r["role"] == "select"]
      lrs = sorted({r["lr"] for r in sel})
      mean = {lr: np.mean([r["final"]["accuracy"] for r in sel
                           if r["lr"] == lr]) for lr in lrs}
      assert cell["chosen_lr"] == max(lrs, key=lambda lr: (mean[lr], -lr))
      median = {lr: np.median([math.inf if r["steps_to_target"] is None
                               else r["steps_to_target"] for r in sel
                               if r["lr"] == lr]) for lr in lrs}
      assert cell["chosen_lr_steps"] == min(
          lrs, key=lambda lr: (median[lr], -mean[lr], lr))
      # The arms: tuned at chosen_lr, tuned for steps at chosen_lr_steps,
      # transfer at the centre (at the base: the rate for steps), each on
      # the report seeds.
      transfer_lr = cell["center_lr"] if b > base else cell["chosen_lr_steps"]
      for arm, lr in (("tuned", cell["chosen_lr"]),
                      ("steps", cell["chosen_lr_steps"]),
                      ("transfer", transfer_lr)):
        stats = task["cells"][arm][opt][b]
        values = [r["final"]["accuracy"] for r in sorted(
            (r for r in cell_rows if r["role"] == "report"
             and r["lr"] == lr), key=lambda r: r["seed"])]
        assert stats["lr"] == lr
        assert stats["values"] == values and len(values) == len(report)
        assert stats["mean"] == pytest.approx(np.mean(values))
      for r in cell_rows:
        # The budget: at least the examples asked for.
        assert r["examples"] >= config.mnist1d.budget_examples
  summary_file = json.loads(pathlib.Path(workdir, "summary.json").read_text())
  assert summary_file["verdict"] == summary["verdict"]
  assert summary_file["verdict_basis"] == summary["verdict_basis"]
  assert summary_file["protocol"] == study.protocol_fingerprint(config)
  other = example["test"].get_config()
  other.mnist1d.target = 0.3
  assert study.protocol_fingerprint(other) != summary_file["protocol"]
  other = example["test"].get_config()
  other.num_workers = 2  # How the study runs, not what it computes.
  assert study.protocol_fingerprint(other) == summary_file["protocol"]
  # The gate: the strongest baseline (mnist1d has one), the best tuned
  # base-batch result and the margin, in summary.json and results.md.
  task = summary_file["tasks"]["mnist1d"]
  assert list(task["baselines"]) == ["majority class"]
  assert task["baseline_name"] == task["gate"]["baseline_name"] == (
      "majority class")
  assert task["baseline"] == task["baselines"]["majority class"]["accuracy"]
  best = max(task["cells"]["tuned"][o][str(base)]["mean"]
             for o in config.optimizers)
  assert 0 < task["baseline"] < 0.5
  assert task["best_base"]["value"] == best
  assert task["margin"] == pytest.approx(best - task["baseline"])
  assert task["gate"]["passed"] is (task["margin"] >= 10 * 0.005)
  assert f"Margin {task['margin']:.4f}" in results
  assert "The gate uses the strongest, the majority class" in results


def test_study_steps_to_target_and_critical_batches(example, finished_study):
  workdir, _, _ = finished_study
  a = example["analysis"]
  config = example["test"].get_config()
  rows = _rows(workdir)
  task = json.loads(pathlib.Path(workdir, "summary.json").read_text())[
      "tasks"]["mnist1d"]
  # The target is the config's; every row's steps to target is where its
  # curve first crosses it, interpolated from the evaluation before.
  target = config.mnist1d.target
  assert task["target"] == target == 0.2
  crossed = 0
  for r in rows:
    steps, acc = r["curve"]["step"], r["curve"]["accuracy"]
    first = next((k for k, v in enumerate(acc) if v >= target), None)
    if first is None:
      assert r["steps_to_target"] is None
    elif first == 0:
      assert r["steps_to_target"] == steps[0]
    else:
      crossed += 1
      assert steps[first - 1] < r["steps_to_target"] <= steps[first]
      # On the straight line between the two evaluations.
      slope = (acc[first] - acc[first - 1]) / (steps[first] - steps[first - 1])
      assert acc[first - 1] + slope * (
          r["steps_to_target"] - steps[first - 1]) == pytest.approx(target)
  # Critical batches, for every optimizer, from every seed's steps at every
  # rate (the choice redone in each of the 2^2 x 2^2 resamples).
  selection, report = list(config.selection_seeds), list(config.report_seeds)
  for opt in config.optimizers:
    batches = task["optimizer_batches"][opt]
    cells = {}
    for b in batches:
      rs = {(r["lr"], r["seed"]): r for r in rows
            if r["optimizer"] == opt and r["batch"] == b}
      lrs = sorted({lr for lr, _ in rs})

      def by(seeds, value, rs=rs, lrs=lrs):
        return {lr: [value(rs[(lr, s)]) for s in seeds] for lr in lrs}
      cells[b] = {"select_steps": by(selection, lambda r: r["steps_to_target"]),
                  "select_final": by(selection,
                                     lambda r: r["final"]["accuracy"]),
                  "report_steps": by(report, lambda r: r["steps_to_target"])}
    expected = a.bootstrap_critical_batch(batches, cells, True)
    critical = task["critical"][opt]
    for key in ("batch", "interval", "censored", "bound", "interval_bounds"):
      assert critical[key] == expected[key], (opt, key)
    assert {int(b): n for b, n in critical["resamples"].items()} == (
        expected["resamples"])
    assert sum(critical["resamples"].values()) == 2**2 * 2**2
    # "censored": a critical batch at an edge of the optimizer's batches.
    assert critical["censored"] is (critical["batch"] in (batches[0],
                                                          batches[-1]))
    # The steps arm's medians are the estimate's.
    for b in batches:
      assert task["cells"]["steps"][opt][str(b)]["lr"] == (
          expected["lr"][b])
      assert task["cells"]["steps"][opt][str(b)][
          "median_steps_to_target"] == expected["median_steps"][b]


def test_study_measures_the_noise_scale_at_the_base_batch(example,
                                                          finished_study):
  workdir, _, _ = finished_study
  a, study = example["analysis"], example["study"]
  config = example["test"].get_config()
  rows = _rows(workdir)
  task = json.loads(pathlib.Path(workdir, "summary.json").read_text())[
      "tasks"]["mnist1d"]
  base = config.mnist1d.batch_sizes[0]
  # At batch 16: 64 steps, evaluated at 16, 32, 48 and 64; the probe at the
  # first evaluation and every 3rd (noise_every): 16 and 48.
  assert config.noise_every == 3
  for r in rows:
    if r["batch"] == base:
      assert r["noise"]["step"] == [16, 48]
      assert set(r["noise"]) == {"step", "b_simple", "trace_sigma",
                                 "grad_sq"}
    else:
      assert "noise" not in r
  report = list(config.report_seeds)
  unresolved = []

  def resolved(v):
    return math.isfinite(v) and v > 0
  for opt in config.optimizers:
    noise = task["noise"][opt]
    cell = study.load_cell(workdir, f"mnist1d-{opt}-{base}")
    assert noise["lr"] == cell["chosen_lr_steps"]
    curve = noise["curve"]
    assert curve["step"] == [16, 48]
    assert not any(math.isnan(v) for v in curve["b_simple"])
    unresolved += [(opt, s, v) for s, v in zip(curve["step"],
                                               curve["b_simple"])
                   if not resolved(v)]
    runs = sorted((r for r in rows if r["optimizer"] == opt
                   and r["batch"] == base and r["role"] == "report"
                   and r["lr"] == noise["lr"]), key=lambda r: r["seed"])
    assert [r["seed"] for r in runs] == report
    # Medians over the report seeds (two: the mean of both).
    for name in ("b_simple", "trace_sigma", "grad_sq"):
      assert curve[name] == pytest.approx(
          [np.median([r["noise"][name][i] for r in runs]) for i in (0, 1)])
    assert curve["accuracy"] == pytest.approx(
        [np.median([r["curve"]["accuracy"][k] for r in runs]) for k in (0, 2)])
    # At each run's target crossing, interpolated in log between the two
    # probes around it (the nearest outside).
    at = []
    for r in runs:
      crossing = r["steps_to_target"]
      assert noise["crossing_steps"][len(at)] == crossing
      if crossing is None:
        at.append(None)
        continue
      b0, b1 = r["noise"]["b_simple"]
      t = min(max((crossing - 16) / 32, 0.0), 1.0)
      if resolved(b0) and resolved(b1):
        at.append(math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0))))
      else:  # An unresolved end: the other one (at an end: that end).
        at.append(b0 if t == 0 else b1 if t == 1 else
                  b0 if resolved(b0) else b1 if resolved(b1) else math.inf)
    assert noise["at_target_by_seed"] == pytest.approx(at)
    critical = task["critical"][opt]
    if None in at:
      assert noise["at_target"] is None and noise["ratio"] is None
    else:
      assert noise["at_target"] == pytest.approx(np.median(at))
      assert noise["ratio"] == (pytest.approx(critical["batch"] / np.median(
          at)) if critical["batch"] else None)
    assert noise["critical"] == critical["batch"]
    assert noise["agrees"] is a.noise_agreement(noise["at_target"], critical)
  # LAMB's relation against AdamW's.
  assert task["noise_relation"] == a.noise_relation(task["noise"]["lamb"],
                                                    task["noise"]["adamw"])
  results = pathlib.Path(workdir, "results.md").read_text()
  assert "**Gradient noise scale**" in results
  assert "| B_simple at step 16 | B_simple at step 48 |" in results
  assert ("LAMB's relation between B_simple and its critical batch" in
          results) is (task["noise_relation"]["differs"] is not None)
  # The probe's sample resolves |G| at every probe step (B_simple finite).
  assert not unresolved, unresolved


def _table(text, header):
  """The rows of the markdown table under ``header``: lists of cells."""
  lines = text.splitlines()
  start = lines.index(header)
  out = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    out.append([c.strip() for c in line.strip().strip("|").split("|")])
  return out


def test_results_md_prints_critical_batches_at_an_edge_as_bounds(
    example, finished_study):
  workdir, summary, _ = finished_study
  task = summary["tasks"]["mnist1d"]
  results = pathlib.Path(workdir, "results.md").read_text()
  table = _table(results, "| optimizer | critical batch | interval | median "
                 "steps to target at 16 |")
  assert [r[0] for r in table] == list(task["cells"]["tuned"])

  def check(text, batches, value):
    if value == 0:
      assert text == "none"
      return
    match = re.fullmatch(r"(<= |>= )?(\d+)", text)
    assert match, text
    assert int(match.group(2)) == value
    sign = {batches[0]: "<= ", batches[-1]: ">= "}.get(value)
    assert match.group(1) == sign, (text, batches)

  for opt, value, interval, _ in table:
    batches = task["optimizer_batches"][opt]
    critical = task["critical"][opt]
    check(value, batches, critical["batch"])
    low, high = re.fullmatch(r"\[(.*), (.*)\]", interval).groups()
    check(low, batches, critical["interval"][0])
    check(high, batches, critical["interval"][1])
  # In the tiny study (batches 16 and 128) every critical batch is a bound
  # or none: no bare 16 or 128 anywhere in the table.
  assert not re.search(r"(?<![<>]= )\b(16|128)\b", "\n".join(
      " | ".join(r[1:3]) for r in table))


def test_results_md_counts_the_resamples_the_bootstrap_used(example,
                                                             finished_study):
  """results.md states how many resamples the interval rests on: all
  nS^nS * nR^nR when that is at most EXACT_BOOTSTRAP_LIMIT, else that many
  drawn (analysis.bootstrap_critical_batch)."""
  workdir, summary, _ = finished_study
  a, report = example["analysis"], example["report"]
  config = example["test"].get_config()
  results = pathlib.Path(workdir, "results.md").read_text()
  # The tiny study: 2^2 * 2^2 = 16, each of them.
  task = summary["tasks"]["mnist1d"]
  assert all(sum(c["resamples"].values()) == 16
             for c in task["critical"].values())
  assert "bootstrap interval over the whole pipeline: 16 resamples" in results
  # configs/gpu.py's 3 selection and 5 report seeds: 27 * 3125 = 84,375
  # possible, 50,000 drawn.
  assert a.EXACT_BOOTSTRAP_LIMIT == 50_000
  assert len(a._resamples(3, 5)) == 50_000  # pylint: disable=protected-access
  gpu = {**summary, "tasks": {"mnist1d": {
      **task, "selection_seeds": [0, 1, 2],
      "report_seeds": [100, 101, 102, 103, 104]}}}
  text = report.results_markdown(config, gpu, {"mnist1d": []})
  assert "over the whole pipeline: 50,000 resamples" in text, re.search(
      r"whole pipeline: [0-9,]+ resamples", text).group(0)


_OUTPUTS = ("results.md", "summary.json", "trials.jsonl",
            "mnist1d_final_metric.png", "mnist1d_steps_to_target.png",
            "mnist1d_lr_heatmap.png", "mnist1d_trust_ratios.png",
            "mnist1d_noise_scale.png")


def _read(workdir):
  return {name: pathlib.Path(workdir, name).read_bytes() for name in _OUTPUTS}


def test_rerun_skips_finished_cells_and_reproduces_results(example,
                                                           finished_study):
  study = example["study"]
  workdir, _, _ = finished_study
  config = example["test"].get_config()
  outputs = _read(workdir)
  again = study.run_study(config, workdir)
  assert again["run"]["trained"] == []
  assert _read(workdir) == outputs
  # A study killed mid-way: the cells it finished are kept, and the rest,
  # run again (here: three cells, the first run stopping after one, the
  # second training two chains on two worker processes), give the same
  # numbers, and the same bytes.
  copy = workdir + "_killed"
  shutil.copytree(workdir, copy)
  lost = ["mnist1d-lamb-128", "mnist1d-adamw-128", "mnist1d-lars-128"]
  for name in lost:
    os.remove(os.path.join(copy, "cells", f"{name}.json"))
  os.remove(os.path.join(copy, "results.md"))
  config.stop_after_cells = 1
  stopped = study.run_study(config, copy)
  assert stopped["run"] == {"trained": [lost[0]], "stopped": True}
  assert not os.path.exists(os.path.join(copy, "results.md"))
  config.stop_after_cells = 0
  config.num_workers = 2
  resumed = study.run_study(config, copy)
  assert resumed["run"]["trained"] == lost[1:]
  assert _read(copy) == outputs
  assert not [f for f in os.listdir(os.path.join(copy, "cells"))
              if ".tmp" in f]
  # Another protocol in the same workdir is refused, naming the fields.
  config.num_learning_rates = 5
  with pytest.raises(ValueError, match="num_learning_rates"):
    study.run_study(config, copy)


def test_outputs_are_rebuilt_from_the_cells_byte_for_byte(example,
                                                          finished_study,
                                                          tmp_path):
  study = example["study"]
  workdir, _, _ = finished_study
  config = example["test"].get_config()
  outputs = _read(workdir)
  copy = tmp_path / "study"
  shutil.copytree(workdir, copy)
  for name in _OUTPUTS:
    os.remove(copy / name)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    study.rebuild_outputs(config, str(copy))
  assert _read(copy) == outputs
  assert printed.getvalue().startswith("VERDICT: ")
  # Nothing to rebuild from: a missing cell, or no study at all.
  os.remove(copy / "cells" / "mnist1d-lars-128.json")
  with pytest.raises(ValueError, match="mnist1d-lars-128"):
    study.rebuild_outputs(config, str(copy))
  with pytest.raises(ValueError, match="no config.json"):
    study.rebuild_outputs(config, str(tmp_path / "empty"))


@pytest.fixture(scope="module")
def tiny_mlm(example, tmp_path_factory):
  config = example["default"].get_config()
  section = config.mlm
  section.vocab_size, section.seq_length, section.eval_examples = 256, 16, 32
  section.hidden_size, section.num_layers, section.num_heads = 16, 1, 1
  section.intermediate_size = 32
  task = example["tasks"].make_task("mlm", section,
                                    str(tmp_path_factory.mktemp("mlm")))
  return task, config


def test_calibration_probes_see_the_base_batch_only(tmp_path):
  """calibrate.py's pilot trains every optimizer alike at the base batch
  alone (the evidence the sizes were chosen on)."""
  script = str(_EXAMPLE / "calibrate.py")
  common = ["--config", str(_EXAMPLE / "configs" / "test.py"),
            "--config.optimizers=adamw", f"--workdir={tmp_path}"]
  subprocess.run([sys.executable, script, "--mode=pilot", "--task=mnist1d",
                  "--num_rates=2"] + common, check=True, capture_output=True)
  pilot = json.loads((tmp_path / "pilot_mnist1d.json").read_text())["result"]
  assert pilot["batch"] == 16 and pilot["steps"] == 1024 // 16
  adamw = pilot["optimizers"]["adamw"]
  assert adamw["rates"] == pytest.approx([0.004 / 2**0.5, 0.004 * 2**0.5])
  assert adamw["best"] == max(adamw["final"])
  # The gate's baseline: the strongest (mnist1d's only one).
  assert list(pilot["baselines"]) == ["majority class"]
  assert pilot["baseline_name"] == "majority class"
  assert adamw["margin"] == pytest.approx(
      adamw["best"] - pilot["baselines"]["majority class"]["accuracy"])


def _docs_link_no_results():
  docs = (_EXAMPLE.parents[1] / "docs" / "batch_scaling.md").read_text()
  assert "results/" not in re.sub(r"<!--.*?-->", "", docs, flags=re.S)


def test_committed_results_belong_to_the_default_config(example):
  """No stale results: what results/ holds was made with configs/default.py
  as committed (summary.json records the protocol's fingerprint) in the v3
  format (bounds at the grid's edges, the noise scale, the per-optimizer
  batches), and every figure results.md shows is there; with no results,
  nothing links to them."""
  results = _EXAMPLE / "results"
  if not results.exists():
    _docs_link_no_results()
    return
  study = example["study"]
  config = example["default"].get_config()
  summary = json.loads((results / "summary.json").read_text())
  assert summary["protocol"] == study.protocol_fingerprint(config)
  text = (results / "results.md").read_text()
  assert f"**Verdict: {summary['verdict']}**, {summary['verdict_basis']}" in (
      text)
  for name, task in summary["tasks"].items():
    assert task["target"] == config[name].target
    assert task["optimizer_batches"] == {
        o: study.optimizer_batches(config, name, o) for o in config.optimizers}
    base = str(config[name].batch_sizes[0])
    for o in config.optimizers:
      critical = task["critical"][o]
      assert isinstance(critical["censored"], bool), (name, o)
      assert critical["bound"] in (None, "upper", "lower")
      assert set(task["noise"][o]) >= {"at_target", "ratio", "agrees",
                                        "curve"}
      assert task["cells"]["steps"][o][base]["lr"] == task["noise"][o]["lr"]
    for kind in ("final_metric", "steps_to_target", "lr_heatmap",
                 "trust_ratios", "noise_scale"):
      assert f"]({name}_{kind}.png)" in text, (name, kind)
  for figure in re.findall(r"\]\(([^)]+\.png)\)", text):
    assert (results / figure).is_file(), figure


def test_committed_results_rebuild_from_the_committed_cells(example,
                                                            tmp_path):
  """The committed numbers are the cells' numbers: rebuilding the outputs
  from results/cells.tar.xz (the finished study's cells and config.json)
  writes results.md and summary.json byte for byte as committed. (The PNGs
  come out identical too with the matplotlib the study ran with, 3.11.2; they
  are not compared here, since another matplotlib may draw other bytes.)"""
  results = _EXAMPLE / "results"
  if not results.exists():
    _docs_link_no_results()
    return
  with tarfile.open(results / "cells.tar.xz") as archive:
    if hasattr(tarfile, "data_filter"):
      archive.extractall(tmp_path, filter="data")
    else:  # Python < 3.11.4: the archive is ours, names checked below.
      assert all(not m.name.startswith(("/", "..")) for m in archive)
      archive.extractall(tmp_path)
  with contextlib.redirect_stdout(io.StringIO()) as printed:
    summary = example["study"].rebuild_outputs(
        example["default"].get_config(), str(tmp_path))
  for name in ("results.md", "summary.json"):
    assert (tmp_path / name).read_bytes() == (results / name).read_bytes(), (
        name)
  assert f"VERDICT: {summary['verdict']}" in printed.getvalue()


def test_mlm_task_uses_the_bert_example_and_learns(example, tiny_mlm):
  trials = example["trials"]
  task, config = tiny_mlm
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
  # The gate's baselines, from the same held-out masked tokens: a unigram
  # model (at most the uniform model's log(V - 5) nats) with the best
  # constant's accuracy, and a bigram on the left neighbour, which on real
  # text is the stronger: the gate's.
  assert set(task.baselines) == {"unigram", "bigram"}
  unigram, bigram = task.baselines["unigram"], task.baselines["bigram"]
  assert unigram["description"] and bigram["description"]
  assert 0 < bigram["loss"] < unigram["loss"] < math.log(256 - 5)
  assert example["tasks"].strongest_baseline(task.baselines, "loss",
                                             False) == "bigram"
  weights = np.asarray(task.data["masked_weights"]) > 0
  targets = np.asarray(task.data["masked_ids"])[weights]
  counts = np.bincount(targets)
  assert unigram["accuracy"] == pytest.approx(counts.max() / len(targets))


def test_unigram_cross_entropy_by_hand(example):
  tasks = example["tasks"]
  # Special tokens 0..4 are left out; 5 twice, 6 and 7 once, add-one
  # smoothing: p = 3/7, 2/7, 2/7. Targets 5 and 7 (weight 1), and a padding
  # slot (weight 0).
  stream = np.array([2, 5, 5, 3, 6, 7, 3, 0], np.int32)
  ce = tasks.unigram_cross_entropy(stream, np.array([[5, 7, 0]]),
                                   np.array([[1.0, 1.0, 0.0]]), vocab_size=8,
                                   num_special=5)
  assert ce == pytest.approx(-(math.log(3 / 7) + math.log(2 / 7)) / 2)
  # A token never seen in training costs log(N + V') = log(7).
  ce = tasks.unigram_cross_entropy(stream, np.array([[5, 5]]),
                                   np.array([[1.0, 0.0]]), 9, 5)
  assert ce == pytest.approx(-math.log(3 / 8))
  with pytest.raises(ValueError, match="special"):
    tasks.unigram_cross_entropy(stream, np.array([[4]]), np.array([[1.0]]),
                                8, 5)


def test_mnist1d_baseline_is_the_majority_class(example, tiny_mnist1d):
  task, config = tiny_mnist1d
  data = example["tasks"].mnist1d_dataset(config.mnist1d.num_samples)
  counts = collections.Counter(data["y"].tolist())
  majority = max(counts, key=lambda c: (counts[c], -c))
  expected = sum(y == majority for y in data["y_test"]) / len(data["y_test"])
  assert task.baselines == {"majority class": {
      "description": f"the majority class of the training signals "
                     f"({majority})", "accuracy": pytest.approx(expected)}}


def test_strongest_baseline(example):
  tasks = example["tasks"]
  baselines = {"unigram": {"loss": 3.8, "accuracy": 0.07},
               "bigram": {"loss": 2.9},
               "constant": {"loss": 4.8, "accuracy": 0.09}}
  assert tasks.strongest_baseline(baselines, "loss", False) == "bigram"
  del baselines["bigram"]
  assert tasks.strongest_baseline(baselines, "accuracy", True) == "constant"
  assert tasks.strongest_baseline(baselines, "loss", False) == "unigram"


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


def test_probe_is_measured_at_the_first_and_every_kth_evaluation(
    example, tiny_mnist1d):
  trials = example["trials"]
  task, config = tiny_mnist1d
  # The shapes of test_micro_batches_and_padding_do_not_change_the_run's
  # (one compile): 16 steps, evaluated at 4, 8, 12 and 16.
  schedule = trials.make_schedule(16, 256, 2, 4)
  assert schedule.eval_steps == [4, 8, 12, 16]

  def held_out(params, data):
    return {"held_out_loss": task.evaluate(params, data)["loss"]}
  probe = jax.jit(jax.vmap(held_out, in_axes=(0, None)))
  lrs, seeds = [0.02, 0.05], [0, 1]
  probed = trials.run_trials(task, "adamw", config.optimizer, schedule, lrs,
                             seeds, probe=probe, probe_every=2)
  plain = trials.run_trials(task, "adamw", config.optimizer, schedule, lrs,
                            seeds)
  for with_probe, without in zip(probed, plain):
    # Measuring does not change the run.
    assert with_probe["curve"] == without["curve"]
    assert "probe" not in without
    # The first evaluation and every 2nd: 1, 2 and 4 (steps 4, 8 and 16),
    # on the parameters there, whose held-out loss the curve has.
    assert with_probe["probe"]["step"] == [4, 8, 16]
    np.testing.assert_allclose(
        with_probe["probe"]["held_out_loss"],
        [with_probe["curve"]["loss"][k] for k in (0, 1, 3)], rtol=1e-6)
  assert probed[0]["probe"] != probed[1]["probe"]
