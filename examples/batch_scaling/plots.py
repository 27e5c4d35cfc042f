"""The study's five figures per task (matplotlib, Agg backend, small PNGs).

1. ``<task>_final_metric.png``: the final held-out metric against the batch
   size per optimizer, tuned and transfer panels, bars from the lowest to the
   highest seed.
2. ``<task>_steps_to_target.png`` (the headline): median steps to the
   target against the batch, log-log, one line per optimizer (tuned), with
   the perfect-scaling line (steps halve when the batch doubles) through each
   optimizer's base batch and its critical batch marked (a star, with its
   seed-bootstrap interval as a horizontal bar); censored cells are open
   markers at the run's length.
3. ``<task>_lr_heatmap.png``: the selection-seed mean over learning rate x
   batch, one panel per optimizer; the chosen rate circled.
4. ``<task>_trust_ratios.png``: LAMB's per-layer trust ratios over training
   at the base and at its largest batch (mean over the report seeds, at the
   rate chosen for steps).
5. ``<task>_noise_scale.png``: the gradient noise scale B_simple against
   the held-out loss along each optimizer's base-batch runs, its value at
   the target crossing starred, each critical batch a dashed line.
"""

from __future__ import annotations

import math
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

COLORS = {"lamb": "tab:blue", "adamw": "tab:orange", "lars": "tab:green",
          "nesterov": "tab:red", "muon": "tab:purple"}


def _save(fig, path: str, dpi: int) -> str:
  fig.tight_layout()
  # No timestamp or software version in the file: reruns give equal bytes.
  fig.savefig(path, dpi=dpi, metadata={"Software": None})
  plt.close(fig)
  return path


def plot_final_metric(name, summary, path, dpi):
  batches = summary["batches"]
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
  for ax, arm in zip(axes, ("tuned", "transfer")):
    for opt, cells in summary["cells"][arm].items():
      bs = sorted(cells)
      means = [cells[b]["mean"] for b in bs]
      lo = [means[i] - min(cells[b]["values"]) for i, b in enumerate(bs)]
      hi = [max(cells[b]["values"]) - means[i] for i, b in enumerate(bs)]
      ax.errorbar(bs, means, yerr=[lo, hi], marker="o", ms=3,
                  capsize=2, label=opt, color=COLORS.get(opt))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_title(f"{arm}" + (" (sqrt rule, untuned)" if arm == "transfer"
                             else " (lr tuned per batch)"), fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel(f"held-out {summary['metric']}")
  axes[0].legend(fontsize=7)
  fig.suptitle(f"{name}: final {summary['metric']} at a fixed budget",
               fontsize=10)
  return _save(fig, path, dpi)


def plot_steps_to_target(name, summary, path, dpi):
  batches = summary["batches"]
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  steps_of = {b: summary["steps"][b] for b in batches}
  for opt, cells in summary["cells"]["steps"].items():
    color = COLORS.get(opt)
    xs, ys = [], []
    for b in sorted(cells):
      m = cells[b]["median_steps_to_target"]
      if m is None:
        ax.plot([b], [steps_of[b]], marker="o", mfc="none", color=color,
                ls="none")
      else:
        xs.append(b)
        ys.append(m)
    ax.plot(xs, ys, marker="o", ms=3, color=color, label=opt)
    base = cells[batches[0]]["median_steps_to_target"]
    if base is not None:
      ax.plot(sorted(cells), [base * batches[0] / b for b in sorted(cells)],
              ls=":", color=color, lw=0.8)
    critical = summary["critical"][opt]
    if critical["batch"]:
      low, high = critical["interval"]
      y = cells[critical["batch"]]["median_steps_to_target"]
      low = low or batches[0]
      ax.errorbar([critical["batch"]], [y],
                  xerr=[[critical["batch"] - low], [high - critical["batch"]]],
                  marker="*", ms=11, color=color, mec="black", mew=0.5,
                  capsize=3, lw=1.0, ls="none", alpha=0.8)
  ax.plot(batches, [steps_of[b] for b in batches], color="gray", lw=0.8,
          ls="--", label="budget")
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel("batch size")
  ax.set_ylabel("steps to target (median over seeds)")
  sign = ">=" if summary["higher_is_better"] else "<="
  ax.set_title(f"{name}, tuned for steps: steps to {summary['metric']} "
               f"{sign} {summary['target']:.3g}\ndotted: perfect scaling; "
               "star: critical batch, bar: its interval;\nopen marker: "
               "censored", fontsize=8)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")
  return _save(fig, path, dpi)


def plot_lr_heatmap(name, summary, path, dpi):
  batches = summary["batches"]
  info = summary["cell_info"]
  opts = list(info)
  fig, axes = plt.subplots(1, len(opts), figsize=(2.6 * len(opts), 3.2),
                           squeeze=False)
  # Every rate is a power of sqrt(2) times the initial one: half-octave rows.
  all_lrs = sorted({float(lr) for o in opts for b in info[o]
                    for lr in info[o][b]["selection_means"]})
  logs = sorted({round(2 * math.log2(lr)) for lr in all_lrs})
  rows = list(range(logs[0], logs[-1] + 1))
  label_of = {round(2 * math.log2(lr)): lr for lr in all_lrs}
  values = [m for o in opts for b in info[o]
            for m in info[o][b]["selection_means"].values()]
  vmin, vmax = min(values), max(values)
  cmap = "viridis" if summary["higher_is_better"] else "viridis_r"
  image = None
  for ax, opt in zip(axes[0], opts):
    grid = np.full((len(rows), len(batches)), np.nan)
    for j, b in enumerate(batches):
      for lr, m in info[opt].get(b, {}).get("selection_means", {}).items():
        grid[rows.index(round(2 * math.log2(float(lr)))), j] = m
    image = ax.imshow(grid, origin="lower", aspect="auto", cmap=cmap,
                      vmin=vmin, vmax=vmax, interpolation="nearest")
    tuned = summary["cells"]["tuned"][opt]
    chosen = [tuned[b]["lr"] for b in batches if b in tuned]
    ax.plot(range(len(chosen)),
            [rows.index(round(2 * math.log2(lr))) for lr in chosen],
            "o", mfc="none", mec="white", ms=6)
    ax.set_xticks(range(len(batches)))
    ax.set_xticklabels([str(b) for b in batches], rotation=90, fontsize=6)
    ticks = [i for i, r in enumerate(rows) if r in label_of]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{label_of[rows[i]]:.2g}" for i in ticks],
                       fontsize=6)
    ax.set_title(opt, fontsize=9)
    ax.set_xlabel("batch size", fontsize=7)
  axes[0][0].set_ylabel("peak learning rate", fontsize=7)
  fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8,
               label=f"selection mean {summary['metric']}")
  fig.suptitle(f"{name}: selection-seed mean final {summary['metric']}, "
               "learning rate x batch (circles: chosen for it)",
               fontsize=10)
  fig.savefig(path, dpi=dpi, metadata={"Software": None},
              bbox_inches="tight")
  plt.close(fig)
  return path


