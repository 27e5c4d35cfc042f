"""The gradient noise scale (examples/batch_scaling/noise_scale.py).

Every number is checked against an independent float64 statement of the
math: the closed form of linear regression, per-example gradients written
out by hand (analytic, or by finite differences in NumPy), and exact
expectations over every sample of a finite population.
"""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

_EXAMPLE = (pathlib.Path(__file__).resolve().parents[1] / "examples" /
            "batch_scaling")
# Top-level module names of the example (run as a script, not a package);
# cleared around the import so another example's `configs` cannot be reused.
_MODULES = ("noise_scale", "tasks", "mlm_pipeline", "configs",
            "configs.default", "configs.test",
            # The BERT example's modules that mlm_pipeline imports.
            "corpus", "wordpiece", "masking")


@pytest.fixture(scope="module")
def example():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield {"noise_scale": load("noise_scale"), "tasks": load("tasks"),
           "default": load("configs.default"), "test": load("configs.test")}


def _reference(grads: np.ndarray, population_size=None) -> dict:
  """S, the unbiased |G|^2 and B_simple of per-example gradients (n, d),
  in float64 NumPy, by the textbook two-pass formulas."""
  grads = np.asarray(grads, np.float64)
  n = grads.shape[0]
  mean = grads.mean(axis=0)
  trace = np.sum((grads - mean) ** 2) / (n - 1)
  fpc = 1.0 if population_size is None else 1.0 - n / population_size
  grad_sq = mean @ mean - trace / n * fpc
  return {"trace_sigma": trace, "grad_sq": grad_sq, "mean_grad_sq": mean @ mean,
          "b_simple": trace / grad_sq if grad_sq > 0 else np.inf}


# ----------------------------------------------------------------------------
# Linear regression: x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, sigma^2), the
# loss 1/2 (x.w - y)^2. With Delta = w - w*, the per-example gradient is
# g = x (x.Delta - eps), so G = E[x x^T] Delta = Delta and
# E|g|^2 = E[|x|^2 (x.Delta)^2] + sigma^2 E|x|^2 = (d + 2)|Delta|^2 + d sigma^2
# (Isserlis), hence tr Sigma = (d + 1)|Delta|^2 + d sigma^2.


def _linear_loss(w, idx, data):
  residual = data["x"][idx] @ w - data["y"][idx]
  return 0.5 * jnp.mean(residual ** 2)


def _linear_data(rng, n, d, delta, sigma):
  """(data, w, per-example gradients in float64) of n regression examples."""
  x = rng.standard_normal((n, d))
  w_star = rng.standard_normal(d)
  y = x @ w_star + sigma * rng.standard_normal(n)
  w = w_star + delta
  grads = x * (x @ w - y)[:, None]
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}, jnp.asarray(w), grads


def _direction(rng, d, norm_sq):
  v = rng.standard_normal(d)
  return v * np.sqrt(norm_sq / (v @ v))


