r"""Tokenises a corpus once into ArrayRecord shards that train.py reads with grain.

Run it once per corpus, tokenizer and set of sequence lengths, with the
configuration you will train with (it reads the data fields of the config:
``corpus``, ``text_field``, ``held_out_percent``, ``tokenizer`` or
``vocab_size`` and ``lowercase``, ``seq_lengths``, ``examples_per_shard``):

  python examples/bert/prepare_data.py \
      --config=examples/bert/configs/bert_base.py \
      --config.corpus=/data/wiki --config.tokenizer=/data/vocab.txt \
      --config.data_dir=/shared/bert_data

``train.py`` does the same on first use when the data directory
(``config.data_dir``, by default ``WORKDIR/data``) has no shards yet.

What the directory holds:

* ``tokenizer.json``: the tokenizer (the user's, or one trained on the
  training split);
* for each split (``train``, ``held_out``) and each sequence length ``L`` of
  ``seq_lengths``, shards ``<split>-len<L>-<i>.array_record``: the split's
  token stream (documents joined by [SEP]) cut into consecutive windows of
  ``L - 2`` tokens, one window per record (``group_size:1``, so grain can
  read any record), the remainder dropped; a split shorter than one window
  gives one window padded with [PAD];
* ``manifest.json``, written last: the corpus's fingerprint and counts, the
  tokenizer's digest, vocabulary size and special ids, and every shard with
  its number of examples, size and SHA-256.

Each sequence length has its own shard set (as BERT's
``create_pretraining_data.py`` writes one per ``max_seq_length``): a record
is then exactly one example of its phase, so grain's shuffle permutes
examples and each process reads only its own rows, with no cutting at read
time. Tokenisation runs once; the stream is cut at every length in the same
pass.

The preparation streams: documents are read one at a time and tokenised in
blocks of about ``ENCODE_BLOCK_CHARS`` characters by the Rust tokenizer on
all cores (``encode_batch``, in a thread while the previous block is
written), so memory stays bounded whatever the corpus size. It is
deterministic: the same corpus, tokenizer and settings give byte-identical
shards and manifest. (Training a tokenizer is not: the ``tokenizers``
trainer breaks ties in hash-map order, which changes between processes. The
trained ``tokenizer.json`` is saved with the shards, and passing it back as
``config.tokenizer`` reproduces them.)

Everything is written to a staging directory inside the data directory and
moved into place; ``manifest.json`` comes last, so an interrupted
preparation leaves no manifest and a later run prepares again, and a
directory with a manifest is complete. A manifest that does not match the
config (another corpus, tokenizer or sequence length) is an error naming the
field; nothing is overwritten. A shard that is missing, truncated or (when
read) corrupt is an error naming the file; ``config.verify_shards`` checks
every shard's SHA-256 against the manifest when the data is loaded.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
from typing import Any, Iterator, Sequence

from array_record.python import array_record_module
import grain
import ml_collections
import numpy as np
import tokenizers

import corpus as corpus_lib
import input_pipeline
import wordpiece

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT_VERSION = 1
SPLITS = ("train", "held_out")
# One record per group: grain reads single records at random. ArrayRecord's
# default zstd compression is kept: on the 20x synthetic corpus it makes
# records of 256 tokens 16% smaller than uncompressed ones (64 tokens: the
# same size), for about 8 us more per record written and 5 us per record
# read (a few percent of the pipeline's cost per example).
RECORD_OPTIONS = "group_size:1"
ENCODE_BLOCK_CHARS = 1 << 20
_STAGING_PREFIX = ".staging-"


def data_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """``config.data_dir``, or ``WORKDIR/data``."""
  return config.data_dir or os.path.join(workdir, "data")


def corpus_source(corpus: str) -> str:
  """How the manifest names ``config.corpus``: "builtin" or an absolute path."""
  return corpus if corpus == "builtin" else os.path.abspath(corpus)


def tokenizer_digest(tokenizer: tokenizers.Tokenizer) -> str:
  """SHA-256 of the tokenizer's JSON (vocabulary, normaliser, model)."""
  return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def user_tokenizer(config: ml_collections.ConfigDict):
  """``config.tokenizer`` loaded (checked), or None when a tokenizer is trained."""
  if not config.tokenizer:
    return None
  return wordpiece.load_tokenizer(config.tokenizer, config.lowercase)


