"""lamb_optax with Flax: nnx.Optimizer and linen's TrainState.

Small end-to-end runs on a fixed regression problem: the loss must go down,
and the trust ratios read back from the Flax-held optimizer state must be
float32 scalars per parameter, 1 on the leaves excluded by BERT's masks, and
equal to ||x|| / ||u|| (float64, from the first-step closed form) on the
others.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.training import train_state

import lamb_optax
from lamb_optax import masks

EPS = 1e-6
WD = 1e-3


def regression_data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((64, 3)).astype(np.float32)
  w = np.array([[1.5], [-2.0], [0.5]], np.float32)
  y = np.sin(x @ w) + 0.3 * x[:, :1] ** 2
  return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


def make_lamb(learning_rate):
  return lamb_optax.lamb(
      learning_rate, eps=EPS, weight_decay=WD,
      weight_decay_mask=masks.exclude_bias_and_norm(),
      trust_ratio_mask=masks.exclude_bias_and_norm())


def path_of(key_path):
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(p for p in parts if p != "value")


def flat_by_path(tree):
  return {path_of(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def first_step_ratio(x, g):
  """r = ||x|| / ||g / (|g| + eps) + wd x|| in float64 (first LAMB step)."""
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  u = g / (np.abs(g) + EPS) + WD * x
  return np.linalg.norm(x.ravel()) / np.linalg.norm(u.ravel())


def is_excluded(path):
  leaf = path.split("/")[-1]
  return leaf in ("bias", "scale")


def check_ratios(ratios, params, grads):
  """Ratios: float32 scalars; 1 where excluded; else the float64 formula."""
  flat_r = flat_by_path(ratios)
  flat_x, flat_g = flat_by_path(params), flat_by_path(grads)
  assert set(flat_r) == set(flat_x)
  n_adapted = 0
  for path, r in flat_r.items():
    r = jnp.asarray(r)
    assert r.dtype == jnp.float32 and r.shape == (), path
    if is_excluded(path):
      assert float(r) == 1.0, path
    else:
      n_adapted += 1
      np.testing.assert_allclose(float(r),
                                 first_step_ratio(flat_x[path], flat_g[path]),
                                 rtol=1e-4, err_msg=path)
      assert abs(float(r) - 1.0) > 1e-3, path
  assert n_adapted >= 2


# --------------------------------------------------------------------------
# nnx.Optimizer.
# --------------------------------------------------------------------------


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(3, 32, rngs=rngs)
    self.norm = nnx.LayerNorm(32, rngs=rngs)
    self.out = nnx.Linear(32, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.tanh(self.norm(self.hidden(x))))


def test_nnx_optimizer_trains_with_lamb_and_exposes_ratios():
  x, y = regression_data()
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_lamb(3e-2), wrt=nnx.Param)

  def loss_fn(model):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  ratios = lamb_optax.trust_ratios(optimizer.opt_state)
  assert all(float(r) == 1.0 for r in jax.tree.leaves(ratios))

  params0 = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))
  grads0 = jax.tree.map(np.asarray,
                        nnx.state(nnx.grad(loss_fn)(model), nnx.Param))
  initial_loss = float(train_step(model, optimizer))
  check_ratios(lamb_optax.trust_ratios(optimizer.opt_state), params0, grads0)
  # The first step moved every adapted kernel by exactly lr * ||x||.
  params1 = nnx.state(model, nnx.Param)
  for path, x1 in flat_by_path(params1).items():
    if not is_excluded(path):
      x0 = flat_by_path(params0)[path]
      np.testing.assert_allclose(
          np.linalg.norm(np.asarray(x1, np.float64) - x0),
          3e-2 * np.linalg.norm(np.asarray(x0, np.float64)), rtol=1e-4)

  for _ in range(40):
    loss = float(train_step(model, optimizer))
  final_loss = float(loss_fn(model))
  assert np.isfinite(final_loss)
  assert final_loss < 0.3 * initial_loss, (initial_loss, final_loss)
  ratios = lamb_optax.trust_ratios(optimizer.opt_state)
  for path, r in flat_by_path(ratios).items():
    assert jnp.asarray(r).dtype == jnp.float32 and jnp.shape(r) == ()
    assert (float(r) == 1.0) == is_excluded(path), path


# --------------------------------------------------------------------------
# linen TrainState.
# --------------------------------------------------------------------------


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(32)(x)
    x = nn.LayerNorm()(x)
    x = nn.tanh(x)
    return nn.Dense(1)(x)


def test_linen_train_state_trains_with_lamb_bert_masks():
  x, y = regression_data()
  model = LinenMLP()
  params = model.init(jax.random.PRNGKey(0), x[:1])["params"]
  state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                        tx=make_lamb(3e-2))

  def loss_fn(params):
    return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

  @jax.jit
  def train_step(state):
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  grads0 = jax.grad(loss_fn)(state.params)
  params0 = state.params
  state, initial_loss = train_step(state)
  check_ratios(lamb_optax.trust_ratios(state.opt_state), params0, grads0)
  # Excluded leaves took a plain Adam step: lr * g / (|g| + eps), no decay.
  for path, x1 in flat_by_path(state.params).items():
    if is_excluded(path):
      g = np.asarray(flat_by_path(grads0)[path], np.float64)
      x0 = np.asarray(flat_by_path(params0)[path], np.float64)
      np.testing.assert_allclose(np.asarray(x1, np.float64),
                                 x0 - 3e-2 * g / (np.abs(g) + EPS),
                                 rtol=1e-5, atol=1e-6, err_msg=path)

  for _ in range(30):
    state, _ = train_step(state)
  final_loss = float(loss_fn(state.params))
  assert int(state.step) == 31
  assert final_loss < 0.3 * float(initial_loss), (initial_loss, final_loss)
  ratios = flat_by_path(lamb_optax.trust_ratios(state.opt_state))
  assert set(ratios) == set(flat_by_path(state.params))
  for path, r in ratios.items():
    assert r.dtype == jnp.float32 and r.shape == ()
    assert (float(r) == 1.0) == is_excluded(path), path
