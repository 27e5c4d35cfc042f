"""Argument and input checks of lamb_optax: what is rejected, and how.

Construction-time checks must raise ``ValueError`` (``TypeError`` for a value
of the wrong kind) with a message naming the offending argument; run-time
checks (masks that do not fit, missing params, non-float leaves) must raise a
clear error naming the argument too. Valid edge values must be accepted and
behave as the math says (checked against float64 numpy), and traced
hyperparameters under :func:`optax.inject_hyperparams` must not be rejected.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax

NAN = float("nan")
INF = float("inf")


def _params():
  return {
      "dense": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3) / 4.0,
                "bias": jnp.array([0.5, -0.25, 1.0])},
      "scale": jnp.array(2.0),
  }


def _grads():
  return {
      "dense": {"kernel": jnp.array([[0.3, -0.2, 0.1], [-0.5, 0.4, 0.7]]),
                "bias": jnp.array([0.2, 0.0, -0.6])},
      "scale": jnp.array(-0.8),
  }


def _named(name):
  """A `pytest.raises(match=...)` pattern: the argument's name as a word."""
  return rf"\b{re.escape(name)}\b"


# Factories taking one keyword argument under test.
ADAM = lambda **kw: lamb_optax.scale_by_adam(**kw)
LAMB = lambda **kw: lamb_optax.lamb(1e-2, **kw)
LARS = lambda **kw: lamb_optax.lars(1e-2, **kw)
TRUST = lambda **kw: lamb_optax.scale_by_trust_ratio(**kw)

BAD_UNIT_INTERVAL = [-0.1, 1.0, 1.5, NAN, -INF, INF]
BAD_NON_NEGATIVE = [-1e-8, -1.0, NAN, -INF]


# --------------------------------------------------------------------------
# Construction-time checks.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", BAD_UNIT_INTERVAL)
@pytest.mark.parametrize("name", ["b1", "b2"])
@pytest.mark.parametrize("factory", [ADAM, LAMB], ids=["scale_by_adam", "lamb"])
def test_decay_rates_outside_unit_interval_rejected(factory, name, value):
  with pytest.raises(ValueError, match=_named(name)):
    factory(**{name: value})


@pytest.mark.parametrize("value", [np.float32(1.0), jnp.asarray(-0.5),
                                   np.array(1.2)])
def test_decay_rate_rejected_when_given_as_concrete_array(value):
  with pytest.raises(ValueError, match=_named("b1")):
    lamb_optax.lamb(1e-2, b1=value)
  with pytest.raises(ValueError, match=_named("b2")):
    lamb_optax.scale_by_adam(b2=value)


@pytest.mark.parametrize("value", BAD_UNIT_INTERVAL)
def test_lars_momentum_outside_unit_interval_rejected(value):
  with pytest.raises(ValueError, match=_named("momentum")):
    lamb_optax.lars(1e-2, momentum=value)


@pytest.mark.parametrize("value", BAD_NON_NEGATIVE)
@pytest.mark.parametrize(
    "factory, name",
    [(ADAM, "eps"), (ADAM, "eps_root"),
     (LAMB, "eps"), (LAMB, "eps_root"), (LAMB, "weight_decay"),
     (LARS, "eps"), (LARS, "weight_decay"), (LARS, "trust_coefficient"),
     (TRUST, "eps"), (TRUST, "trust_coefficient")],
    ids=lambda x: x if isinstance(x, str) else None)
def test_negative_or_nan_non_negative_argument_rejected(factory, name, value):
  with pytest.raises(ValueError, match=_named(name)):
    factory(**{name: value})


@pytest.mark.parametrize("value", [True, "0.9", 1 + 0j, [0.9],
                                   jnp.ones(2) * 0.5])
def test_non_real_scalar_decay_rate_is_a_type_error(value):
  with pytest.raises(TypeError, match=_named("b1")):
    lamb_optax.scale_by_adam(b1=value)


