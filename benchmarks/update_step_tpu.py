r"""The optimizer update compiled for TPU slices, on a CPU (no TPU needed).

Compiles one ``opt.update`` + ``optax.apply_updates`` step (params, state
and gradients donated) ahead of time for a TPU topology with libtpu (jax's
``tpu`` extra), for optax's AdamW and LAMB and for lamb_optax's LAMB
(default and ``store_direction=True``) and LARS, side by side in one
process, on BERT-base and BERT-Large parameter trees (encoder layers
stacked as ``nn.scan`` stores them, BERT's bias/LayerNorm masks, one trust
ratio per layer), replicated and FSDP (each large leaf split over all
devices along its largest divisible axis, never the layer axis). Per row:

* HBM bytes per parameter each device updates, counted from the optimized
  HLO by memory space (``xla_report.hbm_bytes``), beside the float32
  floors: AdamW reads g, m, v, x and writes m, v, x (28 B); LAMB needs a
  second pass over the update for its norms (40 B);
* XLA's own ``bytes accessed`` per parameter (which on v4 and later also
  counts prefetch copies into on-chip memory: see docs/tpu.md);
* the ratio to ``optax.adamw`` on the same tree and sharding;
* kernels (fusions) and the collectives each optimizer adds over AdamW's;
* the compile time and its ratio to AdamW's.

Usage (from the repository root; minutes, mostly compile)::

  python benchmarks/update_step_tpu.py                     # v3-16 and v5p-16
  python benchmarks/update_step_tpu.py --quick             # tiny, seconds
  python benchmarks/update_step_tpu.py --topologies v3-16 --models base

It prints Markdown tables and writes the same data as JSON (``--out``). This
is a benchmark, not a test; the compiler's figures are estimates of what a
TPU would do, not measurements on one.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(_ROOT, "examples", "bert"))
import xla_report  # pylint: disable=wrong-import-position

# Before JAX loads libtpu (see xla_report.quiet_libtpu).
xla_report.quiet_libtpu()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=wrong-import-position
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import lamb_optax
from lamb_optax._src import trust_ratio as trust_ratio_lib

import update_step
# pylint: enable=wrong-import-position

DEFAULT_OUT = os.path.join("benchmarks", "results", "update_step_tpu.json")
BASELINE = "optax.adamw"
ADAMW_FLOOR, LAMB_FLOOR = 28.0, 40.0
MODELS = {
    "base": dict(layers=12, hidden=768, ffn=3072),
    "large": dict(layers=24, hidden=1024, ffn=4096),
    "tiny": dict(layers=2, hidden=128, ffn=512, vocab=1024, positions=128),
}
LAYER_AXES = update_step.SCANNED_LAYER_AXES
BERT_MASK = lamb_optax.masks.exclude_bias_and_norm()

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adamw": lambda: optax.adamw(1e-3, eps=1e-6, weight_decay=0.01,
                                       mask=BERT_MASK),
    # One trust ratio per stacked tensor: optax.lamb has no layer axes.
    "optax.lamb": lambda: optax.lamb(1e-3, weight_decay=0.01,
                                     mask=BERT_MASK),
    "lamb_optax.lamb": lambda: lamb_optax.lamb(
        1e-3, weight_decay=0.01, layer_axes=LAYER_AXES,
        weight_decay_mask=BERT_MASK, trust_ratio_mask=BERT_MASK),
    "lamb_optax.lamb (no chunks)": lambda: lamb_optax.lamb(
        1e-3, weight_decay=0.01, layer_axes=LAYER_AXES,
        weight_decay_mask=BERT_MASK, trust_ratio_mask=BERT_MASK),
    "lamb_optax.lamb(store_direction=True)": lambda: lamb_optax.lamb(
        1e-3, weight_decay=0.01, layer_axes=LAYER_AXES, store_direction=True,
        weight_decay_mask=BERT_MASK, trust_ratio_mask=BERT_MASK),
    "lamb_optax.lars": lambda: lamb_optax.lars(
        1e-3, weight_decay=0.01, layer_axes=LAYER_AXES,
        weight_decay_mask=BERT_MASK, trust_ratio_mask=BERT_MASK),
}


@contextlib.contextmanager
def engine_variant(name: str):
  """The "(no chunks)" row: every leaf reduces its own norms.

  The trust-ratio engine reduces the norms of small leaves (biases,
  LayerNorm) in stacked chunks, a layout chosen for XLA:CPU's compile time
  (docs/performance.md). This row compiles the same maths with that
  structure off (``SMALL_LEAF_SIZE = 0``: no leaf is small), to show what
  the TPU pays or saves for it.
  """
  if "(no chunks)" not in name:
    yield
    return
  saved = trust_ratio_lib.SMALL_LEAF_SIZE
  trust_ratio_lib.SMALL_LEAF_SIZE = 0
  try:
    yield
  finally:
    trust_ratio_lib.SMALL_LEAF_SIZE = saved


def shardings(shapes: Any, mesh: Mesh, fsdp: bool,
              min_size: int = 2**14) -> Any:
  """Replicated, or FSDP: each large leaf's largest divisible axis split
  over all devices (never axis 0 of a stacked encoder leaf)."""
  n = mesh.size

  def spec(path, shape):
    if not fsdp or math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    stacked = path and getattr(path[0], "key", None) == "encoder"
    axes = [i for i, d in enumerate(shape)
            if d % n == 0 and not (stacked and i == 0)]
    if not axes:
      return NamedSharding(mesh, P())
    axis = max(axes, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*["data" if i == axis else None
                                   for i in range(len(shape))]))
  return jax.tree_util.tree_map_with_path(spec, shapes,
                                          is_leaf=update_step._is_shape)  # pylint: disable=protected-access


def local_params(shapes: Any, param_shardings: Any) -> int:
  """Parameters each device holds (and so updates)."""
  total = 0
  for shape, sharding in zip(
      jax.tree.leaves(shapes, is_leaf=update_step._is_shape),  # pylint: disable=protected-access
      jax.tree.leaves(param_shardings)):
    total += math.prod(sharding.shard_shape(shape))
  return total


def compile_update(name: str, shapes: Any, mesh: Mesh,
                   fsdp: bool) -> dict[str, Any]:
  """One optimizer's update compiled for ``mesh``: its per-device figures."""
  jax.clear_caches()
  param_shardings = shardings(shapes, mesh, fsdp)
  params = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s, np.float32, sharding=sh), shapes,
      param_shardings, is_leaf=update_step._is_shape)  # pylint: disable=protected-access
  with engine_variant(name):
    tx = OPTIMIZERS[name]()
    state_shardings = lamb_optax.state_shardings(tx, params,
                                                 param_shardings)
    state = jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        jax.eval_shape(tx.init, params), state_shardings)
    jitted = jax.jit(update_step.make_step(tx), donate_argnums=(0, 1, 2),
                     in_shardings=(param_shardings, state_shardings,
                                   param_shardings),
                     out_shardings=(param_shardings, state_shardings))
    start = time.perf_counter()
    compiled = jitted.lower(params, state, params).compile()
    seconds = time.perf_counter() - start
  text = compiled.as_text()
  n_local = local_params(shapes, param_shardings)
  collectives = xla_report.collectives(text)
  return {
      "local_params": n_local,
      "hbm_bytes_per_param": xla_report.hbm_bytes(text) / n_local,
      "xla_bytes_per_param": xla_report.cost(compiled)["bytes_accessed"]
                             / n_local,
      "kernels": xla_report.kernel_count(text),
      "collectives": collectives,
      "num_collectives": int(sum(c["count"] for c in collectives.values())),
      "compile_s": seconds,
  }


