r"""Will it fit my pod? The train step compiled for a TPU slice, on a CPU.

Compiles the training script's own steps (``steps.Plan``: the same functions
and shardings that ``train.py`` jits), once per phase, and the eval step,
ahead of time for a TPU topology with no TPU attached (libtpu, the TPU
compiler, from ``pip install "jax[tpu]==<installed jax>"``; see
docs/tpu.md), and prints per device:

* the HBM it needs (arguments, temporaries, total) against the chip's HBM;
* flops and HBM bytes, and the roofline lower bound of the step time from
  the chip's public peak bf16 flops and HBM bandwidth (``xla_report.CHIPS``);
* the collectives by kind with their operand bytes;
* the optimizer update's share of the step's bytes and roofline time,
  beside AdamW's;
* the compile time.

Run from the repository root (minutes for a pod of a thousand chips):

  python examples/bert/train_compile.py \
      --config=examples/bert/configs/bert_large.py --topology=v3-1024

Any config field can be overridden as in main.py (``--config.FIELD=VALUE``).
``--json`` writes the figures. It exits with status 1, naming the knobs to
turn (``micro_batch_size``, ``remat``, ``fsdp``), when a step does not fit.
The figures are the compiler's estimates, not measurements: the roofline is
a lower bound.
"""

import importlib.metadata
import json
import os
import sys
import time
from typing import Any, Optional

import xla_report

# Before JAX loads libtpu: quiet on a machine with no TPU, and compile for
# the TPU while running on the CPU.
xla_report.quiet_libtpu()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from ml_collections import config_flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import recipe
import steps
import utils

import lamb_optax
# pylint: enable=g-import-not-at-top,wrong-import-position

_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "bert_large.py"),
    "Training configuration (a configs/*.py file).", lock_config=True)
flags.DEFINE_string(
    "topology", None,
    f"A TPU slice: one of {', '.join(xla_report.TOPOLOGIES)} (the number "
    "counts chips), or a chip shape such as v4:2x2x4.")
flags.DEFINE_string("json", None, "Write the figures to this JSON file.")
flags.DEFINE_string("hlo_dir", None,
                    "Write each program's optimized HLO to this directory.")
flags.DEFINE_bool("optimizer_share", True,
                  "Also compile the optimizer update alone (the configured "
                  "optimizer and AdamW) to give its share of the step.")
flags.mark_flags_as_required(["topology"])

KNOBS = ("--config.micro_batch_size (accumulate the global batch over "
         "smaller micro-batches), --config.remat=True (recompute each "
         "layer's activations in the backward pass), --config.fsdp=True "
         "(shard the parameters and optimizer state over the devices)")


def _fits_or_error(compile_fn) -> tuple[Optional[Any], Optional[str], float]:
  """Compiles; an out-of-memory compile is an answer, not a crash."""
  start = time.perf_counter()
  try:
    compiled = compile_fn()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "exceeds" not in message:
      raise
    return None, message.splitlines()[0][:500], time.perf_counter() - start
  return compiled, None, time.perf_counter() - start


def _program_report(name: str, compiled: Optional[Any], error: Optional[str],
                    seconds: float, slice_: xla_report.Topology,
                    global_batch: Optional[int], hlo_dir: Optional[str],
                    jaxpr: Any) -> dict[str, Any]:
  """The per-device figures of one compiled program (``jaxpr``: its
  global program, for the flops)."""
  chip = slice_.chip
  row: dict[str, Any] = {"program": name, "compile_s": seconds,
                         "hbm_capacity": chip.device_hbm_bytes}
  if compiled is None:
    row.update(fits=False, error=error)
    return row
  text = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    with open(os.path.join(hlo_dir, f"{slice_.name}_{name}.hlo"), "w") as f:
      f.write(text)
  mem, xla_cost = xla_report.memory(compiled), xla_report.cost(compiled)
  row.update(
      fits=mem["total"] <= chip.device_hbm_bytes, memory=mem,
      headroom=chip.device_hbm_bytes - mem["total"],
      xla_flops=xla_cost["flops"],
      xla_bytes_accessed=xla_cost["bytes_accessed"],
      **xla_report.program_figures(
          text, chip, xla_report.jaxpr_flops(jaxpr) / slice_.num_devices))
  if global_batch is not None:
    row["global_batch_shapes"] = xla_report.shapes_with_dim(text,
                                                            global_batch)
  return row


