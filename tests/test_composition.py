"""lamb_optax inside the optax/JAX machinery users wrap optimizers in.

jit (no retracing, stable state, donation), optax.chain / named_chain,
inject_hyperparams (run-time changes of the learning rate and the weight
decay), schedules, MultiSteps and apply_if_finite. Expected values come from
an equivalent optax composition or from a float64 numpy statement of
Algorithm 2 (LAMB) / Algorithm 1 (LARS) of You et al. (2020).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
import reference


# --------------------------------------------------------------------------
# Local fixtures; the float64 reference is reference.py's.
# --------------------------------------------------------------------------


def composition_params(dtype=jnp.float32):
  """Awkward leaves: a scalar, a zero vector, a 3-D tensor, mixed scales."""
  return jax.tree.map(lambda x: x.astype(dtype), {
      "block": {
          "kernel": jnp.linspace(-1.0, 2.0, 24).reshape(2, 3, 4),
          "bias": jnp.zeros(4),
      },
      "LayerNorm_0": {"scale": jnp.full((4,), 1.5)},
      "temperature": jnp.array(0.05),
      "embedding": 100.0 * jnp.cos(jnp.arange(6.0)).reshape(3, 2),
  })


@functools.lru_cache(maxsize=None)
def _grad_leaves(step):
  rng = np.random.default_rng(step)
  shapes = [np.shape(x) for x in jax.tree.leaves(composition_params())]
  return tuple((0.1 + i) * rng.standard_normal(shape).astype(np.float32)
               for i, shape in enumerate(shapes))


def composition_grads(step, dtype=jnp.float32):
  """A different, deterministic gradient at every step."""
  treedef = jax.tree.structure(composition_params())
  return jax.tree.unflatten(
      treedef, [jnp.asarray(g, dtype) for g in _grad_leaves(step)])


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-6):
  chex.assert_trees_all_equal_structs(actual, expected)
  for a, e in zip(leaves64(actual), leaves64(expected)):
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


def np_lamb(params, grads_seq, *, learning_rate, weight_decay=0.0, b1=0.9,
            b2=0.999, eps=1e-6, decay_mask=None, adapt_mask=None):
  """The parameters after ``reference.lamb`` (float64 Algorithm 2) has run
  over ``grads_seq``, as a list of leaves."""
  steps = reference.lamb(
      leaves64(params), [leaves64(g) for g in grads_seq],
      learning_rate=learning_rate, weight_decay=weight_decay, b1=b1, b2=b2,
      eps=eps, weight_decay_mask=decay_mask, trust_ratio_mask=adapt_mask)
  return steps[-1].params


def np_lars(params, grads_seq, *, learning_rate, momentum=0.9,
            weight_decay=0.0):
  """The parameters after ``reference.lars`` (float64 Algorithm 1, trust
  coefficient 1) has run over ``grads_seq``, as a list of leaves."""
  steps = reference.lars(
      leaves64(params), [leaves64(g) for g in grads_seq],
      learning_rate=learning_rate, momentum=momentum,
      weight_decay=weight_decay)
  return steps[-1].params


def run(tx, params, grads_seq, update=None):
  """Applies ``tx`` over ``grads_seq``; returns (params, state)."""
  update = update or tx.update
  state = tx.init(params)
  for grads in grads_seq:
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


# --------------------------------------------------------------------------
# jit: one trace, stable state.
# --------------------------------------------------------------------------


OPTIMIZERS = {
    "lamb": lambda: lamb_optax.lamb(1e-2, weight_decay=0.01),
    "lamb_masked_clipped": lambda: lamb_optax.lamb(
        1e-2, weight_decay=0.01, max_grad_norm=1.0, nesterov="nn",
        weight_decay_mask=lamb_optax.masks.exclude_bias_and_norm(),
        trust_ratio_mask=lamb_optax.masks.exclude_bias_and_norm(),
        trust_ratio_bounds=(0.0, 10.0)),
    "lamb_schedules": lambda: lamb_optax.lamb(
        optax.linear_schedule(1e-2, 0.0, 10),
        weight_decay=optax.cosine_decay_schedule(0.1, 10)),
    "lamb_mu_bf16": lambda: lamb_optax.lamb(1e-2, mu_dtype=jnp.bfloat16),
    # float32 hyperparameters whatever the params' dtype: by default optax
    # casts them to the params' dtype, and b2 = 0.999 is 1.0 in bfloat16.
    "lamb_injected": lambda: optax.inject_hyperparams(
        lamb_optax.lamb, hyperparam_dtype=jnp.float32)(
            learning_rate=1e-2, weight_decay=0.01),
    "lars": lambda: lamb_optax.lars(1e-2, weight_decay=1e-4),
    "lars_injected": lambda: optax.inject_hyperparams(
        lamb_optax.lars, hyperparam_dtype=jnp.float32)(
            learning_rate=1e-2, momentum=0.9, weight_decay=1e-4),
}


@pytest.mark.parametrize("name, dtype", [
    ("lamb_masked_clipped", jnp.float32),
    ("lamb_masked_clipped", jnp.bfloat16),
    ("lamb_schedules", jnp.bfloat16),
    ("lamb_mu_bf16", jnp.float32),
    ("lamb_injected", jnp.bfloat16),
    ("lars", jnp.bfloat16),
    ("lars_injected", jnp.float32),
    ("lars_injected", jnp.bfloat16),
], ids=lambda x: x if isinstance(x, str) else jnp.dtype(x).name)
def test_jit_traces_once_and_state_is_stable(name, dtype):
  tx = OPTIMIZERS[name]()
  traces = []

  @jax.jit
  def step(params, state, grads):
    traces.append(1)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = composition_params(dtype)
  state = tx.init(params)
  params_spec = shapes_and_dtypes(params)
  state_spec = shapes_and_dtypes(state)
  for i in range(3):
    params, state = step(params, state, composition_grads(i, dtype))
    assert shapes_and_dtypes(params) == params_spec
    assert shapes_and_dtypes(state) == state_spec
  assert len(traces) == 1
  assert step._cache_size() == 1
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  # The optimizer really moved the parameters.
  assert any(not np.array_equal(a, b) for a, b in
             zip(leaves64(params), leaves64(composition_params(dtype))))


@pytest.mark.filterwarnings("error:Some donated buffers were not usable")
@pytest.mark.parametrize("name", ["lamb_schedules", "lars_injected"])
def test_donated_buffers_are_reused_and_results_unchanged(name):
  tx = OPTIMIZERS[name]()

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  plain = jax.jit(step)
  params_d = params_p = composition_params()
  state_d = state_p = tx.init(params_d)
  params_p = jax.tree.map(jnp.copy, params_p)
  state_p = jax.tree.map(jnp.copy, state_p)
  for i in range(3):
    old_params_d = params_d
    params_d, state_d = donated(params_d, state_d, composition_grads(i))
    params_p, state_p = plain(params_p, state_p, composition_grads(i))
    assert all(x.is_deleted() for x in jax.tree.leaves(old_params_d))
  assert_trees_close(params_d, params_p, rtol=0, atol=0)
  assert_trees_close(state_d, state_p, rtol=0, atol=0)


def test_lars_state_dtype_stable_with_float32_momentum_and_bf16_params():
  # The momentum buffer is stored in the params' dtype at init; it must come
  # back in that dtype after an update whatever the hyperparameters' dtype
  # (a float32 array here, as optax.inject_hyperparams passes them).
  params = composition_params(jnp.bfloat16)
  for kwargs in (dict(momentum=jnp.float32(0.9)),
                 dict(weight_decay=jnp.float32(1e-4))):
    tx = lamb_optax.lars(1e-2, **kwargs)
    state = tx.init(params)
    _, new_state = tx.update(composition_grads(0, jnp.bfloat16), state, params)
    assert shapes_and_dtypes(new_state) == shapes_and_dtypes(state), kwargs


# --------------------------------------------------------------------------
# optax.chain and named_chain.
# --------------------------------------------------------------------------


def count_scaled_plus_offset():
  """A stateful custom transform: g -> (t + 1) * g + 0.01 at step t."""
  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    factor = (state.count + 1).astype(jnp.float32)
    updates = jax.tree.map(lambda g: factor * g + 0.01, updates)
    return updates, optax.ScaleByScheduleState(count=state.count + 1)

  return optax.GradientTransformation(init_fn, update_fn)


def test_lamb_after_custom_transform_equals_lamb_on_transformed_grads():
  grads_seq = [composition_grads(i) for i in range(3)]
  chained = optax.chain(count_scaled_plus_offset(),
                        lamb_optax.lamb(1e-2, weight_decay=0.01))
  got, _ = run(chained, composition_params(), grads_seq)
  transformed = [jax.tree.map(lambda g, t=t: (t + 1.0) * g + 0.01, grads)
                 for t, grads in enumerate(grads_seq)]
  want, _ = run(lamb_optax.lamb(1e-2, weight_decay=0.01), composition_params(),
                transformed)
  assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
  np_want = np_lamb(composition_params(), transformed, learning_rate=1e-2,
                    weight_decay=0.01)
  for a, e in zip(leaves64(got), np_want):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


HAND_CONFIGS = {
    "defaults": dict(),
    "decay_masks_bounds": dict(
        weight_decay=0.05, b1=0.8, b2=0.99, eps=1e-5,
        weight_decay_mask=lamb_optax.masks.rank_at_least(2),
        trust_ratio_mask=lamb_optax.masks.exclude_bias_and_norm(),
        param_norm_bounds=(0.5, 20.0), trust_ratio_bounds=(0.01, 5.0)),
    "nesterov_no_bias_correction": dict(
        weight_decay=0.01, nesterov="nn", bias_correction=False,
        eps_root=1e-8),
    "clipped": dict(weight_decay=0.01, max_grad_norm=0.5),
    "schedules_masked_mu_bf16": dict(
        weight_decay=optax.linear_schedule(0.1, 0.0, 3),
        weight_decay_mask=lamb_optax.masks.exclude_bias_and_norm(),
        mu_dtype=jnp.bfloat16),
}


@pytest.mark.parametrize("config", sorted(HAND_CONFIGS))
def test_hand_composition_equals_lamb(config):
  kw = dict(HAND_CONFIGS[config])
  lr = optax.exponential_decay(3e-2, 1, 0.7) if "schedules" in config else 3e-2
  adam_kw = {k: kw.pop(k) for k in ("b1", "b2", "eps", "eps_root", "nesterov",
                                    "bias_correction", "mu_dtype") if k in kw}
  adam_kw.setdefault("eps", 1e-6)  # lamb's (the paper's); scale_by_adam's is
  # optax's 1e-8.
  weight_decay = kw.pop("weight_decay", 0.0)
  weight_decay_mask = kw.pop("weight_decay_mask", None)
  trust_ratio_mask = kw.pop("trust_ratio_mask", None)
  max_grad_norm = kw.pop("max_grad_norm", None)
  bounds = kw  # param_norm_bounds / trust_ratio_bounds, if any
  by_hand = optax.named_chain(
      ("clip", optax.identity() if max_grad_norm is None
       else optax.clip_by_global_norm(max_grad_norm)),
      ("adam", lamb_optax.scale_by_adam(**adam_kw)),
      ("weight_decay", optax.add_decayed_weights(weight_decay,
                                                 weight_decay_mask)),
      ("trust_ratio", lamb_optax.scale_by_trust_ratio(
          trust_ratio_mask=trust_ratio_mask, **bounds)),
      ("learning_rate", optax.scale_by_learning_rate(lr)),
  )
  lamb = lamb_optax.lamb(lr, **HAND_CONFIGS[config])
  grads_seq = [composition_grads(i) for i in range(3)]
  params_hand, state_hand = run(by_hand, composition_params(), grads_seq)
  params_lamb, state_lamb = run(lamb, composition_params(), grads_seq)
  assert_trees_close(params_lamb, params_hand, rtol=1e-5, atol=1e-6)
  # The same state, by name; lamb's 'direction' holds no array unless
  # store_direction=True.
  assert not jax.tree.leaves(state_lamb.pop("direction"))
  assert list(state_lamb) == list(state_hand)
  chex.assert_trees_all_equal_structs(dict(state_lamb), dict(state_hand))
  assert_trees_close(dict(state_lamb), dict(state_hand), rtol=1e-5,
                     atol=1e-6)


def test_lamb_defaults_match_optax_lamb():
  grads_seq = [composition_grads(i) for i in range(3)]
  ours, _ = run(lamb_optax.lamb(1e-2, weight_decay=0.01), composition_params(),
                grads_seq)
  theirs, _ = run(optax.lamb(1e-2, weight_decay=0.01), composition_params(),
                  grads_seq)
  assert_trees_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_lars_equals_its_optax_composition():
  lr, momentum, wd, coeff, eps = 5e-2, 0.8, 1e-3, 0.5, 1e-4
  by_hand = optax.chain(
      optax.add_decayed_weights(wd),
      optax.ema(momentum, debias=False),
      lamb_optax.scale_by_trust_ratio(trust_coefficient=coeff, eps=eps),
      optax.scale_by_learning_rate(lr),
  )
  lars = lamb_optax.lars(lr, momentum=momentum, weight_decay=wd,
                         trust_coefficient=coeff, eps=eps)
  grads_seq = [composition_grads(i) for i in range(4)]
  assert_trees_close(run(lars, composition_params(), grads_seq)[0],
                     run(by_hand, composition_params(), grads_seq)[0],
                     rtol=1e-6, atol=1e-7)


def test_named_chain_clip_then_lamb_equals_lamb_with_max_grad_norm():
  named = optax.named_chain(
      ("clip", optax.clip_by_global_norm(0.3)),
      ("lamb", lamb_optax.lamb(1e-2, weight_decay=0.01)),
  )
  grads_seq = [composition_grads(i) for i in range(3)]
  got, state = run(named, composition_params(), grads_seq)
  want, want_state = run(
      lamb_optax.lamb(1e-2, weight_decay=0.01, max_grad_norm=0.3),
      composition_params(), grads_seq)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
  assert set(state) == {"clip", "lamb"}
  assert int(state["lamb"]["adam"].count) == 3
  assert_trees_close(lamb_optax.trust_ratios(state),
                     lamb_optax.trust_ratios(want_state), rtol=1e-5)


# --------------------------------------------------------------------------
# inject_hyperparams: run-time changes of learning_rate and weight_decay.
# --------------------------------------------------------------------------


def _set_hyperparams(state, **values):
  hyperparams = dict(state.hyperparams)
  for k, v in values.items():
    hyperparams[k] = jnp.asarray(v, hyperparams[k].dtype)
  return state._replace(hyperparams=hyperparams)


@pytest.mark.parametrize("change", ["learning_rate", "weight_decay"])
def test_inject_hyperparams_lamb_runtime_change(change):
  lr0, wd0, lr1, wd1 = 1e-2, 0.01, 3e-3, 0.3
  new = {"learning_rate": {"learning_rate": lr1},
         "weight_decay": {"weight_decay": wd1}}[change]
  lr_after, wd_after = new.get("learning_rate", lr0), new.get(
      "weight_decay", wd0)
  tx = optax.inject_hyperparams(lamb_optax.lamb)(learning_rate=lr0,
                                                 weight_decay=wd0)
  update = jax.jit(tx.update)
  params, state = composition_params(), tx.init(composition_params())
  for i in range(2):
    updates, state = update(composition_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  inner_before = state.inner_state
  state = _set_hyperparams(state, **new)
  updates, state = update(composition_grads(2), state, params)
  assert update._cache_size() == 1

  # Same step as a fresh lamb built with the new values, from the same state.
  fresh = lamb_optax.lamb(lr_after, weight_decay=wd_after)
  want_updates, want_state = fresh.update(composition_grads(2), inner_before, params)
  assert_trees_close(updates, want_updates, rtol=1e-4, atol=1e-7)
  assert_trees_close(state.inner_state, want_state, rtol=1e-4, atol=1e-7)

  # And the float64 statement of the algorithm with piecewise values.
  want64 = np_lamb(
      composition_params(), [composition_grads(i) for i in range(3)],
      learning_rate=lambda t: lr0 if t < 2 else lr_after,
      weight_decay=lambda t: wd0 if t < 2 else wd_after)
  got = optax.apply_updates(params, updates)
  for a, e in zip(leaves64(got), want64):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)
  # The change matters: the unchanged optimizer would land elsewhere.
  unchanged64 = np_lamb(composition_params(), [composition_grads(i) for i in range(3)],
                        learning_rate=lr0, weight_decay=wd0)
  assert max(np.max(np.abs(a - b)) for a, b in zip(want64, unchanged64)) > 1e-4


@pytest.mark.parametrize("change", ["learning_rate", "weight_decay"])
def test_inject_hyperparams_lars_runtime_change(change):
  lr0, wd0, lr1, wd1 = 1e-2, 1e-3, 4e-2, 0.5
  new = {"learning_rate": {"learning_rate": lr1},
         "weight_decay": {"weight_decay": wd1}}[change]
  lr_after = new.get("learning_rate", lr0)
  wd_after = new.get("weight_decay", wd0)
  tx = optax.inject_hyperparams(lamb_optax.lars)(learning_rate=lr0,
                                                 weight_decay=wd0)
  update = jax.jit(tx.update)
  params, state = composition_params(), tx.init(composition_params())
  for i in range(2):
    updates, state = update(composition_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  inner_before = state.inner_state
  state = _set_hyperparams(state, **new)
  updates, state = update(composition_grads(2), state, params)
  assert update._cache_size() == 1
  fresh = lamb_optax.lars(lr_after, weight_decay=wd_after)
  want_updates, want_state = fresh.update(composition_grads(2), inner_before, params)
  assert_trees_close(updates, want_updates, rtol=1e-5, atol=1e-8)
  assert_trees_close(state.inner_state, want_state, rtol=1e-5, atol=1e-8)
  want64 = np_lars(
      composition_params(), [composition_grads(i) for i in range(3)],
      learning_rate=lambda t: lr0 if t < 2 else lr_after,
      weight_decay=lambda t: wd0 if t < 2 else wd_after)
  for a, e in zip(leaves64(optax.apply_updates(params, updates)), want64):
    np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-6)


def test_inject_hyperparams_bf16_params_default_dtype_rejects_rounded_b2():
  # optax casts injected hyperparameters to the params' dtype by default:
  # b2 = 0.999 becomes exactly 1.0 in bfloat16, which would zero Adam's
  # bias correction (1 - b2^t = 0). It must be rejected, not train silently.
  assert float(jnp.asarray(0.999, jnp.bfloat16)) == 1.0
  tx = optax.inject_hyperparams(lamb_optax.lamb)(learning_rate=1e-2)
  with pytest.raises(ValueError, match=r"\bb2\b"):
    tx.init(composition_params(jnp.bfloat16))


# --------------------------------------------------------------------------
# Schedules.
# --------------------------------------------------------------------------


def test_learning_rate_and_weight_decay_schedules_match_float64_reference():
  lr_schedule = optax.piecewise_constant_schedule(2e-2, {2: 0.25, 4: 0.1})
  wd_schedule = optax.linear_schedule(0.2, 0.0, transition_steps=5)
  tx = lamb_optax.lamb(lr_schedule, weight_decay=wd_schedule)
  grads_seq = [composition_grads(i) for i in range(6)]
  got, _ = run(tx, composition_params(), grads_seq, update=jax.jit(tx.update))
  # optax schedules are evaluated at the 0-based step count.
  want = np_lamb(composition_params(), grads_seq,
                 learning_rate=lambda t: float(lr_schedule(t)),
                 weight_decay=lambda t: float(wd_schedule(t)))
  for a, e in zip(leaves64(got), want):
    np.testing.assert_allclose(a, e, rtol=3e-5, atol=3e-6)
  # A schedule that is constant equals the scalar.
  const, _ = run(lamb_optax.lamb(optax.constant_schedule(2e-2),
                                 weight_decay=optax.constant_schedule(0.2)),
                 composition_params(), grads_seq)
  scalar, _ = run(lamb_optax.lamb(2e-2, weight_decay=0.2), composition_params(),
                  grads_seq)
  assert_trees_close(const, scalar, rtol=1e-6, atol=1e-7)


def test_lars_schedules_match_float64_reference():
  lr_schedule = optax.exponential_decay(5e-2, transition_steps=1,
                                        decay_rate=0.5)
  wd_schedule = optax.linear_schedule(0.0, 0.1, transition_steps=4)
  tx = lamb_optax.lars(lr_schedule, weight_decay=wd_schedule)
  grads_seq = [composition_grads(i) for i in range(5)]
  got, _ = run(tx, composition_params(), grads_seq)
  want = np_lars(composition_params(), grads_seq,
                 learning_rate=lambda t: float(lr_schedule(t)),
                 weight_decay=lambda t: float(wd_schedule(t)))
  for a, e in zip(leaves64(got), want):
    np.testing.assert_allclose(a, e, rtol=3e-5, atol=3e-6)


# --------------------------------------------------------------------------
# MultiSteps and apply_if_finite.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("k", [3])
def test_multisteps_equals_lamb_on_averaged_gradients(k):
  n_outer = 2
  micro = [composition_grads(i) for i in range(k * n_outer)]
  multi = optax.MultiSteps(lamb_optax.lamb(1e-2, weight_decay=0.01),
                           every_k_schedule=k)
  update = jax.jit(multi.update)
  params, state = composition_params(), multi.init(composition_params())
  for i, grads in enumerate(micro):
    updates, state = update(grads, state, params)
    if (i + 1) % k:
      for u in leaves64(updates):
        np.testing.assert_array_equal(u, np.zeros_like(u))
    params = optax.apply_updates(params, updates)

  averaged = [jax.tree.map(lambda *gs: sum(gs) / k, *micro[j * k:(j + 1) * k])
              for j in range(n_outer)]
  want, want_state = run(lamb_optax.lamb(1e-2, weight_decay=0.01),
                         composition_params(), averaged)
  assert_trees_close(params, want, rtol=1e-5, atol=1e-6)
  assert int(state.gradient_step) == n_outer
  assert_trees_close(state.inner_opt_state, want_state, rtol=1e-5, atol=1e-6)
  want64 = np_lamb(composition_params(), averaged, learning_rate=1e-2,
                   weight_decay=0.01)
  for a, e in zip(leaves64(params), want64):
    np.testing.assert_allclose(a, e, rtol=3e-5, atol=3e-6)


@pytest.mark.parametrize("name, bad", [("lamb", jnp.nan), ("lamb", -jnp.inf),
                                       ("lars", jnp.inf)])
def test_apply_if_finite_skips_non_finite_step_and_then_proceeds(name, bad):
  inner = {"lamb": lambda: lamb_optax.lamb(1e-2, weight_decay=0.01),
           "lars": lambda: lamb_optax.lars(1e-2, weight_decay=1e-3)}[name]
  tx = optax.apply_if_finite(inner(), max_consecutive_errors=3)
  update = jax.jit(tx.update)
  params, state = composition_params(), tx.init(composition_params())
  for i in range(2):
    updates, state = update(composition_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  params_before, state_before = params, state

  bad_grads = composition_grads(2)
  bad_grads["block"]["kernel"] = bad_grads["block"]["kernel"].at[1, 2, 0].set(
      bad)
  updates, state = update(bad_grads, state, params)
  params = optax.apply_updates(params, updates)
  chex.assert_trees_all_equal(params, params_before)
  chex.assert_trees_all_equal(state.inner_state, state_before.inner_state)
  assert int(state.notfinite_count) == 1
  assert not bool(state.last_finite)

  updates, state = update(composition_grads(3), state, params)
  want_updates, want_inner = inner().update(
      composition_grads(3), state_before.inner_state, params_before)
  assert_trees_close(updates, want_updates, rtol=1e-4, atol=1e-7)
  assert_trees_close(state.inner_state, want_inner, rtol=1e-4, atol=1e-7)
  assert int(state.notfinite_count) == 0
  assert bool(state.last_finite)
  assert int(state.total_notfinite) == 1
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree.leaves(state.inner_state))
