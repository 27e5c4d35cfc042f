"""Character-level text from the docstrings of Python's standard library.

The corpus ships with every Python, so the example runs offline: the
docstrings (``inspect.getdoc``) of a fixed list of standard-library modules
and of the public functions, classes and methods they define, in a fixed
order. Docstrings are assigned to the held-out split by a hash of their text
(about 1 in 10), so the split does not depend on the order of anything.
Characters are mapped to a fixed 96-symbol vocabulary (newline and printable
ASCII; anything else becomes ``?``).

The exact text depends on the Python version (docstrings change between
releases), not on the machine or the run.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import warnings
import zlib
from typing import Iterator

import numpy as np

MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bisect", "calendar",
    "cmd", "codecs", "collections", "colorsys", "concurrent.futures",
    "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime",
    "decimal", "difflib", "dis", "doctest", "email.message", "enum",
    "filecmp", "fileinput", "fnmatch", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html", "html.parser", "http.client", "http.server", "imaplib",
    "inspect", "io", "ipaddress", "itertools", "json", "json.decoder",
    "json.encoder", "locale", "logging", "logging.handlers", "lzma",
    "mailbox", "mimetypes", "numbers", "operator", "optparse", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib",
    "poplib", "pprint", "pstats", "queue", "quopri", "random", "re",
    "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "statistics", "string", "struct",
    "subprocess", "sysconfig", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "types",
    "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree",
    "zipfile", "zipimport",
)

# Newline, then the 95 printable ASCII characters from ' ' to '~'.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
UNKNOWN = "?"
VOCAB_SIZE = len(VOCAB)
_CHAR_TO_ID = np.full(0x110000, VOCAB.index(UNKNOWN), np.uint8)
_CHAR_TO_ID[[ord(c) for c in VOCAB]] = np.arange(VOCAB_SIZE, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Token ids of the two splits and what they were built from."""
  train: np.ndarray      # uint8 ids, shape (n_train,)
  held_out: np.ndarray   # uint8 ids, shape (n_held_out,)
  modules: tuple[str, ...]      # the modules that could be imported
  num_docstrings: tuple[int, int]  # (train, held out)


def _public_docs(module) -> Iterator[str]:
  """The module's docstring, then its own public objects', sorted by name."""
  doc = inspect.getdoc(module)
  if doc:
    yield doc
  for name in sorted(vars(module)):
    if name.startswith("_"):
      continue
    obj = vars(module)[name]
    if not (inspect.isclass(obj) or inspect.isroutine(obj)):
      continue
    if getattr(obj, "__module__", None) != module.__name__:
      continue  # Re-exported from elsewhere: collected where it is defined.
    doc = inspect.getdoc(obj)
    if doc:
      yield doc
    if inspect.isclass(obj):
      for attr in sorted(vars(obj)):
        if attr.startswith("_"):
          continue
        member = vars(obj)[attr]
        if isinstance(member, (staticmethod, classmethod)):
          member = member.__func__
        if inspect.isroutine(member) or isinstance(member, property):
          doc = inspect.getdoc(member)
          if doc:
            yield doc


def docstrings(modules: tuple[str, ...] = MODULES) -> tuple[list[str],
                                                            tuple[str, ...]]:
  """Unique docstrings of ``modules`` in a fixed order, and the modules used.

  Modules that cannot be imported (some builds leave out a few) are skipped.
  """
  seen, docs, used = set(), [], []
  with warnings.catch_warnings():
    # Reading some attributes warns (e.g. the deprecated `typing.io`).
    warnings.simplefilter("ignore")
    for module_name in modules:
      try:
        module = importlib.import_module(module_name)
      except ImportError:
        continue
      used.append(module_name)
      for doc in _public_docs(module):
        doc = doc.replace("\t", "    ").strip()
        if doc and doc not in seen:
          seen.add(doc)
          docs.append(doc)
  return docs, tuple(used)


def is_held_out(doc: str, held_out_percent: int = 10) -> bool:
  return zlib.crc32(doc.encode("utf-8")) % 100 < held_out_percent


def encode(text: str) -> np.ndarray:
  """Text -> uint8 ids in ``VOCAB`` (unknown characters become ``?``)."""
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  return _CHAR_TO_ID[codes]


def decode(ids) -> str:
  return "".join(VOCAB[int(i)] for i in ids)


def load_corpus(held_out_percent: int = 10) -> Corpus:
  """Builds the train and held-out character streams.

  Each split is its docstrings joined by blank lines.
  """
  docs, used = docstrings()
  train_docs = [d for d in docs if not is_held_out(d, held_out_percent)]
  held_out_docs = [d for d in docs if is_held_out(d, held_out_percent)]
  return Corpus(
      train=encode("\n\n".join(train_docs) + "\n\n"),
      held_out=encode("\n\n".join(held_out_docs) + "\n\n"),
      modules=used,
      num_docstrings=(len(train_docs), len(held_out_docs)),
  )


def windows(ids: np.ndarray, starts: np.ndarray,
            context: int) -> tuple[np.ndarray, np.ndarray]:
  """Inputs ``ids[s:s+context]`` and targets ``ids[s+context]`` per start."""
  index = starts[:, None] + np.arange(context + 1)[None, :]
  block = ids[index].astype(np.int32)
  return block[:, :context], block[:, context]


def train_batches(ids: np.ndarray, batch_size: int, context: int,
                  seed: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless batches of windows at uniformly random positions."""
  rng = np.random.default_rng(seed)
  high = len(ids) - context
  while True:
    yield windows(ids, rng.integers(0, high, size=batch_size), context)


def eval_windows(ids: np.ndarray, context: int,
                 max_examples: int | None = None) -> tuple[np.ndarray,
                                                           np.ndarray]:
  """Every position of ``ids`` (or ``max_examples`` evenly spaced ones)."""
  count = len(ids) - context
  if max_examples is None or max_examples >= count:
    starts = np.arange(count)
  else:
    starts = np.linspace(0, count - 1, max_examples).astype(np.int64)
  return windows(ids, starts, context)