def _update_report(plan: steps.Plan, tx: optax.GradientTransformation,
                   slice_: xla_report.Topology) -> dict[str, Any]:
  """The optimizer update alone (update + apply_updates), sharded as in
  the step: the parameters, gradients and moments as ``plan`` shards them."""
  params, _ = plan.abstract_state()
  state_sharding = lamb_optax.state_shardings(tx, plan.params_shape,
                                              plan.params_sharding)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(tx.init, plan.params_shape), state_sharding)

  def update(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  jitted = jax.jit(update, donate_argnums=(0, 1), in_shardings=(
      plan.params_sharding, state_sharding, plan.params_sharding),
                   out_shardings=(plan.params_sharding, state_sharding))
  compiled, error, seconds = _fits_or_error(
      lambda: jitted.lower(params, state, params).compile())
  return _program_report("update", compiled, error, seconds, slice_, None,
                         None, jax.make_jaxpr(jitted)(params, state, params))


def compile_report(config, topology_name: str,
                   hlo_dir: Optional[str] = None,
                   optimizer_share: bool = True) -> dict[str, Any]:
  """Compiles ``config``'s steps for a TPU slice; per-device figures.

  Args:
    config: A training configuration (``configs/*.py``).
    topology_name: A slice (``xla_report.topology``).
    hlo_dir: Write each program's optimized HLO there.
    optimizer_share: Also compile the optimizer update alone, for the
      configured optimizer and for AdamW.

  Returns:
    ``{"topology", "chip", "num_devices", "num_params", "programs": [...]}``
    with one row per program (``phase_1``, ..., ``eval``): ``fits``,
    ``memory`` (bytes: arguments, outputs, aliased, temporaries, code,
    total), ``headroom``, ``flops``, ``hbm_bytes``, ``roofline_s``,
    ``collectives`` (kind -> count and operand bytes), ``kernels``,
    ``global_batch_shapes`` and ``compile_s``, and, per phase, the
    ``optimizer`` and ``adamw`` update rows and the optimizer's share.
  """
  slice_ = xla_report.topology(topology_name)
  devices = xla_report.topology_devices(slice_)
  mesh = Mesh(np.asarray(devices), (utils.DATA_AXIS,))
  plan = steps.make_plan(config, mesh)
  params, opt_state = plan.abstract_state()
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=plan.replicated)
  report: dict[str, Any] = {
      "topology": slice_.name, "jax_topology": slice_.jax_name,
      "chip": slice_.chip.name, "chip_source": slice_.chip.source,
      "num_devices": slice_.num_devices, "num_params": plan.num_params,
      "optimizer": config.optimizer, "fsdp": bool(config.fsdp),
      "remat": bool(config.remat), "jax": jax.__version__,
      "libtpu": importlib.metadata.version("libtpu"), "programs": []}
  updates = {}
  if optimizer_share:
    updates["optimizer"] = _update_report(plan, plan.tx, slice_)
    adamw_config = config.copy_and_resolve_references()
    with adamw_config.unlocked():
      adamw_config.optimizer = "adamw"
    updates["adamw"] = _update_report(
        plan, recipe.make_optimizer(adamw_config, plan.schedule), slice_)
  for phase in plan.phases:
    batch = plan.train_batch_shapes(phase)
    jitted = plan.jit_train_step(phase)
    compiled, error, seconds = _fits_or_error(
        lambda: jitted.lower(params, opt_state, batch, step).compile())
    row = _program_report(
        f"phase_{phase.index + 1}", compiled, error, seconds, slice_,
        phase.batch_size, hlo_dir,
        jax.make_jaxpr(jitted)(params, opt_state, batch, step))
    row.update(seq_length=phase.seq_length, global_batch=phase.batch_size,
               num_micro_batches=phase.num_micro_batches,
               per_device_batch=phase.batch_size // slice_.num_devices,
               steps=phase.num_steps)
    if compiled is not None and updates:
      row["update"] = {}
      for name, update in updates.items():
        if "hbm_bytes" in update:
          row["update"][name] = {
              "hbm_bytes": update["hbm_bytes"],
              "roofline_s": update["roofline_s"],
              "bytes_share": update["hbm_bytes"] / row["hbm_bytes"],
              "time_share": update["roofline_s"] / row["roofline_s"]}
    report["programs"].append(row)
  eval_batch = max(slice_.num_devices, config.eval_batch_size
                   - config.eval_batch_size % slice_.num_devices)
  seq_length = plan.phases[-1].seq_length
  jitted = plan.jit_eval_step()
  eval_batch_shapes = plan.eval_batch_shapes(eval_batch, seq_length)
  compiled, error, seconds = _fits_or_error(
      lambda: jitted.lower(params, eval_batch_shapes).compile())
  row = _program_report("eval", compiled, error, seconds, slice_, eval_batch,
                        hlo_dir, jax.make_jaxpr(jitted)(params,
                                                        eval_batch_shapes))
  row.update(seq_length=seq_length, global_batch=eval_batch)
  report["programs"].append(row)
  report["updates"] = updates
  report["fits"] = all(r["fits"] for r in report["programs"])
  report["roofline_total_s"] = sum(
      r["roofline_s"] * r["steps"] for r in report["programs"]
      if "steps" in r and "roofline_s" in r)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    xla_report.topology(FLAGS.topology)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  report = compile_report(FLAGS.config, FLAGS.topology, FLAGS.hlo_dir,
                          FLAGS.optimizer_share)
  report["config"] = FLAGS.config.to_dict()
  print(xla_report.markdown(report), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=1, default=str)
  if not report["fits"]:
    worst = [r for r in report["programs"] if not r["fits"]]
    print(f"\nDoes not fit {report['topology']}: "
          f"{', '.join(r['program'] for r in worst)}. Turn {KNOBS}.",
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