BAD_BOUNDS_VALUE = [
    (2.0, 1.0),       # lo > hi
    (-1.0, 1.0),      # negative lo
    (-2.0, -1.0),     # both negative
    (NAN, 1.0),       # NaN lo
    (0.0, NAN),       # NaN hi
    (1.0,),           # wrong length
    (0.0, 1.0, 2.0),  # wrong length
    (),               # wrong length
]
BAD_BOUNDS_TYPE = [1.0, "01", {"lo": 0.0, "hi": 1.0}, (0.0, "1")]
BOUNDS_FACTORIES = [LAMB, LARS, TRUST]
BOUNDS_IDS = ["lamb", "lars", "scale_by_trust_ratio"]


@pytest.mark.parametrize("bounds", BAD_BOUNDS_VALUE, ids=repr)
@pytest.mark.parametrize("name", ["param_norm_bounds", "trust_ratio_bounds"])
@pytest.mark.parametrize("factory", BOUNDS_FACTORIES, ids=BOUNDS_IDS)
def test_bounds_not_ordered_non_negative_pair_rejected(factory, name, bounds):
  with pytest.raises(ValueError, match=_named(name)):
    factory(**{name: bounds})


@pytest.mark.parametrize("bounds", BAD_BOUNDS_TYPE, ids=repr)
@pytest.mark.parametrize("name", ["param_norm_bounds", "trust_ratio_bounds"])
@pytest.mark.parametrize("factory", BOUNDS_FACTORIES, ids=BOUNDS_IDS)
def test_bounds_not_a_sequence_of_numbers_rejected(factory, name, bounds):
  with pytest.raises((TypeError, ValueError), match=_named(name)):
    factory(**{name: bounds})


@pytest.mark.parametrize("value", ["N", "nesterov", "", "nnn", 1, 0])
@pytest.mark.parametrize("factory", [ADAM, LAMB], ids=["scale_by_adam", "lamb"])
def test_unknown_nesterov_rejected(factory, value):
  with pytest.raises(ValueError, match=_named("nesterov")):
    factory(nesterov=value)


@pytest.mark.parametrize("value", [0.0, 0, -1.0, -INF, NAN])
def test_non_positive_max_grad_norm_rejected(value):
  with pytest.raises(ValueError, match=_named("max_grad_norm")):
    lamb_optax.lamb(1e-2, max_grad_norm=value)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.int32, jnp.uint8, jnp.bool_,
                                   "int16"])
@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
@pytest.mark.parametrize("factory", [ADAM, LAMB], ids=["scale_by_adam", "lamb"])
def test_non_floating_moment_dtype_rejected_naming_it(factory, name, dtype):
  # An int8 first moment would be stored as zeros every step: the optimizer
  # would silently lose its momentum.
  with pytest.raises(ValueError, match=_named(name) + ".*a floating dtype"):
    factory(**{name: dtype})


@pytest.mark.parametrize("dtype", ["not-a-dtype", object()])
@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
def test_moment_dtype_that_is_no_dtype_is_a_type_error(name, dtype):
  with pytest.raises(TypeError, match=_named(name)):
    lamb_optax.lamb(1e-2, **{name: dtype})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32,
                                   "float32"])
@pytest.mark.parametrize("name", ["mu_dtype", "nu_dtype"])
def test_floating_moment_dtype_accepted_and_kept(name, dtype):
  tx = lamb_optax.lamb(1e-2, **{name: dtype})
  params = _params()
  _, state = tx.update(_grads(), tx.init(params), params)
  moment = state["adam"].mu if name == "mu_dtype" else state["adam"].nu
  assert {leaf.dtype for leaf in jax.tree.leaves(moment)} == {jnp.dtype(dtype)}


def test_complex_moment_dtype_accepted_for_complex_params():
  tx = lamb_optax.scale_by_adam(mu_dtype=jnp.complex64, nu_dtype=jnp.complex64)
  params = {"w": jnp.array([1.0 + 1.0j, -2.0j])}
  _, state = tx.update(params, tx.init(params))
  assert state.mu["w"].dtype == state.nu["w"].dtype == jnp.complex64


@pytest.mark.parametrize("value", [1, 0, None, "yes"])
def test_bias_correction_must_be_a_bool(value):
  with pytest.raises(TypeError, match=_named("bias_correction")):
    lamb_optax.scale_by_adam(bias_correction=value)


# --------------------------------------------------------------------------
# Valid edge values are accepted and do what the math says.
# --------------------------------------------------------------------------


