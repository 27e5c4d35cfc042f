"""Text, a WordPiece tokenizer and BERT's masked-LM batches, all offline.

The built-in corpus ships with every Python: the sections of the Python
language reference and library topics that ``help()`` shows
(``pydoc_data.topics``, one document per section heading), then the
docstrings (``inspect.getdoc``) of a fixed list of standard-library modules
and of the public classes, functions and methods they define. A document goes
to the held-out split when a CRC32 of its text falls in the first
``held_out_percent`` of 100, so the split depends on nothing but the text.
``config.corpus = PATH`` replaces it with your own ``.txt`` file or a
directory of them (one document per blank-line-separated paragraph block of
at least ``MIN_DOCUMENT_CHARS``).

A WordPiece tokenizer (``tokenizers``, BERT's normalisation and
pre-tokenisation, lower case) is trained on the training split and cached in
the workdir; a rerun with the same corpus and vocabulary size loads it.

Batches are a pure function of ``(seed, step)``: each example is ``[CLS]``,
a window of the training token stream (documents joined by ``[SEP]``) at a
position drawn from ``numpy.random.default_rng((seed, step))``, ``[SEP]``;
then BERT's masking (15% of the non-special tokens; of those 80% become
``[MASK]``, 10% a random non-special token, 10% stay). So a resumed run sees
exactly the batches an uninterrupted one would, with no data state to save
beyond the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import os
import re
import warnings
import zlib
from typing import Iterator, Optional, Sequence

import numpy as np
import tokenizers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
# Ids of the special tokens in every tokenizer trained here (their order).
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
MIN_DOCUMENT_CHARS = 200

MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar",
    "cmd", "codecs", "collections", "concurrent.futures", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email.message", "enum", "filecmp",
    "fileinput", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "locale", "logging",
    "logging.handlers", "lzma", "mailbox", "mimetypes", "numbers", "operator",
    "optparse", "pathlib", "pdb", "pickle", "pickletools", "pkgutil",
    "platform", "plistlib", "poplib", "pprint", "pstats", "queue", "random",
    "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "socketserver", "statistics", "string",
    "struct", "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom",
    "xml.etree.ElementTree", "zipfile",
)

_HEADING_UNDERLINE = re.compile(r"([*=\-~^])\1{2,}")
# Lines of one repeated punctuation mark (heading underlines, rules): trivial
# to predict, so they would inflate the masked-LM accuracy.
_RULE_LINE = re.compile(r"^[ \t]*([*=\-~^#_+.])\1{2,}[ \t]*$\n?", re.MULTILINE)


# ----------------------------------------------------------------------------
# Documents.


def _topic_sections() -> list[str]:
  """``pydoc_data.topics``, cut into one document per section heading."""
  from pydoc_data import topics  # pylint: disable=import-outside-toplevel
  sections = []
  for name in sorted(topics.topics):
    lines = topics.topics[name].split("\n")
    current = []
    for i, line in enumerate(lines):
      is_heading = (i + 1 < len(lines) and line.strip()
                    and _HEADING_UNDERLINE.fullmatch(lines[i + 1].strip()))
      if is_heading and current:
        sections.append("\n".join(current))
        current = []
      current.append(line)
    sections.append("\n".join(current))
  return sections


def _public_docstrings(module) -> Iterator[str]:
  """The module's docstring, then its own public objects', sorted by name."""
  yield inspect.getdoc(module) or ""
  for name in sorted(vars(module)):
    obj = vars(module)[name]
    if name.startswith("_") or not (inspect.isclass(obj)
                                    or inspect.isroutine(obj)):
      continue
    if getattr(obj, "__module__", None) != module.__name__:
      continue  # Re-exported: collected where it is defined.
    yield inspect.getdoc(obj) or ""
    if inspect.isclass(obj):
      for attr in sorted(vars(obj)):
        member = vars(obj)[attr]
        if isinstance(member, (staticmethod, classmethod)):
          member = member.__func__
        if not attr.startswith("_") and (inspect.isroutine(member)
                                         or isinstance(member, property)):
          yield inspect.getdoc(member) or ""


def _stdlib_docstrings() -> list[str]:
  docs = []
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # e.g. deprecated attributes of typing
    for module_name in MODULES:
      try:
        module = importlib.import_module(module_name)
      except ImportError:  # Some builds leave a module out.
        continue
      docs.extend(_public_docstrings(module))
  return docs


def builtin_documents() -> list[str]:
  """The built-in corpus: reference sections, then docstrings, deduplicated."""
  docs = [_RULE_LINE.sub("", doc)
          for doc in _topic_sections() + _stdlib_docstrings()]
  return _dedupe(docs, min_chars=40)


def _dedupe(docs: Sequence[str], min_chars: int) -> list[str]:
  seen, out = set(), []
  for doc in docs:
    doc = doc.replace("\t", "    ").strip()
    if len(doc) >= min_chars and doc not in seen:
      seen.add(doc)
      out.append(doc)
  return out


def user_documents(path: str) -> list[str]:
  """Documents of a ``.txt`` file or of the ``.txt`` files under a directory.

  Each file is cut at blank lines, and consecutive paragraphs are joined until
  a document has at least ``MIN_DOCUMENT_CHARS`` characters.
  """
  if os.path.isdir(path):
    files = sorted(os.path.join(root, name)
                   for root, _, names in os.walk(path)
                   for name in names if name.endswith(".txt"))
  else:
    files = [path]
  if not files:
    raise ValueError(f"`corpus`: no .txt files under {path!r}.")
  docs = []
  for file_path in files:
    with open(file_path, encoding="utf-8", errors="replace") as f:
      paragraphs = re.split(r"\n\s*\n", f.read())
    current = ""
    for paragraph in paragraphs:
      current = f"{current}\n\n{paragraph}" if current else paragraph
      if len(current) >= MIN_DOCUMENT_CHARS:
        docs.append(current)
        current = ""
    if current:
      docs.append(current)
  return _dedupe(docs, min_chars=1)


def is_held_out(doc: str, held_out_percent: int) -> bool:
  return zlib.crc32(doc.encode("utf-8")) % 100 < held_out_percent


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
  """The built-in corpus (``"builtin"``) or a path's, split by document."""
  if corpus == "builtin":
    docs, name = builtin_documents(), "builtin (pydoc topics + docstrings)"
  else:
    docs, name = user_documents(corpus), corpus
  train = [d for d in docs if not is_held_out(d, held_out_percent)]
  held_out = [d for d in docs if is_held_out(d, held_out_percent)]
  if not train or not held_out:
    raise ValueError(
        f"`corpus` {name!r}: {len(train)} training and {len(held_out)} "
        "held-out documents; need at least one of each (more text, or "
        "another held_out_percent).")
  return Corpus(train=train, held_out=held_out, name=name)