def plot_trust_ratios(name, summary, cells, path, dpi):
  batches = summary["optimizer_batches"].get("lamb", summary["batches"])
  chosen = summary["cells"]["steps"].get("lamb", {})
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), sharey=True)
  for ax, batch in zip(axes, (batches[0], batches[-1])):
    rows = [r for c in cells if c["task"] == name
            and c["optimizer"] == "lamb" and c["batch"] == batch
            for r in c["rows"] if r["role"] == "report"
            and r["lr"] == chosen[batch]["lr"]]
    if not rows or "trust_ratios" not in rows[0]:
      ax.set_title(f"batch {batch}: no LAMB report rows", fontsize=9)
      continue
    steps = np.asarray(rows[0]["curve"]["step"], float)
    for layer in rows[0]["trust_ratios"]:
      values = np.mean([r["trust_ratios"][layer] for r in rows], axis=0)
      ax.plot(steps / steps[-1], values, lw=1, label=layer)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the budget")
    ax.set_title(f"batch {batch} (lr {rows[0]['lr']:.3g})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
  axes[0].set_ylabel("LAMB trust ratio")
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, fontsize=5, loc="center left",
               bbox_to_anchor=(0.9, 0.5))
    fig.subplots_adjust(right=0.88, bottom=0.18)
  fig.suptitle(f"{name}: LAMB's per-layer trust ratios", fontsize=10)
  fig.savefig(path, dpi=dpi, metadata={"Software": None},
              bbox_inches="tight")
  plt.close(fig)
  return path


def plot_noise_scale(name, summary, path, dpi):
  """B_simple against the held-out loss along each base-batch run, with
  each optimizer's critical batch (dashed) at the right."""
  fig, ax = plt.subplots(figsize=(5.2, 3.8))
  for opt, noise in summary.get("noise", {}).items():
    if not noise:
      continue
    color = COLORS.get(opt)
    loss = np.asarray(noise["curve"]["loss"], float)
    b = np.asarray(noise["curve"]["b_simple"], float)
    ok = np.isfinite(b) & (b > 0) & np.isfinite(loss)
    ax.plot(loss[ok], b[ok], marker="o", ms=2, lw=1, color=color, label=opt)
    critical = summary["critical"][opt]["batch"]
    if critical:
      ax.axhline(critical, color=color, ls="--", lw=0.8)
    crossings = [c for c in noise["crossing_steps"] if c is not None]
    if (crossings and noise["at_target"] is not None
        and math.isfinite(noise["at_target"])):
      at_loss = np.interp(np.median(crossings),
                          np.asarray(noise["curve"]["step"], float), loss)
      ax.plot([at_loss], [noise["at_target"]], marker="*", ms=10,
              color=color, mec="black", mew=0.5, ls="none")
  ax.set_yscale("log")
  ax.invert_xaxis()
  ax.set_xlabel("held-out loss (training runs left to right)")
  ax.set_ylabel("B_simple (median over report seeds)")
  ax.set_title(f"{name}: gradient noise scale along the base-batch runs\n"
               "star: at the target crossing; dashed: each optimizer's "
               "critical batch", fontsize=8)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3, which="both")
  return _save(fig, path, dpi)


def plot_task(name: str, summary: dict[str, Any], cells, workdir: str,
              dpi: int = 80) -> list[str]:
  """Writes the five figures of one task; returns their paths."""
  return [
      plot_final_metric(name, summary,
                        os.path.join(workdir, f"{name}_final_metric.png"),
                        dpi),
      plot_steps_to_target(
          name, summary, os.path.join(workdir, f"{name}_steps_to_target.png"),
          dpi),
      plot_lr_heatmap(name, summary,
                      os.path.join(workdir, f"{name}_lr_heatmap.png"), dpi),
      plot_trust_ratios(name, summary, cells,
                        os.path.join(workdir, f"{name}_trust_ratios.png"),
                        dpi),
      plot_noise_scale(name, summary,
                       os.path.join(workdir, f"{name}_noise_scale.png"), dpi),
  ]
