"""Shared test helpers: an awkward parameter tree, its gradients, and runners.

The tree mixes every kind of layer LAMB meets: a scalar, a vector, two
matrices, a 3-D kernel and a zero-initialised layer, with parameter norms and
gradient scales that differ by orders of magnitude (1e-4 .. 1e3), so that a
trust ratio computed over the wrong axes, or with the wrong norm, shows.

The test modules import these helpers (``from helpers import ...``); the
fixtures built from them are in conftest.py.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np

import lamb_optax

NUM_STEPS = 12

# Leaf paths (in jax.tree.leaves order, dict keys sorted) -> (shape, scale of
# the initial parameters, scale of the gradients). A scale of 0 initialises the
# layer to zeros.
LAYERS = {
    "conv/kernel": ((3, 2, 4), 3.0, 1e-4),
    "dense/bias": ((5,), 0.1, 1e-2),
    "dense/kernel": ((6, 5), 1.0, 1e3),
    "embed/table": ((8, 6), 0.02, 1.0),
    "head/kernel": ((4, 3), 0.0, 0.1),
    "norm/scale": ((), 1.3, 10.0),
}
ZERO_LAYER = "head/kernel"


def _nest(flat: dict) -> dict:
  tree = {}
  for path, value in flat.items():
    module, name = path.split("/")
    tree.setdefault(module, {})[name] = value
  return tree


def make_params(dtype=np.float32) -> dict:
  """The fixture tree as numpy arrays of ``dtype``."""
  rng = np.random.default_rng(0)
  flat = {}
  for path, (shape, scale, _) in LAYERS.items():
    if path == "norm/scale":
      value = np.full(shape, scale)
    else:
      value = scale * rng.standard_normal(shape)
    flat[path] = np.asarray(value, dtype)
  return _nest(flat)


def make_grads(num_steps: int = NUM_STEPS, dtype=np.float32) -> list[dict]:
  """A deterministic gradient sequence, independent of the parameters.

  Each layer's gradient is ``scale * factor_t * (offset + noise_t)``: the fixed
  offset gives momentum something to accumulate, the noise changes signs, and
  the per-step factor (shared by all layers) makes the global norm vary from
  step to step by up to 10x (for the ``max_grad_norm`` tests).
  """
  rng = np.random.default_rng(1)
  factors = np.exp(rng.uniform(np.log(0.3), np.log(3.0), num_steps))
  offsets = {path: rng.standard_normal(shape)
             for path, (shape, _, _) in LAYERS.items()}
  seq = []
  for t in range(num_steps):
    flat = {}
    for path, (shape, _, scale) in LAYERS.items():
      noise = rng.standard_normal(shape)
      flat[path] = np.asarray(
          scale * factors[t] * (offsets[path] + noise), dtype)
    seq.append(_nest(flat))
  return seq


def leaf_paths(tree) -> list[str]:
  """'/'-joined paths of the leaves, in jax.tree.leaves order."""
  return ["/".join(str(k.key) for k in path)
          for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def no_bias_or_norm(params):
  """Path-based mask: False for biases and normalisation scales."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(str(k.key) in ("bias", "scale") for k in path),
      params)


def flat_mask(mask, params) -> list[bool]:
  """A mask (callable, full tree or prefix tree) as one bool per leaf."""
  tree = mask(params) if callable(mask) else mask
  full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), tree,
                      params)
  return [bool(m) for m in jax.tree.leaves(full)]


def to_numpy64(tree) -> list[np.ndarray]:
  return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def run_optimizer(opt, params, grads_seq, *, jit=False):
  """Applies ``opt`` to ``grads_seq``.

  Eager by default: op-by-op dispatch is cached per primitive and shape
  across the many optimizer configurations of the suite, while ``jax.jit``
  would compile each configuration anew (~1 s each on CPU). The jitted path
  is compared with the eager one in the test files.

  Returns ``(params_per_step, ratios_per_step, states)``: lists with one entry
  per step of the parameter trees, of ``lamb_optax.trust_ratios(state)`` (or
  None if the optimizer has no trust-ratio state) and of the states.
  """
  params = jax.tree.map(jnp.asarray, params)
  state = opt.init(params)
  update = jax.jit(opt.update) if jit else opt.update
  params_out, ratios_out, states = [], [], []
  for grads in grads_seq:
    grads = jax.tree.map(jnp.asarray, grads)
    updates, state = update(grads, state, params)
    params = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params,
                          updates)
    params_out.append(params)
    try:
      ratios_out.append(lamb_optax.trust_ratios(state))
    except ValueError:
      ratios_out.append(None)
    states.append(state)
  return params_out, ratios_out, states


