"""lamb_optax.schedules against float64 numpy statements of each formula."""

from __future__ import annotations

import math
import pathlib
import re

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
from lamb_optax import schedules

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Table 4 of You et al. (2020), as printed: batch size -> (exponent e of the
# learning rate 5 / (2^e * 10^3), warmup iterations, warmup ratio, iterations).
TABLE_4 = {
    512: (3.0, 3125, 1 / 320, 1_000_000),
    1024: (2.5, 3125, 1 / 160, 500_000),
    2048: (2.0, 3125, 1 / 80, 250_000),
    4096: (1.5, 3125, 1 / 40, 125_000),
    8192: (1.0, 3125, 1 / 20, 62_500),
    16384: (0.5, 3125, 1 / 10, 31_250),
    32768: (0.0, 3125, 1 / 5, 15_625),
}
TABLE_4_BASE = dict(base_learning_rate=5 / (2**3 * 10**3), base_batch_size=512,
                    base_warmup_steps=3125, base_total_steps=1_000_000)


# ---------------------------------------------------------------------------
# Independent float64 statements of the formulas.


def reference_wpd(t, peak, warmup, total, power=1.0, end=0.0):
  """BERT's warmup + polynomial decay, in float64, one step at a time."""
  t = float(t)
  if t < warmup:
    return peak * t / warmup
  if t >= total:
    return end
  return end + (peak - end) * (1.0 - (t - warmup) / (total - warmup))**power


def reference_mixed(t, peaks, warmups, lengths, power=1.0, end=0.0):
  start = 0
  for peak, warmup, length in zip(peaks, warmups, lengths):
    if t < start + length:
      return reference_wpd(t - start, peak, warmup, length, power, end)
    start += length
  return end


def probe_steps(warmup, total):
  """Boundaries and interior points of a warmup/decay schedule."""
  steps = {0, 1, warmup - 1, warmup, warmup + 1, (warmup + total) // 2,
           total - 1, total, total + 5}
  steps |= set(np.linspace(0, total + 3, 23).astype(int).tolist())
  return sorted(s for s in steps if s >= 0)


def assert_matches_reference(schedule, steps, expected, rtol=2e-6):
  expected = np.asarray(expected, np.float64)
  eager = np.array([float(schedule(int(s))) for s in steps])
  jitted = np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)))
  atol = rtol * max(float(np.max(np.abs(expected))), 1e-30)
  np.testing.assert_allclose(eager, expected, rtol=rtol, atol=atol)
  # The int32 count optax keeps, under jit, gives the same values (to the
  # few ulps XLA's fused arithmetic may differ by; exact at the endpoints,
  # which the callers check on both).
  assert jitted.dtype == np.float32
  np.testing.assert_allclose(jitted, eager, rtol=5e-7, atol=1e-30)
  return {int(s): (e, j) for s, e, j in zip(steps, eager, jitted)}


# ---------------------------------------------------------------------------
# warmup_polynomial_decay


WPD_CASES = [
    # peak, warmup, total, power, end
    (1e-3, 10, 110, 1.0, 0.0),
    (2.5e-3, 0, 50, 2.0, 1e-4),
    (0.5, 3, 40, 0.5, 0.1),
    (1.0, 7, 7, 1.0, 0.0),  # warmup == total
    (3e-2, 1, 2, 3.0, 0.0),
    (6.25e-4, 3125, 1_000_000, 1.0, 0.0),
]


@pytest.mark.parametrize("peak,warmup,total,power,end", WPD_CASES)
def test_warmup_polynomial_decay_matches_reference(peak, warmup, total, power,
                                                   end):
  schedule = schedules.warmup_polynomial_decay(peak, warmup, total, power,
                                               end)
  steps = probe_steps(warmup, total)
  by_step = assert_matches_reference(
      schedule, steps,
      [reference_wpd(s, peak, warmup, total, power, end) for s in steps])
  # The endpoints are exact, not just close, eagerly and under jit.
  for i in range(2):
    if warmup > 0:
      assert by_step[0][i] == 0.0
    if warmup < total:
      assert by_step[warmup][i] == np.float32(peak)
    assert by_step[total][i] == np.float32(end)
    assert by_step[total + 5][i] == np.float32(end)
    assert by_step[total - 1][i] > by_step[total][i] or warmup == total


