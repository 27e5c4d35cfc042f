"""Distributed scenarios of tests/test_sharding.py, run in one subprocess.

``python tests/distributed_scenarios.py OUT.json`` simulates 8 CPU devices,
runs every scenario (jit + NamedSharding, ZeRO-1, pmap, shard_map) for each
optimizer alongside the single-device float32 run of the same steps, and
writes what it measured (errors relative to the single-device run, shardings,
error messages) as JSON; the test module asserts on it. The problem (params,
gradients, specs, optimizers) is defined here so the multi-process worker and
the tests share it; importing this module does not initialise JAX's backend.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

if __name__ == "__main__":  # Before jax initialises its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

import lamb_optax
from lamb_optax._src.sharding import state_shardings

NUM_STEPS = 5
OPTIMIZERS = ("lamb", "lamb_store_direction", "lars")

# Leaf -> shape. blocks/kernel stacks 4 layers (scanned model, layer axis 0)
# and has 4 * 128 * 128 = 65536 elements.
SHAPES = {
    "blocks": {"kernel": (4, 128, 128)},
    "dense": {"bias": (12,), "kernel": (8, 12)},
    "embed": {"table": (16, 8)},
    "head": {"kernel": (8, 4)},
    "norm": {"scale": (8,)},
}
# On the ("data", "model") = (2, 4) mesh: FSDP over "data", tensor parallel
# over "model", a dimension split over both, and replicated leaves.
SPECS = {
    "blocks": {"kernel": P(None, "data", "model")},
    "dense": {"bias": P(), "kernel": P(None, "model")},
    "embed": {"table": P(("data", "model"))},
    "head": {"kernel": P()},
    "norm": {"scale": P("model")},
}
# Pipeline-like: the stacked leaf's layer axis split over "stage".
STAGE_SPECS = {
    "blocks": {"kernel": P("stage", None, "model")},
    "dense": {"bias": P(), "kernel": P(None, "model")},
    "embed": {"table": P(("stage", "model"))},
    "head": {"kernel": P()},
    "norm": {"scale": P("model")},
}
LAYER_AXES = {"blocks": {"kernel": 0}, "dense": None, "embed": None,
              "head": None, "norm": None}
# No decay and no trust ratio on the bias and the norm scale (BERT's rule).
MASK = {"blocks": True, "dense": {"bias": False, "kernel": True},
        "embed": True, "head": True, "norm": False}


# The stacked layers differ in scale by up to 300x (params) and 100x
# (gradients), so a norm summed over layers is far from any one layer's.
BLOCK_PARAM_SCALES = np.array([1.0, 10.0, 0.03, 3.0])[:, None, None]
BLOCK_GRAD_SCALES = np.array([0.1, 1.0, 10.0, 0.3])[:, None, None]


def scenario_params() -> dict:
  rng = np.random.default_rng(0)
  scales = {"blocks": 0.05 * BLOCK_PARAM_SCALES, "dense": 0.5, "embed": 0.02,
            "head": 2.0, "norm": 1.0}
  return {module: {name: np.asarray(scales[module] * rng.standard_normal(shape)
                                    + (1.0 if module == "norm" else 0.0),
                                    np.float32)
                   for name, shape in leaves.items()}
          for module, leaves in SHAPES.items()}


def scenario_grads(num_steps: int = NUM_STEPS, seed: int = 1) -> list[dict]:
  rng = np.random.default_rng(seed)
  scales = {"blocks": 1e-3 * BLOCK_GRAD_SCALES, "dense": 1.0, "embed": 10.0,
            "head": 0.1, "norm": 0.01}
  return [{module: {name: np.asarray(
      scales[module] * (0.5 + rng.standard_normal(shape)), np.float32)
                    for name, shape in leaves.items()}
           for module, leaves in SHAPES.items()}
          for _ in range(num_steps)]


def global_grad_norms(grads_seq) -> list[float]:
  return [float(np.sqrt(sum(np.sum(np.square(g.astype(np.float64)))
                            for g in jax.tree.leaves(grads))))
          for grads in grads_seq]


# Clips every step (the gradients' global norms are > 100).
MAX_GRAD_NORM = 5.0


def make_optimizer(name: str, *, axis_name=None, layer_axes=LAYER_AXES,
                   max_grad_norm=None) -> optax.GradientTransformation:
  if name in ("lamb", "lamb_store_direction"):
    return lamb_optax.lamb(
        1e-2, weight_decay=0.01, weight_decay_mask=MASK,
        trust_ratio_mask=MASK, layer_axes=layer_axes, axis_name=axis_name,
        max_grad_norm=max_grad_norm, store_direction=name == "lamb_store_direction")
  if name == "lars":
    assert max_grad_norm is None
    return lamb_optax.lars(
        0.1, momentum=0.9, weight_decay=1e-3, weight_decay_mask=MASK,
        trust_ratio_mask=MASK, layer_axes=layer_axes, axis_name=axis_name)
  raise ValueError(name)


def train_step(tx):
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def record(params, state) -> dict:
  """One step's params and trust ratios, as float64 numpy leaves."""
  return {"params": [np.asarray(x, np.float64) for x in jax.tree.leaves(params)],
          "ratios": [np.asarray(r, np.float64) for r in
                     jax.tree.leaves(lamb_optax.trust_ratios(state))]}


