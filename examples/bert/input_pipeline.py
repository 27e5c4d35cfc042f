"""Text, a WordPiece tokenizer, BERT's masking and the grain input pipeline.

Documents. The built-in corpus ships with every Python: the sections of the
Python language reference and library topics that ``help()`` shows
(``pydoc_data.topics``, one document per section heading), then the
docstrings (``inspect.getdoc``) of a fixed list of standard-library modules
and of the public classes, functions and methods they define.
``config.corpus = PATH`` replaces it with your own text: a ``.txt`` file (one
document per blank-line-separated paragraph block of at least
``MIN_DOCUMENT_CHARS``), a JSON-lines file (``.jsonl``, one document per
line, text under ``config.text_field``), a Parquet file (``.parquet``, one
document per row of the ``config.text_field`` column), or a directory of
such files. ``iter_documents`` reads them as a stream. A document goes to
the held-out split when a CRC32 of its text falls in the first
``held_out_percent`` of 100, so the split depends on nothing but the text.

Tokenizer. A lower-case WordPiece tokenizer (``tokenizers``, BERT's
normalisation and pre-tokenisation) trained on the training split, or a
user's (``load_tokenizer``: BERT's ``vocab.txt`` or a ``tokenizer.json``);
``SpecialIds`` holds the ids of its [PAD], [UNK], [CLS], [SEP] and [MASK].

Examples. ``prepare_data.py`` cuts each split's token stream (documents
joined by [SEP]) into consecutive windows of ``seq_length - 2`` tokens and
writes them to ArrayRecord shards once. ``train_dataset`` and
``eval_dataset`` read them with grain: each example is [CLS] + window +
[SEP], then BERT's masking (15% of the non-special tokens; of those 80%
become [MASK], 10% a random non-special token, 10% stay) with a random
generator derived from (seed, example index); each process reads only its
own rows of every global batch.

``load_corpus``, ``cached_tokenizer``, ``token_stream``, ``train_batch`` and
``eval_batches`` are the in-memory pipeline of before: a batch sampled at
random positions of the whole token stream as a pure function of
``(seed, step)``. ``examples/batch_scaling`` uses them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import warnings
import zlib
from typing import Iterable, Iterator, Optional, Sequence

from absl import flags
import grain
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


def _normalize(doc: str) -> str:
  return doc.replace("\t", "    ").strip()


def _dedupe(docs: Iterable[str], min_chars: int) -> list[str]:
  seen, out = set(), []
  for doc in map(_normalize, docs):
    if len(doc) >= min_chars and doc not in seen:
      seen.add(doc)
      out.append(doc)
  return out


CORPUS_SUFFIXES = (".txt", ".jsonl", ".parquet")


def corpus_files(path: str) -> list[str]:
  """The files of ``config.corpus``: the file itself, or those under a directory.

  Under a directory, the ``.txt``, ``.jsonl`` and ``.parquet`` files (at any
  depth), sorted by path. A single file is read by its suffix (``.jsonl``,
  ``.parquet``; any other is text).
  """
  if not os.path.exists(path):
    raise ValueError(f"`corpus`: no such file or directory: {path!r} "
                     "(expected 'builtin', a text, .jsonl or .parquet file, "
                     "or a directory of them).")
  if not os.path.isdir(path):
    return [path]
  files = sorted(os.path.join(root, name)
                 for root, _, names in os.walk(path)
                 for name in names if name.endswith(CORPUS_SUFFIXES))
  if not files:
    raise ValueError(f"`corpus`: no .txt, .jsonl or .parquet files under "
                     f"{path!r}.")
  return files


def _lines(path: str) -> Iterator[tuple[str, bool, bool]]:
  """``(line, is_first, is_last)`` of ``text.split("\\n")``, read lazily."""
  with open(path, encoding="utf-8", errors="replace") as f:
    previous, first = None, True
    for line in f:
      if previous is not None:
        yield previous[:-1], first, False  # Only the last may lack "\n".
        first = False
      previous = line
    if previous is None:  # An empty file is one empty line.
      yield "", True, True
    elif previous.endswith("\n"):  # The empty line after the last newline.
      yield previous[:-1], first, False
      yield "", False, True
    else:
      yield previous, first, True


def _paragraphs(path: str) -> Iterator[str]:
  """``re.split(r"\\n\\s*\\n", text)`` of a text file, read line by line.

  A run of whitespace-only lines separates paragraphs, except that the
  first and the last line are never part of a separator (no newline
  precedes or follows them).
  """
  current = None
  for line, is_first, is_last in _lines(path):
    if line.strip() or is_first or is_last:
      current = current or []
      current.append(line)
    elif current is not None:
      yield "\n".join(current)
      current = None
  if current is not None:
    yield "\n".join(current)


def _text_documents(path: str) -> Iterator[str]:
  """Consecutive paragraphs joined until each has ``MIN_DOCUMENT_CHARS``."""
  current = ""
  for paragraph in _paragraphs(path):
    current = f"{current}\n\n{paragraph}" if current else paragraph
    if len(current) >= MIN_DOCUMENT_CHARS:
      yield current
      current = ""
  if current:
    yield current


def _jsonl_documents(path: str, text_field: str) -> Iterator[str]:
  """The ``text_field`` string of each line's JSON object."""
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"`corpus`: line {line_number} of {path!r} is not "
                         f"JSON ({e}).") from e
      text = record.get(text_field) if isinstance(record, dict) else None
      if not isinstance(text, str):
        raise ValueError(
            f"`text_field`: line {line_number} of {path!r} has no string "
            f"field {text_field!r} (expected one JSON object per line with "
            "the document's text under `text_field`).")
      yield text