def run(topologies: Sequence[str], models: Sequence[str],
        names: Sequence[str], repeats: int) -> dict[str, Any]:
  """Every (topology, model, sharding) cell, every optimizer, compile
  repetitions interleaved (the median compile time is kept)."""
  cells = []
  for topology_name in topologies:
    slice_ = xla_report.topology(topology_name)
    mesh = Mesh(np.asarray(xla_report.topology_devices(slice_)), ("data",))
    for model in models:
      shapes = update_step.bert_base_shapes(scanned=True, **MODELS[model])
      for fsdp in (False, True):
        rows: dict[str, dict[str, Any]] = {}
        times: dict[str, list[float]] = {name: [] for name in names}
        for rep in range(repeats):
          for name in names[rep % len(names):] + names[:rep % len(names)]:
            row = compile_update(name, shapes, mesh, fsdp)
            times[name].append(row.pop("compile_s"))
            rows[name] = row
        for name in names:
          rows[name]["compile_s"] = float(np.median(times[name]))
        base = rows[BASELINE]
        for row in rows.values():
          row["x_adamw_bytes"] = (row["hbm_bytes_per_param"]
                                  / base["hbm_bytes_per_param"])
          row["x_adamw_compile"] = row["compile_s"] / base["compile_s"]
          row["added_collectives"] = (row["num_collectives"]
                                      - base["num_collectives"])
        cells.append({"topology": slice_.name, "chip": slice_.chip.name,
                      "num_devices": slice_.num_devices, "model": model,
                      "num_params": update_step.count_params(shapes),
                      "sharding": "FSDP" if fsdp else "replicated",
                      "rows": rows})
  return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "jax": jax.__version__, "optax": optax.__version__,
          "lamb_optax": lamb_optax.__version__, "repeats": repeats,
          "cells": cells}