def run_single_device(name: str, grads_seq=None, **kw) -> list[dict]:
  """The reference: the same steps, float32, on one device.

  Eager: op-by-op dispatch is cached per primitive and shape across the
  optimizers, where jit would compile each anew.
  """
  tx = make_optimizer(name, **kw)
  device = jax.local_devices()[0]
  params = jax.device_put(scenario_params(), device)
  state = tx.init(params)
  step = train_step(tx)
  out = []
  for grads in grads_seq or scenario_grads():
    params, state = step(params, state, jax.device_put(grads, device))
    out.append(record(params, state))
  return out


def compare(got: list[dict], ref: list[dict]) -> dict:
  """Largest differences from the reference over all steps and leaves.

  ``param_err``: relative to the layer's total move over the run (so it reads
  as "fraction of what the optimizer did"); ``ratio_err``: relative.
  """
  start = jax.tree.leaves(scenario_params())
  moves = [np.max(np.abs(end - np.asarray(x0, np.float64)))
           for end, x0 in zip(ref[-1]["params"], start)]
  param_err = ratio_err = 0.0
  for g, r in zip(got, ref):
    for a, b, move in zip(g["params"], r["params"], moves):
      assert a.shape == b.shape, (a.shape, b.shape)
      param_err = max(param_err, float(np.max(np.abs(a - b)) / move))
    for a, b in zip(g["ratios"], r["ratios"]):
      assert a.shape == b.shape, (a.shape, b.shape)
      ratio_err = max(ratio_err, float(np.max(np.abs(a - b) / np.abs(b))))
  return {"param_err": param_err, "ratio_err": ratio_err}


