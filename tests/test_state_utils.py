"""lamb_optax.trust_ratios: finding the ratios in any optimizer state.

The ratios of a first LAMB step are known in closed form: the first Adam
direction is g / (|g| + eps), so r = ||x|| / ||g / (|g| + eps) + wd x||; for
LARS, m_1 = (1 - beta) (g + wd x) and r = c ||x|| / (||m_1|| + eps). The
expected values below are computed from those formulas in float64 numpy.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax

LR = 1e-2
WD = 0.05
EPS = 1e-6


def small_params(dtype=jnp.float32):
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), {
      "conv": np.linspace(-2.0, 3.0, 24).reshape(2, 3, 4),
      "dense": {"kernel": np.array([[3.0, -4.0, 0.5], [1.0, 2.0, -0.25]]),
                "bias": np.zeros(3)},
      "scale": np.array(0.5),
  })


def small_grads(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  params = small_params()
  leaves = [rng.standard_normal(np.shape(x)) * (1.0 + i)
            for i, x in enumerate(jax.tree.leaves(params))]
  return jax.tree.map(lambda g: jnp.asarray(g, dtype),
                      jax.tree.unflatten(jax.tree.structure(params), leaves))


def leaves64(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _norm(x):
  return np.sqrt(np.sum(np.square(x)))


def lamb_first_step_ratios(params, grads, weight_decay=WD, eps=EPS):
  """Float64 trust ratios of LAMB's first step, one per leaf (flat)."""
  out = []
  for x, g in zip(leaves64(params), leaves64(grads)):
    u = g / (np.abs(g) + eps) + weight_decay * x
    pn, un = _norm(x), _norm(u)
    out.append(pn / un if pn > 0 and un > 0 else 1.0)
  return out


def lars_first_step_ratios(params, grads, momentum=0.9, weight_decay=WD,
                           trust_coefficient=1.0, eps=0.0):
  out = []
  for x, g in zip(leaves64(params), leaves64(grads)):
    m = (1 - momentum) * (g + weight_decay * x)
    pn, mn = _norm(x), _norm(m)
    out.append(trust_coefficient * pn / (mn + eps)
               if pn > 0 and mn > 0 else 1.0)
  return out


def step(tx, params=None, grads=None, state=None):
  params = small_params() if params is None else params
  grads = small_grads() if grads is None else grads
  state = tx.init(params) if state is None else state
  _, state = tx.update(grads, state, params)
  return state


def lamb():
  return lamb_optax.lamb(LR, eps=EPS, weight_decay=WD)


def assert_ratios(ratios, expected, params=None, rtol=1e-5):
  """float32 scalars, shaped like the params, equal to the float64 values."""
  params = small_params() if params is None else params
  chex.assert_trees_all_equal_structs(ratios, params)
  for r in jax.tree.leaves(ratios):
    assert r.dtype == jnp.float32
    assert r.shape == ()
  np.testing.assert_allclose(leaves64(ratios), expected, rtol=rtol)


# --------------------------------------------------------------------------
# Values, dtype and shape.
# --------------------------------------------------------------------------


def test_ratios_of_first_lamb_step_equal_float64_formula():
  ratios = lamb_optax.trust_ratios(step(lamb()))
  expected = lamb_first_step_ratios(small_params(), small_grads())
  assert_ratios(ratios, expected)
  # The zero bias gets exactly 1; the others are not trivially 1.
  assert float(ratios["dense"]["bias"]) == 1.0
  assert abs(float(ratios["dense"]["kernel"]) - 1.0) > 0.1


def test_ratios_of_a_simple_layer_by_hand():
  # ||x|| = 6 and sign-like first Adam direction of norm 2: r = 3 (up to
  # the float32 rounding of 1 - b2 in the bias correction, ~1e-5).
  params = {"w": jnp.full((2, 2), 3.0)}
  grads = {"w": jnp.array([[0.5, -2.0], [1e3, -1e-2]])}
  tx = lamb_optax.lamb(LR, eps=0.0)
  ratios = lamb_optax.trust_ratios(step(tx, params, grads))
  assert float(ratios["w"]) == pytest.approx(3.0, rel=1e-4)


def test_ratios_are_float32_for_bfloat16_params():
  params = small_params(jnp.bfloat16)
  grads = small_grads(dtype=jnp.bfloat16)
  ratios = lamb_optax.trust_ratios(step(lamb(), params, grads))
  # bf16 direction: compare loosely with the formula on the bf16 values.
  assert_ratios(ratios, lamb_first_step_ratios(params, grads), params,
                rtol=2e-2)


