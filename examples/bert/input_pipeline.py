"""The grain input pipeline over the prepared shards (see prepare_data.py).

``prepare_data.py`` cuts each split's token stream (documents joined by
[SEP]) into consecutive windows of ``seq_length - 2`` tokens and writes them
to ArrayRecord shards once. ``train_dataset`` and ``eval_dataset`` read them
with grain: each example is [CLS] + window + [SEP], then BERT's masking
(``masking.py``) with a random generator derived from (seed, example
index); each process reads only its own rows of every global batch.

The documents are read by ``corpus.py`` and tokenised by ``wordpiece.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from absl import flags
import grain
import numpy as np

from masking import best_constant, frame, mask_tokens, max_predictions
from wordpiece import SpecialIds

__all__ = ("MaskedExample", "best_constant", "eval_dataset", "grain_seed",
           "make_iterator", "max_predictions", "train_dataset")


@dataclasses.dataclass(frozen=True)
class MaskedExample(grain.transforms.RandomMap):
  """A shard record (a window of token ids) -> one masked BERT example.

  [CLS] + window + [SEP], then ``mask_tokens`` with the generator that grain
  derives from the map's seed and the example's index in the dataset.
  """
  vocab_size: int
  token_dtype: str
  special_ids: SpecialIds = SpecialIds()
  mask_rate: float = 0.15

  def random_map(self, element: bytes,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    window = np.frombuffer(element, self.token_dtype).astype(np.int32)
    example = mask_tokens(frame(window[None], self.special_ids), rng,
                          self.vocab_size, self.mask_rate,
                          special_ids=self.special_ids)
    return {k: v[0] for k, v in example.items()}


def grain_seed(*numbers: int) -> int:
  """A 32-bit seed for a grain transformation, from (config.seed, ...)."""
  return int(np.random.SeedSequence(numbers).generate_state(1)[0])


# The last argument of grain_seed for each random transformation.
_SHUFFLE, _MASK, _EVAL = 0, 1, 2


def train_dataset(source: grain.sources.RandomAccessDataSource,
                  masking: MaskedExample, *, batch_size: int,
                  num_micro_batches: int, shard_index: int = 0,
                  shard_count: int = 1, seed: int = 0,
                  phase: int = 0) -> grain.MapDataset:
  """One process's rows of every training batch, as a grain ``MapDataset``.

  The stream is the source repeated, each epoch in a new seeded permutation
  (grain's ``shuffle`` then ``repeat``), each example masked with a
  generator derived from (seed, its index in the stream) (``random_map``).
  The global batch of step ``s`` is examples ``[s B, (s + 1) B)`` of the
  stream, and micro-batch ``m`` its rows ``[m M, (m + 1) M)``
  (``M = B / num_micro_batches``). Each micro-batch is cut into
  ``shard_count`` consecutive blocks of rows, and this dataset holds block
  ``shard_index`` of each, by grain's sharding by slicing
  (``[index::count]``): the rows that this process's devices hold in the
  global array. No other row is read or masked.

  Args:
    source: The training examples of one sequence length.
    masking: The per-example map.
    batch_size: The global batch ``B``.
    num_micro_batches: Micro-batches per step.
    shard_index: This process's block of rows (``utils.process_rows``).
    shard_count: Blocks per micro-batch (the processes).
    seed: ``config.seed``.
    phase: The phase's index: each phase has its own order and masks.

  Returns:
    A dataset whose element ``s`` is the dict of step ``s``'s arrays, of
    shape ``(num_micro_batches, M / shard_count, ...)``.
  """
  micro_batch, remainder = divmod(batch_size, num_micro_batches)
  if remainder or micro_batch % shard_count:
    raise ValueError(
        f"`global_batch_size`/`phase_batch_sizes`: the global batch "
        f"{batch_size} must split into {num_micro_batches} micro-batches "
        f"whose size is a multiple of {shard_count} (the processes: one "
        "block of rows each).")
  dataset = grain.MapDataset.source(source)
  dataset = dataset.shuffle(seed=grain_seed(seed, phase, _SHUFFLE)).repeat()
  dataset = dataset.random_map(masking, seed=grain_seed(seed, phase, _MASK))
  dataset = dataset.batch(micro_batch // shard_count)
  return dataset[shard_index::shard_count].batch(num_micro_batches)


def eval_dataset(source: grain.sources.RandomAccessDataSource,
                 masking: MaskedExample, *, batch_size: int,
                 max_examples: Optional[int] = None, shard_index: int = 0,
                 shard_count: int = 1, seed: int = 0) -> grain.MapDataset:
  """One process's rows of every evaluation batch: each example once.

  The first ``max_examples`` held-out examples, masked once (a fixed seed),
  then padded with rows of zeros (``masked_weights`` 0, so they count for
  nothing) to a whole number of global batches; this process's block of
  rows of each batch, as in ``train_dataset``.

  Args:
    source: The held-out examples of one sequence length.
    masking: The per-example map.
    batch_size: The global evaluation batch (a multiple of ``shard_count``).
    max_examples: At most this many examples (None: all).
    shard_index: This process's block of rows.
    shard_count: Blocks per batch.
    seed: ``config.seed``.

  Returns:
    A finite dataset of dicts of arrays of shape ``(batch_size /
    shard_count, ...)``.
  """
  if batch_size % shard_count:
    raise ValueError(f"`eval_batch_size`: the evaluation batch {batch_size} "
                     f"must be a multiple of the {shard_count} processes.")
  count = len(source) if max_examples is None else min(len(source),
                                                       max_examples)
  dataset = grain.MapDataset.source(source)[:count]
  dataset = dataset.random_map(masking, seed=grain_seed(seed, _EVAL))
  padding = -count % batch_size
  if padding:
    blank = {k: np.zeros_like(v) for k, v in dataset[0].items()}
    dataset = grain.MapDataset.concatenate(
        [dataset, grain.MapDataset.source([blank] * padding)])
  return dataset.batch(batch_size // shard_count)[shard_index::shard_count]


def make_iterator(dataset: grain.MapDataset, *, workers: int = 0,
                  prefetch: int = 2) -> grain.DatasetIterator:
  """A checkpointable iterator over ``dataset`` (``get_state``/``set_state``).

  Args:
    dataset: ``train_dataset`` or ``eval_dataset``.
    workers: Processes that compute elements ahead (grain's ``mp_prefetch``,
      each worker a slice of the elements); 0: threads of this process.
    prefetch: Elements (steps) read ahead, per worker; 0: none, each read
      when asked for.

  Returns:
    The iterator.
  """
  read_options = grain.ReadOptions(num_threads=1 if prefetch else 0,
                                   prefetch_buffer_size=prefetch)
  iter_dataset = dataset.to_iter_dataset(read_options)
  if workers:
    if not flags.FLAGS.is_parsed():
      # mp_prefetch reads grain's absl flags; outside an absl app (a test,
      # a notebook) none were parsed: take their defaults.
      flags.FLAGS.mark_as_parsed()
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, prefetch)))
  return iter(iter_dataset)