def _flat64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _norm(x):
  return float(np.sqrt(np.sum(np.square(x))))


def test_b1_zero_makes_the_direction_the_current_gradient_only():
  # With b1 = 0 the first moment is the current gradient, whatever came
  # before; b2 = 0 likewise for the second moment, so u = g / (|g| + eps).
  eps = 1e-6
  tx = lamb_optax.scale_by_adam(b1=0.0, b2=0.0, eps=eps)
  params = _params()
  state = tx.init(params)
  _, state = tx.update(jax.tree.map(lambda g: 10.0 * g + 3.0, _grads()),
                       state)
  u, state = tx.update(_grads(), state)
  for ui, gi in zip(_flat64(u), _flat64(_grads())):
    np.testing.assert_allclose(ui, gi / (np.abs(gi) + eps), rtol=1e-5,
                               atol=1e-7)
  assert int(state.count) == 2


def test_b1_zero_lamb_two_steps_match_float64_reference():
  lr, b2, eps = 0.1, 0.5, 1e-6
  tx = lamb_optax.lamb(lr, b1=0.0, b2=b2, eps=eps, weight_decay=0.0)
  params = _params()
  state = tx.init(params)
  x = _flat64(params)
  v = [np.zeros_like(a) for a in x]
  grads_seq = [_grads(), jax.tree.map(lambda g: -2.0 * g + 0.1, _grads())]
  for t, grads in enumerate(grads_seq, start=1):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    new_x = []
    for i, g in enumerate(_flat64(grads)):
      v[i] = b2 * v[i] + (1 - b2) * g * g
      u = g / (np.sqrt(v[i] / (1 - b2 ** t)) + eps)
      pn, un = _norm(x[i]), _norm(u)
      ratio = pn / un if pn > 0 and un > 0 else 1.0
      new_x.append(x[i] - lr * ratio * u)
    x = new_x
  for got, want in zip(_flat64(params), x):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("factory", [LAMB, LARS], ids=["lamb", "lars"])