# ----------------------------------------------------------------------------
# Tokenizer.


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
  tokenizer = train_tokenizer(corpus.train, vocab_size, lowercase)
  for token_id, token in enumerate(SPECIAL_TOKENS):
    assert tokenizer.token_to_id(token) == token_id, token
  os.makedirs(cache_dir, exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  tokenizer.save(tmp)
  os.replace(tmp, path)  # Atomic: concurrent processes agree on one file.
  return tokenizer, False


def token_stream(tokenizer: tokenizers.Tokenizer,
                 docs: Sequence[str]) -> np.ndarray:
  """int32 ids of ``docs`` (no [CLS]), each document followed by [SEP]."""
  encodings = tokenizer.encode_batch(list(docs), add_special_tokens=False)
  pieces = []
  for encoding in encodings:
    pieces.append(np.asarray(encoding.ids, np.int32))
    pieces.append(np.asarray([SEP_ID], np.int32))
  return np.concatenate(pieces)


# ----------------------------------------------------------------------------
# Masked-LM examples.


def max_predictions(seq_length: int, mask_rate: float = 0.15) -> int:
  """Masked positions per sequence: BERT's 20 at 128, 77 at 512, ..."""
  return max(1, int(round(mask_rate * seq_length)))


def mask_tokens(input_ids: np.ndarray, rng: np.random.Generator,
                vocab_size: int, mask_rate: float = 0.15,
                num_predictions: Optional[int] = None) -> dict[str, np.ndarray]:
  """BERT's masking of a (batch, length) int array.

  In each row, ``round(mask_rate * n)`` of the ``n`` non-special tokens
  (ids >= ``len(SPECIAL_TOKENS)``) are chosen uniformly without replacement
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
  candidate = input_ids >= len(SPECIAL_TOKENS)
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
  random_ids = rng.integers(len(SPECIAL_TOKENS), vocab_size,
                            size=(batch, num_predictions))
  replacement = np.where(action < 0.8, MASK_ID,
                         np.where(action < 0.9, random_ids, masked_ids))
  out = input_ids.copy()
  # Padding slots (weight 0) point at position 0, which they leave as is.
  out[rows, positions] = np.where(weights, replacement, out[rows, positions])
  return {
      "input_ids": out.astype(np.int32),
      "input_mask": (input_ids != PAD_ID).astype(np.int32),
      "masked_positions": positions.astype(np.int32),
      "masked_ids": masked_ids.astype(np.int32),
      "masked_weights": weights.astype(np.float32),
  }


def _frame(windows: np.ndarray) -> np.ndarray:
  """[CLS] + window + [SEP] for each row."""
  batch = windows.shape[0]
  return np.concatenate([np.full((batch, 1), CLS_ID, np.int32), windows,
                         np.full((batch, 1), SEP_ID, np.int32)], axis=1)


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
  return mask_tokens(_frame(windows), rng, vocab_size, mask_rate)


def eval_batches(stream: np.ndarray, seq_length: int, vocab_size: int,
                 seed: int, max_examples: Optional[int] = None,
                 mask_rate: float = 0.15) -> dict[str, np.ndarray]:
  """Consecutive windows of the held-out stream, masked once (fixed seed)."""
  window = seq_length - 2
  count = max(1, len(stream) // window)
  if max_examples is not None:
    count = min(count, max_examples)
  padded = np.pad(stream, (0, max(0, count * window - len(stream))))
  windows = padded[:count * window].reshape(count, window)
  rng = np.random.default_rng((seed, 2**31 - 1, seq_length))
  return mask_tokens(_frame(windows), rng, vocab_size, mask_rate)


def constant_baseline(masked_ids: np.ndarray,
                      masked_weights: np.ndarray) -> tuple[int, float]:
  """The best constant prediction of masked tokens: (token id, accuracy).

  The most frequent target among the given (held-out) masked tokens, so no
  constant prediction does better on them.
  """
  targets = masked_ids[masked_weights > 0]
  counts = np.bincount(targets)
  best = int(np.argmax(counts))
  return best, float(counts[best] / max(1, len(targets)))


def describe(corpus: Corpus, tokenizer: tokenizers.Tokenizer,
             train_stream: np.ndarray, held_out_stream: np.ndarray) -> str:
  return (f"data: {corpus.name}; {len(corpus.train)} training documents "
          f"({len(train_stream):,} tokens), {len(corpus.held_out)} held out "
          f"({len(held_out_stream):,} tokens); WordPiece vocabulary "
          f"{tokenizer.get_vocab_size():,}")
