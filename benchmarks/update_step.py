r"""Cost of one optimizer step on a BERT-base-shaped parameter tree.

Times one jitted ``opt.update`` + ``optax.apply_updates`` step (params, state
and gradients donated) for optax's AdamW and LAMB and for lamb_optax's LAMB
(plain and with BERT's bias/LayerNorm masks) and LARS, side by side in one
process: the optimizers take turns every repetition, each call gets fresh
gradients, and every call is timed to ``block_until_ready``. It also reports
how long trace + lower + compile takes on a deeper tree (24 layers, ~400
leaves by default), and two numbers from the compiled executable: XLA's
cost-analysis "bytes accessed" and the temporary buffer size, both per
parameter. On CPU the step is memory bound, so parameter-sized temporaries
(e.g. a materialised update whose norm is needed before it can be scaled) are
what separate a LAMB step from an AdamW step.

Usage (from the repository root)::

  python benchmarks/update_step.py                # BERT-base, ~110M params
  python benchmarks/update_step.py --quick        # tiny shapes, seconds
  python benchmarks/update_step.py --baseline before.json  # before | after
  python benchmarks/update_step.py --compile-only --no-scanned \
      --only "lamb_optax.lamb (BERT" --compile-reps 7  # compile ratios only

It prints a Markdown table and writes the same data as JSON (``--out``).
Compile times are given as wall time and as the CPU time of the process
(which a busy machine inflates less). ``--baseline`` adds the ratios of an
earlier run (its JSON, e.g. of another commit with ``PYTHONPATH`` pointing at
that checkout) to the table, row by row. ``--compile-only`` skips the steps
and prints each compile ratio's median and range over the rounds; run it in
processes that alternate between two checkouts to compare their compile
times (docs/performance.md). This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import optax

import lamb_optax

DEFAULT_OUT = os.path.join("benchmarks", "results", "update_step.json")
BASELINE = "optax.adamw"
DONATION_WARNING = "Some donated buffers were not usable"

# name -> factory of a fresh optax.GradientTransformation.
OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "optax.adamw": lambda: optax.adamw(1e-3, eps=1e-6, weight_decay=0.01),
    "optax.lamb": lambda: optax.lamb(1e-3, weight_decay=0.01),
    "lamb_optax.lamb": lambda: lamb_optax.lamb(1e-3, weight_decay=0.01),
    "lamb_optax.lamb (BERT masks)": lambda: lamb_optax.lamb(
        1e-3, weight_decay=0.01,
        weight_decay_mask=lamb_optax.masks.exclude_bias_and_norm(),
        trust_ratio_mask=lamb_optax.masks.exclude_bias_and_norm()),
    "lamb_optax.lamb(store_direction=True)": lambda: lamb_optax.lamb(
        1e-3, weight_decay=0.01, store_direction=True),
    "lamb_optax.lamb(store_direction=True) (BERT masks)": lambda: lamb_optax.lamb(
        1e-3, weight_decay=0.01, store_direction=True,
        weight_decay_mask=lamb_optax.masks.exclude_bias_and_norm(),
        trust_ratio_mask=lamb_optax.masks.exclude_bias_and_norm()),
    "lamb_optax.lars": lambda: lamb_optax.lars(1e-3, weight_decay=0.01),
}

# The same model with its encoder layers stacked into (layers, ...) leaves, as
# flax.linen.scan / nnx.scan store them. Rows are compared with AdamW on the
# same stacked tree. optax.lamb computes one ratio for the whole stack (a
# different algorithm); lamb_optax gets one ratio per layer from layer_axes.
SCANNED_BASELINE = "optax.adamw [scanned]"
SCANNED_LAYER_AXES = {"embeddings": None, "encoder": 0, "pooler": None}
SCANNED_OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
    SCANNED_BASELINE: OPTIMIZERS["optax.adamw"],
    "optax.lamb [scanned, one ratio per stack]": OPTIMIZERS["optax.lamb"],
    "lamb_optax.lamb(layer_axes) (BERT masks) [scanned]":
        lambda: lamb_optax.lamb(
            1e-3, weight_decay=0.01, layer_axes=SCANNED_LAYER_AXES,
            weight_decay_mask=lamb_optax.masks.exclude_bias_and_norm(),
            trust_ratio_mask=lamb_optax.masks.exclude_bias_and_norm()),
    "lamb_optax.lamb(layer_axes, store_direction=True) (BERT masks) [scanned]":
        lambda: lamb_optax.lamb(
            1e-3, weight_decay=0.01, layer_axes=SCANNED_LAYER_AXES,
            store_direction=True,
            weight_decay_mask=lamb_optax.masks.exclude_bias_and_norm(),
            trust_ratio_mask=lamb_optax.masks.exclude_bias_and_norm()),
    "lamb_optax.lars(layer_axes) [scanned]": lambda: lamb_optax.lars(
        1e-3, weight_decay=0.01, layer_axes=SCANNED_LAYER_AXES),
}


def bert_base_shapes(
    layers: int = 12,
    hidden: int = 768,
    ffn: int = 3072,
    vocab: int = 30522,
    positions: int = 512,
    token_types: int = 2,
    scanned: bool = False,
) -> dict[str, Any]:
  """The parameter shapes of BERT-base, as a nested dict named like Flax linen.

  Embeddings (word, position, token type) with their LayerNorm; ``layers``
  encoder layers, each with query/key/value/output projections, two
  LayerNorms and a two-layer feed-forward block; and the pooler. At the
  default sizes this is 109,482,240 parameters in 199 leaves.

  Args:
    layers: Number of encoder layers.
    hidden: Hidden size.
    ffn: Inner size of the feed-forward block.
    vocab: Vocabulary size.
    positions: Number of position embeddings.
    token_types: Number of token-type embeddings.
    scanned: Stack the encoder layers into leaves of shape ``(layers, ...)``
      under ``shapes['encoder']`` (as ``nn.scan`` does) instead of one
      subtree per layer.

  Returns:
    A nested dict whose leaves are shape tuples, e.g.
    ``shapes['encoder']['layer_3']['attention']['query']['kernel']``, or
    ``shapes['encoder']['attention']['query']['kernel'] == (layers, 768,
    768)`` when scanned.
  """
  def dense(n_in, n_out):
    return {"kernel": (n_in, n_out), "bias": (n_out,)}

  def layer_norm():
    return {"scale": (hidden,), "bias": (hidden,)}

  def encoder_layer():
    return {
        "attention": {
            name: dense(hidden, hidden)
            for name in ("query", "key", "value", "output")},
        "LayerNorm_0": layer_norm(),
        "intermediate": dense(hidden, ffn),
        "output": dense(ffn, hidden),
        "LayerNorm_1": layer_norm(),
    }

  return {
      "embeddings": {
          "word_embeddings": {"embedding": (vocab, hidden)},
          "position_embeddings": {"embedding": (positions, hidden)},
          "token_type_embeddings": {"embedding": (token_types, hidden)},
          "LayerNorm_0": layer_norm(),
      },
      "encoder": (
          jax.tree.map(lambda s: (layers,) + s, encoder_layer(),
                       is_leaf=_is_shape) if scanned else
          {f"layer_{i}": encoder_layer() for i in range(layers)}),
      "pooler": dense(hidden, hidden),
  }


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def count_params(shapes: Any) -> int:
  """Number of parameters in a tree of shape tuples (nothing is allocated)."""
  return sum(math.prod(s) for s in jax.tree.leaves(shapes, is_leaf=_is_shape))


def abstract_params(shapes: Any, dtype=jnp.float32) -> Any:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), shapes,
                      is_leaf=_is_shape)


def random_params(shapes: Any, seed: int = 0, dtype=jnp.float32) -> Any:
  """Random normal * 0.02 parameters with the given shapes."""
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)

  @jax.jit
  def make(key):
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([
        0.02 * jax.random.normal(k, s, dtype) for k, s in zip(keys, leaves)])

  return make(jax.random.key(seed))


def make_step(opt: optax.GradientTransformation) -> Callable[..., Any]:
  """A fresh (un-jitted) step function ``(params, state, grads) -> ...``."""
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    return params, state
  return step


def jit_step(step: Callable[..., Any]) -> Callable[..., Any]:
  return jax.jit(step, donate_argnums=(0, 1, 2))


def _cost(compiled: Any, key: str) -> Optional[float]:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or key not in analysis:
    return None
  return float(analysis[key])


def _memory(compiled: Any) -> dict[str, Optional[int]]:
  fields = ("temp_size_in_bytes", "argument_size_in_bytes",
            "output_size_in_bytes", "alias_size_in_bytes",
            "generated_code_size_in_bytes")
  try:
    stats = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    stats = None
  return {f: (None if stats is None else int(getattr(stats, f, 0)))
          for f in fields}


def kernel_counts(hlo_text: str) -> dict[str, Optional[int]]:
  """Kernels of a compiled executable: its top-level fusions, and how many
  of them are distinct once names and metadata are stripped.

  XLA:CPU compiles each distinct fusion once and reuses it for identical
  ones, so compile time grows with both numbers (about 2 ms per kernel and
  25 ms per distinct kernel on the 2-core machine of docs/performance.md).
  """
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    header = re.match(r"^%?(\S+) \(.*\) -> .* \{$", line)
    if header and not line.startswith("ENTRY"):
      current = header.group(1)
      bodies[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      body = re.sub(r", metadata=\{[^}]*\}", "", line)
      bodies[current].append(re.sub(r"%[\w.\-]+", "%v", body).strip())
  if "ENTRY" not in hlo_text:
    return {"kernels": None, "distinct_kernels": None}
  called = re.findall(r" fusion\(.*?calls=%?([\w.\-]+)",
                      hlo_text[hlo_text.index("ENTRY"):])
  return {"kernels": len(called),
          "distinct_kernels": len({"\n".join(bodies.get(c, [c]))
                                   for c in called})}


def compile_once(make_opt: Callable[[], optax.GradientTransformation],
                 params: Any) -> tuple[dict[str, float], Any]:
  """One trace + lower + compile from scratch (fresh jit, cleared caches):
  its wall and CPU times, and the executable."""
  jax.clear_caches()
  # Every compile starts from a collected heap: else the garbage of earlier
  # compiles is collected in whichever later one triggers a full collection.
  gc.collect()
  opt = make_opt()
  state = jax.eval_shape(opt.init, params)
  jitted = jit_step(make_step(opt))
  c0 = time.process_time()
  t0 = time.perf_counter()
  lowered = jitted.lower(params, state, params)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  return {"total": t2 - t0, "cpu": time.process_time() - c0,
          "lower": t1 - t0, "xla": t2 - t1}, compiled


def time_compile(factories: dict[str, Callable[[], Any]], shapes: Any,
                 repeats: int) -> dict[str, dict[str, Any]]:
  """Compile times of every optimizer, the repetitions interleaved (each
  round compiles every optimizer once, in a rotating order, so that a busy
  machine slows all alike), and the :func:`kernel_counts` of each
  executable."""
  params = abstract_params(shapes)
  names = list(factories)
  times: dict[str, dict[str, list[float]]] = {
      name: {"total": [], "cpu": [], "lower": [], "xla": []}
      for name in names}
  counts = {}
  for rep in range(repeats):
    for name in names[rep % len(names):] + names[:rep % len(names)]:
      measured, compiled = compile_once(factories[name], params)
      for key, value in measured.items():
        times[name][key].append(value)
      counts[name] = kernel_counts(compiled.as_text())
  return {name: {
      "median_s": statistics.median(times[name]["total"]),
      "cpu_median_s": statistics.median(times[name]["cpu"]),
      "trace_lower_median_s": statistics.median(times[name]["lower"]),
      "xla_compile_median_s": statistics.median(times[name]["xla"]),
      "all_s": times[name]["total"],
      "cpu_all_s": times[name]["cpu"],
      **counts[name],
  } for name in names}


def time_steps(shapes: Any, names: Sequence[str], reps: int, warmup: int,
               seed: int = 0) -> tuple[dict[str, list[float]],
                                       dict[str, dict[str, Any]]]:
  """Interleaved step times (seconds) and compiled-executable statistics."""
  n_params = count_params(shapes)
  master_params = random_params(shapes, seed)
  master_grads = random_params(shapes, seed + 1)
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  # A fresh gradient buffer for every call (the step donates it).
  fresh_grads = jax.jit(
      lambda tree, scale: jax.tree.map(lambda g: g * scale, tree))

  runs, analyses = {}, {}
  for name in names:
    opt = OPTIMIZERS[name]()
    params = copy(master_params)
    state = opt.init(params)
    compiled = jit_step(make_step(opt)).lower(
        params, state, master_grads).compile()
    analyses[name] = {
        "bytes_accessed": _cost(compiled, "bytes accessed"),
        "flops": _cost(compiled, "flops"),
        **_memory(compiled),
    }
    for key in ("bytes_accessed", "temp_size_in_bytes"):
      value = analyses[name][key]
      analyses[name][key + "_per_param"] = (
          None if value is None else value / n_params)
    runs[name] = [compiled, params, state]

  times: dict[str, list[float]] = {name: [] for name in names}
  faults: dict[str, list[int]] = {name: [] for name in names}
  for rep in range(warmup + reps):
    # Round-robin, rotating who goes first so no optimizer always follows
    # the same neighbour.
    order = list(names[rep % len(names):]) + list(names[:rep % len(names)])
    for name in order:
      compiled, params, state = runs[name]
      grads = fresh_grads(master_grads, jnp.float32(1.0 + 1e-3 * rep))
      jax.block_until_ready(grads)
      faults0 = _minor_page_faults()
      t0 = time.perf_counter()
      params, state = compiled(params, state, grads)
      jax.block_until_ready((params, state))
      elapsed = time.perf_counter() - t0
      faults1 = _minor_page_faults()
      runs[name][1:] = [params, state]
      if rep >= warmup:
        times[name].append(elapsed)
        faults[name].append(faults1 - faults0)
  for name in names:
    finite = all(bool(jnp.all(jnp.isfinite(x)))
                 for x in jax.tree.leaves(runs[name][1]))
    analyses[name]["params_finite_after_run"] = finite
    # Fresh temporaries are first touched every call: on CPU each new 4 KiB
    # page costs a minor page fault, which is where their time goes.
    analyses[name]["minor_page_faults_per_step_median"] = statistics.median(
        faults[name])
  del runs
  return times, analyses


def _minor_page_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _read_first_line(path: str) -> str:
  try:
    with open(path, encoding="utf-8") as f:
      return f.readline().strip()
  except OSError:
    return ""


def _lamb_optax_commit() -> str:
  """The checkout's commit, with '+dirty' if lamb_optax/ has local changes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(lamb_optax.__file__)))
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
        capture_output=True, text=True, timeout=10).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "lamb_optax"], cwd=root,
        check=True, capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return commit + ("+dirty" if dirty else "")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
  device = jax.devices()[0]
  try:
    usable_cpus = len(os.sched_getaffinity(0))
  except AttributeError:
    usable_cpus = os.cpu_count()
  return {
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "optax": optax.__version__,
      "lamb_optax": lamb_optax.__version__,
      "lamb_optax_commit": _lamb_optax_commit(),
      "lamb_optax_path": os.path.dirname(os.path.abspath(lamb_optax.__file__)),
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": usable_cpus,
      "cpu_model": _cpu_model(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "page_size": resource.getpagesize(),
      "transparent_hugepage": _read_first_line(
          "/sys/kernel/mm/transparent_hugepage/enabled"),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
  }


def _fmt(value: Optional[float], spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def markdown(result: dict[str, Any],
             baseline: Optional[dict[str, Any]] = None) -> str:
  """The table of ``result``; with ``baseline`` (an earlier result), its
  ratios beside each row of the same name."""
  env, cfg = result["environment"], result["config"]
  if cfg.get("compile_only"):
    return _compile_markdown(result)
  lines = [
      f"jax {env['jax']} / jaxlib {env['jaxlib']} / optax {env['optax']} / "
      f"lamb_optax {env['lamb_optax']} ({env['lamb_optax_commit']}) on "
      f"{env['device_kind']} ({env['cpu_model']}, {env['cpu_count']} CPUs); "
      f"{cfg['n_params']:,} params in {cfg['n_leaves']} leaves "
      f"({cfg['layers']} layers), median of {cfg['reps']} interleaved steps; "
      f"compile: {cfg['compile_layers']} layers, {cfg['compile_n_leaves']} "
      f"leaves, median of {cfg['compile_reps']} rounds (x adamw: the "
      "median of each round's ratio to AdamW's compile of that round).",
      "",
      "Rows marked [scanned] use the same model with its encoder layers "
      "stacked into (layers, ...) leaves and compare with AdamW on that "
      "tree.",
      "",
  ]
  header = ("| optimizer | step ms | x adamw | compile s "
            f"({cfg['compile_layers']} layers) | x adamw | compile CPU s | "
            "x adamw | kernels (distinct) | bytes accessed / param | "
            "temp bytes / param |")
  rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  if baseline is not None:
    benv = baseline["environment"]
    lines[-1:-1] = [
        "Before: the run of lamb_optax "
        f"{benv['lamb_optax']} ({benv['lamb_optax_commit']}, "
        f"{benv.get('lamb_optax_path', '')}) of {benv['date']}, same "
        "configuration; its ratios to its own AdamW.", ""]
    header += (" before: step x adamw | before: compile x adamw | before: "
               "compile CPU x adamw | before: kernels (distinct) |")
    rule += "---:|---:|---:|---:|"
  lines += [header, rule]
  before_rows = (baseline or {}).get("optimizers", {})
  for name, row in result["optimizers"].items():
    line = (
        f"| {name} | {row['step_ms_median']:.2f} | "
        f"{row['step_x_adamw']:.2f} | {row['compile_s_median']:.2f} | "
        f"{row['compile_x_adamw']:.2f} | "
        f"{_fmt(row.get('compile_cpu_s_median'), '.2f')} | "
        f"{_fmt(row.get('compile_cpu_x_adamw'), '.2f')} | "
        f"{_fmt(row['compile_kernels'], 'd')} "
        f"({_fmt(row['compile_distinct_kernels'], 'd')}) | "
        f"{_fmt(row['bytes_accessed_per_param'], '.1f')} | "
        f"{_fmt(row['temp_size_in_bytes_per_param'], '.2f')} |")
    if baseline is not None:
      before = before_rows.get(name, {})
      line += (
          f" {_fmt(before.get('step_x_adamw'), '.2f')} | "
          f"{_fmt(before.get('compile_x_adamw'), '.2f')} | "
          f"{_fmt(before.get('compile_cpu_x_adamw'), '.2f')} | "
          f"{_fmt(before.get('compile_kernels'), 'd')} "
          f"({_fmt(before.get('compile_distinct_kernels'), 'd')}) |")
    lines.append(line)
  lines += ["", "Minor page faults per step (fresh temporaries touched "
            f"page by page, {env['page_size']} B pages): " + "; ".join(
                f"{name} {row['minor_page_faults_per_step_median']:,.0f}"
                for name, row in result["optimizers"].items()) + "."]
  return "\n".join(lines)


def _compile_markdown(result: dict[str, Any]) -> str:
  """The table of a ``--compile-only`` run: compile times, the median and
  range of the paired ratios, and kernel counts."""
  env, cfg = result["environment"], result["config"]
  lines = [
      f"jax {env['jax']} / jaxlib {env['jaxlib']} / optax {env['optax']} / "
      f"lamb_optax {env['lamb_optax']} ({env['lamb_optax_commit']}, "
      f"{env.get('lamb_optax_path', '')}) on {env['device_kind']} "
      f"({env['cpu_model']}, {env['cpu_count']} CPUs); compile only: "
      f"{cfg['compile_layers']} layers, {cfg['compile_n_leaves']} leaves, "
      f"{cfg['compile_reps']} rounds; x adamw: the median (and range) of "
      "each round's ratio to AdamW's compile of that round.",
      "",
      f"| optimizer | compile s ({cfg['compile_layers']} layers) | x adamw | "
      "range | compile CPU s | x adamw | kernels (distinct) |",
      "|---|---:|---:|---|---:|---:|---:|",
  ]
  for name, row in result["optimizers"].items():
    ratios = row["compile_x_adamw_all"]
    lines.append(
        f"| {name} | {row['compile_s_median']:.2f} | "
        f"{row['compile_x_adamw']:.2f} | "
        f"{min(ratios):.2f}-{max(ratios):.2f} | "
        f"{row['compile_cpu_s_median']:.2f} | "
        f"{row['compile_cpu_x_adamw']:.2f} | "
        f"{_fmt(row['compile_kernels'], 'd')} "
        f"({_fmt(row['compile_distinct_kernels'], 'd')}) |")
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=20,
                      help="Timed steps per optimizer (default 20).")
  parser.add_argument("--warmup", type=int, default=None,
                      help="Untimed steps per optimizer first (default 3; "
                      "1 with --quick).")
  parser.add_argument("--layers", type=int, default=None,
                      help="Encoder layers of the timed tree (default 12; "
                      "2 with --quick).")
  parser.add_argument("--compile-layers", type=int, default=None,
                      help="Encoder layers of the tree whose compile time is "
                      "measured (default 24; 2 with --quick).")
  parser.add_argument("--compile-reps", type=int, default=None,
                      help="Rounds of compilations (each compiles every "
                      "optimizer once), median reported (default 3; 1 with "
                      "--quick).")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny shapes (hidden 64, vocab 1000) to "
                      "smoke-test the script in seconds.")
  parser.add_argument("--only", default=None,
                      help="Comma-separated substrings: run only the rows "
                      "whose name contains one (the AdamW baselines always "
                      "run), e.g. 'lamb_optax.lamb(store,lars'.")
  parser.add_argument("--no-scanned", action="store_true",
                      help="Skip the scanned-tree rows.")
  parser.add_argument("--compile-only", action="store_true",
                      help="Time the compiles only (no steps): with many "
                      "--compile-reps, the paired compile ratios of "
                      "docs/performance.md.")
  parser.add_argument("--out", default=DEFAULT_OUT,
                      help=f"JSON output path (default {DEFAULT_OUT}).")
  parser.add_argument("--baseline", default=None,
                      help="JSON of an earlier run, whose ratios the table "
                      "shows beside this run's (before | after).")
  args = parser.parse_args(argv)
  quick = args.quick

  def default(value, normal, tiny):
    return value if value is not None else (tiny if quick else normal)

  args.warmup = default(args.warmup, 3, 1)
  args.layers = default(args.layers, 12, 2)
  args.compile_layers = default(args.compile_layers, 24, 2)
  args.compile_reps = default(args.compile_reps, 3, 1)
  for flag in ("reps", "layers", "compile_layers", "compile_reps"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag.replace('_', '-')} must be >= 1")
  if args.warmup < 0:
    parser.error("--warmup must be >= 0")
  if args.compile_only and args.baseline:
    parser.error("--baseline does not apply to --compile-only (compare "
                 "compile times in alternating processes instead)")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark, prints the table, writes JSON; returns the result."""
  args = parse_args(argv)
  with warnings.catch_warnings():
    # The gradients are donated but no output has their shape-and-role to
    # reuse them once params and state are aliased; XLA says so per leaf.
    warnings.filterwarnings("ignore", message=DONATION_WARNING)
    return _run(args)


def _rows(names: Sequence[str], factories: dict[str, Callable[[], Any]],
          baseline: str, shapes: Any, compile_shapes: Any,
          args: argparse.Namespace) -> dict[str, dict[str, Any]]:
  """Times one group of optimizers on one tree, relative to ``baseline``."""
  if args.compile_only:
    times, analyses = None, {name: {} for name in names}
  else:
    saved = dict(OPTIMIZERS)
    OPTIMIZERS.update(factories)
    try:
      times, analyses = time_steps(shapes, names, args.reps, args.warmup)
    finally:
      OPTIMIZERS.clear()
      OPTIMIZERS.update(saved)
  compile_times = time_compile({name: factories[name] for name in names},
                               compile_shapes, args.compile_reps)

  def paired(name, key):
    # Each round compiles every optimizer once: a ratio per round to the
    # baseline's compile of that round, so that a slow spell of the machine
    # slows both sides of a ratio.
    return [t / b for t, b in zip(compile_times[name][key],
                                  compile_times[baseline][key])]

  rows = {}
  for name in names:
    compile_x, cpu_x = paired(name, "all_s"), paired(name, "cpu_all_s")
    rows[name] = {"baseline": baseline}
    if times is not None:
      step = statistics.median(times[name])
      rows[name].update({
          "step_ms_median": 1e3 * step,
          "step_ms_min": 1e3 * min(times[name]),
          "step_ms_all": [1e3 * t for t in times[name]],
          "step_x_adamw": step / statistics.median(times[baseline]),
      })
    rows[name].update({
        "compile_s_median": compile_times[name]["median_s"],
        "compile_trace_lower_s_median":
            compile_times[name]["trace_lower_median_s"],
        "compile_xla_s_median": compile_times[name]["xla_compile_median_s"],
        "compile_s_all": compile_times[name]["all_s"],
        "compile_x_adamw": statistics.median(compile_x),
        "compile_x_adamw_all": compile_x,
        "compile_cpu_s_median": compile_times[name]["cpu_median_s"],
        "compile_cpu_s_all": compile_times[name]["cpu_all_s"],
        "compile_cpu_x_adamw": statistics.median(cpu_x),
        "compile_cpu_x_adamw_all": cpu_x,
        "compile_kernels": compile_times[name]["kernels"],
        "compile_distinct_kernels": compile_times[name]["distinct_kernels"],
        **analyses[name],
    })
  return rows


def _selected(factories: dict[str, Any], baseline: str,
              only: Optional[str]) -> list[str]:
  """The baseline and the rows ``--only`` selects (all without it)."""
  if not only:
    return list(factories)
  wanted = [w for w in only.split(",") if w]
  return [name for name in factories
          if name == baseline or any(w in name for w in wanted)]


def _run(args: argparse.Namespace) -> dict[str, Any]:
  sizes = (dict(hidden=64, ffn=256, vocab=1000, positions=128) if args.quick
           else {})
  shapes = bert_base_shapes(layers=args.layers, **sizes)
  compile_shapes = bert_base_shapes(layers=args.compile_layers, **sizes)
  n_params = count_params(shapes)
  rows = _rows(_selected(OPTIMIZERS, BASELINE, args.only), OPTIMIZERS,
               BASELINE, shapes, compile_shapes, args)
  if not args.no_scanned:
    rows.update(_rows(
        _selected(SCANNED_OPTIMIZERS, SCANNED_BASELINE, args.only),
        SCANNED_OPTIMIZERS, SCANNED_BASELINE,
        bert_base_shapes(layers=args.layers, scanned=True, **sizes),
        bert_base_shapes(layers=args.compile_layers, scanned=True, **sizes),
        args))
  result = {
      "environment": environment(),
      "config": {
          "quick": args.quick,
          "layers": args.layers,
          "n_params": n_params,
          "n_leaves": len(jax.tree.leaves(shapes, is_leaf=_is_shape)),
          "compile_layers": args.compile_layers,
          "compile_n_params": count_params(compile_shapes),
          "compile_n_leaves": len(
              jax.tree.leaves(compile_shapes, is_leaf=_is_shape)),
          "reps": args.reps,
          "warmup": args.warmup,
          "compile_reps": args.compile_reps,
          "compile_only": args.compile_only,
          "dtype": "float32",
          "baseline": BASELINE,
      },
      "optimizers": rows,
  }
  baseline = None
  if args.baseline:
    with open(args.baseline, encoding="utf-8") as f:
      baseline = json.load(f)
  print(markdown(result, baseline))
  write_json(result, args.out)
  return result


def write_json(result: dict[str, Any], path: str) -> None:
  """Writes ``result`` as indented JSON, creating the folder."""
  out_dir = os.path.dirname(path)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
    f.write("\n")
  print(f"\nwrote {path}")


if __name__ == "__main__":
  main(sys.argv[1:])