def test_linear_regression_closed_form(example):
  ns = example["noise_scale"]
  d, sigma, delta_sq, n = 8, 1.0, 0.5, 50_000
  true_trace = (d + 1) * delta_sq + d * sigma ** 2  # 12.5
  true_b = true_trace / delta_sq  # 25
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    data, w, grads = _linear_data(rng, n, d, _direction(rng, d, delta_sq),
                                  sigma)
    # 391 chunks of 128, the last with 80 examples and 48 of padding.
    stats = jax.jit(lambda w, idx, data: ns.per_example_stats(
        _linear_loss, w, idx, data))(w, jnp.arange(n), data)
    got = {k: float(v) for k, v in ns.b_simple(stats).items()}
  assert stats["sum_sq_dev"].dtype == jnp.float64
  ref = _reference(grads)
  for key in ("trace_sigma", "grad_sq", "b_simple"):
    np.testing.assert_allclose(got[key], ref[key], rtol=1e-10)
  # Tolerances from this sample's own sampling error: each estimate's
  # standard error is that of the mean of its influence function (first
  # order; the S/n term of |G|^2's is O(1/n) smaller): S: |g_i - gbar|^2 - S;
  # |gbar|^2: 2 gbar.(g_i - gbar); their ratio B: (a_i - B b_i) / |G|^2,
  # which keeps the correlation of the two. 4 standard errors: a correct
  # estimator fails with probability < 1e-4 (and this seed is fixed).
  mean = grads.mean(axis=0)
  a = np.sum((grads - mean) ** 2, axis=1) - ref["trace_sigma"]
  b = 2 * (grads - mean) @ mean
  influence = {"trace_sigma": a, "grad_sq": b,
               "b_simple": (a - ref["b_simple"] * b) / ref["grad_sq"]}
  truth = {"trace_sigma": true_trace, "grad_sq": delta_sq, "b_simple": true_b}
  for key, values in influence.items():
    se = np.std(values, ddof=1) / np.sqrt(n)
    # The tolerance is tight enough to mean something (a few percent).
    assert 4 * se < 0.1 * truth[key], (key, se)
    assert abs(got[key] - truth[key]) < 4 * se, (key, got[key], truth[key],
                                                 se)


def test_unresolved_gradient_is_inf_never_nan(example):
  """G = 0 (B_simple = inf, far above n): |G|^2's estimate has mean 0, so a
  sample gives +inf or a large finite B, never NaN; all-zero gradients (no
  noise, no signal) give +inf too."""
  ns = example["noise_scale"]
  d, n, samples = 8, 64, 200
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    data, w, _ = _linear_data(rng, n * samples, d, np.zeros(d), 1.0)
    probe = jax.jit(jax.vmap(
        lambda idx: ns.b_simple(ns.per_example_stats(
            _linear_loss, w, idx, data, chunk=16))))
    got = probe(jnp.arange(n * samples).reshape(samples, n))
    got = {k: np.asarray(v) for k, v in got.items()}
    assert not any(np.isnan(v).any() for v in got.values())
    assert np.all(np.isfinite(got["trace_sigma"]) & (got["trace_sigma"] > 0))
    unresolved = got["grad_sq"] <= 0
    np.testing.assert_array_equal(np.isinf(got["b_simple"]), unresolved)
    assert np.all(got["b_simple"][~unresolved] > 0)
    # P(|gbar|^2 < S/n) is about P(chi2_8 / 8 < 1) ~ 0.57 here.
    assert 0.3 < unresolved.mean() < 0.85
    # Noise-free and gradient-free: every g_i = 0.
    exact = {"x": data["x"][:n], "y": data["x"][:n] @ w}
    zero = ns.b_simple(ns.per_example_stats(_linear_loss, w, jnp.arange(n),
                                            exact))
  assert float(zero["trace_sigma"]) == 0 and float(zero["grad_sq"]) == 0
  assert float(zero["b_simple"]) == np.inf


# ----------------------------------------------------------------------------
# Finite samples: exactly the textbook formulas.


def _mlp_numpy(p, x, label):
  """A 3 -> 4 -> 2 tanh MLP's cross-entropy on one example, float64 NumPy."""
  logits = np.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  top = logits.max()
  return top + np.log(np.sum(np.exp(logits - top))) - logits[label]


def _mlp_loss(p, idx, data):
  hidden = jnp.tanh(data["x"][idx] @ p["w1"] + p["b1"])
  logits = hidden @ p["w2"] + p["b2"]
  labels = data["y"][idx]
  return jnp.mean(jax.nn.logsumexp(logits, axis=-1) -
                  jnp.take_along_axis(logits, labels[:, None], -1)[:, 0])


def _mlp_params(rng):
  return {"w1": rng.standard_normal((3, 4)), "b1": 0.1 * rng.standard_normal(4),
          "w2": rng.standard_normal((4, 2)), "b2": 0.1 * rng.standard_normal(2)}