def assert_trajectory_close(params_per_step, ratios_per_step, ref_steps, *,
                            step_rtol=1e-5, ratio_rtol=3e-6):
  """Compares a float32 run with the float64 reference, step by step.

  What float32 honestly achieves, and so what is allowed:

  * Parameters: each step's move may be off by ``step_rtol`` of its size
    (rounding in the Adam direction, the norms and the product: ~1e-6
    measured, so 1e-5 leaves a wide margin), so after ``t`` steps a layer may
    be off by ``step_rtol`` times the sum of its largest per-element moves so
    far, plus an ulp of the parameters per step (``x + step`` is rounded to
    float32 every step).
  * Ratios: relative ``ratio_rtol`` times the cancellation factor
    ``|u|_abs / |u|`` of the reference (>= 1; large only where momentum or
    weight decay nearly cancels the Adam direction, which makes |u| itself
    ill-conditioned). Measured: ~4e-7. 3e-6 still rejects computing
    ``1 - b2**t`` from float32(b2), which is 6e-6 off.
  """
  assert len(params_per_step) == len(ref_steps)
  num_layers = len(ref_steps[0].params)
  moved = np.zeros(num_layers)
  ulp = np.finfo(np.float32).eps
  for t, (params, ratios, ref) in enumerate(
      zip(params_per_step, ratios_per_step, ref_steps), start=1):
    got = to_numpy64(params)
    assert len(got) == num_layers
    for i in range(num_layers):
      assert got[i].shape == ref.params[i].shape
      moved[i] += np.max(np.abs(ref.updates[i]), initial=0.0)
      want = ref.params[i]
      tol = step_rtol * moved[i] + t * ulp * np.max(np.abs(want), initial=0.0)
      err = np.max(np.abs(got[i] - want), initial=0.0)
      assert err <= tol, (
          f"step {t}, layer {i}: params off by {err:.3g} > tol {tol:.3g} "
          f"(total move so far {moved[i]:.3g})")
    got_ratios = np.array([float(r) for r in jax.tree.leaves(ratios)])
    want_ratios = np.array(ref.ratios)
    cond = np.array([max(1.0, a / n) if n > 0 else 1.0 for a, n in
                     zip(ref.update_abs_norms, ref.update_norms)])
    rel = np.abs(got_ratios - want_ratios) / want_ratios
    assert np.all(rel <= ratio_rtol * cond), (
        f"step {t}: trust ratios {got_ratios} != reference {want_ratios} "
        f"(relative errors {rel}, allowed {ratio_rtol * cond})")


def trajectory_distance(ref_a, ref_b) -> float:
  """Largest parameter difference between two reference runs, relative to the
  largest total move of the layer: used to check that an option matters."""
  worst = 0.0
  num_layers = len(ref_a[0].params)
  for i in range(num_layers):
    moved = sum(np.max(np.abs(s.updates[i]), initial=0.0) for s in ref_a)
    diff = max(np.max(np.abs(a.params[i] - b.params[i]), initial=0.0)
               for a, b in zip(ref_a, ref_b))
    if moved > 0:
      worst = max(worst, diff / moved)
  return worst


@contextlib.contextmanager
def example_modules(example_dir, module_names):
  """Imports an example's top-level modules (it runs as a script, not a
  package) with its directory first on sys.path, and clears ``module_names``
  from sys.modules around it, so that another example's ``train`` or
  ``configs`` is never picked up. Yields ``importlib.import_module``."""
  saved = {name: sys.modules.pop(name) for name in module_names
           if name in sys.modules}
  sys.path.insert(0, str(example_dir))
  try:
    yield importlib.import_module
  finally:
    sys.path.remove(str(example_dir))
    for name in module_names:
      sys.modules.pop(name, None)
    sys.modules.update(saved)


def jaxpr_equations(jaxpr):
  """Every equation of a jaxpr, those of its sub-jaxprs (pjit, cond, scan,
  custom_jvp, ...) included, in order."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from jaxpr_equations(sub)


def free_port() -> int:
  """A free TCP port on 127.0.0.1 (for a jax.distributed coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def join_loopback_job(process_id: int, port: int, num_processes: int = 2,
                      timeout_s: int = 60) -> None:
  """In a worker process: joins a ``jax.distributed`` job on 127.0.0.1:port.

  CPU collectives go over gloo. Where this jax build has none, prints
  ``DISTRIBUTED_UNAVAILABLE: <reason>`` (``run_processes`` then skips the
  test) and exits with status 3.
  """
  try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except Exception as e:  # pylint: disable=broad-except
    print(f"DISTRIBUTED_UNAVAILABLE: no gloo CPU collectives ({e!r})",
          flush=True)
    sys.exit(3)
  jax.distributed.initialize(
      coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
      process_id=process_id, initialization_timeout=timeout_s,
      heartbeat_timeout_seconds=timeout_s, shutdown_timeout_seconds=timeout_s)


def run_processes(commands: Sequence[Sequence[str]], log_dir, timeout_s: float,
                  env: Optional[dict] = None) -> list[str]:
  """Runs ``commands`` as concurrent processes (a multi-process job).

  Each process's output goes to ``log_dir/log_<i>.txt``. Skips the calling
  test if a process printed ``DISTRIBUTED_UNAVAILABLE: <reason>``; fails it,
  with the last lines of every log, if a process is still running after
  ``timeout_s`` seconds (then killed) or exited non-zero.

  Returns:
    The logs' texts.
  """
  import pytest  # pylint: disable=import-outside-toplevel
  logs = [pathlib.Path(log_dir) / f"log_{i}.txt" for i in range(len(commands))]
  procs = []
  for command, log in zip(commands, logs):
    with open(log, "w") as f:
      procs.append(subprocess.Popen(list(command), stdout=f,
                                    stderr=subprocess.STDOUT, env=env))
  deadline = time.monotonic() + timeout_s
  timed_out = False
  for proc in procs:
    try:
      proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      timed_out = True
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  texts = [log.read_text() for log in logs]
  for text in texts:
    for line in text.splitlines():
      if line.startswith("DISTRIBUTED_UNAVAILABLE:"):
        pytest.skip(line)
  report = "\n".join(
      f"--- process {i} (exit {p.returncode}), last lines:\n"
      + "\n".join(t.splitlines()[-25:]) for i, (p, t) in
      enumerate(zip(procs, texts)))
  if timed_out:
    pytest.fail(f"the {len(procs)}-process run did not finish in "
                f"{timeout_s} s\n{report}")
  if any(p.returncode != 0 for p in procs):
    pytest.fail(f"a process failed\n{report}")
  return texts