def auto_mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def moment_leaves(state) -> dict:
  """{'mu/dense/kernel': array, ...}: the parameter-shaped state leaves."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    names = [getattr(k, "name", None) for k in path]
    for moment in ("mu", "nu", "ema"):
      if moment in names:  # The params' keys, after the chain's link name.
        keys = [str(k.key) for k in path[names.index(moment):]
                if hasattr(k, "key")]
        out["/".join([moment] + keys)] = leaf
  return out


def param_of(moment_path: str, tree):
  module, name = moment_path.split("/")[1:]
  return tree[module][name]


def scenario_jit(name: str, ref, *, zero: bool, explicit: bool = False) -> dict:
  """jit + NamedSharding: FSDP/TP params, or replicated params with ZeRO-1."""
  if explicit:
    mesh = jax.make_mesh((2, 4), ("data", "model"),
                         axis_types=(AxisType.Explicit,) * 2)
  else:
    mesh = auto_mesh((2, 4), ("data", "model"))
  if zero:
    param_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), SPECS)
  else:
    param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)
  tx = make_optimizer(name)
  params = jax.device_put(scenario_params(), param_sh)
  state_sh = state_shardings(tx, params, param_sh,
                             zero_axis="data" if zero else None)
  state = jax.jit(tx.init, out_shardings=state_sh)(params)
  step = jax.jit(train_step(tx), in_shardings=(param_sh, state_sh, param_sh),
                 out_shardings=(param_sh, state_sh))
  grads_seq = [jax.device_put(g, param_sh) for g in scenario_grads()]
  # Compiled once: calling the compiled step with inputs sharded otherwise
  # than it was compiled for raises, so 5 calls prove the shardings stay.
  compiled = step.lower(params, state, grads_seq[0]).compile()
  mismatches, checked, shard_shapes = [], 0, {}

  def check(state, when):
    nonlocal checked
    for path, leaf in moment_leaves(state).items():
      want = param_of(path, state_sh_moments)
      checked += 1
      if not leaf.sharding.is_equivalent_to(want, leaf.ndim):
        mismatches.append(f"{when} {path}: {leaf.sharding} != {want}")
      if not zero and want != param_of(path, param_sh):
        mismatches.append(f"state_shardings {path}: {want} != param's")
      shard_shapes[path] = [list(leaf.shape),
                            list(leaf.addressable_shards[0].data.shape),
                            str(want.spec)]

  state_sh_moments = {}
  for path, sharding in moment_leaves(state_sh).items():
    module, leaf_name = path.split("/")[1:]
    state_sh_moments.setdefault(module, {})[leaf_name] = sharding
  check(state, "init")
  out = []
  for grads in grads_seq:
    params, state = compiled(params, state, grads)
    out.append(record(params, state))
  check(state, "after 5 steps")
  return dict(compare(out, ref), mismatches=mismatches, moments_checked=checked,
              shard_shapes=shard_shapes, steps_run=len(out),
              param_shardings_kept=all(
                  x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(
                      jax.tree.leaves(params), jax.tree.leaves(param_sh))))


def scenario_zero_specs() -> dict:
  """ZeRO-1 placement on top of FSDP/TP specs (specs only, nothing runs)."""
  mesh = auto_mesh((2, 4), ("data", "model"))
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.float32), SHAPES,
                        is_leaf=lambda x: isinstance(x, tuple))
  params["odd"] = {"vector": jax.ShapeDtypeStruct((3,), jnp.float32)}
  specs = dict(SPECS, odd={"vector": P()})
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  tx = lamb_optax.lamb(1e-3, layer_axes=dict(LAYER_AXES, odd=None))
  shardings = state_shardings(tx, params, param_sh, zero_axis="data")
  return {path: str(s.spec) for path, s in moment_leaves(shardings).items()
          if path.startswith("mu/")}


def scenario_pmap(name: str) -> dict:
  """pmap, replicated params, grads pmean'd by the user; axis_name=None."""
  n = jax.device_count()
  rng = np.random.default_rng(7)
  # Each device's gradient: the step's gradient plus noise that averages out.
  local_seq, mean_seq = [], []
  for grads in scenario_grads():
    def spread(g):
      noise = rng.standard_normal((n,) + g.shape).astype(np.float32)
      noise -= noise.mean(axis=0)
      return (g + np.abs(g).mean() * noise).astype(np.float32)
    local = jax.tree.map(spread, grads)
    local_seq.append(local)
    mean_seq.append(jax.tree.map(
        lambda x: np.mean(x.astype(np.float64), axis=0).astype(np.float32),
        local))
  ref = run_single_device(name, grads_seq=mean_seq)

  tx = make_optimizer(name)

  def step(params, state, local_grads):
    grads = jax.lax.pmean(local_grads, "batch")
    return train_step(tx)(params, state, grads)

  def user_collectives_only(params, state, local_grads):
    return jax.lax.pmean(local_grads, "batch")

  params = scenario_params()
  one_grads = jax.tree.map(lambda x: x[0], local_seq[0])
  state0 = tx.init(params)
  count = lambda f: str(jax.make_jaxpr(f, axis_env=[("batch", n)])(
      params, state0, one_grads)).count("psum")
  psums_step, psums_user = count(step), count(user_collectives_only)

  pstep = jax.pmap(step, axis_name="batch")
  replicated = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + x.shape),
                            params)
  state = jax.tree.map(lambda x: np.broadcast_to(x, (n,) + x.shape), state0)
  params = replicated
  out, spread_across_replicas = [], 0.0
  for local in local_seq:
    params, state = pstep(params, state, local)
    host = jax.tree.map(np.asarray, params)
    spread_across_replicas = max(spread_across_replicas, max(
        float(np.max(np.abs(x - x[0]))) for x in jax.tree.leaves(host)))
    out.append(record(jax.tree.map(lambda x: x[0], host),
                      jax.tree.map(lambda x: x[0], state)))
  return dict(compare(out, ref), psums_step=psums_step, psums_user=psums_user,
              spread_across_replicas=spread_across_replicas)