def _finite_difference_grads(p, x, y, h=1e-5):
  """(n, num_params) per-example gradients by central differences."""
  keys = sorted(p)
  rows = []
  for xi, yi in zip(x, y):
    row = []
    for key in keys:
      for index in np.ndindex(p[key].shape):
        plus = {k: v.copy() for k, v in p.items()}
        minus = {k: v.copy() for k, v in p.items()}
        plus[key][index] += h
        minus[key][index] -= h
        row.append((_mlp_numpy(plus, xi, yi) - _mlp_numpy(minus, xi, yi))
                   / (2 * h))
    rows.append(row)
  return np.asarray(rows)


@pytest.fixture(scope="module")
def mlp_sample():
  rng = np.random.default_rng(2)
  n = 7
  x = rng.standard_normal((n, 3))
  y = rng.integers(0, 2, n)
  params = [_mlp_params(rng) for _ in range(3)]
  grads = [_finite_difference_grads(p, x, y) for p in params]
  return x, y, params, grads


@pytest.mark.parametrize("chunk", [1, 3, 7, 128])
def test_small_sample_matches_the_formulas(example, mlp_sample, chunk):
  """n = 7: one chunk of 7, 7 of 1, 3 of 3 (the last one example and two
  of padding), or a chunk larger than n, all give the two-pass float64
  formulas on gradients taken by finite differences."""
  ns = example["noise_scale"]
  x, y, params, grads = mlp_sample
  ref = _reference(grads[0])
  assert ref["grad_sq"] > 0  # The ratio is exercised, not just +inf.
  with jax.enable_x64(True):
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    stats = jax.jit(lambda p: ns.per_example_stats(
        _mlp_loss, p, jnp.arange(7), data, chunk=chunk))(
            jax.tree.map(jnp.asarray, params[0]))
    got = ns.b_simple(stats)
  assert float(stats["n"]) == 7
  np.testing.assert_allclose(float(stats["mean_grad_sq"]),
                             ref["mean_grad_sq"], rtol=1e-8)
  np.testing.assert_allclose(float(stats["sum_sq_norms"]),
                             np.sum(grads[0] ** 2), rtol=1e-8)
  for key in ("trace_sigma", "grad_sq", "b_simple"):
    np.testing.assert_allclose(float(got[key]), ref[key], rtol=1e-7)


def test_vmapped_over_trials_is_each_trial_alone(example, mlp_sample):
  ns = example["noise_scale"]
  x, y, params, grads = mlp_sample
  with jax.enable_x64(True):
    data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    stacked = jax.tree.map(lambda *v: jnp.asarray(np.stack(v)), *params)
    got = jax.jit(jax.vmap(
        lambda p: ns.b_simple(ns.per_example_stats(
            _mlp_loss, p, jnp.arange(7), data, chunk=3))))(stacked)
  for i, g in enumerate(grads):
    ref = _reference(g)
    assert got["trace_sigma"].shape == (3,)
    for key in ("trace_sigma", "grad_sq", "b_simple"):
      np.testing.assert_allclose(float(got[key][i]), ref[key], rtol=1e-7)


def _linear_sum_loss(w, idx, data):
  """Per-example gradient data["v"][i], exactly."""
  return jnp.mean(data["v"][idx] @ w)


