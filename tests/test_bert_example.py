"""The BERT example: trains, logs, checkpoints, resumes exactly, masks as BERT.

The training runs share one JAX persistent compilation cache (a temporary
directory), so the runs after the first load their compiled steps instead of
compiling them again.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "bert"
# Top-level module names of the example (run as a script, not a package),
# cleared around the import so another example's `train` cannot be picked up.
_MODULES = ("train", "recipe", "steps", "models", "input_pipeline",
            "corpus", "wordpiece", "masking", "prepare_data", "utils",
            "metrics", "configs",
            "configs.default", "configs.test", "configs.bert_base",
            "configs.bert_large")
_TRAIN_FIELDS = ("step", "phase", "loss", "learning_rate", "tokens_per_sec")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  import jax  # pylint: disable=import-outside-toplevel
  saved_modules = {name: sys.modules.pop(name) for name in _MODULES
                   if name in sys.modules}
  cache_options = ("jax_compilation_cache_dir",
                   "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes")
  saved_options = {name: getattr(jax.config, name) for name in cache_options}
  jax.config.update("jax_compilation_cache_dir",
                    str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  sys.path.insert(0, str(_EXAMPLE))
  try:
    # pylint: disable=import-outside-toplevel
    import input_pipeline
    import masking
    import models
    import train
    import wordpiece
    from configs import bert_base
    from configs import test as test_config
    # pylint: enable=import-outside-toplevel
    yield dict(train=train, models=models, input_pipeline=input_pipeline,
               masking=masking, wordpiece=wordpiece,
               test_config=test_config, bert_base=bert_base)
  finally:
    sys.path.remove(str(_EXAMPLE))
    for name in _MODULES:
      sys.modules.pop(name, None)
    sys.modules.update(saved_modules)
    for name, value in saved_options.items():
      jax.config.update(name, value)


def _rows(workdir, kind="train"):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if r["kind"] == kind]


@pytest.fixture(scope="module")
def full_run(example, tmp_path_factory):
  """The test configuration, uninterrupted: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp("bert_full")
  summary = example["train"].train_and_evaluate(
      example["test_config"].get_config(), str(workdir))
  return workdir, summary


def test_run_learns_and_writes_its_outputs(example, full_run):
  workdir, summary = full_run
  config = example["test_config"].get_config()
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == list(range(1, config.total_steps + 1))
  for row in rows:
    for field in _TRAIN_FIELDS:
      assert field in row and math.isfinite(row[field]), (field, row)
    assert row["tokens_per_sec"] > 0
    # LAMB's trust ratios of the adapted (non-bias, non-norm) leaves.
    assert row["trust_ratios"]
    assert not any("bias" in k or "norm" in k for k in row["trust_ratios"])
    assert all(v > 0 for v in row["trust_ratios"].values())
  assert {r["phase"] for r in rows} == {1, 2}
  # The learning rate is warmed up again from zero at the phase change.
  first_of_phase_2 = next(r for r in rows if r["phase"] == 2)
  assert first_of_phase_2["learning_rate"] == 0.0
  assert rows[0]["learning_rate"] == 0.0
  assert max(r["learning_rate"] for r in rows) == pytest.approx(
      config.learning_rate)
  # The loss falls: from log(vocabulary) at initialisation.
  first, last = rows[0]["loss"], np.mean([r["loss"] for r in rows[-3:]])
  assert first == pytest.approx(math.log(config.vocab_size), abs=0.2)
  assert last < first - 0.1, [r["loss"] for r in rows]

  evals = _rows(workdir, "eval")
  assert evals and evals[-1]["step"] == config.total_steps
  for row in evals:
    assert 0.0 <= row["mlm_accuracy"] <= 1.0 and math.isfinite(row["loss"])
    assert 0.0 < row["baseline_accuracy"] < 1.0
  assert evals[-1]["loss"] < evals[0]["loss"]
  assert summary["mlm_accuracy"] == evals[-1]["mlm_accuracy"]
  assert summary["end_step"] == config.total_steps
  assert summary["final_loss"] == rows[-1]["loss"]

  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  png = workdir / "training.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (workdir / "checkpoints" / str(config.total_steps)).is_dir()
  assert json.loads((workdir / "summary.json").read_text())["end_step"] == (
      config.total_steps)