def shard_map_state_specs(tx, mesh, specs):
  """The state's specs under shard_map, from lamb_optax.state_shardings:
  moments like the params, per-layer ratios like their layer axis (split
  over "stage" when the blocks' layer axis is), the rest replicated."""
  params = scenario_params()
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  return jax.tree.map(lambda s: s.spec, state_shardings(tx, params, param_sh))


def run_shard_map(name, mesh, specs, *, axis_name, check_vma=True,
                  max_grad_norm=None) -> list[dict]:
  tx = make_optimizer(name, axis_name=axis_name, max_grad_norm=max_grad_norm)
  state_specs = shard_map_state_specs(tx, mesh, specs)
  step = jax.jit(jax.shard_map(
      train_step(tx), mesh=mesh, in_specs=(specs, state_specs, specs),
      out_specs=(specs, state_specs), check_vma=check_vma))
  params = scenario_params()
  # The initial state of the blocks is the global initial state's blocks.
  state = tx.init(params)
  out = []
  for grads in scenario_grads():
    params, state = step(params, state, grads)
    out.append(record(params, state))
  return out


def error_of(fn) -> dict:
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return {"type": type(e).__name__, "message": str(e)}
  return {"type": None, "message": ""}


def scenario_shard_map(name: str, ref, ref_clipped) -> dict:
  mesh = auto_mesh((2, 4), ("data", "model"))
  axis_name = lamb_optax.axis_names_from_specs(SPECS, layer_axes=LAYER_AXES)
  result = {"axis_name": axis_name}

  def sub(key, fn):
    """Runs one variant; a crash is reported for it alone."""
    try:
      result[key] = fn()
    except Exception:  # pylint: disable=broad-except
      result[key] = {"crashed": traceback.format_exc()}

  sub("correct", lambda: compare(
      run_shard_map(name, mesh, SPECS, axis_name=axis_name), ref))
  if name != "lamb_store_direction":
    # Every mesh axis for every leaf: psum over axes where leaves are
    # replicated (caught while tracing: nothing is compiled).
    result["all_axes"] = error_of(lambda: run_shard_map(
        name, mesh, SPECS, axis_name=("data", "model")))
  if name != "lars":
    # The clip's global norm is summed over the mesh too (without the sum,
    # each device would clip by the norm of its blocks).
    sub("clipped", lambda: compare(run_shard_map(
        name, mesh, SPECS, axis_name=axis_name, max_grad_norm=MAX_GRAD_NORM),
        ref_clipped))
  stage_mesh = auto_mesh((2, 4), ("stage", "model"))
  stage_axis_name = lamb_optax.axis_names_from_specs(STAGE_SPECS,
                                                     layer_axes=LAYER_AXES)
  result["stage_axis_name"] = stage_axis_name
  stage_state_specs = shard_map_state_specs(
      make_optimizer(name, axis_name=stage_axis_name), stage_mesh,
      STAGE_SPECS)
  result["stage_ratio_specs"] = [
      str(spec) for state in jax.tree.leaves(
          stage_state_specs, is_leaf=lambda x: isinstance(
              x, lamb_optax.ScaleByTrustRatioState))
      if isinstance(state, lamb_optax.ScaleByTrustRatioState)
      for spec in [state.trust_ratios["blocks"]["kernel"]]]
  sub("stage", lambda: compare(run_shard_map(
      name, stage_mesh, STAGE_SPECS, axis_name=stage_axis_name), ref))
  if name != "lamb":
    return result

  # The wrong alternatives, for one optimizer (they share the code path).
  # Without axis_name each device takes its block's norm for the layer's;
  # check_vma=False so that shard_map lets the (device-dependent) ratios out.
  sub("no_axis_name", lambda: compare(
      run_shard_map(name, mesh, SPECS, axis_name=None, check_vma=False), ref))
  # ...which check_vma=True (the default) refuses at out_specs instead.
  result["no_axis_name_checked"] = error_of(
      lambda: run_shard_map(name, mesh, SPECS, axis_name=None))
  # Ignoring layer_axes, the helper would sum the norms of different layers
  # over "stage" (no error: the leaf does vary along "stage").
  wrong = lamb_optax.axis_names_from_specs(STAGE_SPECS)
  result["stage_wrong_axis_name"] = wrong
  sub("stage_wrong", lambda: compare(run_shard_map(
      name, stage_mesh, STAGE_SPECS, axis_name=wrong), ref))
  return result


