"""The BERT example's data path: shards prepared once, read with grain.

examples/bert/prepare_data.py (streamed, deterministic, atomic preparation;
the manifest checked against the config), input_pipeline.py's grain
datasets (a new permutation per epoch, masking from (seed, index), each
process's rows of every batch, every held-out example once) and their
iterator state in orbax checkpoints; a user's vocab.txt and a JSON-lines
corpus end to end; every bad input's named error; and two processes over
loopback reading disjoint rows whose union is the single-process batch,
with the single-process losses. Tiny corpora and shards, so that it stays
cheap.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import helpers

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "bert"
_MODULES = ("train", "recipe", "steps", "models", "input_pipeline",
            "corpus", "wordpiece", "masking", "prepare_data", "utils",
            "metrics", "configs",
            "configs.default", "configs.test")
_WORKER = pathlib.Path(__file__).resolve().parent / "bert_multiprocess_worker.py"
_WORDS = ("the quick brown fox jumps over lazy dog while a patient teacher "
          "explains lesson to curious students who write notes about every "
          "river mountain and city they visit in summer").split()
# A BERT-like vocabulary: [PAD] first, then unused slots, the other special
# tokens further on (as in BERT's vocab.txt), words, letters and "##" pieces.
_VOCAB = (["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]",
           "[MASK]"] + sorted(set(_WORDS) | set("abcdefghijklmnopqrstuvwxyz"))
          + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"])


@pytest.fixture(scope="module")
def bert():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield dict(ip=load("input_pipeline"), corpus=load("corpus"),
               wordpiece=load("wordpiece"), masking=load("masking"),
               prep=load("prepare_data"),
               train=load("train"), utils=load("utils"),
               test_config=load("configs.test"))


def _documents(count: int = 90, seed: int = 0) -> list[str]:
  """Paragraphs of at least 200 characters (one document each)."""
  rng = np.random.default_rng(seed)
  docs = [" ".join(rng.choice(_WORDS, int(rng.integers(60, 100))))
          for _ in range(count)]
  assert min(map(len, docs)) >= 200  # One paragraph is one document.
  return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The same documents as .txt, .jsonl and .parquet, and a vocab.txt."""
  root = tmp_path_factory.mktemp("corpus")
  docs = _documents()
  (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
  with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
    for doc in docs:
      f.write(json.dumps({"id": len(doc), "body": doc}) + "\n")
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  pq.write_table(pa.table({"body": docs}), root / "corpus.parquet",
                 row_group_size=16)
  (root / "vocab.txt").write_text("\n".join(_VOCAB) + "\n")
  return dict(docs=docs, txt=str(root / "corpus.txt"),
              jsonl=str(root / "corpus.jsonl"),
              parquet=str(root / "corpus.parquet"),
              vocab=str(root / "vocab.txt"))


def _config(bert, files, data_dir, **overrides):
  config = bert["test_config"].get_config()
  config.update(dict(corpus=files["txt"], tokenizer=files["vocab"],
                     held_out_percent=20, seq_lengths=(16, 32),
                     examples_per_shard=100, data_dir=str(data_dir),
                     global_batch_size=8, num_micro_batches=2,
                     eval_batch_size=8, eval_examples=20))
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def prepared(bert, corpus, tmp_path_factory):
  """The corpus prepared once with the vocab.txt: (config, PreparedData)."""
  config = _config(bert, corpus, tmp_path_factory.mktemp("shards"))
  assert bert["prep"].prepare(config, config.data_dir)
  return config, bert["prep"].load(config, config.data_dir)


def _records(data, split, length):
  source = data.source(split, length)
  dtype = data.manifest["token_dtype"]
  return np.stack([np.frombuffer(source[i], dtype)
                   for i in range(len(source))]).astype(np.int32)


def _originals(batch):
  """The unmasked rows of a batch: masked positions get their targets back."""
  ids = batch["input_ids"].reshape(-1, batch["input_ids"].shape[-1]).copy()
  positions = batch["masked_positions"].reshape(len(ids), -1)
  targets = batch["masked_ids"].reshape(len(ids), -1)
  weights = batch["masked_weights"].reshape(len(ids), -1) > 0
  rows = np.nonzero(weights)[0]
  ids[rows, positions[weights]] = targets[weights]
  return ids


# ----------------------------------------------------------------------------
# Preparation.


def test_shards_hold_the_token_stream_in_windows(bert, corpus, prepared):
  """Records = consecutive windows of the split's stream (documents + [SEP])."""
  config, data = prepared
  docs = list(bert["corpus"].iter_documents(corpus["txt"]))
  held_out = [bert["corpus"].is_held_out(d, config.held_out_percent)
              for d in docs]
  splits = (("train", [d for d, h in zip(docs, held_out) if not h]),
            ("held_out", [d for d, h in zip(docs, held_out) if h]))
  tokenizer = bert["wordpiece"].load_tokenizer(corpus["vocab"])
  special = data.special_ids
  assert (special.pad, special.unk, special.cls, special.sep,
          special.mask) == (0, 3, 4, 5, 6)
  manifest = data.manifest
  assert manifest["tokenizer"]["vocab_size"] == len(_VOCAB)
  for name, docs in splits:
    ids = [tokenizer.encode(d, add_special_tokens=False).ids for d in docs]
    stream = np.concatenate([np.asarray(i + [special.sep]) for i in ids])
    assert manifest["counts"][name] == {"documents": len(docs),
                                        "tokens": len(stream)}
    for length in (16, 32):
      window = length - 2
      count = len(stream) // window
      expected = stream[:count * window].reshape(count, window)
      np.testing.assert_array_equal(_records(data, name, length), expected)
      shards = data.shards(name, length)
      assert [s["examples"] for s in shards] == (
          [100] * (count // 100) + ([count % 100] if count % 100 else []))
  assert len(data.shards("train", 16)) > 2  # Several shards, read as one.


def test_preparation_is_byte_identical_and_formats_agree(bert, corpus,
                                                         prepared, tmp_path):
  """The CLI in another process, from .jsonl and .parquet: the same shards."""
  config, data = prepared
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  again = tmp_path / "again"
  result = subprocess.run(
      [sys.executable, str(_EXAMPLE / "prepare_data.py"),
       f"--config={_EXAMPLE / 'configs' / 'test.py'}",
       f"--config.corpus={corpus['txt']}",
       f"--config.tokenizer={corpus['vocab']}",
       "--config.held_out_percent=20", "--config.seq_lengths=(16, 32)",
       "--config.examples_per_shard=100", f"--config.data_dir={again}"],
      env=env, capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "training examples of length 16, 32" in result.stdout
  names = sorted(p.name for p in pathlib.Path(data.directory).iterdir())
  assert names == sorted(p.name for p in again.iterdir())
  for name in names:
    assert (again / name).read_bytes() == (
        pathlib.Path(data.directory) / name).read_bytes(), name
  # The same documents from JSON lines and Parquet: the same shards.
  prep = bert["prep"]
  for kind in ("jsonl", "parquet"):
    other = _config(bert, corpus, tmp_path / kind, corpus=corpus[kind],
                    text_field="body")
    prep.prepare(other, other.data_dir)
    manifest = prep.load(other, other.data_dir).manifest
    assert manifest["shards"] == data.manifest["shards"], kind
    assert manifest["corpus"]["fingerprint"] == (
        data.manifest["corpus"]["fingerprint"])


def test_documents_stream_from_every_format(bert, corpus):
  reader = bert["corpus"]
  assert list(reader.iter_documents(corpus["txt"])) == corpus["docs"]
  for kind in ("jsonl", "parquet"):
    assert list(reader.iter_documents(corpus[kind], "body")) == corpus["docs"]


def test_a_trained_tokenizer_is_saved_and_reproduces_the_shards(
    bert, corpus, tmp_path):
  """Unset `tokenizer`: one is trained; passing it back gives the same data."""
  prep = bert["prep"]
  config = _config(bert, corpus, tmp_path / "trained", tokenizer="",
                   vocab_size=120)
  prep.prepare(config, config.data_dir)
  data = prep.load(config, config.data_dir)
  assert data.manifest["tokenizer"]["source"] == "trained"
  assert data.special_ids == bert["wordpiece"].SpecialIds()
  saved = os.path.join(config.data_dir, prep.TOKENIZER_FILE)
  again = _config(bert, corpus, tmp_path / "again", tokenizer=saved)
  prep.prepare(again, again.data_dir)
  assert prep.load(again, again.data_dir).manifest["shards"] == (
      data.manifest["shards"])
  # The shards of a trained tokenizer also load when it is named.
  prep.load(_config(bert, corpus, config.data_dir, tokenizer=saved),
            config.data_dir)


# ----------------------------------------------------------------------------
# Reading with grain.


def _train(bert, data, **kwargs):
  args = dict(batch_size=8, num_micro_batches=2, seed=0)
  args.update(kwargs)
  return bert["ip"].train_dataset(data.source("train", 16), data.masking(0.15),
                                  **args)


def test_epochs_are_new_permutations_and_masks_are_fresh(bert, prepared):
  _, data = prepared
  records = _records(data, "train", 16)
  count = len(records)
  dataset = _train(bert, data)
  steps = -(-3 * count // 8)  # Three epochs.
  batches = [dataset[s] for s in range(steps)]
  rows = np.concatenate([_originals(b) for b in batches])
  np.testing.assert_array_equal(rows[:, 0], data.special_ids.cls)
  np.testing.assert_array_equal(rows[:, -1], data.special_ids.sep)
  index = {tuple(r): i for i, r in enumerate(records)}
  assert len(index) == count  # Windows of random words are distinct.
  order = np.asarray([index[tuple(r)] for r in rows[:, 1:-1]])
  epochs = [order[e * count:(e + 1) * count] for e in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(count))  # Each example once.
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(count))
  # An example seen in two epochs is masked differently (fresh masks).
  masks = np.concatenate([
      b["masked_positions"].reshape(-1, b["masked_positions"].shape[-1])
      for b in batches])
  first = {int(o): i for i, o in enumerate(epochs[0])}
  second = {int(o): i + count for i, o in enumerate(epochs[1])}
  same = [np.array_equal(masks[first[o]], masks[second[o]]) for o in first]
  assert np.mean(same) < 0.5
  # Deterministic: the same seed gives the same batches, another seed not.
  again = _train(bert, data)
  for s in (0, 5):
    for key, value in batches[s].items():
      np.testing.assert_array_equal(again[s][key], value)
  assert not np.array_equal(_train(bert, data, seed=1)[0]["input_ids"],
                            batches[0]["input_ids"])
  assert not np.array_equal(_train(bert, data, phase=1)[0]["input_ids"],
                            batches[0]["input_ids"])


def test_process_blocks_tile_the_global_batch(bert, prepared):
  """Blocks of 2 or 4 processes, side by side, are the one-process batch."""
  _, data = prepared
  single = _train(bert, data, batch_size=16)
  for count in (2, 4):
    blocks = [_train(bert, data, batch_size=16, shard_index=i,
                     shard_count=count) for i in range(count)]
    for step in (0, 1, 40):  # 40: past the first epoch.
      for key, value in single[step].items():
        assert value.shape[:2] == (2, 8)
        np.testing.assert_array_equal(
            np.concatenate([b[step][key] for b in blocks], axis=1), value)


def test_masking_with_a_bert_vocabulary_skips_every_special_id(bert):
  """Candidates and random replacements avoid ids 0, 3, 4, 5, 6, uniformly."""
  special = bert["wordpiece"].SpecialIds(pad=0, unk=3, cls=4, sep=5, mask=6)
  vocab_size = 40
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab_size, (20000, 32))
  out = bert["masking"].mask_tokens(ids, np.random.default_rng(1),
                                    vocab_size, special_ids=special)
  weights = out["masked_weights"] > 0
  rows = np.nonzero(weights)[0]
  positions = out["masked_positions"][weights]
  original = ids[rows, positions]
  assert not np.isin(original, special.ids).any()
  new = out["input_ids"][rows, positions]
  replaced = new[(new != special.mask) & (new != original)]
  counts = np.bincount(replaced, minlength=vocab_size)
  assert not counts[list(special.ids)].any()
  others = np.delete(counts, special.ids)
  assert len(replaced) > 5000
  assert others.min() > 0.75 * others.mean() and (
      others.max() < 1.25 * others.mean()), others
  np.testing.assert_array_equal(out["input_mask"], (ids != 0).astype(int))


def test_eval_reads_every_example_once_and_pads(bert, prepared):
  ip = bert["ip"]
  _, data = prepared
  source = data.source("held_out", 16)
  count = len(source)
  assert count % 8  # A last, padded batch.
  records = _records(data, "held_out", 16)
  single = list(ip.eval_dataset(source, data.masking(0.15), batch_size=8,
                                seed=0))
  assert len(single) == -(-count // 8)
  rows = np.concatenate([_originals(b)
                         for b in single])[:count]
  np.testing.assert_array_equal(rows[:, 1:-1], records)
  weights = np.concatenate([b["masked_weights"] for b in single])
  assert weights[:count].sum(axis=1).min() > 0
  np.testing.assert_array_equal(weights[count:], 0.0)
  # Two processes: their blocks, side by side, are the one-process batches.
  blocks = [list(ip.eval_dataset(source, data.masking(0.15), batch_size=8,
                                 shard_index=i, shard_count=2, seed=0))
            for i in range(2)]
  for b, (first, second) in enumerate(zip(*blocks)):
    np.testing.assert_array_equal(
        np.concatenate([first["input_ids"], second["input_ids"]]),
        single[b]["input_ids"])
  capped = list(ip.eval_dataset(source, data.masking(0.15), batch_size=8,
                                max_examples=5, seed=0))
  assert len(capped) == 1 and capped[0]["masked_weights"][5:].sum() == 0
  np.testing.assert_array_equal(capped[0]["input_ids"][:5],
                                single[0]["input_ids"][:5])


def _manager(path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.CheckpointManager(
      str(path), options=ocp.CheckpointManagerOptions(create=True))


@pytest.mark.parametrize("workers", [0, 1])
def test_iterator_state_resumes_mid_epoch_exactly(bert, prepared, tmp_path,
                                                  workers):
  """Saved with the checkpoint, restored: the batches continue exactly."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ip, utils = bert["ip"], bert["utils"]
  _, data = prepared
  count = len(data.source("train", 16))
  stop, total = count // 8 - 3, count // 8 + 4  # Resume, then a new epoch.

  def iterator():
    return ip.make_iterator(_train(bert, data), workers=workers, prefetch=3)

  uninterrupted = iterator()
  expected = [next(uninterrupted) for _ in range(total)]
  first = iterator()
  for _ in range(stop):
    next(first)
  params = {"w": jnp.ones(3)}
  manager = _manager(tmp_path / "checkpoints")
  utils.save_checkpoint(manager, stop, params, {"m": jnp.zeros(3)}, 0, first)
  manager.wait_until_finished()
  next(first)  # Read on after the save: the saved state must not move.
  manager.close()
  manager = _manager(tmp_path / "checkpoints")
  resumed = iterator()
  _, _, step = utils.restore_checkpoint(manager, stop, params,
                                        {"m": jnp.zeros(3)}, 0, resumed)
  manager.close()
  assert step == stop
  for s in range(stop, total):
    batch = next(resumed)
    for key, value in expected[s].items():
      np.testing.assert_array_equal(batch[key], value, err_msg=f"{s} {key}")
  for it in (uninterrupted, first, resumed):
    bert["train"]._close(it)  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# End to end: a user's vocab.txt and JSON lines.


def test_vocab_txt_and_json_lines_train_end_to_end(bert, corpus, tmp_path):
  config = _config(bert, corpus, tmp_path / "data", corpus=corpus["jsonl"],
                   text_field="body", seq_lengths=(16,), phase_fractions=(1.0,),
                   total_steps=4, eval_every=4, checkpoint_every=4)
  summary = bert["train"].train_and_evaluate(config, str(tmp_path / "work"))
  assert summary["data_prepared"] and summary["end_step"] == 4
  rows = [json.loads(line) for line in
          (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if r["kind"] == "train"]
  assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
  # The vocabulary size comes from vocab.txt: the initial loss is
  # log(len(vocab.txt)), not log(config.vocab_size).
  assert train_rows[0]["loss"] == pytest.approx(np.log(len(_VOCAB)), abs=0.2)
  assert config.vocab_size != len(_VOCAB)
  assert summary["baseline_token"] in _VOCAB
  assert os.path.isfile(tmp_path / "work" / "checkpoints" / "4" /
                        "data_iterator" / "process_0-of-1.json")


# ----------------------------------------------------------------------------
# Bad input: a named error, and nothing (half-)written.


def _leaves_nothing(path):
  return not os.path.exists(path) or not os.listdir(path)


@pytest.mark.parametrize("case, message", [
    ("missing", r"`corpus`: no such file"),
    ("no_corpus_files", r"`corpus`: no \.txt, \.jsonl or \.parquet"),
    ("empty.txt", r"`corpus` .*every file is empty"),
    ("blank.txt", r"`corpus` .*0 training and 0 held-out documents"),
    ("bad.jsonl", r"`text_field`: line 2 .*'body'"),
])
def test_bad_corpus_is_named_and_writes_nothing(bert, corpus, tmp_path, case,
                                                message):
  (tmp_path / "no_corpus_files").mkdir()
  (tmp_path / "no_corpus_files" / "notes.md").write_text("not a corpus")
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "blank.txt").write_text("\n  \n\t\n")
  (tmp_path / "bad.jsonl").write_text('{"body": "a text"}\n{"text": "x"}\n')
  data_dir = tmp_path / "data"
  config = _config(bert, corpus, data_dir, corpus=str(tmp_path / case),
                   text_field="body")
  with pytest.raises(ValueError, match=message):
    bert["prep"].prepare(config, str(data_dir))
  assert _leaves_nothing(data_dir)


def test_bad_tokenizer_is_named(bert, corpus, tmp_path):
  prep = bert["prep"]
  missing = _config(bert, corpus, tmp_path / "a",
                    tokenizer=str(tmp_path / "vocab.txt"))
  with pytest.raises(ValueError, match=r"`tokenizer`: no such file"):
    prep.prepare(missing, missing.data_dir)
  no_mask = tmp_path / "no_mask.txt"
  no_mask.write_text("\n".join(t for t in _VOCAB if t != "[MASK]"))
  config = _config(bert, corpus, tmp_path / "b", tokenizer=str(no_mask))
  with pytest.raises(ValueError, match=r"`tokenizer` .* has no \[MASK\]"):
    prep.prepare(config, config.data_dir)
  # A tokenizer.json without [CLS] and [SEP].
  import tokenizers  # pylint: disable=import-outside-toplevel
  vocab = [t for t in _VOCAB if t not in ("[CLS]", "[SEP]")]
  plain = tokenizers.Tokenizer(tokenizers.models.WordPiece(
      {t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  plain.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  json_path = tmp_path / "tokenizer.json"
  plain.save(str(json_path))
  config = _config(bert, corpus, tmp_path / "c", tokenizer=str(json_path))
  with pytest.raises(ValueError, match=r"has no \[CLS\], \[SEP\]"):
    prep.prepare(config, config.data_dir)
  # Before any model is built or data read, in train_and_evaluate too.
  with pytest.raises(ValueError, match=r"`tokenizer`"):
    bert["train"].train_and_evaluate(config, str(tmp_path / "work"))
  for name in ("a", "b", "c"):
    assert _leaves_nothing(tmp_path / name)


@pytest.mark.parametrize("field, value, message", [
    ("seq_lengths", (16, 64), r"`seq_lengths`: .*\(16, 32\).*\(16, 64\)"),
    ("tokenizer", "", r"`tokenizer`"),
    ("held_out_percent", 10, r"`held_out_percent`"),
    ("corpus", "builtin", r"`corpus`: .*'builtin'"),
])
def test_shards_of_other_settings_are_refused(bert, corpus, prepared, field,
                                              value, message):
  config, data = prepared
  other = config.copy_and_resolve_references()
  other[field] = value
  with pytest.raises(ValueError, match=message):
    bert["prep"].load(other, data.directory)


def test_another_tokenizer_or_vocabulary_size_is_refused(bert, corpus,
                                                         prepared, tmp_path):
  config, data = prepared
  other_vocab = tmp_path / "other.txt"
  other_vocab.write_text("\n".join(_VOCAB + ["extra"]))
  other = config.copy_and_resolve_references()
  other.tokenizer = str(other_vocab)
  with pytest.raises(ValueError, match=r"`tokenizer`: the shards .* were "
                     r"tokenised with"):
    bert["prep"].load(other, data.directory)
  trained = _config(bert, corpus, tmp_path / "trained", tokenizer="",
                    vocab_size=120)
  bert["prep"].prepare(trained, trained.data_dir)
  trained.vocab_size = 150
  with pytest.raises(ValueError, match=r"`vocab_size`: .* 120.* 150"):
    bert["prep"].load(trained, trained.data_dir)


def test_a_batch_the_processes_or_devices_do_not_divide(bert, prepared):
  _, data = prepared
  with pytest.raises(ValueError, match=r"`global_batch_size`.* 12 .* 2 "
                     r"micro-batches .* multiple of 4"):
    _train(bert, data, batch_size=12, shard_count=4)
  with pytest.raises(ValueError, match=r"`eval_batch_size`"):
    bert["ip"].eval_dataset(data.source("held_out", 16), data.masking(0.15),
                            batch_size=6, shard_count=4)
  config = bert["test_config"].get_config()
  config.global_batch_size = 12
  with pytest.raises(ValueError, match=r"`global_batch_size`.* 12 .* 2 "
                     r"micro-batches .* multiple of the 4 devices"):
    bert["train"].make_phases(config, num_devices=4)


def test_an_interrupted_preparation_is_never_taken_for_complete(
    bert, corpus, tmp_path, monkeypatch):
  prep = bert["prep"]
  config = _config(bert, corpus, tmp_path / "data")
  data_dir = pathlib.Path(config.data_dir)
  moved = []
  real_replace = os.replace

  def replace_then_die(src, dst):
    if len(moved) == 2:  # Killed while moving the files into place.
      raise KeyboardInterrupt
    moved.append(dst)
    real_replace(src, dst)

  monkeypatch.setattr(prep.os, "replace", replace_then_die)
  with pytest.raises(KeyboardInterrupt):
    prep.prepare(config, str(data_dir))
  monkeypatch.undo()
  assert len(list(data_dir.iterdir())) == 2  # Two files, no manifest.
  with pytest.raises(ValueError, match=r"`data_dir`: .* no manifest\.json"):
    prep.load(config, str(data_dir))
  # A staging directory left by a killed run is cleared too.
  (data_dir / ".staging-killed").mkdir()
  (data_dir / ".staging-killed" / "train-len0016-00000.array_record"
   ).write_bytes(b"partial")
  assert prep.prepare(config, str(data_dir))
  data = prep.load(config, str(data_dir))
  assert not [p for p in data_dir.iterdir() if p.name.startswith(".")]
  assert not prep.prepare(config, str(data_dir))  # Complete: kept.
  # A shard truncated after the manifest was written is refused.
  shard = data_dir / data.shards("train", 16)[0]["file"]
  shard.write_bytes(shard.read_bytes()[:100])
  with pytest.raises(ValueError, match=r"`data_dir`: shard .* is missing or "
                     r"is not the"):
    prep.load(config, str(data_dir))


def _corrupt_copy(data, tmp_path):
  """A copy of the prepared directory whose first training shard has bad bytes.

  The shard keeps its size (the manifest's check passes); 16 bytes in its
  first chunk are inverted.
  """
  import shutil  # pylint: disable=import-outside-toplevel
  directory = tmp_path / "corrupt"
  shutil.copytree(data.directory, directory)
  shard = directory / data.shards("train", 16)[0]["file"]
  content = bytearray(shard.read_bytes())
  content[100:116] = bytes(b ^ 0xFF for b in content[100:116])
  shard.write_bytes(bytes(content))
  return str(directory), str(shard)


def test_a_corrupt_shard_is_named_when_read(bert, prepared, tmp_path):
  config, data = prepared
  directory, shard = _corrupt_copy(data, tmp_path)
  corrupt = bert["prep"].load(config, directory)  # The sizes match.
  message = rf"`data_dir`: shard {re.escape(shard)} is corrupt .*prepare the "
  source = corrupt.source("train", 16)
  with pytest.raises(ValueError, match=message):
    source[0]
  with pytest.raises(ValueError, match=message):
    source.__getitems__([len(source) - 1, 0])
  # Through grain, as training reads it.
  with pytest.raises(ValueError, match=message):
    list(bert["ip"].eval_dataset(source, corrupt.masking(0.15), batch_size=8))


def test_verify_shards_checks_the_digests_at_load(bert, prepared, tmp_path):
  config, data = prepared
  directory, shard = _corrupt_copy(data, tmp_path)
  assert not config.verify_shards  # Never by default.
  verify = config.copy_and_resolve_references()
  verify.verify_shards = True
  with pytest.raises(ValueError, match=rf"`data_dir`: shard {re.escape(shard)} "
                     r"is corrupt \(its SHA-256 .*prepare the shards again"):
    bert["prep"].load(verify, directory)
  bert["prep"].load(verify, data.directory)  # Intact shards pass.


# ----------------------------------------------------------------------------
# Two processes over loopback.


def _main_flags(overrides):
  """``--config.FIELD=VALUE`` for each override, as a user types them."""
  def value(v):
    return f"({', '.join(map(str, v))},)" if isinstance(v, list) else str(v)
  return [f"--config.{k}={value(v)}" for k, v in overrides.items()]


def test_two_processes_read_their_rows_and_train_as_one(bert, corpus,
                                                        tmp_path):
  """Disjoint rows whose union is the one-process batch; the same losses.

  Two processes launched from the command line alone (``main.py`` with
  ``--config.distributed.*`` over 127.0.0.1, as the README says; CPU, gloo,
  one device each) prepare the shards (process 0; process 1 waits), train 4
  steps stopped after step 2, and are launched again to resume from the
  checkpoint (the grain iterator's state saved per process); then two
  processes dump their rows of the first batches. The same configuration
  runs here in one process on one device. (One phase, one layer and AdamW,
  to compile less: what is tested is the data; resuming at a phase change
  is in test_bert_example.py.)
  """
  overrides = dict(optimizer="adamw", num_layers=1,
                   corpus=corpus["txt"], tokenizer=corpus["vocab"],
                   held_out_percent=20, seq_lengths=[16],
                   examples_per_shard=100, total_steps=4,
                   phase_fractions=[1.0], global_batch_size=8,
                   num_micro_batches=2, eval_batch_size=8, eval_examples=20,
                   eval_every=2, checkpoint_every=100)
  out = tmp_path / "two"
  out.mkdir()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             # The resumed run loads the first run's compiled steps.
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)  # One CPU device per process.
  two = dict(overrides, data_dir=str(out / "data"))
  summaries = []
  for run, stop_at_step in enumerate((2, 0)):
    (out / f"run_{run}").mkdir()
    port = helpers.free_port()
    helpers.run_processes(
        [[sys.executable, str(_EXAMPLE / "main.py"), f"--workdir={out / 'work'}",
          f"--config={_EXAMPLE / 'configs' / 'test.py'}",
          f"--config.distributed.coordinator_address=127.0.0.1:{port}",
          "--config.distributed.num_processes=2",
          f"--config.distributed.process_id={i}",
          f"--config.stop_at_step={stop_at_step}", *_main_flags(two)]
         for i in range(2)], out / f"run_{run}", 240, env)
    summaries.append(json.loads((out / "work" / "summary.json").read_text()))
  (out / "rows").mkdir()
  port = helpers.free_port()
  helpers.run_processes(
      [[sys.executable, str(_WORKER), str(i), str(port), json.dumps(two),
        str(out)] for i in range(2)], out / "rows", 120, env)

  config = _config(bert, corpus, tmp_path / "one_data", **overrides)
  config.num_devices = 1
  single = bert["train"].train_and_evaluate(config, str(tmp_path / "one"))
  data = bert["prep"].load(config, config.data_dir)
  # The same shards, prepared by process 0 of the job and here.
  assert bert["prep"].load(config, str(out / "data")).manifest["shards"] == (
      data.manifest["shards"])

  def rows_of(workdir, kind):
    return [r for r in map(json.loads, (workdir / "metrics.jsonl")
                           .read_text().splitlines()) if r["kind"] == kind]

  two_rows = rows_of(out / "work", "train")
  assert [r["step"] for r in two_rows] == [1, 2, 3, 4]
  np.testing.assert_allclose([r["loss"] for r in two_rows],
                             [r["loss"] for r in rows_of(tmp_path / "one",
                                                         "train")],
                             rtol=2e-5)
  two_eval = rows_of(out / "work", "eval")
  assert [r["step"] for r in two_eval] == [2, 4]
  np.testing.assert_allclose([r["loss"] for r in two_eval],
                             [r["loss"] for r in rows_of(tmp_path / "one",
                                                         "eval")], rtol=2e-5)
  assert [s["end_step"] for s in summaries] == [2, 4]
  assert summaries[1]["start_step"] == 2
  assert summaries[1]["num_devices"] == 2  # One job, not two single runs.
  assert summaries[1]["eval_loss"] == pytest.approx(single["eval_loss"],
                                                    rel=2e-5)
  iterator_files = sorted(
      p.name for p in (out / "work" / "checkpoints" / "2" /
                       "data_iterator").glob("process_*"))
  assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]

  # Rows: process i holds block i of each micro-batch; side by side they are
  # the one-process batch, and the two blocks share no example.
  blocks = []
  for i in range(2):
    with np.load(out / f"rows_{i}.npz") as dumped:
      blocks.append(dict(dumped))
      assert list(blocks[i]["rows"]) == [i, 2]
  one = _train(bert, data, batch_size=8)
  for step in range(3):
    for key in ("input_ids", "masked_positions", "masked_ids"):
      np.testing.assert_array_equal(
          np.concatenate([b[f"{step}/{key}"] for b in blocks], axis=1),
          one[step][key])
    originals = [{tuple(r) for r in _originals(
        {k: b[f"{step}/{k}"] for k in ("input_ids", "masked_positions",
                                        "masked_ids", "masked_weights")})}
                 for b in blocks]
    assert len(originals[0]) == len(originals[1]) == 4
    assert not originals[0] & originals[1]