def test_warmup_polynomial_decay_is_monotone_in_each_stage():
  schedule = schedules.warmup_polynomial_decay(1e-3, 50, 400, power=2.0)
  values = np.asarray(schedule(jnp.arange(0, 420, dtype=jnp.int32)))
  assert np.all(np.diff(values[:51]) > 0)
  assert np.all(np.diff(values[50:401]) < 0)
  assert np.all(values[400:] == 0.0)


@pytest.mark.parametrize("peak,warmup,total,power,end", [
    (6.25e-4, 3125, 1_000_000, 1.0, 0.0),  # Table 4 at batch size 512
    (5e-3, 3125, 15_625, 1.0, 0.0),  # Table 4 at batch size 32768
    (1e-3, 462_349, 1_804_993, 0.5, 1e-5),
    (0.7, 100_000, 2_000_000, 3.0, 1e-4),
])
def test_warmup_polynomial_decay_is_float32_accurate_at_the_stage_ends(
    peak, warmup, total, power, end):
  # optax.linear_schedule and optax.polynomial_schedule compute 1 - t / T,
  # which cancels here in float32: 1.0% off at t = T - 1 of Table 4's 512 run.
  schedule = schedules.warmup_polynomial_decay(peak, warmup, total, power,
                                               end)
  steps = [1, 2, 3, warmup - 1, warmup + 1, warmup + 2, total - 3, total - 2,
           total - 1]
  expected = np.array(
      [reference_wpd(s, peak, warmup, total, power, end) for s in steps])
  eager = np.array([float(schedule(s)) for s in steps])
  jitted = np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)),
                      np.float64)
  np.testing.assert_allclose(eager, expected, rtol=1e-6, atol=0)
  np.testing.assert_allclose(jitted, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("warmup", [0, 4])
def test_counts_below_zero_read_as_zero(warmup):
  wpd = schedules.warmup_polynomial_decay(0.5, warmup, 10, power=2.0,
                                          end_value=0.1)
  mixed = schedules.mixed_batch((0.5, 0.2), (warmup, 1), (10, 5), power=2.0,
                                end_value=0.1)
  counts = jnp.asarray([-7, -1, 0], jnp.int32)
  for schedule in (wpd, mixed):
    for values in (np.array([float(schedule(int(c))) for c in counts]),
                   np.asarray(jax.jit(schedule)(counts))):
      np.testing.assert_array_equal(values, np.float32(float(schedule(0))))
  assert float(wpd(-1)) == (0.0 if warmup else np.float32(0.5))


def test_warmup_polynomial_decay_in_float64_under_x64():
  with jax.enable_x64(True):
    schedule = schedules.warmup_polynomial_decay(0.1, 3, 10, power=1.5)
    value = schedule(jnp.asarray(5, jnp.int64))
    assert value.dtype == jnp.float64
    assert float(value) == pytest.approx(reference_wpd(5, 0.1, 3, 10, 1.5),
                                         rel=1e-14)


# ---------------------------------------------------------------------------
# legw and Table 4


def test_legw_config_reproduces_table_4():
  for batch_size, (exponent, warmup, ratio, iterations) in TABLE_4.items():
    config = schedules.legw_config(**TABLE_4_BASE, batch_size=batch_size)
    assert isinstance(config, schedules.LEGWConfig)
    assert config.peak_value == pytest.approx(5 / (2**exponent * 10**3),
                                              rel=1e-12)
    assert config.warmup_steps == warmup
    assert config.total_steps == iterations
    assert config.warmup_steps / config.total_steps == pytest.approx(ratio,
                                                                     rel=1e-12)
  assert schedules.legw_config(**TABLE_4_BASE,
                               batch_size=32768).peak_value == 5e-3


@pytest.mark.parametrize("batch_size", [512, 2048, 32768, 3000, 700])
def test_legw_schedule_matches_reference(batch_size):
  base_lr, base_batch, base_warmup, base_total = 1e-3, 512, 30, 10_000
  schedule = schedules.legw(base_lr, base_batch, base_warmup, base_total,
                            batch_size, decay_power=1.0)
  peak = base_lr * math.sqrt(batch_size / base_batch)
  total = math.ceil(base_total * base_batch / batch_size)
  steps = probe_steps(base_warmup, total)
  by_step = assert_matches_reference(
      schedule, steps,
      [reference_wpd(s, peak, base_warmup, total) for s in steps])
  for i in range(2):
    assert by_step[base_warmup][i] == np.float32(peak)
    assert by_step[total][i] == 0.0 and by_step[total - 1][i] > 0.0


def test_legw_warmup_iterations_constant_and_epochs_fixed():
  examples = 1000 * 512
  for batch_size in (256, 512, 1000, 3000, 4096, 17000):
    config = schedules.legw_config(1e-3, 512, 30, 1000, batch_size)
    assert config.warmup_steps == 30
    # Fixed epochs, rounded up: at least the base examples, less than one
    # batch more.
    assert config.total_steps * batch_size >= examples
    assert (config.total_steps - 1) * batch_size < examples
  assert schedules.legw_config(1e-3, 512, 30, 1000, 3000).total_steps == 171


def test_legw_decay_power_is_applied():
  schedule = schedules.legw(1e-3, 512, 10, 110, 512, decay_power=2.0)
  assert float(schedule(60)) == pytest.approx(1e-3 * 0.25, rel=1e-6)


def test_legw_rejects_a_run_shorter_than_its_warmup():
  with pytest.raises(ValueError, match="batch_size.*too large"):
    schedules.legw(1e-3, 512, 3125, 1_000_000, 512 * 1024)


# ---------------------------------------------------------------------------
# mixed_batch


def test_mixed_batch_matches_reference_and_rewarms():
  peaks, warmups, lengths = (4e-3, 2e-3, 1e-3), (20, 10, 0), (90, 30, 15)
  schedule = schedules.mixed_batch(peaks, warmups, lengths, power=1.5,
                                   end_value=1e-5)
  starts = np.cumsum((0,) + lengths[:-1])
  steps = set(range(0, 140, 7))
  for start, warmup, length in zip(starts, warmups, lengths):
    steps |= {start - 1, start, start + 1, start + warmup, start + length - 1}
  steps = sorted(s for s in steps if s >= 0) + [sum(lengths), 200]
  by_step = assert_matches_reference(
      schedule, steps,
      [reference_mixed(s, peaks, warmups, lengths, 1.5, 1e-5) for s in steps])
  for i in range(2):
    # Phases 1 and 2 start again from zero; phase 3 has no warmup.
    assert by_step[0][i] == 0.0 and by_step[90][i] == 0.0
    assert by_step[89][i] > 0.0
    for start, peak, warmup in zip(starts, peaks, warmups):
      assert by_step[start + warmup][i] == np.float32(peak)
    assert by_step[sum(lengths)][i] == np.float32(1e-5)
    assert by_step[200][i] == np.float32(1e-5)


def test_mixed_batch_single_phase_is_warmup_polynomial_decay():
  mixed = schedules.mixed_batch([1e-3], [5], [40], power=2.0)
  single = schedules.warmup_polynomial_decay(1e-3, 5, 40, power=2.0)
  steps = jnp.arange(50, dtype=jnp.int32)
  np.testing.assert_array_equal(np.asarray(mixed(steps)),
                                np.asarray(single(steps)))


# ---------------------------------------------------------------------------
# Phase lengths


@pytest.mark.parametrize("total,fractions,expected", [
    (8599, (0.9, 0.1), (7739, 860)),
    (10, (0.25, 0.25, 0.5), (3, 2, 5)),   # tie: the earlier phase
    (10, (1 / 3, 1 / 3, 1 / 3), (4, 3, 3)),
    (3, (0.98, 0.01, 0.01), (1, 1, 1)),   # every phase gets a step
    (100, (0.7, 0.3), (70, 30)),
    (1, (1.0,), (1,)),
])
def test_split_steps_values(total, fractions, expected):
  assert schedules.split_steps(total, fractions) == expected


def test_split_steps_default_is_nine_to_one():
  assert schedules.split_steps(1000) == (900, 100)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(
    total=st.integers(1, 10**7),
    weights=st.lists(st.integers(1, 1000), min_size=1, max_size=6))
def test_split_steps_sums_exactly_and_rounds_by_largest_remainder(total,
                                                                   weights):
  hypothesis.assume(total >= len(weights))
  fractions = [w / sum(weights) for w in weights]
  steps = schedules.split_steps(total, fractions)
  assert sum(steps) == total
  assert all(isinstance(s, int) and s >= 1 for s in steps)
  quotas = [total * w / sum(weights) for w in weights]
  if all(q >= 1 for q in quotas):
    # Largest remainder: each phase within one step of its quota.
    assert all(abs(s - q) < 1 + 1e-6 for s, q in zip(steps, quotas))


def test_phase_steps_from_epochs_paper_recipe():
  steps = schedules.phase_steps_from_epochs(
      epochs=1, num_examples=512 * 1_000_000, batch_sizes=(65536, 32768))
  assert steps == (math.ceil(0.9 * 512e6 / 65536),
                   math.ceil(0.1 * 512e6 / 32768)) == (7032, 1563)


def test_phase_steps_from_epochs_is_exact_and_rounds_up():
  # 0.7 * 10 is 7.000000000000001 in floats; the budget is exactly 7 steps.
  assert schedules.phase_steps_from_epochs(1, 10, (1, 1), (0.7, 0.3)) == (7, 3)
  # 2.5 epochs of 1000 examples, 9:1, at batch sizes 64 and 48.
  assert schedules.phase_steps_from_epochs(2.5, 1000, [64, 48]) == (
      math.ceil(2250 / 64), math.ceil(250 / 48))
  for steps, batch, share in zip(
      schedules.phase_steps_from_epochs(3, 777, (100, 7), (0.6, 0.4)),
      (100, 7), (0.6, 0.4)):
    assert steps * batch >= share * 3 * 777 > (steps - 1) * batch


def test_phase_steps_from_tokens():
  assert schedules.phase_steps_from_tokens(
      60e9, (65536, 32768), (128, 512)) == (
          math.ceil(0.9 * 60e9 / (65536 * 128)),
          math.ceil(0.1 * 60e9 / (32768 * 512))) == (6438, 358)
  # Exact budgets give exact steps; integers beyond 2**53 stay exact.
  assert schedules.phase_steps_from_tokens(
      4096 * 10, (8, 4), (128, 64), (0.5, 0.5)) == (20, 80)
  big = 2**60 + 2**8
  assert schedules.phase_steps_from_tokens(big, (1,), (2**8,), (1.0,)) == (
      2**52 + 1,)


# ---------------------------------------------------------------------------
# Scaling rules


def test_sqrt_and_linear_scaled_floats():
  value = schedules.sqrt_scaled(1e-3, 256, 4096)
  assert type(value) is float and value == pytest.approx(4e-3, rel=1e-15)
  value = schedules.linear_scaled(0.1, 256, 8192)
  assert type(value) is float and value == pytest.approx(3.2, rel=1e-15)
  assert schedules.sqrt_scaled(2e-3, 1000, 250) == pytest.approx(1e-3)
  assert schedules.linear_scaled(2e-3, 1000, 250) == pytest.approx(5e-4)


def test_sqrt_and_linear_scaled_schedules():
  base = schedules.warmup_polynomial_decay(1e-3, 10, 100)
  sqrt_schedule = schedules.sqrt_scaled(base, 512, 2048)
  linear_schedule = schedules.linear_scaled(base, 512, 2048)
  steps = jnp.arange(0, 110, 3, dtype=jnp.int32)
  np.testing.assert_allclose(np.asarray(jax.jit(sqrt_schedule)(steps)),
                             2 * np.asarray(base(steps)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.jit(linear_schedule)(steps)),
                             4 * np.asarray(base(steps)), rtol=1e-6)


def test_sqrt_scaled_of_base_is_legw_peak():
  for batch_size in TABLE_4:
    assert schedules.sqrt_scaled(
        TABLE_4_BASE["base_learning_rate"], 512, batch_size) == (
            schedules.legw_config(**TABLE_4_BASE,
                                  batch_size=batch_size).peak_value)


# ---------------------------------------------------------------------------
# With the optimizers: the learning rate actually applied.

PARAMS = {
    "dense": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3) / 4,
              "bias": jnp.array([0.5, -1.0, 2.0])},
    "scale": jnp.array(1.5),
}