def test_zero_weight_decay_and_eps_accepted_and_equal_defaults(factory):
  params, grads = _params(), _grads()
  tx_default = factory()
  tx_edge = factory(weight_decay=0.0, eps=0.0) if factory is LARS else factory(
      weight_decay=0.0, eps_root=0.0)
  u1, _ = tx_default.update(grads, tx_default.init(params), params)
  u2, _ = tx_edge.update(grads, tx_edge.init(params), params)
  for a, b in zip(_flat64(u1), _flat64(u2)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("factory", BOUNDS_FACTORIES, ids=BOUNDS_IDS)
def test_bounds_zero_to_inf_accepted_and_change_nothing(factory):
  params, grads = _params(), _grads()
  plain = factory()
  bounded = factory(param_norm_bounds=(0, INF), trust_ratio_bounds=[0.0, INF])
  u1, s1 = plain.update(grads, plain.init(params), params)
  u2, s2 = bounded.update(grads, bounded.init(params), params)
  for a, b in zip(_flat64(u1), _flat64(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(_flat64(lamb_optax.trust_ratios(s1)),
                  _flat64(lamb_optax.trust_ratios(s2))):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_trust_ratio_bounds_one_one_gives_ratio_one():
  # (1, 1) is a valid pair: it pins r = 1 and LAMB becomes Adam (+ decay).
  lr, wd, eps = 0.1, 0.05, 1e-6
  params, grads = _params(), _grads()
  tx = lamb_optax.lamb(lr, eps=eps, weight_decay=wd,
                       trust_ratio_bounds=(1, 1))
  updates, state = tx.update(grads, tx.init(params), params)
  for r in jax.tree.leaves(lamb_optax.trust_ratios(state)):
    assert float(r) == 1.0
  for got, g, x in zip(_flat64(updates), _flat64(grads), _flat64(params)):
    u = g / (np.abs(g) + eps) + wd * x
    np.testing.assert_allclose(got, -lr * u, rtol=1e-5, atol=1e-7)


def test_param_norm_bounds_one_one_makes_each_layer_step_lr():
  # phi = 1 for every layer, so ||r u|| = ||u|| / ||u|| = 1 and each layer
  # moves by exactly lr (no layer here has a zero update).
  lr = 0.1
  params, grads = _params(), _grads()
  tx = lamb_optax.lamb(lr, param_norm_bounds=(1.0, 1.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  for got in _flat64(updates):
    np.testing.assert_allclose(_norm(got), lr, rtol=1e-5)


def test_max_grad_norm_inf_accepted_and_changes_nothing():
  params, grads = _params(), _grads()
  plain, clipped = lamb_optax.lamb(0.1), lamb_optax.lamb(0.1, max_grad_norm=INF)
  u1, _ = plain.update(grads, plain.init(params), params)
  u2, _ = clipped.update(grads, clipped.init(params), params)
  for a, b in zip(_flat64(u1), _flat64(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("nesterov", [None, "n", "nn", False, True])
def test_valid_nesterov_accepted(nesterov):
  tx = lamb_optax.lamb(0.1, nesterov=nesterov)
  updates, _ = tx.update(_grads(), tx.init(_params()), _params())
  assert all(np.all(np.isfinite(u)) for u in _flat64(updates))


# --------------------------------------------------------------------------
# Masks that do not fit the params.
# --------------------------------------------------------------------------


def _bad_masks():
  """Bool trees that do not have the params' structure (nor a prefix of it)."""
  return {
      "missing_leaf": {"dense": {"kernel": True}, "scale": True},
      "extra_leaf": {"dense": {"kernel": True, "bias": False, "other": True},
                     "scale": True},
      "list_not_dict": [True, False],
      "too_deep": {"dense": {"kernel": {"a": True}, "bias": True},
                   "scale": True},
  }


def _run_one_step(tx):
  params, grads = _params(), _grads()
  state = tx.init(params)
  tx.update(grads, state, params)


@pytest.mark.parametrize("form", ["tree", "callable"])
@pytest.mark.parametrize("kind", ["missing_leaf", "extra_leaf"])
@pytest.mark.parametrize("argname", ["weight_decay_mask", "trust_ratio_mask"])
@pytest.mark.parametrize("factory", [LAMB, LARS], ids=["lamb", "lars"])
def test_mask_that_does_not_fit_params_names_the_argument(
    factory, argname, kind, form):
  mask = _bad_masks()[kind]
  if form == "callable":
    mask = (lambda m: lambda params: m)(mask)
  tx = factory(weight_decay=0.1, **{argname: mask})
  with pytest.raises((ValueError, TypeError), match=_named(argname)):
    _run_one_step(tx)


@pytest.mark.parametrize("form", ["tree", "callable"])
@pytest.mark.parametrize("kind", sorted(_bad_masks()))
def test_scale_by_trust_ratio_mask_that_does_not_fit_names_it(kind, form):
  mask = _bad_masks()[kind]
  if form == "callable":
    mask = (lambda m: lambda params: m)(mask)
  with pytest.raises((ValueError, TypeError),
                     match=_named("trust_ratio_mask")):
    _run_one_step(lamb_optax.scale_by_trust_ratio(trust_ratio_mask=mask))


@pytest.mark.parametrize("leaf", [1, 0.0, "yes", None])
def test_trust_ratio_mask_with_non_bool_leaves_rejected(leaf):
  mask = {"dense": {"kernel": True, "bias": leaf}, "scale": True}
  with pytest.raises((ValueError, TypeError),
                     match=_named("trust_ratio_mask")):
    _run_one_step(lamb_optax.scale_by_trust_ratio(trust_ratio_mask=mask))


def test_scale_by_trust_ratio_mask_keyword_is_deprecated():
  mask = {"dense": {"kernel": True, "bias": False}, "scale": True}
  with pytest.warns(DeprecationWarning, match="`trust_ratio_mask`"):
    old = lamb_optax.scale_by_trust_ratio(mask=mask)
  new = lamb_optax.scale_by_trust_ratio(trust_ratio_mask=mask)
  params = _params()
  for a, b in zip(jax.tree.leaves(old.update(_grads(), old.init(params),
                                             params)),
                  jax.tree.leaves(new.update(_grads(), new.init(params),
                                             params))):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="`trust_ratio_mask` or `mask`"):
    lamb_optax.scale_by_trust_ratio(mask=mask, trust_ratio_mask=mask)


@pytest.mark.parametrize("argname", ["weight_decay_mask", "trust_ratio_mask"])
def test_prefix_mask_is_accepted_and_broadcast(argname):
  # A prefix of the params' structure is a valid mask: one bool per subtree.
  lr, wd, eps = 0.1, 0.1, 1e-6
  params, grads = _params(), _grads()
  prefix = {"dense": False, "scale": True}
  full = {"dense": {"kernel": False, "bias": False}, "scale": True}
  tx_prefix = lamb_optax.lamb(lr, eps=eps, weight_decay=wd,
                              **{argname: prefix})
  tx_full = lamb_optax.lamb(lr, eps=eps, weight_decay=wd, **{argname: full})
  u1, _ = tx_prefix.update(grads, tx_prefix.init(params), params)
  u2, _ = tx_full.update(grads, tx_full.init(params), params)
  for a, b in zip(_flat64(u1), _flat64(u2)):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Missing params.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factory",
    [lambda: lamb_optax.lamb(0.1),
     lambda: lamb_optax.lamb(0.1, weight_decay=0.1),
     lambda: lamb_optax.lars(0.1),
     lambda: lamb_optax.lars(0.1, weight_decay=0.1),
     lambda: lamb_optax.scale_by_trust_ratio()],
    ids=["lamb", "lamb_wd", "lars", "lars_wd", "scale_by_trust_ratio"])
def test_update_without_params_names_params(factory):
  tx = factory()
  state = tx.init(_params())
  with pytest.raises(ValueError, match=_named("params")):
    tx.update(_grads(), state)
  with pytest.raises(ValueError, match=_named("params")):
    tx.update(_grads(), state, None)


def test_updates_with_other_structure_than_params_rejected():
  tx = lamb_optax.scale_by_trust_ratio()
  params = _params()
  state = tx.init(params)
  grads = {"dense": _grads()["dense"]}
  with pytest.raises(ValueError, match=_named("updates")):
    tx.update(grads, state, params)


# --------------------------------------------------------------------------
# Non-float leaves.
# --------------------------------------------------------------------------


ALL_FACTORIES = {
    "scale_by_adam": lambda: lamb_optax.scale_by_adam(),
    "scale_by_trust_ratio": lambda: lamb_optax.scale_by_trust_ratio(),
    "lamb": lambda: lamb_optax.lamb(0.1, weight_decay=0.1),
    "lamb_clipped": lambda: lamb_optax.lamb(0.1, max_grad_norm=1.0),
    "lars": lambda: lamb_optax.lars(0.1),
    "lars_wd": lambda: lamb_optax.lars(0.1, weight_decay=0.1),
}


def _with_int_leaf(tree, dtype=jnp.int32):
  out = jax.tree.map(lambda x: x, tree)
  out["dense"]["bias"] = jnp.array([1, 0, 2], dtype)
  return out


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_non_float_params_rejected_at_init(name, dtype):
  tx = ALL_FACTORIES[name]()
  with pytest.raises(TypeError, match=_named("params")) as info:
    tx.init(_with_int_leaf(_params(), dtype))
  assert "dense/bias" in str(info.value)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
@pytest.mark.parametrize("name", sorted(ALL_FACTORIES))
def test_non_float_grads_rejected_at_update(name, dtype):
  tx = ALL_FACTORIES[name]()
  params = _params()
  state = tx.init(params)
  with pytest.raises(TypeError, match=_named("updates")):
    tx.update(_with_int_leaf(_grads(), dtype), state, params)


@pytest.mark.parametrize("name", ["scale_by_trust_ratio", "lamb", "lars"])
def test_non_float_params_rejected_at_update(name):
  tx = ALL_FACTORIES[name]()
  state = tx.init(_params())
  with pytest.raises(TypeError, match=_named("params")):
    tx.update(_grads(), state, _with_int_leaf(_params()))


# --------------------------------------------------------------------------
# Traced hyperparameters (optax.inject_hyperparams) are not rejected.
# --------------------------------------------------------------------------


def _assert_same_step(tx_injected, tx_plain, n_steps=2):
  params, grads = _params(), _grads()
  s_inj, s_plain = tx_injected.init(params), tx_plain.init(params)
  update = jax.jit(tx_injected.update)  # hyperparams are traced here
  for _ in range(n_steps):
    u_inj, s_inj = update(grads, s_inj, params)
    u_plain, s_plain = tx_plain.update(grads, s_plain, params)
    for a, b in zip(_flat64(u_inj), _flat64(u_plain)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
    params = optax.apply_updates(params, u_plain)


def test_inject_hyperparams_lamb_traced_numeric_arguments():
  kwargs = dict(learning_rate=0.05, b1=0.8, b2=0.95, eps=1e-5,
                weight_decay=0.02, eps_root=1e-8)
  _assert_same_step(optax.inject_hyperparams(lamb_optax.lamb)(**kwargs),
                    lamb_optax.lamb(**kwargs))


def test_inject_hyperparams_lars_traced_numeric_arguments():
  kwargs = dict(learning_rate=0.05, momentum=0.8, weight_decay=0.02,
                trust_coefficient=0.5, eps=1e-4)
  _assert_same_step(optax.inject_hyperparams(lamb_optax.lars)(**kwargs),
                    lamb_optax.lars(**kwargs))


def test_inject_hyperparams_trust_ratio_and_adam_traced_arguments():
  _assert_same_step(
      optax.inject_hyperparams(lamb_optax.scale_by_trust_ratio)(
          trust_coefficient=0.3, eps=1e-3),
      lamb_optax.scale_by_trust_ratio(trust_coefficient=0.3, eps=1e-3))
  _assert_same_step(
      optax.inject_hyperparams(lamb_optax.scale_by_adam)(
          b1=0.5, b2=0.9, eps=1e-4, eps_root=1e-6),
      lamb_optax.scale_by_adam(b1=0.5, b2=0.9, eps=1e-4, eps_root=1e-6))


def test_inject_hyperparams_under_jit_accepts_any_traced_value_at_trace():
  # Traced values cannot be checked; they must not be rejected either. The
  # whole step (init included) runs under jit.
  @jax.jit
  def step(b1, weight_decay):
    tx = lamb_optax.lamb(0.1, b1=b1, weight_decay=weight_decay)
    params = _params()
    updates, _ = tx.update(_grads(), tx.init(params), params)
    return updates

  traced = step(0.5, 0.01)
  plain_tx = lamb_optax.lamb(0.1, b1=0.5, weight_decay=0.01)
  plain, _ = plain_tx.update(_grads(), plain_tx.init(_params()), _params())
  for a, b in zip(_flat64(traced), _flat64(plain)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("name, value",
                         [("b1", 1.5), ("b2", -0.1), ("weight_decay", -1.0),
                          ("eps", -1.0)])
def test_inject_hyperparams_still_checks_concrete_values_at_init(name, value):
  tx = optax.inject_hyperparams(lamb_optax.lamb)(learning_rate=0.1,
                                                 **{name: value})
  with pytest.raises(ValueError, match=_named(name)):
    tx.init(_params())


def test_schedules_are_not_checked_as_numbers():
  # Callables are accepted where a schedule is allowed.
  tx = lamb_optax.lamb(optax.constant_schedule(0.1),
                       weight_decay=optax.constant_schedule(0.01))
  plain = lamb_optax.lamb(0.1, weight_decay=0.01)
  params, grads = _params(), _grads()
  u1, _ = tx.update(grads, tx.init(params), params)
  u2, _ = plain.update(grads, plain.init(params), params)
  for a, b in zip(_flat64(u1), _flat64(u2)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert math.isfinite(float(jax.tree.leaves(u1)[0].sum()))


# --------------------------------------------------------------------------
# Learning rates and weight decays that would train silently wrong.
# --------------------------------------------------------------------------


LR_FACTORIES = {
    "lamb": lamb_optax.lamb,
    "lamb_store_direction": lambda lr, **kw: lamb_optax.lamb(
        lr, store_direction=True, **kw),
    "lars": lamb_optax.lars,
    "nvlamb": lamb_optax.presets.nvlamb,
    "timm": lamb_optax.presets.timm,
    "torch_optimizer": lamb_optax.presets.torch_optimizer,
    "deepspeed": lamb_optax.presets.deepspeed,
    "tensorflow": lamb_optax.presets.tensorflow,
    "keras": lamb_optax.presets.keras,
}

# (value, error): None would make the update +r*u (climbing the gradient
# at an effective learning rate of 1), a string failed only inside update.
BAD_LEARNING_RATES = [
    (None, TypeError), ("0.1", TypeError), (True, TypeError),
    (False, TypeError), (-0.1, ValueError), (-1e-12, ValueError),
    (NAN, ValueError), (INF, ValueError), (-INF, ValueError),
]
BAD_LR_IDS = [repr(v) for v, _ in BAD_LEARNING_RATES]


@pytest.mark.parametrize("value,error", BAD_LEARNING_RATES, ids=BAD_LR_IDS)
@pytest.mark.parametrize("name", sorted(LR_FACTORIES))
def test_bad_learning_rate_rejected_naming_it(name, value, error):
  with pytest.raises(error, match=_named("learning_rate")):
    LR_FACTORIES[name](value)


@pytest.mark.parametrize("value,error", BAD_LEARNING_RATES, ids=BAD_LR_IDS)
@pytest.mark.parametrize("name", ["lamb", "lars", "nvlamb"])
def test_bad_learning_rate_rejected_under_inject_hyperparams(name, value,
                                                             error):
  opt = optax.inject_hyperparams(LR_FACTORIES[name])(learning_rate=value)
  with pytest.raises(error, match=_named("learning_rate")):
    opt.init(_params())


@pytest.mark.parametrize("name", ["lamb", "lars", "keras"])
def test_injected_learning_rate_set_negative_rejected_at_update(name):
  """Set in the state between steps (outside jit the value is concrete)."""
  opt = optax.inject_hyperparams(LR_FACTORIES[name])(learning_rate=0.1)
  params = _params()
  state = opt.init(params)
  state.hyperparams["learning_rate"] = jnp.asarray(-0.1)
  with pytest.raises(ValueError, match=_named("learning_rate")):
    opt.update(_grads(), state, params)


@pytest.mark.parametrize("name", sorted(LR_FACTORIES))
def test_schedules_and_zero_learning_rate_accepted(name):
  params = _params()
  for lr in (0.0, optax.linear_schedule(0.1, 0.0, 10), np.float32(0.1)):
    opt = LR_FACTORIES[name](lr)
    updates, _ = opt.update(_grads(), opt.init(params), params)
    assert all(np.all(np.isfinite(u)) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("value", [INF, -INF, NAN])
@pytest.mark.parametrize("name", sorted(LR_FACTORIES))
def test_non_finite_weight_decay_rejected_naming_it(name, value):
  with pytest.raises(ValueError, match=_named("weight_decay")):
    LR_FACTORIES[name](0.1, weight_decay=value)


@pytest.mark.parametrize("value", [INF, NAN, -0.5])
@pytest.mark.parametrize("name", ["lamb", "lars", "timm"])
def test_bad_weight_decay_rejected_under_inject_hyperparams(name, value):
  opt = optax.inject_hyperparams(LR_FACTORIES[name])(
      learning_rate=0.1, weight_decay=value)
  with pytest.raises(ValueError, match=_named("weight_decay")):
    opt.init(_params())


# --------------------------------------------------------------------------
# Gradients that do not match the params leaf by leaf.
# --------------------------------------------------------------------------


SHAPE_FACTORIES = dict(
    LR_FACTORIES,
    scale_by_trust_ratio=lambda lr: lamb_optax.scale_by_trust_ratio(),
    scale_by_adam=lambda lr: lamb_optax.scale_by_adam(),
    inject_hyperparams_lamb=lambda lr: optax.inject_hyperparams(
        lamb_optax.lamb)(learning_rate=lr, weight_decay=0.1),
    inject_hyperparams_lars=lambda lr: optax.inject_hyperparams(
        lamb_optax.lars)(learning_rate=lr),
)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(SHAPE_FACTORIES))
def test_gradient_of_other_shape_names_leaf_and_both_shapes(name, jit):
  opt = SHAPE_FACTORIES[name](0.1)
  params = _params()
  state = opt.init(params)
  grads = _grads()
  grads["dense"]["kernel"] = grads["dense"]["kernel"].T  # (3, 2), not (2, 3)
  update = jax.jit(opt.update) if jit else opt.update
  with pytest.raises(ValueError, match=_named("updates")) as info:
    update(grads, state, params)
  message = str(info.value)
  assert "dense/kernel" in message
  assert "(3, 2)" in message and "(2, 3)" in message


@pytest.mark.parametrize("name", ["lamb", "lars", "scale_by_trust_ratio"])
def test_gradient_broadcastable_to_its_param_still_rejected(name):
  """A (3,) gradient for a (2, 3) kernel would broadcast silently."""
  opt = SHAPE_FACTORIES[name](0.1)
  params = _params()
  state = opt.init(params)
  grads = _grads()
  grads["dense"]["kernel"] = grads["dense"]["kernel"][0]
  with pytest.raises(ValueError, match=r"dense/kernel.*\(3,\).*\(2, 3\)"):
    opt.update(grads, state, params)


def test_complex_gradient_for_float_param_names_the_leaf():
  opt = lamb_optax.lamb(0.1)
  params = _params()
  state = opt.init(params)
  grads = _grads()
  grads["scale"] = jnp.asarray(1.0 + 0.5j, jnp.complex64)
  with pytest.raises(TypeError, match=r"`updates` leaf 'scale'"):
    opt.update(grads, state, params)


# --------------------------------------------------------------------------
# An alias checks its inputs once and resolves each mask once.
# --------------------------------------------------------------------------


ALIASES = {
    "lamb": lambda wd, tr: lamb_optax.lamb(
        0.1, weight_decay=0.1, weight_decay_mask=wd, trust_ratio_mask=tr,
        max_grad_norm=1.0),
    "lamb_store_direction": lambda wd, tr: lamb_optax.lamb(
        0.1, weight_decay=0.1, weight_decay_mask=wd, trust_ratio_mask=tr,
        store_direction=True),
    "lars": lambda wd, tr: lamb_optax.lars(
        0.1, weight_decay=0.1, weight_decay_mask=wd, trust_ratio_mask=tr),
    "nvlamb": lambda wd, tr: lamb_optax.presets.nvlamb(
        0.1, weight_decay_mask=wd, trust_ratio_mask=tr),
    "keras": lambda wd, tr: lamb_optax.presets.keras(
        0.1, weight_decay=0.1, weight_decay_mask=wd, trust_ratio_mask=tr),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(ALIASES))
def test_alias_checks_inputs_once_and_resolves_each_mask_once(
    name, jit, monkeypatch):
  from lamb_optax._src import validation  # pylint: disable=g-import-not-at-top
  checks, calls = [], {"weight_decay_mask": 0, "trust_ratio_mask": 0}
  check = validation.check_updates_match_params
  monkeypatch.setattr(validation, "check_updates_match_params",
                      lambda *a, **k: checks.append(1) or check(*a, **k))

  def mask(role):
    def fn(params):
      calls[role] += 1
      return jax.tree.map(lambda x: np.ndim(x) > 0, params)
    return fn

  tx = ALIASES[name](mask("weight_decay_mask"), mask("trust_ratio_mask"))
  params = _params()
  state = tx.init(params)
  assert calls == {"weight_decay_mask": 1, "trust_ratio_mask": 1}
  update = jax.jit(tx.update) if jit else tx.update
  update(_grads(), state, params)
  assert len(checks) == 1, checks
  assert calls == {"weight_decay_mask": 2, "trust_ratio_mask": 2}


@pytest.mark.parametrize("name", ["scale_by_adam", "scale_by_trust_ratio"])
def test_building_blocks_used_alone_still_check_their_inputs(name):
  tx = {"scale_by_adam": lamb_optax.scale_by_adam,
        "scale_by_trust_ratio": lamb_optax.scale_by_trust_ratio}[name]()
  state = tx.init(_params())
  grads = _grads()
  grads["dense"]["kernel"] = grads["dense"]["kernel"].T
  with pytest.raises(ValueError, match=r"`updates` leaf 'dense/kernel'"):
    tx.update(grads, state, _params())
