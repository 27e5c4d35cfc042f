"""Tests of lamb_optax._src.accumulation: multi_steps and accumulate_gradients.

multi_steps is checked step for step against optax.MultiSteps (its reference
semantics) and for its cost property: the inner update must not run on a
micro-step, and XLA must not copy the inner state or the accumulator.
accumulate_gradients is checked against jax.value_and_grad of the whole batch
computed in float64.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import make_grads, make_params
import lamb_optax
from lamb_optax._src.accumulation import accumulate_gradients
from lamb_optax._src.accumulation import multi_steps

NUM_MICRO_STEPS = 10
K_SCHEDULE = lambda step: jnp.where(step < 2, 2, 3)  # 2, 2, 3, 3, ...
LR_SCHEDULE = optax.linear_schedule(1e-2, 1e-3, transition_steps=4)


def _grads(num_steps=NUM_MICRO_STEPS):
  """Gradients for the awkward tree of helpers.py (6 leaves, mixed scales)."""
  return [jax.tree.map(jnp.asarray, g) for g in make_grads(num_steps)]


def _small_params():
  return {"w": jnp.linspace(-1.0, 2.0, 12).reshape(3, 4), "s": jnp.float32(3)}


def _small_grads(num_steps):
  """Gradients for `_small_params` (2 leaves: compiles fast)."""
  rng = np.random.default_rng(2)
  return [{"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
           "s": jnp.float32(rng.standard_normal())}
          for _ in range(num_steps)]


def _run(opt, grads_seq, params=None, *, compiles=None, **extra_args):
  """Jitted update + apply over ``grads_seq``; returns (updates, states).

  Appends the number of compilations of the update to ``compiles`` if given.
  """
  params = jax.tree.map(jnp.asarray, make_params() if params is None
                        else params)
  state = opt.init(params)
  update = jax.jit(functools.partial(opt.update, **extra_args))
  all_updates, states = [], []
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    all_updates.append(updates)
    states.append(state)
  if compiles is not None:
    compiles.append(update._cache_size())  # pylint: disable=protected-access
  return all_updates, states


def _assert_trees_close(got, want, what, rtol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want), what
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-30, err_msg=what)


INNERS = {
    "optax.adam": lambda: optax.adam(LR_SCHEDULE),
    "lamb_optax.lamb": lambda: lamb_optax.lamb(LR_SCHEDULE, weight_decay=0.01),
}


@pytest.fixture(scope="module")
def lamb_k3_runs():
  """lamb_optax.lamb inside multi_steps and optax.MultiSteps, k = 3."""
  grads_seq = _grads()
  compiles = []
  got = _run(multi_steps(INNERS["lamb_optax.lamb"](), 3), grads_seq,
             compiles=compiles)
  want = _run(optax.MultiSteps(INNERS["lamb_optax.lamb"](), 3)
              .gradient_transformation(), grads_seq)
  return got, want, compiles[0]


def _assert_runs_match(got, want, num_steps):
  (got_updates, got_states), (want_updates, want_states) = got, want
  assert len(got_updates) == len(want_updates) == num_steps
  for t in range(num_steps):
    _assert_trees_close(got_updates[t], want_updates[t], f"updates {t}")
    _assert_trees_close(got_states[t], want_states[t], f"state {t}")
    assert isinstance(got_states[t], optax.MultiStepsState)


def test_lamb_matches_optax_multisteps_step_for_step(lamb_k3_runs):
  got, want, _ = lamb_k3_runs
  _assert_runs_match(got, want, NUM_MICRO_STEPS)


def test_adam_with_k_schedule_matches_optax_multisteps_step_for_step():
  grads_seq = _grads()
  got = _run(multi_steps(INNERS["optax.adam"](), K_SCHEDULE), grads_seq)
  want = _run(optax.MultiSteps(INNERS["optax.adam"](), K_SCHEDULE)
              .gradient_transformation(), grads_seq)
  _assert_runs_match(got, want, NUM_MICRO_STEPS)
  # k = 2, 2, 3, 3: emits after micro-steps 2, 4, 7, 10.
  emits = [t for t, state in enumerate(got[1], start=1)
           if int(state.mini_step) == 0]
  assert emits == [2, 4, 7, 10]


def test_micro_steps_emit_zeros_and_inner_count_advances_only_on_emit(
    lamb_k3_runs):
  (updates_seq, states), _, _ = lamb_k3_runs
  for t, (updates, state) in enumerate(zip(updates_seq, states), start=1):
    is_emit = t % 3 == 0
    leaves = jax.tree.leaves(updates)
    if is_emit:
      assert any(np.any(np.asarray(u) != 0) for u in leaves), t
    else:
      assert all(np.all(np.asarray(u) == 0) for u in leaves), t
    # Existing tooling finds the inner counts (Adam's, the trust ratio's and
    # the lr schedule's) through the wrapper's state.
    counts = optax.tree_utils.tree_get_all_with_path(state, "count")
    assert len(counts) == 3
    assert [int(count) for _, count in counts] == [t // 3] * 3, t
    assert int(state.gradient_step) == t // 3
    assert int(state.mini_step) == t % 3
    acc = jax.tree.leaves(state.acc_grads)
    assert all(a.dtype == jnp.float32 for a in acc)
    assert all(np.all(np.asarray(a) == 0) for a in acc) == is_emit, t


def test_jit_compiles_once_and_state_types_are_stable(lamb_k3_runs):
  (_, states), _, compiles = lamb_k3_runs
  assert compiles == 1
  opt = multi_steps(INNERS["lamb_optax.lamb"](), 3)
  init = opt.init(jax.tree.map(jnp.asarray, make_params()))
  types = lambda tree: jax.tree.map(
      lambda x: (x.shape, x.dtype, x.weak_type), tree)
  for state in states:
    assert types(state) == types(init)


def test_emitted_update_is_the_mean_or_the_sum_of_the_gradients():
  grads_seq, params = _small_grads(4), _small_params()
  mean_updates, _ = _run(multi_steps(optax.sgd(1.0), 2), grads_seq, params)
  sum_updates, sum_states = _run(
      multi_steps(optax.sgd(1.0), 2, use_grad_mean=False), grads_seq, params)
  want_sum_updates, want_sum_states = _run(
      optax.MultiSteps(optax.sgd(1.0), 2,
                       use_grad_mean=False).gradient_transformation(),
      grads_seq, params)
  for t in range(4):
    _assert_trees_close(sum_updates[t], want_sum_updates[t], f"updates {t}")
    _assert_trees_close(sum_states[t], want_sum_states[t], f"state {t}")
  for t in (1, 3):
    grad_sum = jax.tree.map(lambda a, b: a + b, grads_seq[t - 1],
                            grads_seq[t])
    _assert_trees_close(sum_updates[t], jax.tree.map(lambda g: -g, grad_sum),
                        f"sum {t}", rtol=1e-6)
    _assert_trees_close(mean_updates[t],
                        jax.tree.map(lambda g: -g / 2, grad_sum),
                        f"mean {t}", rtol=1e-5)


def _counting_sgd(calls):
  """optax.sgd(1.0) whose update records, at run time, that it ran."""
  sgd = optax.sgd(1.0)

  def update(updates, state, params=None):
    jax.debug.callback(lambda: calls.append(1))
    return sgd.update(updates, state, params)

  return optax.GradientTransformation(sgd.init, update)


def test_micro_step_does_not_run_the_inner_update():
  calls = []
  _run(multi_steps(_counting_sgd(calls), 3), _small_grads(9),
       _small_params())
  jax.effects_barrier()
  assert len(calls) == 3  # one per emitting step, none per micro-step


def _step_hlo(opt, params, donate):
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  state = opt.init(params)
  return jax.jit(step, donate_argnums=donate).lower(
      params, state, params).compile().as_text()


# Donated gradients have no output to alias (params and state take theirs);
# XLA says so, as in the user's own step.
@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
@pytest.mark.parametrize("donate", [(0, 1, 2), (0, 1)],
                         ids=["donate_grads", "keep_grads"])
def test_donated_step_copies_no_state(donate):
  # optax.MultiSteps' cost was measured, not asserted; here we check that
  # XLA neither copies the untouched inner state through the cond nor the
  # accumulator after it (what made earlier designs slow).
  params = {"w": jnp.ones((96, 160)), "b": jnp.ones((160,))}
  hlo = _step_hlo(multi_steps(lamb_optax.lamb(1e-3), 4), params, donate)
  copies = re.findall(r"= (f32\[[0-9,]+\])\S* copy\(", hlo)
  assert not copies, copies
  assert " conditional(" in hlo


def test_should_skip_update_fn_matches_optax():
  grads_seq = _small_grads(8)
  grads_seq[2] = jax.tree.map(lambda g: g * jnp.nan, grads_seq[2])
  grads_seq[5] = jax.tree.map(lambda g: g * jnp.inf, grads_seq[5])
  inner = INNERS["optax.adam"]
  got_updates, got_states = _run(
      multi_steps(inner(), 2, should_skip_update_fn=optax.skip_not_finite),
      grads_seq, _small_params())
  want_updates, want_states = _run(
      optax.MultiSteps(inner(), 2, should_skip_update_fn=optax.skip_not_finite
                       ).gradient_transformation(), grads_seq,
      _small_params())
  for t in range(8):
    _assert_trees_close(got_updates[t], want_updates[t], f"updates {t}")
    _assert_trees_close(got_states[t], want_states[t], f"state {t}")
    assert bool(got_states[t].skip_state["should_skip"]) == (t in (2, 5))
  # 8 micro-steps, 2 skipped: 3 emits, all finite.
  assert int(got_states[-1].gradient_step) == 3
  assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(got_updates))


def test_inject_hyperparams_inner_advances_only_on_emit():
  make = lambda: optax.inject_hyperparams(optax.adamw)(
      learning_rate=LR_SCHEDULE, weight_decay=0.01)
  grads_seq = _small_grads(6)
  got_updates, got_states = _run(multi_steps(make(), 2), grads_seq,
                                 _small_params())
  want_updates, want_states = _run(
      optax.MultiSteps(make(), 2).gradient_transformation(), grads_seq,
      _small_params())
  for t in range(6):
    _assert_trees_close(got_updates[t], want_updates[t], f"updates {t}")
    _assert_trees_close(got_states[t], want_states[t], f"state {t}")
    lr = got_states[t].inner_opt_state.hyperparams["learning_rate"]
    # The schedule saw inner counts 0, 1, 2 at emits 1, 2, 3.
    np.testing.assert_allclose(lr, LR_SCHEDULE((t + 1) // 2 - 1 if t else 0),
                               rtol=1e-6)


def test_extra_args_reach_the_inner_update():
  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, scale):
    del params
    return jax.tree.map(lambda g: -scale * g, updates), state

  opt = multi_steps(optax.GradientTransformationExtraArgs(init, update), 2)
  assert isinstance(opt, optax.GradientTransformationExtraArgs)
  grads_seq = _small_grads(2)
  updates_seq, _ = _run(opt, grads_seq, _small_params(), scale=3.0)
  want = jax.tree.map(lambda a, b: -3.0 * (a + b) / 2, *grads_seq)
  _assert_trees_close(updates_seq[1], want, "scaled", rtol=1e-5)


def test_bfloat16_gradients_accumulate_in_float32():
  params = {"w": jnp.zeros((4,), jnp.bfloat16)}
  grads_seq = [{"w": jnp.full((4,), v, jnp.bfloat16)}
               for v in (1.0, 1 / 256, 1 / 256, 1 / 256, 1 / 256)]
  updates_seq, states = _run(multi_steps(optax.sgd(1.0), 5,
                                         use_grad_mean=False),
                             grads_seq, params)
  assert states[2].acc_grads["w"].dtype == jnp.float32
  np.testing.assert_array_equal(states[2].acc_grads["w"], 1 + 2 / 256)
  assert updates_seq[4]["w"].dtype == jnp.bfloat16
  # Adds in bfloat16 would round each 1 + 1/256 (a tie) back to 1.
  np.testing.assert_array_equal(
      np.asarray(updates_seq[4]["w"], np.float32), -(1 + 4 / 256))


@pytest.mark.parametrize("bad", [0, -2])
def test_every_k_below_one_is_rejected(bad):
  with pytest.raises(ValueError, match="`every_k_schedule` must be >= 1"):
    multi_steps(optax.sgd(1.0), bad)


@pytest.mark.parametrize("bad", [2.0, True, "3", None])
def test_every_k_of_wrong_type_is_rejected(bad):
  with pytest.raises(TypeError, match="`every_k_schedule`"):
    multi_steps(optax.sgd(1.0), bad)


@pytest.mark.parametrize("bad", [optax.sgd, "adam", None, 1.0])
def test_inner_must_be_a_gradient_transformation(bad):
  with pytest.raises(TypeError, match="`inner` must be an optax"):
    multi_steps(bad, 2)


def test_other_bad_arguments():
  with pytest.raises(TypeError, match="`use_grad_mean`"):
    multi_steps(optax.sgd(1.0), 2, use_grad_mean=1)
  with pytest.raises(TypeError, match="`should_skip_update_fn`"):
    multi_steps(optax.sgd(1.0), 2, should_skip_update_fn=True)
  with pytest.raises(ValueError, match="`accumulator_dtype`"):
    multi_steps(optax.sgd(1.0), 2, accumulator_dtype=jnp.int32)
  opt = multi_steps(optax.sgd(1.0), 2,
                    should_skip_update_fn=lambda u, s, p: (jnp.float32(0), ()))
  params = jnp.ones(3)
  with pytest.raises(ValueError, match="`should_skip_update_fn` must return"):
    opt.update(params, opt.init(params), params)
  with pytest.raises(TypeError, match="`state` must be the optax.Multi"):
    opt.update(params, optax.sgd(1.0).init(params), params)


# accumulate_gradients ------------------------------------------------------


def _mlp_params(dtype=np.float32):
  rng = np.random.default_rng(0)
  return {
      "dense1": {"kernel": rng.standard_normal((5, 7)).astype(dtype) / 2,
                 "bias": rng.standard_normal(7).astype(dtype) / 10},
      "dense2": {"kernel": rng.standard_normal((7, 3)).astype(dtype) / 3,
                 "bias": np.zeros(3, dtype)},
  }


def _mlp_batch(batch_size=24):
  rng = np.random.default_rng(1)
  return {"x": rng.standard_normal((batch_size, 5)).astype(np.float32),
          "label": rng.integers(0, 3, batch_size).astype(np.int32)}


def _mlp_loss(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["dense1"]["kernel"]
                    + params["dense1"]["bias"])
  logits = hidden @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits, batch["label"])
  correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"])
  aux = {"max_loss": jnp.max(losses), "correct": correct.astype(jnp.int32)}
  return jnp.mean(losses), aux


def _float64_reference(params, batch, num_micro_batches):
  """value_and_grad of the whole batch in float64, and the micro-batches'
  mean of max_loss (the mean of a max is not the max of the batch)."""
  with jax.enable_x64(True):
    to64 = lambda x: (jnp.asarray(x, jnp.float64)
                      if np.issubdtype(x.dtype, np.floating) else x)

    @jax.jit
    def reference(params, batch):
      (loss, aux), grads = jax.value_and_grad(_mlp_loss, has_aux=True)(
          params, batch)
      micro_batches = jax.tree.map(
          lambda x: x.reshape((num_micro_batches, -1) + x.shape[1:]), batch)
      micro_max = jax.vmap(lambda b: _mlp_loss(params, b)[1]["max_loss"])(
          micro_batches)
      return loss, aux, jnp.mean(micro_max), grads

    out = reference(jax.tree.map(to64, params), jax.tree.map(to64, batch))
    return jax.tree.map(np.asarray, out)


def test_equals_value_and_grad_of_the_whole_batch():
  params, batch = _mlp_params(), _mlp_batch()
  value_and_grad_fn = jax.value_and_grad(_mlp_loss, has_aux=True)
  # The call the BERT example makes, inside its jitted train step.
  (loss, aux), grads = jax.jit(
      lambda p, b: accumulate_gradients(value_and_grad_fn, p, b, 4))(
          params, batch)
  want_loss, want_aux, want_max, want_grads = _float64_reference(
      params, batch, 4)
  assert loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  np.testing.assert_allclose(aux["max_loss"], want_max, rtol=1e-6)
  assert aux["correct"].dtype == jnp.int32
  assert int(aux["correct"]) == int(want_aux["correct"])  # summed, not mean
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7)
  # The micro-batches really differ: a micro-batch gradient is not the mean.
  (_, _), first = jax.jit(value_and_grad_fn)(
      params, jax.tree.map(lambda x: x[:6], batch))
  assert not np.allclose(first["dense2"]["kernel"],
                         want_grads["dense2"]["kernel"], rtol=1e-2)


def test_weighted_means_give_the_mean_over_real_examples():
  params, batch = _mlp_params(), _mlp_batch(24)
  # Micro-batches of 6 rows with 6, 1, 3, 4 real examples.
  mask = np.zeros(24, np.float32)
  for i, n in enumerate((6, 1, 3, 4)):
    mask[6 * i:6 * i + n] = 1
  batch["mask"] = mask

  def masked_loss(params, batch):
    losses = optax.softmax_cross_entropy_with_integer_labels(
        jnp.tanh(batch["x"] @ params["dense1"]["kernel"]
                 + params["dense1"]["bias"]) @ params["dense2"]["kernel"]
        + params["dense2"]["bias"], batch["label"])
    return jnp.sum(losses * batch["mask"]) / jnp.sum(batch["mask"])

  value_and_grad_fn = jax.value_and_grad(masked_loss)
  loss, grads = jax.jit(lambda p, b: accumulate_gradients(
      value_and_grad_fn, p, b, 4,
      micro_batch_weight_fn=lambda micro: jnp.sum(micro["mask"])))(
          params, batch)
  want_loss, want_grads = jax.jit(value_and_grad_fn)(params, batch)
  np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  # Unweighted, the mean of micro-batch means is not the real-example mean.
  unweighted, _ = jax.jit(lambda p, b: accumulate_gradients(
      value_and_grad_fn, p, b, 4))(params, batch)
  assert not np.isclose(unweighted, want_loss, rtol=1e-3)


def test_bfloat16_gradients_are_summed_in_float32():
  # Micro-batch gradients 1, 1/128, ..., 1/128 (16 micro-batches): the mean
  # is (1 + 15/128) / 16, exact in float32; bfloat16 sums lose the 1/128s.
  params = jnp.zeros((2,), jnp.bfloat16)
  values = np.full(16, 1.0 / 128, np.float32)
  values[0] = 1.0
  batch = {"g": np.repeat(values, 2).reshape(32, 1) * np.ones((1, 2),
                                                              np.float32)}

  def loss(params, batch):
    return jnp.sum(params * jnp.mean(batch["g"], 0).astype(jnp.bfloat16))

  value_and_grad_fn = jax.value_and_grad(loss)
  want = np.float32(np.asarray(jnp.bfloat16((1 + 15 / 128) / 16)))
  _, grads = accumulate_gradients(value_and_grad_fn, params, batch, 16)
  assert grads.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(grads, np.float32), want)
  _, grads_bf16 = accumulate_gradients(value_and_grad_fn, params, batch, 16,
                                       accumulator_dtype=jnp.bfloat16)
  assert not np.array_equal(np.asarray(grads_bf16, np.float32), want)
  # The former name still works, with a DeprecationWarning.
  with pytest.warns(DeprecationWarning, match="`accumulator_dtype`"):
    _, grads_old_name = accumulate_gradients(
        value_and_grad_fn, params, batch, 16, accumulation_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(grads_old_name, np.float32),
                                np.asarray(grads_bf16, np.float32))


def test_uses_one_scan_not_an_unrolled_loop():
  params, batch = _mlp_params(), _mlp_batch(32)
  traces = []

  def value_and_grad_fn(params, batch):
    traces.append(batch["x"].shape)
    return jax.value_and_grad(_mlp_loss, has_aux=True)(params, batch)

  jaxpr = jax.make_jaxpr(
      lambda p, b: accumulate_gradients(value_and_grad_fn, p, b, 8))(
          params, batch)
  primitives = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
  assert primitives.count("scan") == 1
  assert "dot_general" not in primitives  # the model lives inside the scan
  # Traced for the shapes (eval_shape) and once for the scan body, never 8x.
  assert 1 <= len(traces) <= 2 and set(traces) == {(4, 5)}


def test_one_micro_batch_calls_the_function_once_without_scan():
  params, batch = _mlp_params(), _mlp_batch(8)
  calls = []

  def value_and_grad_fn(params, batch):
    calls.append(batch["x"].shape)
    return jax.value_and_grad(_mlp_loss, has_aux=True)(params, batch)

  jaxpr = jax.make_jaxpr(
      lambda p, b: accumulate_gradients(value_and_grad_fn, p, b, 1))(
          params, batch)
  assert calls == [(8, 5)]
  assert "scan" not in [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]


def test_accumulate_gradients_errors():
  params, batch = _mlp_params(), _mlp_batch(24)
  fn = jax.value_and_grad(_mlp_loss, has_aux=True)
  with pytest.raises(ValueError, match=r"`batch` \(24.*`num_micro_batches` "
                     r"\(5\)"):
    accumulate_gradients(fn, params, batch, 5)
  with pytest.raises(ValueError, match="leaves of `batch` disagree"):
    accumulate_gradients(fn, params, {"x": batch["x"],
                                      "label": batch["label"][:12]}, 2)
  with pytest.raises(ValueError, match="`batch` leaf 'step' is a scalar"):
    accumulate_gradients(fn, params, dict(batch, step=np.int32(3)), 2)
  with pytest.raises(ValueError, match="`num_micro_batches` must be >= 1"):
    accumulate_gradients(fn, params, batch, 0)
  for bad in (2.0, True, jnp.int32(2)):
    with pytest.raises(TypeError, match="`num_micro_batches` must be a "
                       "Python int"):
      accumulate_gradients(fn, params, batch, bad)
  with pytest.raises(ValueError, match="`accumulator_dtype`"):
    accumulate_gradients(fn, params, batch, 2, accumulator_dtype=jnp.int32)
  with pytest.raises(ValueError, match="`micro_batch_weight_fn` must return "
                     "a scalar"):
    accumulate_gradients(fn, params, batch, 2,
                         micro_batch_weight_fn=lambda b: b["x"][:, 0])


@pytest.mark.parametrize("dtype", [jnp.bool_, jnp.complex64])
def test_value_leaf_neither_floating_nor_integer_is_refused_by_path(dtype):
  """Floating value leaves are averaged and integer ones summed; a bool or
  complex leaf has no such rule and is named, while the others pass."""
  params, batch = _mlp_params(), _mlp_batch(24)

  def value_and_grad_fn(params, batch):
    (loss, aux), grads = jax.value_and_grad(_mlp_loss, has_aux=True)(
        params, batch)
    return (loss, dict(aux, odd=jnp.zeros([], dtype))), grads

  with pytest.raises(TypeError, match=r"leaf '1/odd' of dtype "
                     f"{jnp.dtype(dtype)}"):
    accumulate_gradients(value_and_grad_fn, params, batch, 2)
  (_, aux), _ = accumulate_gradients(
      jax.value_and_grad(_mlp_loss, has_aux=True), params, batch, 2)
  assert aux["correct"].dtype == jnp.int32
  assert aux["max_loss"].dtype == jnp.float32


# benchmarks/accumulation.py -------------------------------------------------

_SCRIPT = (pathlib.Path(__file__).resolve().parents[1] / "benchmarks" /
           "accumulation.py")


def test_benchmark_quick_run(tmp_path, capsys):
  spec = importlib.util.spec_from_file_location("benchmarks_accumulation",
                                                _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  out = tmp_path / "results" / "accumulation.json"
  module.main(["--quick", "--reps", "2", "--out", str(out)])
  result = json.loads(out.read_text())
  rows = result["rows"]
  assert set(rows) == set(module.ROWS)
  for name, row in rows.items():
    for key in ("ms_median", "x_gradient_add", "x_optax_same_step"):
      assert math.isfinite(row[key]) and row[key] > 0, (name, key, row[key])
    assert len(row["ms_all"]) == 2
    assert row["params_finite_after_run"], name
  assert rows["gradient add"]["x_gradient_add"] == 1.0
  assert result["config"]["quick"] and result["config"]["every_k"] >= 2
  table = capsys.readouterr().out
  for name in module.ROWS:
    assert f"| {name} |" in table
