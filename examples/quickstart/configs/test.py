"""A tiny configuration for tests: a few seconds on a CPU."""

from __future__ import annotations

import dataclasses

from configs import default


def get_config() -> default.Config:
  return dataclasses.replace(
      default.get_config(), steps=200, batch_size=256, hidden=64,
      log_every=50, eval_examples=2048, final_eval_examples=4096)