def model_vocab_size(config: ml_collections.ConfigDict) -> int:
  """Embedding rows: the user tokenizer's vocabulary, else ``vocab_size``."""
  tokenizer = user_tokenizer(config)
  return config.vocab_size if tokenizer is None else tokenizer.get_vocab_size()


def check_inputs(config: ml_collections.ConfigDict) -> None:
  """Cheap checks of the data fields, before anything is read or written.

  Raises:
    ValueError: naming ``corpus`` (no such path, no corpus files, or only
      empty files), ``tokenizer`` (see ``wordpiece.load_tokenizer``),
      ``seq_lengths`` (shorter than 3) or ``examples_per_shard``.
  """
  if config.corpus != "builtin":
    files = corpus_lib.corpus_files(config.corpus)
    if not any(os.path.getsize(path) for path in files):
      raise ValueError(f"`corpus` {config.corpus!r}: every file is empty.")
  user_tokenizer(config)
  for length in config.seq_lengths:
    if length < 3:
      raise ValueError(f"`seq_lengths`: {length} leaves no room for text "
                       "between [CLS] and [SEP] (need at least 3).")
  if config.examples_per_shard < 1:
    raise ValueError(f"`examples_per_shard` must be positive, got "
                     f"{config.examples_per_shard}.")


# ----------------------------------------------------------------------------
# The prepared directory.


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """A prepared data directory: its manifest and tokenizer.

  Attributes:
    directory: The data directory.
    manifest: ``manifest.json``, parsed.
    tokenizer: ``tokenizer.json``, loaded.
    prepared_now: Whether this call wrote it (False: found complete).
  """
  directory: str
  manifest: dict[str, Any]
  tokenizer: tokenizers.Tokenizer
  prepared_now: bool = False

  @property
  def special_ids(self) -> wordpiece.SpecialIds:
    return wordpiece.SpecialIds(**self.manifest["tokenizer"]
                                     ["special_ids"])

  @property
  def token_vocab_size(self) -> int:
    return int(self.manifest["tokenizer"]["vocab_size"])

  def shards(self, split: str, seq_length: int) -> list[dict[str, Any]]:
    return self.manifest["shards"][split][str(seq_length)]

  def num_examples(self, split: str, seq_length: int) -> int:
    return sum(s["examples"] for s in self.shards(split, seq_length))

  def source(self, split: str, seq_length: int) -> "ShardSource":
    """The examples of one split and length: a random-access grain source."""
    return ShardSource(self.directory, self.shards(split, seq_length))

  def masking(self, mask_rate: float) -> input_pipeline.MaskedExample:
    """The per-example map from a record to a masked example."""
    return input_pipeline.MaskedExample(
        vocab_size=self.token_vocab_size,
        token_dtype=self.manifest["token_dtype"],
        special_ids=self.special_ids, mask_rate=mask_rate)

  def describe(self) -> str:
    corpus, counts = self.manifest["corpus"], self.manifest["counts"]
    tokenizer = self.manifest["tokenizer"]
    lengths = ", ".join(str(n) for n in self.manifest["seq_lengths"])
    examples = " + ".join(
        f"{self.num_examples('train', n):,}"
        for n in self.manifest["seq_lengths"])
    origin = ("trained" if tokenizer["source"] == "trained"
              else tokenizer["source"])
    return (f"data: {corpus['name']}; {counts['train']['documents']} training "
            f"documents ({counts['train']['tokens']:,} tokens), "
            f"{counts['held_out']['documents']} held out "
            f"({counts['held_out']['tokens']:,} tokens); WordPiece "
            f"vocabulary {tokenizer['vocab_size']:,} ({origin}); "
            f"{examples} training examples of length {lengths} in "
            f"{self.directory} ({'prepared' if self.prepared_now else 'cached'})")


def corrupt_shard_error(path: str, detail: str) -> ValueError:
  return ValueError(f"`data_dir`: shard {path} is corrupt ({detail}); prepare "
                    "the shards again (delete the directory).")


class ShardSource(grain.sources.ArrayRecordDataSource):
  """Shards of one split and length, read as one random-access grain source.

  Each shard's number of records comes from the manifest, so no shard is
  opened before it is read. A shard that cannot be read (the right size, bad
  bytes) raises a ValueError naming the file and the fix, where
  array_record's ``RuntimeError`` names no file.
  """

  def __init__(self, directory: str, shards: Sequence[dict[str, Any]]):
    self.files = [os.path.join(directory, s["file"]) for s in shards]
    self._ends = list(itertools.accumulate(s["examples"] for s in shards))
    super().__init__([f"{path}[0:{s['examples']}]"
                      for path, s in zip(self.files, shards)])

  def __getitem__(self, record_key):
    try:
      return super().__getitem__(record_key)
    except RuntimeError as e:
      shard = bisect.bisect_right(self._ends, int(record_key))
      raise corrupt_shard_error(self.files[shard], str(e)) from e

  def __getitems__(self, record_keys):
    try:
      return super().__getitems__(record_keys)
    except RuntimeError:  # Read one by one: the bad record names its shard.
      return [self[key] for key in record_keys]


