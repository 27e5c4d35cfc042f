r"""Cost of gradient-accumulation micro-steps on a BERT-base-shaped tree.

Times, side by side in one process, one jitted step ``(params, state, grads)
-> (params, state)`` that calls ``opt.update`` and ``optax.apply_updates``
(params, state and gradients donated), for:

* ``gradient add``: ``acc + grads`` into a donated accumulator, the floor;
* ``optax.MultiSteps(optax.lamb)`` and ``optax.MultiSteps(lamb_optax.lamb)``:
  optax's wrapper, which runs the inner update on every call and selects;
* ``lamb_optax.multi_steps(lamb_optax.lamb)``: the inner update only on the
  emitting call (``lax.cond``);
* ``lamb_optax.lamb step``: the inner optimizer alone, no accumulation.

Each wrapper is called ``--every-k`` times per repetition (``k - 1``
non-emitting micro-steps, then the emitting step), and micro-steps and
emitting steps are reported separately. The wrappers take turns every
repetition, each call gets fresh gradients and is timed to
``block_until_ready``. Ratios are to the gradient add and to
``optax.MultiSteps(optax.lamb)``'s step of the same kind. On CPU the step is
memory bound and every fresh parameter-sized temporary costs a page fault per
4 KiB page, so the table also gives minor page faults per step.

Usage (from the repository root)::

  python benchmarks/accumulation.py            # BERT-base, ~110M params
  python benchmarks/accumulation.py --quick    # tiny shapes, seconds

It prints a Markdown table and writes the same data as JSON (``--out``).
This is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

import lamb_optax

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "_lamb_optax_benchmarks_update_step", os.path.join(_HERE, "update_step.py"))
update_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update_step)

DEFAULT_OUT = os.path.join("benchmarks", "results", "accumulation.json")
DONATION_WARNING = "Some donated buffers were not usable"
GRADIENT_ADD = "gradient add"
BASELINE = "optax.MultiSteps(optax.lamb)"
INNER_ALONE = "lamb_optax.lamb step (no accumulation)"

# wrapper name -> factory of (inner optimizer -> wrapped optimizer).
WRAPPERS: dict[str, Callable[[int], optax.GradientTransformation]] = {
    BASELINE: lambda k: optax.MultiSteps(
        optax.lamb(1e-3, weight_decay=0.01), k).gradient_transformation(),
    "optax.MultiSteps(lamb_optax.lamb)": lambda k: optax.MultiSteps(
        lamb_optax.lamb(1e-3, weight_decay=0.01), k).gradient_transformation(),
    "lamb_optax.multi_steps(lamb_optax.lamb)": lambda k: lamb_optax.multi_steps(
        lamb_optax.lamb(1e-3, weight_decay=0.01), k),
}
MICRO, EMIT = "micro-step", "emitting step"
ROWS = ((GRADIENT_ADD,)
        + tuple(f"{name} {kind}" for name in WRAPPERS for kind in (MICRO, EMIT))
        + (INNER_ALONE,))


def _baseline_row(row: str) -> str:
  """The optax.MultiSteps(optax.lamb) row a row is compared with."""
  kind = EMIT if (row.endswith(EMIT) or row == INNER_ALONE) else MICRO
  return f"{BASELINE} {kind}"


def _time_all(shapes: Any, every_k: int, reps: int, warmup: int
              ) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
  n_params = update_step.count_params(shapes)
  master_params = update_step.random_params(shapes, 0)
  master_grads = update_step.random_params(shapes, 1)
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))
  fresh_grads = jax.jit(
      lambda tree, scale: jax.tree.map(lambda g: g * scale, tree))

  # name -> [compiled step, params or accumulator, state, calls per rep]
  runs: dict[str, list[Any]] = {}
  stats: dict[str, dict[str, Any]] = {}

  def add_run(name, step, params, state, calls):
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(
        params, state, master_grads).compile()
    memory = update_step._memory(compiled)  # pylint: disable=protected-access
    temp = memory["temp_size_in_bytes"]
    stats[name] = {"temp_bytes_per_param":
                   None if temp is None else temp / n_params}
    runs[name] = [compiled, params, state, calls]

  add_run(GRADIENT_ADD,
          lambda acc, state, grads: (jax.tree.map(jnp.add, acc, grads), state),
          copy(master_params), (), 1)
  for name, make in list(WRAPPERS.items()) + [
      (INNER_ALONE, lambda k: lamb_optax.lamb(1e-3, weight_decay=0.01))]:
    opt = make(every_k)
    params = copy(master_params)
    calls = 1 if name == INNER_ALONE else every_k
    add_run(name, update_step.make_step(opt), params, opt.init(params), calls)

  times: dict[str, list[float]] = {row: [] for row in ROWS}
  faults: dict[str, list[int]] = {row: [] for row in ROWS}
  names = list(runs)
  for rep in range(warmup + reps):
    # Round-robin, rotating who goes first.
    order = names[rep % len(names):] + names[:rep % len(names)]
    for name in order:
      compiled, params, state, calls = runs[name]
      for call in range(calls):
        grads = fresh_grads(master_grads, jnp.float32(1.0 + 1e-3 * rep))
        jax.block_until_ready(grads)
        faults0 = update_step._minor_page_faults()  # pylint: disable=protected-access
        t0 = time.perf_counter()
        params, state = compiled(params, state, grads)
        jax.block_until_ready((params, state))
        elapsed = time.perf_counter() - t0
        faults1 = update_step._minor_page_faults()  # pylint: disable=protected-access
        if name in WRAPPERS:
          row = f"{name} {EMIT if call == calls - 1 else MICRO}"
        else:
          row = name
        if rep >= warmup:
          times[row].append(elapsed)
          faults[row].append(faults1 - faults0)
      runs[name][1:3] = [params, state]
  for name in names:
    finite = all(bool(jnp.all(jnp.isfinite(x)))
                 for x in jax.tree.leaves(runs[name][1]))
    rows = ([f"{name} {MICRO}", f"{name} {EMIT}"] if name in WRAPPERS
            else [name])
    for row in rows:
      stats[row] = dict(stats[name], params_finite_after_run=finite,
                        minor_page_faults_per_step_median=statistics.median(
                            faults[row]))
  return times, stats


def markdown(result: dict[str, Any]) -> str:
  env, cfg = result["environment"], result["config"]
  lines = [
      f"jax {env['jax']} / jaxlib {env['jaxlib']} / optax {env['optax']} / "
      f"lamb_optax {env['lamb_optax']} ({env['lamb_optax_commit']}) on "
      f"{env['device_kind']} ({env['cpu_model']}, {env['cpu_count']} CPUs); "
      f"{cfg['n_params']:,} float32 params in {cfg['n_leaves']} leaves "
      f"({cfg['layers']} layers); k = {cfg['every_k']}; median of "
      f"{cfg['reps']} interleaved repetitions.",
      "",
      "| step | ms | x gradient add | x optax.MultiSteps(optax.lamb) "
      "same step | minor page faults / step | temp bytes / param |",
      "|---|---:|---:|---:|---:|---:|",
  ]
  for name, row in result["rows"].items():
    temp = row["temp_bytes_per_param"]
    lines.append(
        f"| {name} | {row['ms_median']:.1f} | {row['x_gradient_add']:.2f} | "
        f"{row['x_optax_same_step']:.3f} | "
        f"{row['minor_page_faults_per_step_median']:,.0f} | "
        f"{'n/a' if temp is None else format(temp, '.2f')} |")
  lines += ["", "`x optax.MultiSteps(optax.lamb) same step`: micro-step rows "
            "and the gradient add are divided by its micro-step, emitting "
            "rows and the plain LAMB step by its emitting step. Temp bytes "
            "are XLA's temporary allocation of the whole compiled step (for a "
            "wrapper: the larger of its two branches)."]
  return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=None,
                      help="Timed repetitions (default 10; 3 with --quick). "
                      "Each repetition makes k calls per wrapper.")
  parser.add_argument("--warmup", type=int, default=None,
                      help="Untimed repetitions first (default 1).")
  parser.add_argument("--every-k", type=int, default=2,
                      help="Micro-steps per optimizer step (default 2).")
  parser.add_argument("--layers", type=int, default=None,
                      help="Encoder layers (default 12; 1 with --quick).")
  parser.add_argument("--quick", action="store_true",
                      help="Tiny shapes (hidden 64, vocab 1000) to "
                      "smoke-test the script in seconds.")
  parser.add_argument("--out", default=DEFAULT_OUT,
                      help=f"JSON output path (default {DEFAULT_OUT}).")
  args = parser.parse_args(argv)

  def default(value, normal, tiny):
    return value if value is not None else (tiny if args.quick else normal)

  args.reps = default(args.reps, 10, 3)
  args.warmup = default(args.warmup, 1, 1)
  args.layers = default(args.layers, 12, 1)
  for flag in ("reps", "layers"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1")
  if args.every_k < 2:
    parser.error("--every-k must be >= 2 (k = 1 has no micro-steps)")
  if args.warmup < 0:
    parser.error("--warmup must be >= 0")
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the benchmark, prints the table, writes JSON; returns the result."""
  args = parse_args(argv)
  with warnings.catch_warnings():
    # Donated gradients have no output of their shape-and-role to reuse them.
    warnings.filterwarnings("ignore", message=DONATION_WARNING)
    return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
  sizes = (dict(hidden=64, ffn=256, vocab=1000, positions=128) if args.quick
           else {})
  shapes = update_step.bert_base_shapes(layers=args.layers, **sizes)
  times, stats = _time_all(shapes, args.every_k, args.reps, args.warmup)
  medians = {row: statistics.median(times[row]) for row in ROWS}
  rows = {}
  for row in ROWS:
    rows[row] = {
        "ms_median": 1e3 * medians[row],
        "ms_min": 1e3 * min(times[row]),
        "ms_all": [1e3 * t for t in times[row]],
        "x_gradient_add": medians[row] / medians[GRADIENT_ADD],
        "x_optax_same_step": medians[row] / medians[_baseline_row(row)],
        "compared_with": _baseline_row(row),
        **stats[row],
    }
  result = {
      "environment": update_step.environment(),
      "config": {
          "quick": args.quick,
          "layers": args.layers,
          "n_params": update_step.count_params(shapes),
          "n_leaves": len(jax.tree.leaves(
              shapes, is_leaf=update_step._is_shape)),  # pylint: disable=protected-access
          "every_k": args.every_k,
          "reps": args.reps,
          "warmup": args.warmup,
          "dtype": "float32",
          "baseline": BASELINE,
      },
      "rows": rows,
  }
  print(markdown(result))
  update_step.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
