"""Documents: the built-in corpus, a user's files, and the held-out split.

The built-in corpus ships with every Python: the sections of the Python
language reference and library topics that ``help()`` shows
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
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import warnings
import zlib
from typing import Iterable, Iterator

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
  spaces) and empty ones skipped; duplicates are kept (finding them needs
  memory that grows with the corpus).

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


def is_held_out(doc: str, held_out_percent: int) -> bool:
  return zlib.crc32(doc.encode("utf-8")) % 100 < held_out_percent


def check_split_sizes(name: str, num_train: int, num_held_out: int) -> None:
  """Both splits need a document (a missing or empty corpus has none)."""
  if not num_train or not num_held_out:
    raise ValueError(
        f"`corpus` {name!r}: {num_train} training and {num_held_out} "
        "held-out documents; need at least one of each (more text, or "
        "another held_out_percent).")