def test_spread_survives_a_large_mean_in_float32(example):
  """|gbar|^2 = 1.6e7 |S|: the merged deviations keep S to 1e-3 in float32,
  where sum |g_i|^2 - n |gbar|^2 loses it."""
  ns = example["noise_scale"]
  rng = np.random.default_rng(3)
  n, d = 1000, 16
  v = 1e3 + rng.standard_normal((n, d))
  stats = jax.jit(lambda data: ns.per_example_stats(
      _linear_sum_loss, jnp.zeros(d, jnp.float32), jnp.arange(n), data))(
          {"v": jnp.asarray(v, jnp.float32)})
  assert stats["sum_sq_dev"].dtype == jnp.float32
  ref = _reference(v.astype(np.float32))
  got = ns.b_simple(stats)
  np.testing.assert_allclose(float(got["trace_sigma"]), ref["trace_sigma"],
                             rtol=1e-3)
  np.testing.assert_allclose(float(stats["mean_grad_sq"]),
                             ref["mean_grad_sq"], rtol=1e-5)
  # The one-pass difference of float32 sums would not pass the check above.
  v32 = v.astype(np.float32)
  naive = (np.sum(v32 * v32, dtype=np.float32) - np.float32(n) *
           np.sum(v32.mean(0, dtype=np.float32) ** 2, dtype=np.float32)) / (
               n - 1)
  assert abs(naive / ref["trace_sigma"] - 1) > 1e-2


# ----------------------------------------------------------------------------
# Unbiasedness.


def test_grad_sq_estimate_is_unbiased_where_the_naive_one_is_not(example):
  """2,000 independent samples of n = 4: the mean of |gbar|^2 - S/n is
  |Delta|^2 and that of S is tr Sigma, while |gbar|^2 sits tr Sigma / n
  above (4 standard errors of the mean over the samples)."""
  ns = example["noise_scale"]
  d, sigma, delta_sq, n, samples = 8, 1.0, 1.0, 4, 2000
  true_trace = (d + 1) * delta_sq + d * sigma ** 2  # 17: bias 4.25
  rng = np.random.default_rng(4)
  with jax.enable_x64(True):
    data, w, _ = _linear_data(rng, n * samples, d,
                              _direction(rng, d, delta_sq), sigma)
    stats = jax.jit(jax.vmap(lambda idx: ns.per_example_stats(
        _linear_loss, w, idx, data)))(
            jnp.arange(n * samples).reshape(samples, n))
    got = ns.b_simple(stats)
  estimate = np.asarray(got["grad_sq"])
  naive = np.asarray(stats["mean_grad_sq"])
  trace = np.asarray(got["trace_sigma"])

  def se(values):
    return np.std(values, ddof=1) / np.sqrt(samples)

  assert abs(estimate.mean() - delta_sq) < 4 * se(estimate)
  assert abs(trace.mean() - true_trace) < 4 * se(trace)
  assert abs(naive.mean() - (delta_sq + true_trace / n)) < 4 * se(naive)
  assert naive.mean() - delta_sq > 10 * se(naive)


def test_exactly_unbiased_over_every_sample_of_a_population(example):
  """A population of N = 5 gradients: over all 5^3 ordered samples with
  replacement, the estimates average to exactly |G|^2 and the population's
  tr Sigma = sum |v - G|^2 / N; over all 5*4*3 samples without replacement
  (population_size=N), |G|^2 again, and the whole population gives |G|^2
  itself."""
  ns = example["noise_scale"]
  rng = np.random.default_rng(5)
  big_n, n = 5, 3
  v = rng.standard_normal((big_n, 3)) + 0.5
  g = v.mean(axis=0)
  trace_pop = np.sum((v - g) ** 2) / big_n
  with jax.enable_x64(True):
    data = {"v": jnp.asarray(v)}
    w = jnp.zeros(3)

    def stats_of(samples):
      return jax.jit(jax.vmap(lambda idx: ns.per_example_stats(
          _linear_sum_loss, w, idx, data)))(jnp.asarray(samples))

    with_or_without = (list(itertools.product(range(big_n), repeat=n)) +
                       list(itertools.permutations(range(big_n), n)))
    stats = stats_of(with_or_without)
    first = {k: v[:big_n ** n] for k, v in stats.items()}
    rest = {k: v[big_n ** n:] for k, v in stats.items()}
    assert len(rest["n"]) == 5 * 4 * 3
    with_replacement, without, everything = (
        {k: np.asarray(v) for k, v in ns.b_simple(*args).items()}
        for args in ((first,), (rest, big_n),
                     (stats_of([list(range(big_n))]), big_n)))
    naive = np.asarray(first["mean_grad_sq"])
  np.testing.assert_allclose(with_replacement["grad_sq"].mean(), g @ g,
                             rtol=1e-12)
  np.testing.assert_allclose(with_replacement["trace_sigma"].mean(),
                             trace_pop, rtol=1e-12)
  np.testing.assert_allclose(naive.mean(), g @ g + trace_pop / n, rtol=1e-12)
  np.testing.assert_allclose(without["grad_sq"].mean(), g @ g, rtol=1e-12)
  np.testing.assert_allclose(without["trace_sigma"].mean(),
                             trace_pop * big_n / (big_n - 1), rtol=1e-12)
  np.testing.assert_allclose(everything["grad_sq"], [g @ g], rtol=1e-12)