def _mismatch(field: str, directory: str, prepared: Any, asked: Any) -> str:
  return (f"`{field}`: the shards in {directory} were prepared with "
          f"{field} {prepared!r}, but the config asks for {asked!r}. Prepare "
          "them into another `data_dir` (or delete that one), or set "
          f"`{field}` to what they were prepared with.")


def check_manifest(manifest: dict[str, Any], config: ml_collections.ConfigDict,
                   directory: str) -> None:
  """Raises a ValueError naming the first field the shards do not match."""
  if manifest.get("format") != FORMAT_VERSION:
    raise ValueError(f"`data_dir`: {directory} holds shards of format "
                     f"{manifest.get('format')!r}, expected {FORMAT_VERSION}; "
                     "prepare them again.")
  corpus = manifest["corpus"]
  for field, prepared, asked in (
      ("corpus", corpus["source"], corpus_source(config.corpus)),
      ("held_out_percent", corpus["held_out_percent"],
       config.held_out_percent),
      ("text_field", corpus["text_field"], config.text_field)):
    if prepared != asked:
      raise ValueError(_mismatch(field, directory, prepared, asked))
  prepared = manifest["tokenizer"]
  tokenizer = user_tokenizer(config)
  if tokenizer is not None:
    if prepared["digest"] != tokenizer_digest(tokenizer):
      raise ValueError(
          f"`tokenizer`: the shards in {directory} were tokenised with "
          f"{prepared['source']!r} (a {prepared['vocab_size']}-token "
          f"vocabulary), not with {config.tokenizer!r} "
          f"(lowercase={config.lowercase}). Prepare them into another "
          "`data_dir`, or set `tokenizer` to what they were prepared with.")
  else:
    if prepared["source"] != "trained":
      raise ValueError(_mismatch("tokenizer", directory, prepared["source"],
                                 config.tokenizer))
    for field in ("vocab_size", "lowercase"):
      if prepared[f"requested_{field}"] != config[field]:
        raise ValueError(_mismatch(field, directory,
                                   prepared[f"requested_{field}"],
                                   config[field]))
  missing = [n for n in config.seq_lengths if n not in manifest["seq_lengths"]]
  if missing:
    raise ValueError(_mismatch("seq_lengths", directory,
                               tuple(manifest["seq_lengths"]),
                               tuple(config.seq_lengths)))
  for split in SPLITS:
    for shards in manifest["shards"][split].values():
      for shard in shards:
        path = os.path.join(directory, shard["file"])
        if (not os.path.isfile(path)
            or os.path.getsize(path) != shard["bytes"]):
          raise ValueError(
              f"`data_dir`: shard {path} is missing or is not the "
              f"{shard['bytes']} bytes its manifest says; prepare the "
              "shards again (delete the directory).")
        if config.verify_shards and _sha256(path) != shard["sha256"]:
          raise corrupt_shard_error(
              path, "its SHA-256 is not the one in the manifest")


def load(config: ml_collections.ConfigDict, directory: str) -> PreparedData:
  """The prepared data of ``directory``, checked against ``config``.

  Raises:
    ValueError: if the directory has no complete preparation (no manifest),
      or was prepared with another corpus, tokenizer or sequence lengths
      (the error names the field), or a shard is missing or truncated, or
      (with ``config.verify_shards``: every shard is read) its SHA-256 is
      not the manifest's.
  """
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.isfile(path):
    raise ValueError(f"`data_dir`: {directory} has no {MANIFEST_FILE}: no "
                     "complete preparation (run prepare_data.py).")
  with open(path, encoding="utf-8") as f:
    manifest = json.load(f)
  check_manifest(manifest, config, directory)
  tokenizer = tokenizers.Tokenizer.from_file(
      os.path.join(directory, manifest["tokenizer"]["file"]))
  return PreparedData(directory, manifest, tokenizer)


# ----------------------------------------------------------------------------
# Writing.


