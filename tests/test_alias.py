"""lamb_optax._src.alias: the boundary every alias goes through."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lamb_optax
from lamb_optax._src import alias


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_chain_is_built_once_per_layout_not_per_update(jit):
  built = []

  def build(specs):
    built.append(specs)
    return optax.named_chain(
        ("scale", optax.scale(0.5)),
        ("trust_ratio", lamb_optax.scale_by_trust_ratio()))

  tx = alias.alias("test", build)
  params = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  for _ in range(3):
    updates, state = update(jax.tree.map(jnp.ones_like, params), state,
                            params)
  assert len(built) == 1
  np.testing.assert_allclose(updates["b"], 1.0)  # r = ||x|| / ||u/2|| = 2.
  # Params of another layout get a chain of their own.
  tx.init({"w": jnp.ones((2, 3))})
  assert len(built) == 2


def test_the_state_of_lamb_is_named_whatever_the_options():
  params = {"w": jnp.ones((2, 3))}
  names = ["clip", "adam", "weight_decay", "direction", "trust_ratio",
           "learning_rate"]
  for kwargs in ({}, {"max_grad_norm": 1.0}, {"store_direction": True},
                 {"max_grad_norm": 1.0, "store_direction": True}):
    state = lamb_optax.lamb(1e-3, **kwargs).init(params)
    assert list(state) == names, kwargs
    assert state["adam"].mu["w"].shape == (2, 3)
    assert type(state["trust_ratio"]) is lamb_optax.ScaleByTrustRatioState
  state = lamb_optax.lars(1e-3, max_grad_norm=1.0).init(params)
  assert list(state) == ["clip", "weight_decay", "momentum", "trust_ratio",
                         "learning_rate"]
