"""The WordPiece tokenizer: trained on the corpus, or a user's.

A lower-case WordPiece tokenizer (``tokenizers``, BERT's normalisation and
pre-tokenisation) trained on the training split (``train_tokenizer``), or a
user's (``load_tokenizer``: BERT's ``vocab.txt`` or a ``tokenizer.json``);
``SpecialIds`` holds the ids of its [PAD], [UNK], [CLS], [SEP] and [MASK].
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import tokenizers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# Ids of the special tokens in every tokenizer trained here (their order).
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))

def train_tokenizer(docs: Sequence[str], vocab_size: int,
                    lowercase: bool = True) -> tokenizers.Tokenizer:
  """A BERT WordPiece tokenizer (special tokens get ids 0..4)."""
  tokenizer = tokenizers.BertWordPieceTokenizer(lowercase=lowercase)
  tokenizer.train_from_iterator(
      docs, vocab_size=vocab_size, min_frequency=2,
      special_tokens=list(SPECIAL_TOKENS), show_progress=False)
  tokenizer = tokenizer._tokenizer  # pylint: disable=protected-access
  # The trainer picks the same tokens every time but numbers tied ones in a
  # hash-map order that changes between processes: renumber them (special
  # tokens first, then sorted) so that the ids, hence the run, are
  # reproducible.
  tokens = sorted(t for t in tokenizer.get_vocab() if t not in SPECIAL_TOKENS)
  tokenizer.model = tokenizers.models.WordPiece(
      {t: i for i, t in enumerate(list(SPECIAL_TOKENS) + tokens)},
      unk_token=UNK, continuing_subword_prefix="##")
  return tokenizer


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The ids of [PAD], [UNK], [CLS], [SEP] and [MASK] in a vocabulary.

  The defaults are those of every tokenizer trained here (0 to 4).
  """
  pad: int = PAD_ID
  unk: int = UNK_ID
  cls: int = CLS_ID
  sep: int = SEP_ID
  mask: int = MASK_ID

  @property
  def ids(self) -> tuple[int, ...]:
    return (self.pad, self.unk, self.cls, self.sep, self.mask)

  @classmethod
  def of(cls, tokenizer: tokenizers.Tokenizer) -> "SpecialIds":
    """The special ids of ``tokenizer`` (see ``load_tokenizer``)."""
    return cls(*(tokenizer.token_to_id(token) for token in SPECIAL_TOKENS))


def _check_special_tokens(vocabulary, path: str) -> None:
  missing = [token for token in SPECIAL_TOKENS if token not in vocabulary]
  if missing:
    raise ValueError(
        f"`tokenizer` {path!r} has no {', '.join(missing)}: BERT's inputs "
        f"and masking need all of {', '.join(SPECIAL_TOKENS)}.")


def load_tokenizer(path: str, lowercase: bool = True) -> tokenizers.Tokenizer:
  """A user's tokenizer: a WordPiece ``vocab.txt`` or a ``tokenizer.json``.

  Args:
    path: ``config.tokenizer``. A ``.json`` file is a ``tokenizers``
      tokenizer, used as it is; any other file is a WordPiece vocabulary, one
      token per line (BERT's ``vocab.txt``), given BERT's normalisation and
      pre-tokenisation (``tokenizers.BertWordPieceTokenizer``).
    lowercase: For a ``vocab.txt``: lower-case and strip accents (BERT's
      uncased models) or not (cased).

  Returns:
    The tokenizer.

  Raises:
    ValueError: if ``path`` is not a file, is not a tokenizer, or lacks one
      of [PAD], [UNK], [CLS], [SEP], [MASK].
  """
  if not os.path.isfile(path):
    raise ValueError(f"`tokenizer`: no such file: {path!r} (expected a "
                     "WordPiece vocab.txt or a tokenizer.json).")
  if path.endswith(".json"):
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"`tokenizer`: {path!r} is not a tokenizers JSON "
                       f"file ({e}).") from e
    _check_special_tokens(tokenizer.get_vocab(), path)
    return tokenizer
  with open(path, encoding="utf-8") as f:
    _check_special_tokens({line.rstrip("\n") for line in f}, path)
  return tokenizers.BertWordPieceTokenizer(
      path, lowercase=lowercase)._tokenizer  # pylint: disable=protected-access
