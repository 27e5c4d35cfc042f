"""The study's masked-LM data, in memory: a batch is a function of (seed, step).

The BERT example tokenises its corpus once into shards and reads them with
grain. The study needs every training batch of a trial at once, for a small
corpus, as a pure function of ``(seed, step)``: a batch of windows at random
positions of the whole token stream. It builds them from the BERT example's
own pieces, imported from ``examples/bert`` (not copied): the document reader
(``corpus.py``), the WordPiece tokenizer (``wordpiece.py``) and BERT's
masking and best constant (``masking.py``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
import sys
from typing import Optional

import numpy as np
import tokenizers

_BERT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bert")


def _bert_modules(*names: str) -> list:
  """``examples/bert/<name>.py`` for each name (they import one another)."""
  sys.path.insert(0, _BERT_DIR)
  try:
    return [importlib.import_module(name) for name in names]
  finally:
    sys.path.remove(_BERT_DIR)


corpus_lib, masking, wordpiece = _bert_modules("corpus", "masking",
                                               "wordpiece")
SPECIAL_TOKENS = wordpiece.SPECIAL_TOKENS
best_constant = masking.best_constant


@dataclasses.dataclass(frozen=True)
class Corpus:
  """The two splits as documents, and a fingerprint of their text."""
  train: list[str]
  held_out: list[str]
  name: str

  @property
  def fingerprint(self) -> str:
    digest = hashlib.sha256()
    for doc in self.train:
      digest.update(doc.encode("utf-8"))
      digest.update(b"\0")
    return digest.hexdigest()[:16]


def load_corpus(corpus: str = "builtin",
                held_out_percent: int = 10) -> Corpus:
  """The documents of ``corpus`` (``corpus.iter_documents``), deduplicated,
  split by document."""
  docs = list(dict.fromkeys(corpus_lib.iter_documents(corpus)))
  name = ("builtin (pydoc topics + docstrings)" if corpus == "builtin"
          else corpus)
  train = [d for d in docs if not corpus_lib.is_held_out(d, held_out_percent)]
  held_out = [d for d in docs if corpus_lib.is_held_out(d, held_out_percent)]
  corpus_lib.check_split_sizes(name, len(train), len(held_out))
  return Corpus(train=train, held_out=held_out, name=name)


def cached_tokenizer(corpus: Corpus, vocab_size: int, cache_dir: str,
                     lowercase: bool = True
                     ) -> tuple[tokenizers.Tokenizer, bool]:
  """Loads the tokenizer cached in ``cache_dir``, or trains and caches one.

  The cache is keyed by the training text, the vocabulary size and the case
  handling, so another corpus gets its own file.

  Returns:
    The tokenizer, and whether it was loaded from the cache.
  """
  key = f"{corpus.fingerprint}-v{vocab_size}-{'uncased' if lowercase else 'cased'}"
  path = os.path.join(cache_dir, f"wordpiece-{key}.json")
  if os.path.exists(path):
    return tokenizers.Tokenizer.from_file(path), True
  tokenizer = wordpiece.train_tokenizer(corpus.train, vocab_size, lowercase)
  for token_id, token in enumerate(SPECIAL_TOKENS):
    assert tokenizer.token_to_id(token) == token_id, token
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tokenizer.save(tmp)
  os.replace(tmp, path)  # Atomic: concurrent processes agree on one file.
  return tokenizer, False


def token_stream(tokenizer: tokenizers.Tokenizer,
                 docs: list[str]) -> np.ndarray:
  """int32 ids of ``docs`` (no [CLS]), each document followed by [SEP]."""
  encodings = tokenizer.encode_batch(list(docs), add_special_tokens=False)
  pieces = []
  for encoding in encodings:
    pieces.append(np.asarray(encoding.ids, np.int32))
    pieces.append(np.asarray([wordpiece.SEP_ID], np.int32))
  return np.concatenate(pieces)


def train_batch(stream: np.ndarray, step: int, batch_size: int,
                seq_length: int, vocab_size: int, seed: int,
                mask_rate: float = 0.15) -> dict[str, np.ndarray]:
  """The training batch of ``step``: a pure function of ``(seed, step)``."""
  rng = np.random.default_rng((seed, step))
  window = seq_length - 2
  if len(stream) <= window:
    stream = np.pad(stream, (0, window + 1 - len(stream)))  # [PAD] = 0
  starts = rng.integers(0, len(stream) - window, size=batch_size)
  windows = stream[starts[:, None] + np.arange(window)[None, :]]
  return masking.mask_tokens(masking.frame(windows), rng, vocab_size,
                             mask_rate)


def eval_batches(stream: np.ndarray, seq_length: int, vocab_size: int,
                 seed: int, max_examples: Optional[int] = None,
                 mask_rate: float = 0.15) -> dict[str, np.ndarray]:
  """Consecutive windows of the held-out stream (:func:`eval_windows`),
  masked once (fixed seed)."""
  rng = np.random.default_rng((seed, 2**31 - 1, seq_length))
  return masking.mask_tokens(eval_windows(stream, seq_length, max_examples),
                             rng, vocab_size, mask_rate)


def eval_windows(stream: np.ndarray, seq_length: int,
                 max_examples: Optional[int] = None) -> np.ndarray:
  """The held-out windows of :func:`eval_batches`, framed and unmasked.

  ``(count, seq_length)`` int32: [CLS] + window + [SEP], the windows that
  ``eval_batches`` (with the same ``seq_length`` and ``max_examples``)
  masks, so that
  ``eval_windows(...)[i, masked_positions[i, j]]`` is ``masked_ids[i, j]``
  and the token left of it is the target's original left neighbour (for
  :func:`tasks.bigram_cross_entropy`).
  """
  window = seq_length - 2
  count = max(1, len(stream) // window)
  if max_examples is not None:
    count = min(count, max_examples)
  padded = np.pad(stream, (0, max(0, count * window - len(stream))))
  windows = padded[:count * window].reshape(count, window)
  return masking.frame(windows)