def _gradients(step):
  return jax.tree.map(lambda x: jnp.cos(x * (step + 1)) + 0.3, PARAMS)


def _check_applied_learning_rates(opt, schedule_ref, num_steps=7):
  """||update|| = lr_t * ||x_t|| per layer for LAMB with no decay."""
  params = PARAMS
  state = opt.init(params)
  update = jax.jit(opt.update)
  for step in range(num_steps):
    updates, state = update(_gradients(step), state, params)
    lr = schedule_ref(step)
    for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(params)):
      expected = lr * float(np.linalg.norm(np.asarray(x, np.float64)))
      assert float(jnp.linalg.norm(u)) == pytest.approx(expected, rel=1e-5,
                                                        abs=1e-12)
    params = optax.apply_updates(params, updates)
  return state


def test_lamb_applies_the_schedule():
  schedule = schedules.warmup_polynomial_decay(0.1, 2, 5, power=2.0)
  _check_applied_learning_rates(
      lamb_optax.lamb(learning_rate=schedule),
      lambda t: reference_wpd(t, 0.1, 2, 5, 2.0))


def test_lamb_applies_mixed_batch_rewarmup():
  schedule = schedules.mixed_batch((0.1, 0.05), (2, 1), (3, 3))
  _check_applied_learning_rates(
      lamb_optax.lamb(learning_rate=schedule),
      lambda t: reference_mixed(t, (0.1, 0.05), (2, 1), (3, 3)))