def test_ratios_are_one_before_the_first_update():
  for tx in (lamb(), lamb_optax.lars(LR),
             lamb_optax.scale_by_trust_ratio()):
    ratios = lamb_optax.trust_ratios(tx.init(small_params()))
    assert_ratios(ratios, [1.0] * len(jax.tree.leaves(small_params())))


def test_ratios_are_one_for_leaves_outside_the_trust_ratio_mask():
  mask = {"conv": False, "dense": {"kernel": True, "bias": True},
          "scale": False}
  tx = lamb_optax.lamb(LR, eps=EPS, weight_decay=WD, trust_ratio_mask=mask)
  ratios = lamb_optax.trust_ratios(step(tx))
  expected = lamb_first_step_ratios(small_params(), small_grads())
  flat_mask = jax.tree.leaves(mask)
  expected = [e if m else 1.0 for e, m in zip(expected, flat_mask)]
  assert_ratios(ratios, expected)


def test_lars_ratios_equal_float64_formula():
  tx = lamb_optax.lars(LR, momentum=0.8, weight_decay=WD,
                       trust_coefficient=0.02, eps=1e-3)
  ratios = lamb_optax.trust_ratios(step(tx))
  assert_ratios(ratios, lars_first_step_ratios(
      small_params(), small_grads(), momentum=0.8, trust_coefficient=0.02,
      eps=1e-3))


def test_ratios_after_several_steps_follow_the_current_params():
  # After k steps, r = ||x_k|| / ||u_k||: check against the state's own
  # moments (Adam direction recomputed from mu, nu in float64).
  tx = lamb()
  params, state = small_params(), tx.init(small_params())
  for seed in range(3):
    updates, state = tx.update(small_grads(seed), state, params)
    last_params = params
    params = optax.apply_updates(params, updates)
  adam_state = state["adam"]
  t = int(adam_state.count)
  expected = []
  for x, m, v in zip(leaves64(last_params), leaves64(adam_state.mu),
                     leaves64(adam_state.nu)):
    u = (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + EPS) + WD * x
    pn, un = _norm(x), _norm(u)
    expected.append(pn / un if pn > 0 and un > 0 else 1.0)
  assert_ratios(lamb_optax.trust_ratios(state), expected, rtol=1e-4)


# --------------------------------------------------------------------------
# Found inside wrappers.
# --------------------------------------------------------------------------