def scenario_replicated_leaf_psum() -> dict:
  """A fully replicated leaf given a mesh axis: refused under check_vma."""
  mesh = auto_mesh((2, 4), ("data", "model"))
  tx = lamb_optax.scale_by_trust_ratio(axis_name="model")
  params = {"w": np.ones((4, 4), np.float32)}

  def run(check_vma):
    def f(p):
      updates, _ = tx.update(p, tx.init(p), p)
      return updates
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P(),), out_specs=P(),
                                 check_vma=check_vma))(params)

  return error_of(lambda: run(True))


def main(out_path: str) -> None:
  assert jax.device_count() == 8, jax.devices()
  results = {}

  def attempt(key, fn):
    start = time.perf_counter()
    try:
      results[key] = fn()
    except Exception:  # pylint: disable=broad-except
      results[key] = {"crashed": traceback.format_exc()}
    results.setdefault("seconds", {})[key] = time.perf_counter() - start

  clipped = {}
  for name in OPTIMIZERS:
    ref = run_single_device(name)
    if name != "lars":
      clipped[name] = run_single_device(name, max_grad_norm=MAX_GRAD_NORM)
    attempt(f"jit/{name}", lambda: scenario_jit(name, ref, zero=False))
    attempt(f"zero1/{name}", lambda: scenario_jit(name, ref, zero=True))
    attempt(f"pmap/{name}", lambda: scenario_pmap(name))
    attempt(f"shard_map/{name}",
            lambda: scenario_shard_map(name, ref, clipped.get(name)))
    if name == "lamb":  # jax.make_mesh's default axis type since jax 0.7.
      attempt("jit_explicit/lamb",
              lambda: scenario_jit(name, ref, zero=False, explicit=True))
  attempt("zero_specs", scenario_zero_specs)
  attempt("replicated_leaf_psum", scenario_replicated_leaf_psum)
  results["grad_norms"] = global_grad_norms(scenario_grads())
  with open(out_path, "w") as f:
    json.dump(results, f, indent=1)


if __name__ == "__main__":
  main(sys.argv[1])