class _ShardWriter:
  """Cuts one split's token stream into windows of one length, into shards."""

  def __init__(self, directory: str, split: str, seq_length: int,
               token_dtype: np.dtype, examples_per_shard: int, pad_id: int):
    self._directory = directory
    self._prefix = f"{split}-len{seq_length:04d}"
    self._window = seq_length - 2
    self._dtype = token_dtype
    self._examples_per_shard = examples_per_shard
    self._pad_id = pad_id
    self._pending = np.zeros(0, np.int64)
    self._writer = None
    self.shards: list[dict[str, Any]] = []

  def add(self, tokens: np.ndarray) -> None:
    stream = np.concatenate([self._pending, tokens])
    count = len(stream) // self._window
    for window in stream[:count * self._window].reshape(count, self._window):
      self._write(window)
    self._pending = stream[count * self._window:]

  def finish(self) -> list[dict[str, Any]]:
    if not self.shards:  # Shorter than one window: one window, padded.
      self._write(np.pad(self._pending, (0, self._window - len(self._pending)),
                         constant_values=self._pad_id))
    self._close()
    return self.shards

  def _write(self, window: np.ndarray) -> None:
    if self._writer is None or (self.shards[-1]["examples"]
                                == self._examples_per_shard):
      self._close()
      name = f"{self._prefix}-{len(self.shards):05d}.array_record"
      self._writer = array_record_module.ArrayRecordWriter(
          os.path.join(self._directory, name), RECORD_OPTIONS)
      self.shards.append({"file": name, "examples": 0})
    self._writer.write(window.astype(self._dtype).tobytes())
    self.shards[-1]["examples"] += 1

  def _close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _blocks(documents: Iterator[str], held_out_percent: int
            ) -> Iterator[list[tuple[str, str]]]:
  """``(split, document)`` pairs in blocks of about ENCODE_BLOCK_CHARS."""
  block, chars = [], 0
  for doc in documents:
    split = ("held_out" if corpus_lib.is_held_out(doc, held_out_percent)
             else "train")
    block.append((split, doc))
    chars += len(doc)
    if chars >= ENCODE_BLOCK_CHARS:
      yield block
      block, chars = [], 0
  if block:
    yield block


def _encoded_blocks(tokenizer: tokenizers.Tokenizer,
                    blocks: Iterator[list[tuple[str, str]]]):
  """``(block, encodings)``, each block encoded while the previous is used."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = None
    for block in blocks:
      future = pool.submit(tokenizer.encode_batch, [doc for _, doc in block],
                           add_special_tokens=False)
      if pending is not None:
        yield pending[0], pending[1].result()
      pending = (block, future)
    if pending is not None:
      yield pending[0], pending[1].result()


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _corpus_name(corpus: str) -> str:
  return ("builtin (pydoc topics + docstrings)" if corpus == "builtin"
          else corpus)


def _documents(config: ml_collections.ConfigDict) -> Iterator[str]:
  return corpus_lib.iter_documents(config.corpus, config.text_field)


def _tokenizer_for(config: ml_collections.ConfigDict
                   ) -> tuple[tokenizers.Tokenizer, str]:
  """The user's tokenizer, or one trained on the training split."""
  tokenizer = user_tokenizer(config)
  if tokenizer is not None:
    return tokenizer, os.path.abspath(config.tokenizer)
  training = (doc for doc in _documents(config)
              if not corpus_lib.is_held_out(doc, config.held_out_percent))
  return wordpiece.train_tokenizer(training, config.vocab_size,
                                        config.lowercase), "trained"


