"""A scanned model trained with ``layer_axes`` follows its unrolled twin.

The same network is built twice: with ``nn.scan`` / ``nnx.scan`` (the blocks'
parameters stacked into leaves of shape ``(L, ...)``) and unrolled (one module
per block, its parameters copied from the scanned model's slices). LAMB with
``layer_axes`` on the scanned model must trace the same parameter trajectory
as plain LAMB on the unrolled one (to float32 rounding); ``optax.lamb`` and
``lamb_optax.lamb`` without ``layer_axes`` on the scanned model must not (one
trust ratio for the whole stack). The blocks are initialised at different
scales (0.1 .. 3), as trained networks' layers are, so per-layer and
whole-stack ratios differ.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lamb_optax
from lamb_optax import masks

NUM_BLOCKS = 4
HIDDEN = 16
NUM_STEPS = 8
LR = 0.02
WEIGHT_DECAY = 0.01
BLOCK_SCALES = np.array([0.1, 0.5, 1.0, 3.0])
# Float32 rounding in the forward/backward passes (scan vs unrolled order of
# operations) stays below this, relative to how far the parameters moved
# (measured: 6e-7).
MATCH_RTOL = 1e-5
# Without per-layer ratios the trajectory is off by at least this much within
# three steps (measured: 0.75 for both lamb_optax and optax.lamb).
MISMATCH_MIN = 0.3


def data():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((32, HIDDEN)).astype(np.float32)
  y = np.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2] ** 2
  return jnp.asarray(x), jnp.asarray(y.astype(np.float32))


def bert_lamb(**kwargs):
  return lamb_optax.lamb(
      LR, weight_decay=WEIGHT_DECAY,
      weight_decay_mask=masks.exclude_bias_and_norm(),
      trust_ratio_mask=masks.exclude_bias_and_norm(), **kwargs)


def relative_deviation(traj_a, traj_b, start):
  """max over steps of |a - b| / |b - start| (whole trees, float64)."""
  flat = lambda t: np.concatenate(
      [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])
  x0 = flat(start)
  worst = 0.0
  for a, b in zip(traj_a, traj_b):
    a, b = flat(a), flat(b)
    worst = max(worst, np.linalg.norm(a - b) / np.linalg.norm(b - x0))
  return worst


def train(grad_fn, params, opt, num_steps=NUM_STEPS):
  """Plain optax loop; returns the parameters after each step.

  ``grad_fn`` is jitted once per model and shared by the optimizers; the
  updates run eagerly (op by op, cached across optimizers).
  """
  state = opt.init(params)
  out = []
  for _ in range(num_steps):
    updates, state = opt.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out, state


# ---------------------------------------------------------------------------
# linen


class Block(nn.Module):

  @nn.compact
  def __call__(self, x, _=None):
    h = nn.Dense(HIDDEN, kernel_init=nn.with_partitioning(
        nn.initializers.lecun_normal(), ("embed", "mlp")),
                 bias_init=nn.with_partitioning(nn.initializers.zeros,
                                                ("mlp",)))(x)
    h = nn.LayerNorm()(jnp.tanh(h))
    return x + h, None


class Scanned(nn.Module):

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(Block, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=NUM_BLOCKS,
                     metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(1, name="head")(x)


class Unrolled(nn.Module):

  @nn.compact
  def __call__(self, x):
    for i in range(NUM_BLOCKS):
      x, _ = Block(name=f"block_{i}")(x)
    return nn.Dense(1, name="head")(x)


def linen_setup():
  x, y = data()
  scanned = Scanned()
  boxed = scanned.init(jax.random.key(0), x)["params"]
  # Blocks at different scales: multiply each slice of the stacked kernels.
  scale = lambda a: a * BLOCK_SCALES.reshape((-1,) + (1,) * (a.ndim - 1)
                                             ).astype(a.dtype)
  boxed["blocks"]["Dense_0"]["kernel"] = boxed["blocks"]["Dense_0"][
      "kernel"].replace_boxed(scale(boxed["blocks"]["Dense_0"]["kernel"].value))
  scanned_params = nn.unbox(boxed)
  unrolled_params = {"head": scanned_params["head"]}
  for i in range(NUM_BLOCKS):
    unrolled_params[f"block_{i}"] = jax.tree.map(lambda a, i=i: a[i],
                                                 scanned_params["blocks"])

  def loss(model):
    return lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  return (boxed, scanned_params, unrolled_params, jax.jit(loss(scanned)),
          jax.jit(loss(Unrolled())))


def restack_linen(unrolled_params):
  return {"head": unrolled_params["head"],
          "blocks": jax.tree.map(lambda *a: jnp.stack(a), *[
              unrolled_params[f"block_{i}"] for i in range(NUM_BLOCKS)])}


@pytest.fixture(scope="module")
def linen_runs():
  boxed, scanned_params, unrolled_params, scanned_loss, unrolled_loss = (
      linen_setup())
  # Same functions at the starting point (so the twins really are twins).
  np.testing.assert_allclose(scanned_loss(scanned_params),
                             unrolled_loss(unrolled_params), rtol=1e-6)
  layer_axes = lamb_optax.layer_axes_from_metadata(boxed)
  scanned_grad = jax.jit(jax.grad(scanned_loss))
  unrolled_grad = jax.jit(jax.grad(unrolled_loss))
  runs = {"start": scanned_params, "boxed": boxed, "layer_axes": layer_axes}
  runs["unrolled"], _ = train(unrolled_grad, unrolled_params, bert_lamb())
  runs["unrolled"] = [restack_linen(p) for p in runs["unrolled"]]
  runs["scanned"], runs["scanned_state"] = train(
      scanned_grad, scanned_params, bert_lamb(layer_axes=layer_axes))
  runs["scanned_no_axes"], _ = train(scanned_grad, scanned_params, bert_lamb(),
                                     num_steps=3)
  optax_opt = optax.lamb(LR, weight_decay=WEIGHT_DECAY,
                         mask=masks.exclude_bias_and_norm())
  runs["optax_unrolled"], _ = train(unrolled_grad, unrolled_params, optax_opt,
                                    num_steps=3)
  runs["optax_unrolled"] = [restack_linen(p) for p in runs["optax_unrolled"]]
  runs["optax_scanned"], _ = train(scanned_grad, scanned_params, optax_opt,
                                   num_steps=3)
  return runs


def test_linen_metadata_and_masks_on_the_scanned_tree(linen_runs):
  layer_axes = linen_runs["layer_axes"]
  assert layer_axes["blocks"]["Dense_0"] == {"kernel": (0,), "bias": (0,)}
  assert layer_axes["head"] == {"kernel": None, "bias": None}
  # BERT's masks still find the biases and LayerNorm params in the stack.
  mask = masks.exclude_bias_and_norm()(linen_runs["start"])
  assert mask["blocks"] == {"Dense_0": {"kernel": True, "bias": False},
                            "LayerNorm_0": {"scale": False, "bias": False}}
  assert mask["head"] == {"kernel": True, "bias": False}
  ratios = lamb_optax.trust_ratios(linen_runs["scanned_state"])
  kernel_ratios = np.asarray(ratios["blocks"]["Dense_0"]["kernel"])
  assert kernel_ratios.shape == (NUM_BLOCKS,)
  assert len(np.unique(kernel_ratios)) == NUM_BLOCKS
  for leaf in (ratios["blocks"]["Dense_0"]["bias"],
               ratios["blocks"]["LayerNorm_0"]["scale"]):
    assert np.all(np.asarray(leaf) == 1.0)


def test_linen_scanned_with_layer_axes_follows_unrolled(linen_runs):
  deviation = relative_deviation(linen_runs["scanned"], linen_runs["unrolled"],
                                 linen_runs["start"])
  assert deviation <= MATCH_RTOL, deviation
  # The parameters did move (the comparison is not of two standing still).
  moved = relative_deviation([linen_runs["start"]], linen_runs["unrolled"][-1:],
                             jax.tree.map(jnp.zeros_like, linen_runs["start"]))
  assert moved > 1e-2


@pytest.mark.parametrize("run,twin", [("scanned_no_axes", "unrolled"),
                                      ("optax_scanned", "optax_unrolled")],
                         ids=["lamb_optax_without_layer_axes", "optax_lamb"])
def test_linen_scanned_without_layer_axes_does_not(linen_runs, run, twin):
  deviation = relative_deviation(linen_runs[run], linen_runs[twin],
                                 linen_runs["start"])
  assert deviation >= MISMATCH_MIN, deviation


# ---------------------------------------------------------------------------
# nnx


class NnxBlock(nnx.Module):

  def __init__(self, rngs):
    self.linear = nnx.Linear(
        HIDDEN, HIDDEN,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          ("embed", "mlp")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                        ("mlp",)), rngs=rngs)
    self.norm = nnx.LayerNorm(HIDDEN, rngs=rngs)

  def __call__(self, x):
    return x + self.norm(jnp.tanh(self.linear(x)))


class NnxScanned(nnx.Module):

  def __init__(self, rngs):
    @nnx.split_rngs(splits=NUM_BLOCKS)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return NnxBlock(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, x):
      return block(x)

    return self.head(forward(self.blocks, x))


class NnxUnrolled(nnx.Module):

  def __init__(self, rngs):
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(NUM_BLOCKS)])
    self.head = nnx.Linear(HIDDEN, 1, rngs=rngs)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def nnx_models():
  with nnx.use_eager_sharding(False):  # metadata only, no mesh
    scanned = NnxScanned(nnx.Rngs(0))
    unrolled = NnxUnrolled(nnx.Rngs(1))
  kernel = scanned.blocks.linear.kernel
  kernel[...] = kernel[...] * BLOCK_SCALES.reshape(-1, 1, 1).astype(np.float32)
  stacked = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
  for i, block in enumerate(unrolled.blocks):
    nnx.update(block, jax.tree.map(lambda a, i=i: a[i], stacked["blocks"]))
  nnx.update(unrolled.head, stacked["head"])
  return scanned, unrolled


def restack_nnx(unrolled_pure):
  blocks = [unrolled_pure["blocks"][i] for i in range(NUM_BLOCKS)]
  return {"head": unrolled_pure["head"],
          "blocks": jax.tree.map(lambda *a: jnp.stack(a), *blocks)}


def train_nnx(model, opt):
  x, y = data()

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
  out = []
  for _ in range(NUM_STEPS):
    step(model, optimizer)
    out.append(jax.tree.map(np.asarray,
                            nnx.to_pure_dict(nnx.state(model, nnx.Param))))
  return out, optimizer


def test_nnx_scanned_with_layer_axes_follows_unrolled():
  scanned, unrolled = nnx_models()
  start = jax.tree.map(np.asarray,
                       nnx.to_pure_dict(nnx.state(scanned, nnx.Param)))
  x, _ = data()
  np.testing.assert_allclose(scanned(x), unrolled(x), rtol=1e-5, atol=1e-6)
  layer_axes = lamb_optax.layer_axes_from_metadata(
      nnx.state(scanned, nnx.Param))
  assert nnx.to_pure_dict(layer_axes)["blocks"]["linear"] == {
      "kernel": (0,), "bias": (0,)}
  mask = masks.exclude_bias_and_norm()(nnx.state(scanned, nnx.Param))
  assert nnx.to_pure_dict(mask)["blocks"] == {
      "linear": {"kernel": True, "bias": False},
      "norm": {"scale": False, "bias": False}}

  unrolled_traj, _ = train_nnx(unrolled, bert_lamb())
  unrolled_traj = [restack_nnx(p) for p in unrolled_traj]
  scanned_traj, optimizer = train_nnx(scanned,
                                      bert_lamb(layer_axes=layer_axes))
  ratios = lamb_optax.trust_ratios(nnx.as_pure(optimizer.opt_state))
  assert np.asarray(ratios["blocks"]["linear"]["kernel"]).shape == (
      NUM_BLOCKS,)
  assert relative_deviation(scanned_traj, unrolled_traj, start) <= MATCH_RTOL

  # Without layer_axes: one ratio for the stack, another trajectory.
  scanned_again, _ = nnx_models()
  no_axes_traj, _ = train_nnx(scanned_again, bert_lamb())
  assert relative_deviation(no_axes_traj[:3], unrolled_traj[:3],
                            start) >= MISMATCH_MIN