def test_two_batch_estimator(example):
  ns = example["noise_scale"]
  # Fed the exact expectations E|G_B|^2 = |G|^2 + tr Sigma / B, it returns
  # |G|^2 and tr Sigma.
  grad_sq, trace = 0.3, 7.0
  got = ns.two_batch_estimates(grad_sq + trace / 16, 16, grad_sq + trace / 256,
                               256)
  np.testing.assert_allclose(float(got["grad_sq"]), grad_sq, rtol=1e-6)
  np.testing.assert_allclose(float(got["trace_sigma"]), trace, rtol=1e-6)
  np.testing.assert_allclose(float(got["b_simple"]), trace / grad_sq,
                             rtol=1e-6)
  # B_small = 1 (the mean |g_i|^2) and B_big = n (|gbar|^2) is the
  # per-example estimator.
  rng = np.random.default_rng(6)
  v = rng.standard_normal((9, 4)) + 0.4
  with jax.enable_x64(True):
    stats = jax.jit(lambda data: ns.per_example_stats(
        _linear_sum_loss, jnp.zeros(4), jnp.arange(9), data))(
            {"v": jnp.asarray(v)})
    two = ns.two_batch_estimates(stats["sum_sq_norms"] / 9, 1,
                                 stats["mean_grad_sq"], 9)
  ref = _reference(v)
  for key in ("trace_sigma", "grad_sq", "b_simple"):
    np.testing.assert_allclose(float(two[key]), ref[key], rtol=1e-10)
  # Unresolved |G|^2 (<= 0): +inf. The big batch no less noisy than the
  # small one (S <= 0, which only the two-batch S can be): 0, never a
  # negative B.
  unresolved = ns.two_batch_estimates(10.0, 4, 1.0, 8)
  assert float(unresolved["grad_sq"]) < 0
  assert float(unresolved["b_simple"]) == np.inf
  noiseless = ns.two_batch_estimates(1.0, 4, 2.0, 8)
  assert float(noiseless["trace_sigma"]) < 0 < float(noiseless["grad_sq"])
  assert float(noiseless["b_simple"]) == 0
  with pytest.raises(ValueError, match="b_small < b_big"):
    ns.two_batch_estimates(1.0, 8, 1.0, 8)


# ----------------------------------------------------------------------------
# The study's tasks.


def _sq_norm(tree):
  return sum(float(np.sum(np.asarray(x, np.float64) ** 2))
             for x in jax.tree.leaves(tree))


