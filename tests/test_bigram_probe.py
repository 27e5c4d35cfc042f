"""The masked LM's bigram baseline (tasks.bigram_cross_entropy) and the
crossing rule of examples/batch_scaling/probe_mlm.py."""

import math
import pathlib

import numpy as np
import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parents[1] / "examples" /
            "batch_scaling")
_MODULES = ("probe_mlm", "study", "tasks", "trials", "analysis", "plots",
            "report", "mlm_pipeline", "noise_scale", "configs",
            "configs.default", "corpus", "wordpiece", "masking")


@pytest.fixture(scope="module")
def example():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield {"tasks": load("tasks"), "mlm_pipeline": load("mlm_pipeline"),
           "probe_mlm": load("probe_mlm")}


def _reference(train, held_out_windows, positions, weights, vocab_size,
               num_special, cls_id):
  """The bigram cross-entropy, token by token in Python floats."""
  window = len(held_out_windows[0]) - 2
  counts = {}
  for i, t in enumerate(train):
    if t < num_special:
      continue
    left = cls_id if i % window == 0 else train[i - 1]
    counts[(left, t)] = counts.get((left, t), 0) + 1
  num_targets = vocab_size - num_special
  total, count = 0.0, 0.0
  for row, (pos_row, w_row) in enumerate(zip(positions, weights)):
    for pos, w in zip(pos_row, w_row):
      if not w:
        continue
      left, t = held_out_windows[row][pos - 1], held_out_windows[row][pos]
      c_left = sum(c for (l, _), c in counts.items() if l == left)
      p = (counts.get((left, t), 0) + 1) / (c_left + num_targets)
      total -= w * math.log(p)
      count += w
  return total / count


def test_bigram_by_hand(example):
  tasks, ip = example["tasks"], example["mlm_pipeline"]
  num_special = len(ip.SPECIAL_TOKENS)  # 5: [PAD] [UNK] [CLS] [SEP] [MASK]
  sep, cls = ip.wordpiece.SEP_ID, ip.wordpiece.CLS_ID
  vocab_size = 12
  train = np.array([5, 6, 7, 5, 6, sep, 8, 9, 5, 7, 7, 6, sep, 10, 5],
                   np.int32)
  held_out = np.array([5, 6, 9, 7, sep, 11, 5, 6], np.int32)
  seq_length = 6  # Windows of 4.
  windows = ip.eval_windows(held_out, seq_length)
  np.testing.assert_array_equal(
      windows, [[cls, 5, 6, 9, 7, sep], [cls, sep, 11, 5, 6, sep]])
  # Targets: 6 (left 5), 5 (left [CLS]), 7 (left 9); 11 (left [SEP]), 6
  # (left 5); one padding slot.
  positions = np.array([[2, 1, 4], [2, 4, 0]], np.int32)
  weights = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  targets = np.where(weights > 0, windows[[[0], [1]], positions], 0)
  got = tasks.bigram_cross_entropy(train, windows, positions, targets,
                                   weights, vocab_size, num_special)
  want = _reference(train.tolist(), windows.tolist(), positions.tolist(),
                    weights.tolist(), vocab_size, num_special, cls)
  assert got == pytest.approx(want, rel=1e-12)
  # By hand, one target: after [CLS] (training windows start at 0, 4, 8,
  # 12: 5, 6 ([SEP] is no target), 5, [SEP] -> 3 pairs, 2 of them to 5),
  # p(5 | [CLS]) = (2 + 1) / (3 + 7).
  one = tasks.bigram_cross_entropy(train, windows[:1], positions[:1, 1:2],
                                   targets[:1, 1:2], weights[:1, 1:2],
                                   vocab_size, num_special)
  assert one == pytest.approx(-math.log(3 / 10), rel=1e-12)
  with pytest.raises(ValueError, match="not the sequences"):
    tasks.bigram_cross_entropy(train, windows, positions, targets + 1,
                               weights, vocab_size, num_special)


def test_eval_windows_are_the_masked_sequences(example):
  ip = example["mlm_pipeline"]
  num_special = len(ip.SPECIAL_TOKENS)
  stream = (np.arange(3_000, dtype=np.int32) * 7) % 60 + num_special
  batch = ip.eval_batches(stream, 16, 80, seed=0, max_examples=50)
  windows = ip.eval_windows(stream, 16, max_examples=50)
  assert windows.shape == batch["input_ids"].shape
  rows = np.arange(windows.shape[0])[:, None]
  real = batch["masked_weights"] > 0
  np.testing.assert_array_equal(
      windows[rows, batch["masked_positions"]][real],
      batch["masked_ids"][real])
  masked = np.zeros(windows.shape, bool)
  masked[np.broadcast_to(rows, real.shape)[real],
         batch["masked_positions"][real]] = True
  np.testing.assert_array_equal(batch["input_ids"][~masked],
                                windows[~masked])


def test_a_deterministic_successor_makes_the_bigram_beat_the_unigram(
    example):
  tasks, ip = example["tasks"], example["mlm_pipeline"]
  num_special = len(ip.SPECIAL_TOKENS)
  vocab_size = num_special + 20
  rng = np.random.default_rng(0)
  # Each token determines the next: t -> (3 t + 1) mod 20 on the 20 ids,
  # restarted at random points.
  pieces = []
  for _ in range(300):
    t = int(rng.integers(20))
    for _ in range(int(rng.integers(5, 40))):
      pieces.append(t + num_special)
      t = (3 * t + 1) % 20
  stream = np.asarray(pieces, np.int32)
  train, held_out = stream[:4000], stream[4000:]
  batch = ip.eval_batches(held_out, 18, vocab_size, seed=0)
  windows = ip.eval_windows(held_out, 18)
  bigram = tasks.bigram_cross_entropy(
      train, windows, batch["masked_positions"], batch["masked_ids"],
      batch["masked_weights"], vocab_size, num_special)
  unigram = tasks.unigram_cross_entropy(
      train, batch["masked_ids"], batch["masked_weights"], vocab_size,
      num_special)
  assert unigram > 2.5  # Near log(20) = 3.0.
  assert bigram < 1.0
  assert bigram < unigram


def test_first_below(example):
  first_below = example["probe_mlm"].first_below
  tokens = [100, 200, 300, 400]
  assert first_below(tokens, [3.0, 2.9, 2.7, 2.6], 2.8) == 300
  assert first_below(tokens, [3.0, 2.8, 2.9, 2.85], 2.8) is None  # Strict.
  assert first_below(tokens, [2.0, 3.0, 1.0, 1.0], 2.5) == 100
  assert first_below(tokens, [float("nan"), float("inf"), 2.0, 2.0],
                     2.5) == 300
  assert first_below([], [], 1.0) is None


def test_parse_runs(example):
  parse_runs = example["probe_mlm"].parse_runs
  assert parse_runs(["lamb:0.01", "adamw:1e-3", "lamb:0.02"]) == {
      "lamb": [0.01, 0.02], "adamw": [0.001]}
  with pytest.raises(ValueError):
    parse_runs(["lamb"])