def _parquet_documents(path: str, text_field: str) -> Iterator[str]:
  """The ``text_field`` column of a Parquet file, read in record batches."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  parquet = pq.ParquetFile(path)
  schema = parquet.schema_arrow
  if text_field not in schema.names:
    raise ValueError(f"`text_field`: {path!r} has no column {text_field!r} "
                     f"(its columns: {', '.join(schema.names)}).")
  column_type = schema.field(text_field).type
  if not (pa.types.is_string(column_type)
          or pa.types.is_large_string(column_type)):
    raise ValueError(f"`text_field`: column {text_field!r} of {path!r} holds "
                     f"{column_type}, expected strings.")
  for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
    yield from (text for text in batch.column(0).to_pylist() if text)


def _file_documents(path: str, text_field: str) -> Iterator[str]:
  if path.endswith(".jsonl"):
    return _jsonl_documents(path, text_field)
  if path.endswith(".parquet"):
    return _parquet_documents(path, text_field)
  return _text_documents(path)


def iter_documents(corpus: str, text_field: str = "text") -> Iterator[str]:
  """The documents of ``config.corpus``, one at a time, in a fixed order.

  Memory stays bounded whatever the corpus size: files are read line by line
  or (Parquet) in record batches. Documents are stripped (tabs become four
  spaces) and empty ones skipped; unlike ``load_corpus``, duplicates are
  kept (finding them needs memory that grows with the corpus).

  Args:
    corpus: "builtin", or a path (see ``corpus_files``).
    text_field: The field of a JSON line, or the column of a Parquet file,
      that holds the text.

  Yields:
    The documents.
  """
  if corpus == "builtin":
    yield from builtin_documents()
    return
  for path in corpus_files(corpus):
    for doc in map(_normalize, _file_documents(path, text_field)):
      if doc:
        yield doc


def user_documents(path: str, text_field: str = "text") -> list[str]:
  """Documents of a file or of the files under a directory, deduplicated.

  A text file is cut at blank lines, and consecutive paragraphs are joined
  until a document has at least ``MIN_DOCUMENT_CHARS`` characters; a JSON
  line or a Parquet row is one document.
  """
  return _dedupe((doc for file_path in corpus_files(path)
                  for doc in _file_documents(file_path, text_field)),
                 min_chars=1)


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
  check_split_sizes(name, len(train), len(held_out))
  return Corpus(train=train, held_out=held_out, name=name)


def check_split_sizes(name: str, num_train: int, num_held_out: int) -> None:
  """Both splits need a document (a missing or empty corpus has none)."""
  if not num_train or not num_held_out:
    raise ValueError(
        f"`corpus` {name!r}: {num_train} training and {num_held_out} "
        "held-out documents; need at least one of each (more text, or "
        "another held_out_percent).")


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


def _frame(windows: np.ndarray,
           special_ids: SpecialIds = SpecialIds()) -> np.ndarray:
  """[CLS] + window + [SEP] for each row."""
  batch = windows.shape[0]
  return np.concatenate(
      [np.full((batch, 1), special_ids.cls, np.int32), windows,
       np.full((batch, 1), special_ids.sep, np.int32)], axis=1)


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
  return best_constant(np.bincount(masked_ids[masked_weights > 0]))


def best_constant(target_counts: np.ndarray) -> tuple[int, float]:
  """The most frequent target of ``target_counts[id]``: (id, its share)."""
  best = int(np.argmax(target_counts))
  return best, float(target_counts[best] / max(1, np.sum(target_counts)))


# ----------------------------------------------------------------------------
# The grain pipeline over prepared shards (see prepare_data.py).


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
    example = mask_tokens(_frame(window[None], self.special_ids), rng,
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
