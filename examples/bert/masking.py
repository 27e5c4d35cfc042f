"""BERT's masked-LM examples: [CLS] + window + [SEP], then the masking.

15% of the non-special tokens of each sequence are predicted; of those 80%
become [MASK], 10% a random non-special token, 10% stay (``mask_tokens``).
``best_constant`` is the baseline every model must beat: always predicting
the most frequent target.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from wordpiece import SpecialIds


def max_predictions(seq_length: int, mask_rate: float = 0.15) -> int:
  """Masked positions per sequence: BERT's 20 at 128, 77 at 512, ..."""
  return max(1, int(round(mask_rate * seq_length)))


def mask_tokens(input_ids: np.ndarray, rng: np.random.Generator,
                vocab_size: int, mask_rate: float = 0.15,
                num_predictions: Optional[int] = None, *,
                special_ids: SpecialIds = SpecialIds()
                ) -> dict[str, np.ndarray]:
  """BERT's masking of a (batch, length) int array.

  In each row, ``round(mask_rate * n)`` of the ``n`` non-special tokens
  (ids other than ``special_ids``) are chosen uniformly without replacement
  (at most ``num_predictions``); each chosen token becomes [MASK] with
  probability 0.8, a uniformly random non-special token with probability
  0.1, and stays with probability 0.1.

  Returns:
    ``input_ids`` (masked), ``input_mask`` (1 on non-[PAD] tokens),
    ``masked_positions``, ``masked_ids`` (the original tokens) and
    ``masked_weights`` (1 on real predictions, 0 on padding), the last three
    of shape (batch, num_predictions).
  """
  batch, length = input_ids.shape
  if num_predictions is None:
    num_predictions = max_predictions(length, mask_rate)
  specials = sorted(special_ids.ids)
  candidate = input_ids != specials[0]
  for special in specials[1:]:
    candidate &= input_ids != special
  num_candidates = candidate.sum(axis=1)
  num_masked = np.minimum(np.rint(mask_rate * num_candidates).astype(np.int64),
                          num_predictions)
  num_masked = np.where(num_candidates > 0, np.maximum(num_masked, 1), 0)
  # A random order of each row's candidates first (non-candidates last).
  keys = np.where(candidate, rng.random((batch, length)), 2.0)
  order = np.argsort(keys, axis=1, kind="stable")[:, :num_predictions]
  weights = np.arange(num_predictions)[None, :] < num_masked[:, None]
  positions = np.where(weights, order, 0)
  rows = np.arange(batch)[:, None]
  masked_ids = np.where(weights, input_ids[rows, positions], 0)

  action = rng.random((batch, num_predictions))
  # Uniform over the non-special ids: a draw from [0, vocab - #specials),
  # stepped past each special id in increasing order.
  random_ids = rng.integers(0, vocab_size - len(specials),
                            size=(batch, num_predictions))
  for special in specials:
    random_ids += random_ids >= special
  replacement = np.where(action < 0.8, special_ids.mask,
                         np.where(action < 0.9, random_ids, masked_ids))
  out = input_ids.copy()
  # Padding slots (weight 0) point at position 0, which they leave as is.
  out[rows, positions] = np.where(weights, replacement, out[rows, positions])
  return {
      "input_ids": out.astype(np.int32),
      "input_mask": (input_ids != special_ids.pad).astype(np.int32),
      "masked_positions": positions.astype(np.int32),
      "masked_ids": masked_ids.astype(np.int32),
      "masked_weights": weights.astype(np.float32),
  }


def frame(windows: np.ndarray,
          special_ids: SpecialIds = SpecialIds()) -> np.ndarray:
  """[CLS] + window + [SEP] for each row."""
  batch = windows.shape[0]
  return np.concatenate(
      [np.full((batch, 1), special_ids.cls, np.int32), windows,
       np.full((batch, 1), special_ids.sep, np.int32)], axis=1)


def best_constant(target_counts: np.ndarray) -> tuple[int, float]:
  """The most frequent target of ``target_counts[id]``: (id, its share)."""
  best = int(np.argmax(target_counts))
  return best, float(target_counts[best] / max(1, np.sum(target_counts)))