def _write(config: ml_collections.ConfigDict, staging: str) -> dict[str, Any]:
  """Writes the tokenizer and the shards into ``staging``; the manifest."""
  tokenizer, source = _tokenizer_for(config)
  tokenizer.save(os.path.join(staging, TOKENIZER_FILE))
  special_ids = wordpiece.SpecialIds.of(tokenizer)
  vocab_size = tokenizer.get_vocab_size()
  token_dtype = np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
  lengths = sorted(set(config.seq_lengths))
  writers = {split: [_ShardWriter(staging, split, n, token_dtype,
                                  config.examples_per_shard, special_ids.pad)
                     for n in lengths] for split in SPLITS}
  counts = {split: {"documents": 0, "tokens": 0} for split in SPLITS}
  fingerprint = hashlib.sha256()
  separator = np.asarray([special_ids.sep], np.int64)
  blocks = _blocks(_documents(config), config.held_out_percent)
  for block, encodings in _encoded_blocks(tokenizer, blocks):
    for (split, doc), encoding in zip(block, encodings):
      fingerprint.update(doc.encode("utf-8") + b"\0")
      tokens = np.concatenate([np.asarray(encoding.ids, np.int64), separator])
      counts[split]["documents"] += 1
      counts[split]["tokens"] += len(tokens)
      for writer in writers[split]:
        writer.add(tokens)
  corpus_lib.check_split_sizes(
      _corpus_name(config.corpus), counts["train"]["documents"],
      counts["held_out"]["documents"])
  shards = {split: {str(n): writer.finish()
                    for n, writer in zip(lengths, writers[split])}
            for split in SPLITS}
  for split_shards in shards.values():
    for length_shards in split_shards.values():
      for shard in length_shards:
        path = os.path.join(staging, shard["file"])
        shard.update(bytes=os.path.getsize(path), sha256=_sha256(path))
  return {
      "format": FORMAT_VERSION,
      "corpus": {"source": corpus_source(config.corpus),
                 "name": _corpus_name(config.corpus),
                 "text_field": config.text_field,
                 "held_out_percent": config.held_out_percent,
                 "fingerprint": fingerprint.hexdigest()},
      "tokenizer": {"file": TOKENIZER_FILE, "source": source,
                    "digest": tokenizer_digest(tokenizer),
                    "vocab_size": vocab_size,
                    "requested_vocab_size": (None if config.tokenizer
                                             else config.vocab_size),
                    "requested_lowercase": config.lowercase,
                    "special_ids": dataclasses.asdict(special_ids)},
      "token_dtype": token_dtype.name,
      "seq_lengths": lengths,
      "counts": counts,
      "shards": shards,
  }


def prepare(config: ml_collections.ConfigDict, directory: str) -> bool:
  """Prepares ``directory`` unless it holds a complete preparation.

  Nothing becomes visible until everything is written: the files are
  written to a staging directory, moved into ``directory``, and the manifest
  is written last (atomically). Staging directories left by an interrupted
  preparation are removed first. An existing manifest is left alone (check
  it with ``load``).

  Args:
    config: The data fields (see the module docstring).
    directory: The data directory (created if needed).

  Returns:
    Whether it prepared (False: a manifest was already there).
  """
  if os.path.isfile(os.path.join(directory, MANIFEST_FILE)):
    return False
  check_inputs(config)
  os.makedirs(directory, exist_ok=True)
  for name in os.listdir(directory):
    if name.startswith(_STAGING_PREFIX):
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
  staging = tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=directory)
  try:
    manifest = _write(config, staging)
    for name in sorted(os.listdir(staging)):
      os.replace(os.path.join(staging, name), os.path.join(directory, name))
    tmp = os.path.join(staging, MANIFEST_FILE)
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.write("\n")
    os.replace(tmp, os.path.join(directory, MANIFEST_FILE))
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return True


def prepare_and_load(config: ml_collections.ConfigDict, directory: str,
                     *, is_chief: bool = True,
                     wait: Any = None) -> PreparedData:
  """Prepares ``directory`` if needed (the chief only) and loads it.

  Args:
    config: The data fields.
    directory: The data directory.
    is_chief: Whether this process prepares (process 0 of a job); the others
      only check the inputs, so that a bad field fails on every process.
    wait: Called between the preparation and the loading, by every
      process: a barrier of a multi-process job (None: no barrier). If the
      chief fails while preparing (an unreadable document, a full disk),
      the others wait there until the job's distributed runtime gives up:
      prepare a pod's shards beforehand with this script.

  Returns:
    The prepared data, checked against ``config`` (see ``load``).
  """
  if is_chief:
    prepared_now = prepare(config, directory)
  else:
    check_inputs(config)
    prepared_now = False
  if wait is not None:
    wait()
  return dataclasses.replace(load(config, directory),
                             prepared_now=prepared_now)


if __name__ == "__main__":
  # pylint: disable=g-import-not-at-top
  from absl import app
  from ml_collections import config_flags
  # pylint: enable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "configs", "default.py"),
      "The training configuration (its data fields are used).",
      lock_config=True)

  def _main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = _CONFIG.value
    if not config.data_dir:
      raise app.UsageError("Set --config.data_dir: where the shards go.")
    prepare(config, config.data_dir)
    print(load(config, config.data_dir).describe(), flush=True)

  app.run(_main)
