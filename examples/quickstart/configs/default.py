"""Default configuration: trains in about a minute on a 2-core CPU."""

from __future__ import annotations

import dataclasses
from typing import Optional

# Peak learning rates per optimizer (used when `learning_rate` is None).
# LAMB and LARS move every layer by about `lr * ||layer||` per step, so their
# rates are relative step sizes; AdamW's is an absolute one.
DEFAULT_LEARNING_RATES = {"lamb": 2e-2, "lars": 2e-2, "adamw": 1e-2}


@dataclasses.dataclass(frozen=True)
class Config:
  """Hyperparameters of `train.train_and_evaluate`."""
  # Optimizer: "lamb", "adamw" or "lars". LAMB and LARS use BERT's masks.
  optimizer: str = "lamb"
  learning_rate: Optional[float] = None  # Peak; None: DEFAULT_LEARNING_RATES.
  weight_decay: float = 0.01
  warmup_fraction: float = 0.1  # Linear warmup, then cosine decay to 0.
  steps: int = 1500
  batch_size: int = 1024
  # Model.
  context: int = 32
  embed_dim: int = 16
  hidden: int = 256
  num_layers: int = 2
  # Data and logging.
  held_out_percent: int = 10
  seed: int = 0
  log_every: int = 100
  eval_examples: Optional[int] = 8192  # Held-out windows per progress line.
  final_eval_examples: Optional[int] = None  # None: every held-out position.

  @property
  def peak_learning_rate(self) -> float:
    if self.learning_rate is not None:
      return self.learning_rate
    return DEFAULT_LEARNING_RATES[self.optimizer]


def get_config() -> Config:
  return Config()
