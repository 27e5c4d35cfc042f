"""The quickstart example trains: held-out loss goes down, metrics are finite."""

import math
import pathlib

import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parents[1] / "examples" /
            "quickstart")
# Top-level module names of the example (it is run as a script, not a
# package); cleared around the import so another example's `train` cannot be
# picked up from sys.modules.
_MODULES = ("train", "models", "input_pipeline", "configs", "configs.default",
            "configs.test")


@pytest.fixture(scope="module")
def example():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield load("train"), load("configs.test")


def test_tiny_run_learns(example, tmp_path):
  train, test_config = example
  metrics = train.train_and_evaluate(test_config.get_config(), str(tmp_path))
  for key in ("initial_eval_loss", "eval_loss", "eval_accuracy",
              "train_loss", "baseline_accuracy", "unigram_loss"):
    assert math.isfinite(metrics[key]), (key, metrics[key])
  assert metrics["eval_loss"] < metrics["initial_eval_loss"] - 0.5
  assert 0.0 <= metrics["eval_accuracy"] <= 1.0
  # Even the tiny run beats always predicting the most frequent character.
  assert metrics["eval_accuracy"] > metrics["baseline_accuracy"] + 0.05
  assert metrics["history"], "no progress line was logged"
  for entry in metrics["history"]:
    for value in entry["trust_ratios"].values():
      assert math.isfinite(value) and value > 0
  assert (tmp_path / "metrics.json").exists()


def test_dict_config_overrides_defaults(example):
  train, _ = example
  metrics = train.train_and_evaluate(
      {"optimizer": "adamw", "steps": 5, "batch_size": 64, "hidden": 32,
       "log_every": 5, "eval_examples": 512, "final_eval_examples": 512})
  assert math.isfinite(metrics["eval_loss"])
  assert metrics["eval_loss"] < metrics["initial_eval_loss"]
  assert "trust_ratios" not in metrics["history"][-1]