def test_resume_continues_exactly(example, full_run, tmp_path):
  """Stopped at step 5 (mid-phase: the grain iterator's state is restored)
  and at step 9 (the end of phase 1: phase 2's data starts), then run to the
  end == one uninterrupted run."""
  full_workdir, _ = full_run
  train = example["train"]
  # The full run's shards (its trained tokenizer is not reproducible
  # across processes; the prepared data directory pins it).
  data_dir = str(full_workdir / "data")
  config = example["test_config"].get_config()
  config.data_dir = data_dir
  config.stop_at_step = 5
  first = train.train_and_evaluate(config, str(tmp_path))
  assert not first["data_prepared"]
  assert first["end_step"] == 5
  assert [r["step"] for r in _rows(tmp_path)] == [1, 2, 3, 4, 5]
  # A row logged after the last checkpoint (a preempted run) is dropped
  # when the run resumes, and logged again.
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps({"kind": "train", "step": 6, "loss": -1.0}) + "\n")
  config.stop_at_step = 9
  assert train.train_and_evaluate(config, str(tmp_path))["start_step"] == 5

  config.stop_at_step = 0
  second = train.train_and_evaluate(config, str(tmp_path))
  assert second["start_step"] == 9
  assert second["end_step"] == config.total_steps
  resumed = _rows(tmp_path)
  uninterrupted = _rows(full_workdir)
  assert [r["step"] for r in resumed] == list(
      range(1, config.total_steps + 1))
  np.testing.assert_allclose([r["loss"] for r in resumed],
                             [r["loss"] for r in uninterrupted],
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose([r["learning_rate"] for r in resumed],
                             [r["learning_rate"] for r in uninterrupted])
  assert second["mlm_accuracy"] == pytest.approx(
      _rows(full_workdir, "eval")[-1]["mlm_accuracy"], abs=1e-6)


def test_main_parses_flags(example, full_run, tmp_path):
  """main.py, as a user runs it: --config file and --config.FIELD overrides."""
  import jax  # pylint: disable=import-outside-toplevel
  del example
  full_workdir, _ = full_run
  env = dict(os.environ)
  env.update(
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  result = subprocess.run(
      [sys.executable, str(_EXAMPLE / "main.py"), f"--workdir={tmp_path}",
       f"--config={_EXAMPLE / 'configs' / 'test.py'}",
       f"--config.data_dir={full_workdir / 'data'}",
       "--config.stop_at_step=2", "--config.eval_every=1"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "held-out MLM accuracy" in result.stdout
  assert [r["step"] for r in _rows(tmp_path)] == [1, 2]
  assert [r["step"] for r in _rows(tmp_path, "eval")] == [1, 2]
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["end_step"] == 2 and not summary["data_prepared"]
  # A misspelt field is an error, not a silent default.
  result = subprocess.run(
      [sys.executable, str(_EXAMPLE / "main.py"), f"--workdir={tmp_path}",
       f"--config={_EXAMPLE / 'configs' / 'test.py'}",
       "--config.total_step=2"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode != 0


def test_eight_devices_fsdp_scanned_matches_one_device(example, full_run,
                                                     tmp_path):
  """8 fake CPU devices, FSDP, nn.scan + layer_axes: the same losses."""
  import jax  # pylint: disable=import-outside-toplevel
  del example
  full_workdir, _ = full_run
  env = dict(os.environ)
  env.update(
      XLA_FLAGS="--xla_force_host_platform_device_count=8",
      JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  result = subprocess.run(
      [sys.executable, str(_EXAMPLE / "main.py"), f"--workdir={tmp_path}",
       f"--config={_EXAMPLE / 'configs' / 'test.py'}",
       f"--config.data_dir={full_workdir / 'data'}",
       "--config.stop_at_step=4", "--config.fsdp=True",
       "--config.fsdp_min_size=256", "--config.scan_layers=True"],
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "8 device(s)" in result.stdout and "FSDP" in result.stdout
  rows = _rows(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in rows],
                             [r["loss"] for r in _rows(full_workdir)[:4]],
                             rtol=2e-4)
  # One trust ratio per layer of the scanned stack.
  ratios = rows[-1]["trust_ratios"]
  assert len(ratios["encoder/layers/attention/query/kernel"]) == 2
  np.testing.assert_allclose(
      ratios["encoder/layers/attention/query/kernel"],
      [_rows(full_workdir)[3]["trust_ratios"][
          f"encoder/layer_{i}/attention/query/kernel"] for i in range(2)],
      rtol=1e-3)


def test_masking_statistics(example):
  ip = example["wordpiece"]  # The special tokens and their ids.
  rng = np.random.default_rng(0)
  vocab_size = 1000
  batch, length = 512, 128
  ids = rng.integers(len(ip.SPECIAL_TOKENS), vocab_size, (batch, length))
  ids[:, 0] = ip.CLS_ID
  ids[:, -1] = ip.SEP_ID
  ids[:, 60] = ip.SEP_ID
  ids[:, 61] = ip.UNK_ID
  ids[: batch // 2, 100:] = ip.PAD_ID  # Half of the rows are padded.
  out = example["masking"].mask_tokens(ids, np.random.default_rng(1), vocab_size)
  weights = out["masked_weights"] > 0
  rows = np.nonzero(weights)[0]
  positions = out["masked_positions"][weights]
  original = ids[rows, positions]
  new = out["input_ids"][rows, positions]
  # Special tokens are never chosen, never replaced, never inserted.
  assert np.all(original >= len(ip.SPECIAL_TOKENS))
  special = ids < len(ip.SPECIAL_TOKENS)
  np.testing.assert_array_equal(out["input_ids"][special], ids[special])
  assert np.all((new == ip.MASK_ID) | (new >= len(ip.SPECIAL_TOKENS)))
  np.testing.assert_array_equal(out["masked_ids"][weights], original)
  # Unchosen tokens stay; each row masks 15% of its candidates, distinct.
  changed = out["input_ids"] != ids
  chosen = np.zeros_like(changed)
  chosen[rows, positions] = True
  assert not np.any(changed & ~chosen)
  candidates = (ids >= len(ip.SPECIAL_TOKENS)).sum(axis=1)
  np.testing.assert_array_equal(weights.sum(axis=1),
                                np.rint(0.15 * candidates))
  for r in (0, batch - 1):
    chosen_positions = out["masked_positions"][r][weights[r]]
    assert len(set(chosen_positions.tolist())) == len(chosen_positions)
  # 80% [MASK], 10% random, 10% unchanged (a random token equals the
  # original with probability 1/995, counted as unchanged).
  n = len(new)
  assert n > 8000
  frac_mask = np.mean(new == ip.MASK_ID)
  frac_same = np.mean(new == original)
  frac_random = 1.0 - frac_mask - frac_same
  assert abs(frac_mask - 0.8) < 0.02, frac_mask
  assert abs(frac_random - 0.1) < 0.015, frac_random
  assert abs(frac_same - 0.1) < 0.015, frac_same
  assert out["input_mask"][0, 100] == 0 and out["input_mask"][-1, 100] == 1


def test_bert_base_config_is_bert_base(example):
  """BERT-base's parameter count, from shapes only (no allocation)."""
  import jax  # pylint: disable=import-outside-toplevel
  import lamb_optax  # pylint: disable=import-outside-toplevel
  train, models = example["train"], example["models"]
  config = example["bert_base"].get_config()
  assert (config.num_layers, config.hidden_size, config.num_heads,
          config.intermediate_size, config.vocab_size,
          config.max_position_embeddings) == (12, 768, 12, 3072, 30522, 512)
  assert tuple(config.seq_lengths) == (128, 512)
  bert = train.model_config(config)
  shapes = models.init_shapes(bert)
  count = models.count_params(shapes)
  # Embeddings 23,837,184 + 12 layers x 7,087,872 + MLM head 622,650
  # (BERT-base without its pooler and next-sentence head: ~110M).
  assert count == 109_514_298
  assert abs(count - 110e6) / 110e6 < 0.01
  # Scanned: one stacked leaf per tensor, one LAMB trust ratio per layer.
  assert config.scan_layers
  params = jax.tree.map(lambda x: x.value, shapes,
                        is_leaf=lambda x: hasattr(x, "names"))
  layer_axes = lamb_optax.layer_axes_from_metadata(shapes)
  phases = train.make_phases(config, num_devices=8)
  assert [p.num_steps for p in phases] == [7038, 1561]
  assert [p.num_micro_batches for p in phases] == [256, 128]
  tx = train.make_optimizer(config, train.learning_rate_schedule(phases),
                            layer_axes)
  state = jax.eval_shape(tx.init, params)
  ratios = lamb_optax.trust_ratios(state)
  assert ratios["encoder"]["layers"]["attention"]["query"]["kernel"].shape == (
      12,)
  assert ratios["embeddings"]["word"]["embedding"].shape == ()


def test_bert_large_config_is_the_papers(example):
  """BERT-Large and the paper's 64k/32k mixed batch, with no accumulation
  on the paper's pod (2048 TPUv3 cores: 32 x 128, then 16 x 512 a core)."""
  train, models = example["train"], example["models"]
  sys.path.insert(0, str(_EXAMPLE))
  try:
    from configs import bert_large  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.remove(str(_EXAMPLE))
  config = bert_large.get_config()
  assert (config.num_layers, config.hidden_size, config.num_heads,
          config.intermediate_size) == (24, 1024, 16, 4096)
  # Embeddings 31,782,912 + 24 layers x 12,596,224 + MLM head 1,082,170.
  assert models.count_params(models.init_shapes(
      train.model_config(config))) == 335_174_458
  phases = train.make_phases(config, num_devices=2048)
  assert [(p.seq_length, p.batch_size, p.num_micro_batches, p.num_steps)
          for p in phases] == [(128, 65536, 1, 7038), (512, 32768, 1, 1561)]


def test_schedule_power_shapes_each_phase_decay(example):
  """config.schedule_power reaches the schedule: (1 - f)^power after the
  warmup, f the fraction of the phase's decay steps done."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh  # pylint: disable=import-outside-toplevel
  train = example["train"]
  config = example["test_config"].get_config()
  config.schedule_power = 2.0
  plan = train.make_plan(config, Mesh(np.asarray(jax.devices()[:1]),
                                      ("data",)))
  phase = plan.phases[0]
  for t in range(phase.warmup_steps, phase.num_steps):
    done = (t - phase.warmup_steps) / (phase.num_steps - phase.warmup_steps)
    expected = phase.peak_learning_rate * (1.0 - done) ** 2
    assert float(plan.schedule(t)) == pytest.approx(expected, rel=1e-5,
                                                    abs=1e-9), t
  linear = train.learning_rate_schedule(plan.phases)
  middle = (phase.warmup_steps + phase.num_steps) // 2
  assert float(plan.schedule(middle)) < float(linear(middle))