def test_mnist1d_probe(example):
  """mnist1d's loss is a mean over signals: the mean per-example gradient
  is the sample's full-batch gradient."""
  ns = example["noise_scale"]
  task = example["tasks"].mnist1d_task(example["test"].get_config().mnist1d)
  n = 100  # 4 chunks of 32, the last with 4 examples and 28 of padding.
  examples, probe = ns.make_noise_probe(task, n, seed=3, chunk=32)
  np.testing.assert_array_equal(examples, task.train_inputs(3, n, 1)[0])
  assert len(set(np.asarray(examples).tolist())) == n
  init = jax.jit(task.init)
  params = [init(jax.random.key(s)) for s in (0, 1)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *params)
  # A leading trial axis of parameters.
  stats = jax.jit(jax.vmap(probe, in_axes=(0, None)))(stacked, task.data)
  full = jax.jit(jax.vmap(jax.grad(task.loss), in_axes=(0, None, None)))(
      stacked, examples, task.data)
  got = ns.b_simple(stats, population_size=task.num_train_examples)
  for i in range(2):
    np.testing.assert_allclose(
        float(stats["mean_grad_sq"][i]),
        _sq_norm(jax.tree.map(lambda x: x[i], full)), rtol=1e-4)
    assert 0 < float(got["trace_sigma"][i]) < np.inf
    assert 0 < float(got["b_simple"][i]) < np.inf
  assert float(stats["mean_grad_sq"][0]) != float(stats["mean_grad_sq"][1])
  with pytest.raises(ValueError, match="training signals"):
    ns.make_noise_probe(task, task.num_train_examples + 1, seed=0)


def test_mlm_probe_averages_per_sequence_gradients(example, tmp_path):
  """mlm's loss is a mean over the batch's masked tokens: the probe's mean
  gradient is the gradient of the mean of per-sequence losses. That is the
  batch's gradient when every sequence has as many masked tokens (BERT's
  masking: round(15%) of a window's non-special tokens, so nearly always),
  and not when the counts differ."""
  ns = example["noise_scale"]
  section = example["default"].get_config().mlm
  section.vocab_size, section.seq_length, section.eval_examples = 256, 16, 32
  section.hidden_size, section.num_layers, section.num_heads = 16, 1, 1
  section.intermediate_size = 32
  task = example["tasks"].make_task("mlm", section, str(tmp_path))
  n = 16  # 4 chunks of 5, the last with 1 example and 4 of padding.
  examples, _ = ns.make_noise_probe(task, n, seed=5, chunk=5)
  inputs = task.train_inputs(5, n, 1)
  for key, value in inputs.items():
    np.testing.assert_array_equal(examples[key], value[0])
  params = jax.jit(task.init)(jax.random.key(0))

  # The mean of per-sequence losses is the task's loss with sequence i's
  # masked weights divided by its count c_i (they then sum to n): one
  # gradient program serves both.
  whole = jax.jit(jax.grad(task.loss))
  stats_of = jax.jit(lambda p, batch: ns.per_example_stats(
      task.loss, p, batch, task.data, chunk=5))

  def per_sequence(p, batch):
    w = np.asarray(batch["masked_weights"])
    return whole(p, dict(batch, masked_weights=jnp.asarray(
        w / w.sum(axis=1, keepdims=True))), task.data)

  # The sample as drawn: 2 masked tokens in each sequence.
  counts = np.asarray(examples["masked_weights"]).sum(axis=1)
  assert set(counts.tolist()) == {2.0}
  # And with one prediction of sequence 0 dropped (1 masked token there).
  weights = np.asarray(examples["masked_weights"]).copy()
  weights[0, 1] = 0
  uneven = dict(examples, masked_weights=jnp.asarray(weights))
  for batch, equal_counts in ((examples, True), (uneven, False)):
    stats = stats_of(params, batch)
    got = ns.b_simple(stats)
    assert 0 < float(got["trace_sigma"]) < np.inf
    np.testing.assert_allclose(float(stats["mean_grad_sq"]),
                               _sq_norm(per_sequence(params, batch)),
                               rtol=1e-4)
    ratio = (_sq_norm(whole(params, batch, task.data)) /
             float(stats["mean_grad_sq"]))
    if equal_counts:
      assert ratio == pytest.approx(1, rel=1e-4)
    else:
      assert abs(ratio - 1) > 1e-3, ratio