def test_inject_hyperparams_applies_and_records_the_schedule():
  schedule = schedules.legw(0.1, 4, 2, 12, batch_size=8)  # peak 0.1*sqrt(2)
  peak = 0.1 * math.sqrt(2)
  opt = optax.inject_hyperparams(lamb_optax.lamb)(learning_rate=schedule)
  state = _check_applied_learning_rates(
      opt, lambda t: reference_wpd(t, peak, 2, 6), num_steps=7)
  # After 7 updates the state holds the value used by the 7th (count 6): 0.
  assert float(state.hyperparams["learning_rate"]) == 0.0
  assert int(state.count) == 7


# ---------------------------------------------------------------------------
# The guide's code runs, and its Table 4 matches legw_config.


def test_recipe_guide_code_runs_and_table_matches(capsys):
  text = (ROOT / "docs" / "recipe.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) >= 4
  for i, block in enumerate(blocks):
    code = compile(block, f"docs/recipe.md block {i}", "exec")
    exec(code, {})  # pylint: disable=exec-used
  assert "iterations 15625" in capsys.readouterr().out
  row = (r"^\| (\d+) \| 5/\(2\^([\d.]+) \* 10\^3\) \| (\d+) \| 1/(\d+) "
         r"\| (\d+) \|$")
  rows = re.findall(row, text, re.M)
  assert len(rows) == len(TABLE_4)
  for batch, exponent, warmup, ratio, iterations in rows:
    table = TABLE_4[int(batch)]
    assert (float(exponent), int(warmup), 1 / int(ratio), int(iterations)) == (
        pytest.approx(table[0]), table[1], pytest.approx(table[2]), table[3])


# ---------------------------------------------------------------------------
# Validation


def _wpd(**overrides):
  kwargs = dict(peak_value=1e-3, warmup_steps=10, total_steps=100)
  return schedules.warmup_polynomial_decay(**{**kwargs, **overrides})


def _legw(**overrides):
  kwargs = dict(TABLE_4_BASE, batch_size=1024)
  return schedules.legw(**{**kwargs, **overrides})


def _mixed(**overrides):
  kwargs = dict(peak_values=(1e-3, 5e-4), warmup_steps=(10, 5),
                phase_steps=(90, 10))
  return schedules.mixed_batch(**{**kwargs, **overrides})


def _split(**overrides):
  return schedules.split_steps(**{"total_steps": 100, **overrides})


def _epochs(**overrides):
  kwargs = dict(epochs=1, num_examples=10, batch_sizes=(1, 1))
  return schedules.phase_steps_from_epochs(**{**kwargs, **overrides})


def _tokens(**overrides):
  kwargs = dict(total_tokens=100, batch_sizes=(1, 1),
                sequence_lengths=(1, 1))
  return schedules.phase_steps_from_tokens(**{**kwargs, **overrides})


def _sqrt(**overrides):
  kwargs = dict(base_learning_rate=1e-3, base_batch_size=8, batch_size=8)
  return schedules.sqrt_scaled(**{**kwargs, **overrides})


def _linear(**overrides):
  kwargs = dict(base_learning_rate=1e-3, base_batch_size=8, batch_size=8)
  return schedules.linear_scaled(**{**kwargs, **overrides})


V, T = ValueError, TypeError
INVALID = [
    # (factory, overrides, error, message pattern)
    (_wpd, dict(warmup_steps=101), V,
     r"`warmup_steps` \(101\).*<= `total_steps`"),
    (_wpd, dict(warmup_steps=-1), V, "`warmup_steps` must be >= 0"),
    (_wpd, dict(total_steps=0, warmup_steps=0), V,
     "`total_steps` must be >= 1"),
    (_wpd, dict(total_steps=100.0), T, "`total_steps` must be an int"),
    (_wpd, dict(warmup_steps=True), T, "`warmup_steps` must be an int"),
    (_wpd, dict(warmup_steps=np.float32(3)), T,
     "`warmup_steps` must be an int"),
    (_wpd, dict(warmup_steps=jnp.int32(3)), T,
     "`warmup_steps` must be an int"),
    (_wpd, dict(peak_value=-1e-3), V, "`peak_value` must be >= 0"),
    (_wpd, dict(peak_value=float("nan")), V, "`peak_value` must be >= 0"),
    (_wpd, dict(peak_value=float("inf")), V, "`peak_value` must be finite"),
    (_wpd, dict(peak_value="1e-3"), T, "`peak_value`"),
    (_wpd, dict(peak_value=True), T, "`peak_value`"),
    (_wpd, dict(peak_value=lambda t: 1e-3), T,
     "`peak_value` must be a concrete"),
    (_wpd, dict(power=0.0), V, "`power` must be > 0"),
    (_wpd, dict(end_value=-1.0), V, "`end_value` must be >= 0"),
    (_wpd, dict(end_value=2e-3), V,
     r"`end_value` .* must be <= `peak_value`"),
    (_legw, dict(base_learning_rate=0.0), V,
     "`base_learning_rate` must be > 0"),
    (_legw, dict(base_batch_size=0), V, "`base_batch_size` must be >= 1"),
    (_legw, dict(base_batch_size=512.0), T,
     "`base_batch_size` must be an int"),
    (_legw, dict(base_warmup_steps=-5), V,
     "`base_warmup_steps` must be >= 0"),
    (_legw, dict(base_total_steps=1e6), T,
     "`base_total_steps` must be an int"),
    (_legw, dict(base_warmup_steps=20, base_total_steps=10), V,
     r"`base_warmup_steps` \(20\) must be <= `base_total_steps`"),
    (_legw, dict(batch_size=False), T, "`batch_size` must be an int"),
    (_legw, dict(batch_size=0), V, "`batch_size` must be >= 1"),
    (_legw, dict(decay_power=-1.0), V, "`decay_power` must be > 0"),
    (_mixed, dict(peak_values=(1e-3,)), V,
     "same length.*peak_values has 1, warmup_steps has 2, phase_steps has 2"),
    (_mixed, dict(phase_steps=100), T, "`phase_steps` must be a sequence"),
    (_mixed, dict(peak_values="ab"), T, "`peak_values` must be a sequence"),
    (_mixed, dict(peak_values=(), warmup_steps=(), phase_steps=()), V,
     "`peak_values` must have at least one entry"),
    (_mixed, dict(warmup_steps=(10, 11)), V,
     r"`warmup_steps\[1\]` \(11\) must be <= `phase_steps\[1\]` \(10\)"),
    (_mixed, dict(phase_steps=(90, 0), warmup_steps=(10, 0)), V,
     r"`phase_steps\[1\]` must be >= 1"),
    (_mixed, dict(phase_steps=(90.0, 10)), T,
     r"`phase_steps\[0\]` must be an int"),
    (_mixed, dict(peak_values=(1e-3, -1.0)), V,
     r"`peak_values\[1\]` must be >= 0"),
    (_mixed, dict(end_value=1e-2), V, r"must be <= `peak_values\[0\]`"),
    (_split, dict(fractions=(0.8, 0.1)), V, "`fractions` must sum to 1"),
    (_split, dict(fractions=(1.1, -0.1)), V,
     r"`fractions\[1\]` must be > 0"),
    (_split, dict(fractions=(1.0, 0.0)), V, r"`fractions\[1\]` must be > 0"),
    (_split, dict(fractions=0.9), T, "`fractions` must be a sequence"),
    (_split, dict(fractions=()), V, "`fractions` must have at least one"),
    (_split, dict(total_steps=1), V,
     r"`total_steps` \(1\) must be >= the number of phases \(2\)"),
    (_split, dict(total_steps=0), V, "`total_steps` must be >= 1"),
    (_split, dict(total_steps=99.5), T, "`total_steps` must be an int"),
    (_epochs, dict(epochs=0), V, "`epochs` must be > 0"),
    (_epochs, dict(num_examples=10.0), T, "`num_examples` must be an int"),
    (_epochs, dict(batch_sizes=(1, 1, 1)), V,
     "batch_sizes has 3, fractions has 2"),
    (_epochs, dict(batch_sizes=(1, 0)), V, r"`batch_sizes\[1\]` must be >= 1"),
    (_tokens, dict(total_tokens=-1), V, "`total_tokens` must be > 0"),
    (_tokens, dict(sequence_lengths=(1,)), V, "sequence_lengths has 1"),
    (_tokens, dict(sequence_lengths=(128, 0.5)), T,
     r"`sequence_lengths\[1\]` must be an int"),
    (_sqrt, dict(base_batch_size=0), V, "`base_batch_size` must be >= 1"),
    (_linear, dict(batch_size=8.0), T, "`batch_size` must be an int"),
    (_sqrt, dict(base_learning_rate=-1.0), V,
     "`base_learning_rate` must be >= 0"),
    (_linear, dict(base_learning_rate="0.1"), T, "`base_learning_rate`"),
]


@pytest.mark.parametrize(
    "factory,overrides,error,match", INVALID,
    ids=[f"{f.__name__[1:]}-{'-'.join(k)}-{i}"
         for i, (f, k, _, _) in enumerate(INVALID)])
def test_invalid_arguments(factory, overrides, error, match):
  with pytest.raises(error, match=match):
    factory(**overrides)


def test_public_face_exports_exactly_the_documented_names():
  assert set(schedules.__all__) == {
      "LEGWConfig", "legw", "legw_config", "linear_scaled", "mixed_batch",
      "phase_steps_from_epochs", "phase_steps_from_tokens", "split_steps",
      "sqrt_scaled", "warmup_polynomial_decay"}
  for name in schedules.__all__:
    assert getattr(schedules, name).__module__ == "lamb_optax._src.schedules"
