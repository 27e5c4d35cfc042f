"""The BERT example's metrics: metrics.jsonl, TensorBoard, plot, summary.

* ``MetricWriter`` writes each row (a dict: ``"kind"`` "train" or "eval",
  ``"step"`` and scalars) to ``metrics.jsonl`` and its scalars to TensorBoard
  (tensorboardX), and on resumption drops the rows an interrupted run logged
  after its last checkpoint.
* ``named_trust_ratios`` and ``per_layer_ratios``: LAMB's trust ratios by
  parameter name, and their geometric mean per encoder layer.
* ``plot_metrics`` draws ``training.png`` (loss, learning rate, per-layer
  trust ratios) from ``metrics.jsonl``.

clu's ``metric_writers`` would be the Flax way, but ``import
clu.metric_writers`` needs TensorFlow (clu 0.0.12), which this example does
not install; this module is the small part of it the example needs.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np

import lamb_optax

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
SUMMARY_FILE = "summary.json"
TENSORBOARD_DIR = "tensorboard"


# ----------------------------------------------------------------------------
# Trust ratios by name.


param_name = lamb_optax.param_path  # "encoder/layer_0/attention/query/kernel"


def has_trust_ratios(opt_state) -> bool:
  """Whether ``lamb_optax.trust_ratios`` finds ratios in ``opt_state``."""
  try:
    lamb_optax.trust_ratios(opt_state)
  except ValueError:
    return False
  return True


def named_trust_ratios(opt_state, trust_mask) -> dict[str, Any]:
  """Trust ratios of the adapted leaves: a float, or a list per layer.

  Args:
    opt_state: A state with trust ratios (LAMB, LARS, a preset).
    trust_mask: A tree of bools like the params: the leaves to report.

  Returns:
    ``{param_name: ratio}``; a scanned stack's ratio is a list, one per layer.
  """
  ratios = jax.device_get(lamb_optax.trust_ratios(opt_state))
  named = {}
  for (path, value), adapted in zip(
      jax.tree_util.tree_leaves_with_path(ratios),
      jax.tree.leaves(trust_mask)):
    if adapted:
      value = np.asarray(value, np.float64)
      named[param_name(path)] = (float(value) if value.ndim == 0
                                 else value.reshape(-1).tolist())
  return named


_LAYER = re.compile(r"(?:^|/)layer_(\d+)/")


def per_layer_ratios(named: dict[str, Any]) -> dict[str, float]:
  """Geometric mean of each encoder layer's kernel ratios, plus the rest.

  Args:
    named: :func:`named_trust_ratios`' output. A name with ``layer_<i>/`` is
      layer ``i``'s; a list is one value per layer of a scanned stack; any
      other leaf is grouped under its parent module's name.

  Returns:
    ``{"layer 0": ..., "layer 1": ..., "embeddings/word": ...}``.
  """
  groups: dict[str, list[float]] = {}
  for name, value in named.items():
    values = value if isinstance(value, list) else [value]
    match = _LAYER.search(name)
    for i, v in enumerate(values):
      if match:
        key = f"layer {int(match.group(1))}"
      elif isinstance(value, list):
        key = f"layer {i}"
      else:
        key = name.rsplit("/", 1)[0]
      groups.setdefault(key, []).append(max(v, 1e-12))
  return {k: float(np.exp(np.mean(np.log(v)))) for k, v in groups.items()}


# ----------------------------------------------------------------------------
# Writing.


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The rows of a ``metrics.jsonl``."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
  """Rows to ``metrics.jsonl`` (resumable) and their scalars to TensorBoard.

  Scalars go to TensorBoard as ``train/<key>`` or ``eval/<key>``, and the
  per-layer trust ratios (:func:`per_layer_ratios`) as ``trust_ratio/<key>``.

  Args:
    workdir: Directory of ``metrics.jsonl`` and ``tensorboard/``.
    resume_step: The restored checkpoint's step (0 for a fresh run): rows
      after it, which a stopped run logged after its last checkpoint, are
      dropped (this run logs them again), and so are TensorBoard's.
    enabled: False on every process but the first: writes nothing.
  """

  def __init__(self, workdir: str, resume_step: int = 0,
               enabled: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.enabled = enabled
    self._tensorboard = None
    if not enabled:
      return
    rows = []
    if resume_step and os.path.exists(self.path):
      rows = [r for r in read_metrics(self.path) if r["step"] <= resume_step]
    with open(self.path, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    # Event files are named by the second they were opened in; the suffix
    # keeps a run resumed within that second from overwriting the last one's.
    self._tensorboard = SummaryWriter(
        os.path.join(workdir, TENSORBOARD_DIR),
        purge_step=resume_step + 1 if resume_step else None,
        filename_suffix=f".from_step_{resume_step}")

  def write(self, row: dict[str, Any]) -> None:
    """Appends ``row`` to metrics.jsonl and its scalars to TensorBoard."""
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
    prefix = "eval" if row["kind"] == "eval" else "train"
    for key, value in row.items():
      if isinstance(value, (int, float)) and key not in ("step", "kind"):
        self._tensorboard.add_scalar(f"{prefix}/{key}", value, row["step"])
    for key, value in per_layer_ratios(row.get("trust_ratios", {})).items():
      self._tensorboard.add_scalar(f"trust_ratio/{key}", value, row["step"])

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  """``summary.json``, and the summary on the console."""
  with open(os.path.join(workdir, SUMMARY_FILE), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  tok_s = (f"{summary['tokens_per_sec']:,.0f} tokens/s"
           if summary["tokens_per_sec"] else "no steps run")
  print(f"\nsteps {summary['start_step'] + 1}-{summary['end_step']} of "
        f"{summary['total_steps']} in {summary['train_time_s']:.1f} s "
        f"({tok_s}); wall time {summary['wall_time_s']:.1f} s")
  if summary["final_loss"] is not None:
    print(f"final training loss {summary['final_loss']:.3f}")
  print(f"held-out MLM accuracy {summary['mlm_accuracy']:.3f} (loss "
        f"{summary['eval_loss']:.3f}) vs {summary['baseline_accuracy']:.3f} "
        f"for always predicting {summary['baseline_token']!r}, the best "
        f"constant prediction (sequences of {summary['eval_seq_length']})",
        flush=True)


# ----------------------------------------------------------------------------
# Plotting.


def plot_metrics(metrics_path: str, out_path: str) -> None:
  """Loss, learning rate and per-layer trust ratios against the step."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  rows = read_metrics(metrics_path)
  train = [r for r in rows if r["kind"] == "train"]
  evals = [r for r in rows if r["kind"] == "eval"]
  ratio_rows = [(r["step"], per_layer_ratios(r["trust_ratios"]))
                for r in train if r.get("trust_ratios")]
  panels = 3 if ratio_rows else 2
  fig, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), sharex=True)
  ax = axes[0]
  ax.plot([r["step"] for r in train], [r["loss"] for r in train],
          label="train MLM loss")
  if evals:
    ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-",
            label="held-out MLM loss")
  boundaries = [b["step"] for a, b in zip(train, train[1:])
                if a["phase"] != b["phase"]]
  for ax_ in axes:
    for b in boundaries:
      ax_.axvline(b, color="gray", ls=":", lw=1)
  ax.set_ylabel("loss")
  ax.legend()
  axes[1].plot([r["step"] for r in train],
               [r["learning_rate"] for r in train])
  axes[1].set_ylabel("learning rate")
  if ratio_rows:
    ax = axes[2]
    keys = sorted({k for _, d in ratio_rows for k in d},
                  key=lambda k: (not k.startswith("layer"),
                                 int(k.split()[1]) if k.startswith("layer ")
                                 else 0, k))
    cmap = plt.get_cmap("viridis")
    num_layers = sum(k.startswith("layer ") for k in keys) or 1
    for k in keys:
      steps = [s for s, d in ratio_rows if k in d]
      values = [d[k] for _, d in ratio_rows if k in d]
      if k.startswith("layer "):
        ax.plot(steps, values, label=k,
                color=cmap(int(k.split()[1]) / max(1, num_layers - 1)))
      else:
        ax.plot(steps, values, label=k, ls="--")
    ax.set_yscale("log")
    ax.set_ylabel("trust ratio")
    ax.legend(fontsize=7, ncol=2)
  axes[-1].set_xlabel("step")
  fig.tight_layout()
  fig.savefig(out_path, dpi=90)
  plt.close(fig)
