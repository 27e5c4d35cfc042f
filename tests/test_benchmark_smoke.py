"""Smoke test of benchmarks/update_step.py (the benchmark itself is not run)."""

import importlib.util
import json
import math
import pathlib
import statistics

import jax
import pytest

import lamb_optax

_SCRIPT = (pathlib.Path(__file__).resolve().parents[1] / "benchmarks" /
           "update_step.py")

EXPECTED_OPTIMIZERS = (
    "optax.adamw",
    "optax.lamb",
    "lamb_optax.lamb",
    "lamb_optax.lamb (BERT masks)",
    "lamb_optax.lamb(store_direction=True)",
    "lamb_optax.lamb(store_direction=True) (BERT masks)",
    "lamb_optax.lars",
    "optax.adamw [scanned]",
    "optax.lamb [scanned, one ratio per stack]",
    "lamb_optax.lamb(layer_axes) (BERT masks) [scanned]",
    "lamb_optax.lamb(layer_axes, store_direction=True) (BERT masks) [scanned]",
    "lamb_optax.lars(layer_axes) [scanned]",
)


@pytest.fixture(scope="module")
def update_step():
  spec = importlib.util.spec_from_file_location(
      "benchmarks_update_step", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bert_base_has_110m_params(update_step):
  shapes = update_step.bert_base_shapes()
  leaves = []

  def walk(tree):
    if isinstance(tree, dict):
      for value in tree.values():
        walk(value)
    else:
      leaves.append(tree)

  walk(shapes)
  n_params = sum(math.prod(shape) for shape in leaves)
  assert 109_000_000 <= n_params <= 111_000_000
  assert 190 <= len(leaves) <= 210
  assert update_step.count_params(shapes) == n_params
  layer = shapes["encoder"]["layer_3"]
  assert layer["attention"]["query"]["kernel"] == (768, 768)
  assert layer["intermediate"]["kernel"] == (768, 3072)
  assert layer["LayerNorm_1"]["scale"] == (768,)
  assert shapes["embeddings"]["word_embeddings"]["embedding"] == (30522, 768)


def test_scanned_tree_stacks_the_encoder_layers(update_step):
  unrolled = update_step.bert_base_shapes(layers=3)
  scanned = update_step.bert_base_shapes(layers=3, scanned=True)
  assert update_step.count_params(scanned) == update_step.count_params(
      unrolled)
  assert scanned["encoder"]["attention"]["query"]["kernel"] == (3, 768, 768)
  assert scanned["encoder"]["LayerNorm_1"]["scale"] == (3, 768)
  assert (scanned["embeddings"]["word_embeddings"]["embedding"]
          == unrolled["embeddings"]["word_embeddings"]["embedding"])
  # The benchmark's layer_axes give one ratio per stacked layer.
  params = update_step.abstract_params(scanned)
  opt = update_step.SCANNED_OPTIMIZERS[
      "lamb_optax.lamb(layer_axes) (BERT masks) [scanned]"]()
  ratios = lamb_optax.trust_ratios(jax.eval_shape(opt.init, params))
  assert ratios["encoder"]["attention"]["query"]["kernel"].shape == (3,)
  assert ratios["pooler"]["kernel"].shape == ()


def test_quick_run_writes_every_optimizer(update_step, tmp_path, capsys):
  out = tmp_path / "results" / "update_step.json"
  update_step.main(["--quick", "--reps", "2", "--compile-reps", "2",
                    "--out", str(out)])
  result = json.loads(out.read_text())
  assert set(result["optimizers"]) == set(EXPECTED_OPTIMIZERS)
  for name, row in result["optimizers"].items():
    for key in ("step_ms_median", "compile_s_median", "step_x_adamw",
                "compile_x_adamw"):
      assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
    assert len(row["step_ms_all"]) == 2
    assert row["compile_kernels"] >= row["compile_distinct_kernels"] >= 1
    assert row["params_finite_after_run"], name
  assert result["optimizers"]["optax.adamw"]["step_x_adamw"] == 1.0
  # Compile ratios pair each round's compile with the baseline's of that
  # round, and take the median of those ratios.
  for name, row in result["optimizers"].items():
    base = result["optimizers"][row["baseline"]]
    for key, ratio in (("compile_s_all", "compile_x_adamw"),
                       ("compile_cpu_s_all", "compile_cpu_x_adamw")):
      assert len(row[key]) == 2, (name, key)
      want = statistics.median(
          t / b for t, b in zip(row[key], base[key]))
      assert row[ratio] == pytest.approx(want, rel=1e-12), (name, ratio)
  assert result["optimizers"]["optax.adamw"]["compile_x_adamw"] == 1.0
  scanned = result["optimizers"]["optax.adamw [scanned]"]
  assert scanned["step_x_adamw"] == 1.0
  assert scanned["baseline"] == "optax.adamw [scanned]"
  assert (result["optimizers"]["lamb_optax.lamb(layer_axes) (BERT masks) "
                               "[scanned]"]["baseline"] == scanned["baseline"])
  assert result["config"]["quick"] and result["config"]["reps"] == 2
  table = capsys.readouterr().out
  for name in EXPECTED_OPTIMIZERS:
    assert f"| {name} |" in table


def test_compile_only_times_compiles_and_no_steps(update_step, tmp_path,
                                                  capsys):
  out = tmp_path / "compile.json"
  update_step.main(["--quick", "--compile-only", "--no-scanned", "--only",
                    "lamb_optax.lamb (BERT", "--compile-reps", "3",
                    "--out", str(out)])
  result = json.loads(out.read_text())
  rows = result["optimizers"]
  assert set(rows) == {"optax.adamw", "lamb_optax.lamb (BERT masks)"}
  assert result["config"]["compile_only"]
  base = rows["optax.adamw"]["compile_s_all"]
  for name, row in rows.items():
    assert not any(key.startswith("step_") for key in row), name
    assert len(row["compile_s_all"]) == 3
    ratios = [t / b for t, b in zip(row["compile_s_all"], base)]
    assert row["compile_x_adamw_all"] == pytest.approx(ratios, rel=1e-12)
    assert row["compile_x_adamw"] == pytest.approx(statistics.median(ratios),
                                                   rel=1e-12)
  table = capsys.readouterr().out
  masked = rows["lamb_optax.lamb (BERT masks)"]
  assert (f"| lamb_optax.lamb (BERT masks) | {masked['compile_s_median']:.2f} "
          f"| {masked['compile_x_adamw']:.2f} | "
          f"{min(masked['compile_x_adamw_all']):.2f}-"
          f"{max(masked['compile_x_adamw_all']):.2f} |") in table
  with pytest.raises(SystemExit):
    update_step.main(["--quick", "--compile-only", "--baseline", str(out)])
  assert "--baseline does not apply to --compile-only" in (
      capsys.readouterr().err)


def test_kernel_counts_tell_identical_kernels_from_distinct_ones(update_step):
  """Five leaves of one shape through one expression are five kernels but
  one distinct kernel; with a different constant per leaf, five distinct."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  xs = [jax.ShapeDtypeStruct((64, 64), jnp.float32)] * 5

  def counts(fn):
    return update_step.kernel_counts(jax.jit(fn).lower(xs).compile().as_text())

  same = counts(lambda xs: [jnp.tanh(x) * 2.0 + 1.0 for x in xs])
  differ = counts(lambda xs: [jnp.tanh(x) * (2.0 + i) + 1.0
                              for i, x in enumerate(xs)])
  assert same == {"kernels": 5, "distinct_kernels": 1}
  assert differ == {"kernels": 5, "distinct_kernels": 5}