def markdown(result: dict[str, Any]) -> str:
  """One table per (topology, model, sharding) cell."""
  out = [f"jax {result['jax']}, optax {result['optax']}, lamb_optax "
         f"{result['lamb_optax']}; compiled for TPU on a CPU (libtpu), "
         f"median compile of {result['repeats']}. Floors (float32): AdamW "
         f"{ADAMW_FLOOR:.0f} B/param, LAMB {LAMB_FLOOR:.0f} B/param."]
  for cell in result["cells"]:
    out += ["", f"**{cell['topology']}** ({cell['num_devices']} devices), "
            f"BERT-{cell['model']} ({cell['num_params']:,} params, scanned, "
            f"BERT masks), {cell['sharding']}:", "",
            "| optimizer | HBM B/param | x adamw | XLA bytes accessed "
            "B/param | kernels | collectives (added over AdamW) | "
            "compile s (x adamw) |",
            "|---|---:|---:|---:|---:|---|---:|"]
    for name, row in cell["rows"].items():
      kinds = ", ".join(f"{k} {v['count']:.0f}"
                        for k, v in sorted(row["collectives"].items()))
      out.append(
          f"| {name} | {row['hbm_bytes_per_param']:.1f} | "
          f"{row['x_adamw_bytes']:.2f} | {row['xla_bytes_per_param']:.1f} | "
          f"{row['kernels']} | {kinds or '-'} ({row['added_collectives']:+d})"
          f" | {row['compile_s']:.2f} ({row['x_adamw_compile']:.2f}) |")
  return "\n".join(out)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--topologies", nargs="+", default=["v3-16", "v5p-16"],
                      help="TPU slices (xla_report.TOPOLOGIES).")
  parser.add_argument("--models", nargs="+", default=["base", "large"],
                      choices=sorted(MODELS))
  parser.add_argument("--only", nargs="+", default=None,
                      help="Optimizers to run (AdamW is always run).")
  parser.add_argument("--repeats", type=int, default=3,
                      help="Compiles of each optimizer (median kept).")
  parser.add_argument("--quick", action="store_true",
                      help="The tiny model on v5e-4 and v3-16, 1 repeat.")
  parser.add_argument("--out", default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats must be at least 1, got {args.repeats}.")
  for name in args.topologies:
    try:
      xla_report.topology(name)
    except ValueError as e:
      parser.error(f"--topologies: {e}")
  if args.only:
    unknown = [n for n in args.only if n not in OPTIMIZERS]
    if unknown:
      parser.error(f"--only: unknown {unknown}; choose from "
                   f"{list(OPTIMIZERS)}.")
  if args.quick:
    args.topologies, args.models, args.repeats = ["v5e-4", "v3-16"], [
        "tiny"], 1
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  names = [BASELINE] + [n for n in (args.only or OPTIMIZERS)
                        if n != BASELINE]
  result = run(args.topologies, args.models, names, args.repeats)
  print(markdown(result), flush=True)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