WRAPPERS = {
    "chain": lambda: optax.chain(optax.identity(), lamb()),
    "nested_chain": lambda: optax.chain(optax.chain(optax.identity(),
                                                    lamb())),
    "named_chain": lambda: optax.named_chain(("identity", optax.identity()),
                                             ("lamb", lamb())),
    "inject_hyperparams": lambda: optax.inject_hyperparams(lamb_optax.lamb)(
        learning_rate=LR, eps=EPS, weight_decay=WD),
    "apply_if_finite": lambda: optax.apply_if_finite(lamb(), 3),
    "multisteps_k1": lambda: optax.MultiSteps(lamb(), every_k_schedule=1),
    "inject_in_apply_if_finite": lambda: optax.apply_if_finite(
        optax.inject_hyperparams(lamb_optax.lamb)(
            learning_rate=LR, eps=EPS, weight_decay=WD), 3),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_found_inside_wrapper(name):
  tx = WRAPPERS[name]()
  state = tx.init(small_params())
  assert_ratios(lamb_optax.trust_ratios(state),
                [1.0] * len(jax.tree.leaves(small_params())))
  state = step(tx, state=state)
  assert_ratios(lamb_optax.trust_ratios(state),
                lamb_first_step_ratios(small_params(), small_grads()))


def test_found_inside_multisteps_after_k_micro_steps():
  tx = optax.MultiSteps(lamb(), every_k_schedule=2)
  update = jax.jit(tx.update)
  params = small_params()
  state = tx.init(params)
  _, state = update(small_grads(0), state, params)
  # Only accumulated so far: the ratios are still the initial ones.
  assert_ratios(lamb_optax.trust_ratios(state),
                [1.0] * len(jax.tree.leaves(params)))
  _, state = update(small_grads(1), state, params)
  mean = jax.tree.map(lambda a, b: (a + b) / 2, small_grads(0), small_grads(1))
  assert_ratios(lamb_optax.trust_ratios(state),
                lamb_first_step_ratios(params, mean))


def test_found_inside_masked():
  mask = {"conv": True, "dense": {"kernel": True, "bias": False},
          "scale": False}
  tx = optax.masked(lamb(), mask)
  ratios = lamb_optax.trust_ratios(step(tx))
  expected = lamb_first_step_ratios(small_params(), small_grads())
  assert float(ratios["conv"]) == pytest.approx(expected[0], rel=1e-5)
  assert float(ratios["dense"]["kernel"]) == pytest.approx(expected[2],
                                                           rel=1e-5)
  assert ratios["conv"].dtype == jnp.float32
  # The masked-out leaves are not the inner optimizer's: no ratio for them.
  assert len(jax.tree.leaves(ratios)) == 2


def _two_optimizers():
  labels = {"conv": "a_lamb", "dense": {"kernel": "a_lamb", "bias": "b_lars"},
            "scale": "b_lars"}
  return optax.multi_transform(
      {"a_lamb": lamb(),
       "b_lars": lamb_optax.lars(LR, momentum=0.9, weight_decay=WD)},
      labels)


def test_multi_transform_needs_index_and_returns_each():
  state = step(_two_optimizers())
  with pytest.raises(ValueError, match=r"\bindex\b"):
    lamb_optax.trust_ratios(state)
  lamb_expected = lamb_first_step_ratios(small_params(), small_grads())
  lars_expected = lars_first_step_ratios(small_params(), small_grads())
  first = lamb_optax.trust_ratios(state, index=0)
  second = lamb_optax.trust_ratios(state, index=1)
  # Pytree order: "a_lamb" before "b_lars".
  assert float(first["conv"]) == pytest.approx(lamb_expected[0], rel=1e-5)
  assert float(first["dense"]["kernel"]) == pytest.approx(lamb_expected[2],
                                                          rel=1e-5)
  assert float(second["scale"]) == pytest.approx(lars_expected[3], rel=1e-5)
  assert float(second["dense"]["bias"]) == 1.0  # zero params: r = 1
  assert len(jax.tree.leaves(first)) == 2
  assert len(jax.tree.leaves(second)) == 2


def test_index_with_a_single_state():
  state = step(lamb())
  np.testing.assert_array_equal(
      leaves64(lamb_optax.trust_ratios(state, index=0)),
      leaves64(lamb_optax.trust_ratios(state)))


@pytest.mark.parametrize("index", [2, 5, -1])
def test_index_out_of_range(index):
  state = step(_two_optimizers())
  with pytest.raises((ValueError, IndexError), match=r"\bindex\b"):
    lamb_optax.trust_ratios(state, index=index)


def test_index_out_of_range_single_state():
  with pytest.raises((ValueError, IndexError), match=r"\bindex\b"):
    lamb_optax.trust_ratios(step(lamb()), index=1)


def test_two_lambs_in_a_chain_are_both_found():
  tx = optax.chain(lamb(), lamb_optax.scale_by_trust_ratio())
  state = step(tx)
  with pytest.raises(ValueError, match=r"\bindex\b"):
    lamb_optax.trust_ratios(state)
  assert_ratios(lamb_optax.trust_ratios(state, index=0),
                lamb_first_step_ratios(small_params(), small_grads()))


@pytest.mark.parametrize("tx", [optax.adam(1e-3), optax.lamb(1e-3),
                                optax.identity()],
                         ids=["adam", "optax_lamb", "identity"])
def test_error_when_state_has_no_trust_ratio(tx):
  state = tx.init(small_params())
  with pytest.raises(ValueError, match="trust"):
    lamb_optax.trust_ratios(state)


def test_param_path_names_a_leaf_as_errors_and_logs_do():
  """lamb_optax.param_path: keys joined by '/', without the trailing Flax
  Variable attribute, so nnx states and pure arrays give one name."""
  import jax  # pylint: disable=import-outside-toplevel
  import lamb_optax  # pylint: disable=import-outside-toplevel
  keys = jax.tree_util
  path = (keys.DictKey("encoder"), keys.SequenceKey(0),
          keys.GetAttrKey("kernel"))
  assert lamb_optax.param_path(path) == "encoder/0/kernel"
  assert lamb_optax.param_path(path + (keys.GetAttrKey("value"),)) == (
      "encoder/0/kernel")
  assert lamb_optax.param_path(()) == ""
