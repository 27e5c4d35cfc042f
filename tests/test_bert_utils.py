"""The BERT example's pieces: optimizer table, checkpoints, sharding, metrics.

Fast unit tests of examples/bert/train.py's ``OPTIMIZERS`` table,
examples/bert/utils.py (checkpoint tree, sharding, process rows) and
examples/bert/metrics.py (metrics.jsonl, TensorBoard scalars, per-layer
trust ratios). The end-to-end runs are in tests/test_bert_example.py.
"""

import json
import operator
import os
import pathlib
import re
import struct
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers

import lamb_optax

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "bert"
# Top-level module names of the example (run as a script, not a package),
# cleared around the import so another example's modules cannot be picked up.
_MODULES = ("train", "recipe", "steps", "models", "input_pipeline",
            "corpus", "wordpiece", "masking", "prepare_data", "utils", "metrics",
            "configs", "configs.default", "configs.test", "configs.bert_base")


@pytest.fixture(scope="module")
def bert():
  with helpers.example_modules(_EXAMPLE, _MODULES) as load:
    yield dict(train=load("train"), utils=load("utils"),
               metrics=load("metrics"), test_config=load("configs.test"))


def _params():
  """A small BERT-like tree: kernels, biases, a LayerNorm, a scanned stack."""
  rng = np.random.default_rng(0)
  return {
      "dense": {"kernel": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=(3,)), jnp.float32)},
      "layer_norm": {"scale": jnp.ones((3,)), "bias": jnp.full((3,), 0.5)},
      "layers": {"kernel": jnp.asarray(rng.normal(size=(2, 3, 4)),
                                       jnp.float32)},
  }


_LAYER_AXES = {"dense": {"kernel": None, "bias": None},
               "layer_norm": {"scale": None, "bias": None},
               "layers": {"kernel": 0}}
_EXCLUDED = ("dense/bias", "layer_norm/scale", "layer_norm/bias")


def _flat(tree):
  return {"/".join(k.key for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------------------------
# The optimizer table.


def test_optimizer_table_covers_every_accepted_name(bert):
  train = bert["train"]
  presets = {name for name in lamb_optax.presets.__all__
             if name.islower() and callable(getattr(lamb_optax.presets, name))}
  assert set(train.OPTIMIZERS) == {"lamb", "lars", "adamw"} | presets
  # The default learning rates are given for names the table has.
  from configs import default  # pylint: disable=import-outside-toplevel
  assert set(default.DEFAULT_LEARNING_RATES) <= set(train.OPTIMIZERS)


@pytest.mark.parametrize("name", ["lamb", "lars", "adamw", "nvlamb", "timm",
                                  "torch_optimizer", "deepspeed",
                                  "tensorflow", "keras"])
def test_each_entry_builds_with_bert_exclusions(bert, name):
  """Every factory takes the one call; its exclusions and layer axes take
  hold."""
  train = bert["train"]
  config = bert["test_config"].get_config()
  config.optimizer = name
  config.weight_decay = 0.1
  config.max_grad_norm = 1.0
  params = _params()
  tx = train.make_optimizer(config, 1e-2, _LAYER_AXES)
  state = tx.init(params)
  # Zero gradients: only weight decay moves a parameter, so the leaves BERT
  # excludes from decay stay exactly where they are, and kernels move.
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, state = tx.update(zeros, state, params)
  moved = _flat(updates)
  for leaf in _EXCLUDED:
    np.testing.assert_array_equal(moved[leaf], 0.0, err_msg=leaf)
  for leaf in ("dense/kernel", "layers/kernel"):
    assert np.all(np.isfinite(moved[leaf])) and np.any(moved[leaf] != 0.0), (
        leaf)
  if name == "adamw":
    assert not bert["metrics"].has_trust_ratios(state)
    return
  ratios = lamb_optax.trust_ratios(state)
  # One trust ratio per layer of the stack (layer_axes was passed) ...
  assert np.shape(ratios["layers"]["kernel"]) == (2,)
  assert np.shape(ratios["dense"]["kernel"]) == ()
  # ... and none on the biases and the LayerNorm (trust_ratio_mask).
  for leaf in _EXCLUDED:
    assert float(_flat(ratios)[leaf]) == 1.0, leaf
  updates, state = tx.update(jax.tree.map(jnp.ones_like, params), state,
                             params)
  assert float(_flat(lamb_optax.trust_ratios(state))["dense/kernel"]) != 1.0


def test_adamw_entry_is_optax_adamw_in_the_shared_vocabulary(bert):
  train = bert["train"]
  mask = lamb_optax.masks.exclude_bias_and_norm()
  params = _params()
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  ours = train.adamw(1e-2, weight_decay=0.1, weight_decay_mask=mask,
                     trust_ratio_mask=mask, layer_axes=_LAYER_AXES,
                     max_grad_norm=0.5)
  theirs = optax.chain(optax.clip_by_global_norm(0.5),
                       optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-6,
                                   weight_decay=0.1, mask=mask))
  a, _ = ours.update(grads, ours.init(params), params)
  b, _ = theirs.update(grads, theirs.init(params), params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_max_grad_norm_reaches_optimizers_that_clip(bert):
  """config.max_grad_norm clips LAMB's gradients; 0 means no clipping."""
  train = bert["train"]
  config = bert["test_config"].get_config()
  config.weight_decay = 0.1
  params = _params()
  # A large gradient then a small one: clipping the first changes how much
  # of it the moments carry into the second update.
  grad_sequence = [jax.tree.map(lambda x, s=s: s * jnp.cos(x) + s, params)
                   for s in (100.0, 0.01)]

  def run(tx):
    state, p = tx.init(params), params
    for grads in grad_sequence:
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return _flat(p)

  def from_config(max_grad_norm):
    config.max_grad_norm = max_grad_norm
    return run(train.make_optimizer(config, 1e-2))

  bert_mask = lamb_optax.masks.exclude_bias_and_norm()
  lamb = lamb_optax.lamb(1e-2, weight_decay=0.1, weight_decay_mask=bert_mask,
                         trust_ratio_mask=bert_mask)
  clipped = run(optax.chain(optax.clip_by_global_norm(1.0), lamb))
  unclipped = run(lamb)
  for name, value in from_config(1.0).items():
    np.testing.assert_allclose(value, clipped[name], rtol=1e-5, atol=1e-7)
  for name, value in from_config(0.0).items():
    np.testing.assert_allclose(value, unclipped[name], rtol=1e-5, atol=1e-7)
  # And the two differ (the test can tell clipping from none).
  assert not np.allclose(clipped["dense/bias"], unclipped["dense/bias"],
                         rtol=1e-3)


def test_readme_table_is_the_optimizer_table(bert):
  """examples/bert/README.md's optimizer table states OPTIMIZERS."""
  train = bert["train"]
  readme = (_EXAMPLE / "README.md").read_text()
  header = "| `optimizer` | factory |"
  lines = readme[readme.index(header):].split("\n\n")[0].splitlines()[2:]
  rows = {}
  for line in lines:
    name, factory = [c.strip() for c in line.strip().strip("|").split("|")]
    rows[name.strip("`")] = factory.split("`")[1]
  assert set(rows) == set(train.OPTIMIZERS)
  modules = {"lamb_optax": lamb_optax, "train": train}
  for name, factory in train.OPTIMIZERS.items():
    root, *attrs = rows[name].split(".")
    assert operator.attrgetter(".".join(attrs))(modules[root]) is factory, (
        name)


def test_bad_optimizer_name_names_the_config_field(bert):
  train = bert["train"]
  config = bert["test_config"].get_config()
  config.optimizer = "adam"
  with pytest.raises(ValueError, match=r"`config\.optimizer` must be one of "
                     r"lamb, .*keras, got 'adam'"):
    train.make_optimizer(config, 1e-2)


def test_bad_optimizer_fails_before_reading_data(bert, tmp_path):
  config = bert["test_config"].get_config()
  config.optimizer = "LAMB"  # Names are lower-case.
  with pytest.raises(ValueError, match="config.optimizer"):
    bert["train"].train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "tokenizer").exists()


# ----------------------------------------------------------------------------
# Checkpoints.


def _manager(path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  return ocp.CheckpointManager(
      str(path), options=ocp.CheckpointManagerOptions(create=True))


def test_checkpoint_tree_is_the_same_for_save_and_restore(bert):
  utils = bert["utils"]
  params = _params()
  opt_state = lamb_optax.lamb(1e-2).init(params)
  saved = utils.checkpoint_tree(params, opt_state, step=7, seed=3)
  target = utils.checkpoint_tree(params, opt_state, step=0, seed=0)
  assert jax.tree.structure(saved) == jax.tree.structure(target)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(target)):
    assert (np.shape(a), np.asarray(a).dtype) == (np.shape(b),
                                                  np.asarray(b).dtype)
  assert int(saved["step"]) == 7
  assert int(saved["data"]["seed"]) == 3
  assert int(saved["data"]["next_step"]) == 8


def test_checkpoint_round_trips(bert, tmp_path):
  """Saved state comes back into a fresh state's structure, exactly."""
  utils = bert["utils"]
  tx = lamb_optax.lamb(1e-2, weight_decay=0.1)
  params = _params()
  opt_state = tx.init(params)
  for _ in range(3):  # A state with non-trivial moments, count and ratios.
    grads = jax.tree.map(lambda x: jnp.cos(x) + 0.1, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  manager = _manager(tmp_path / "checkpoints")
  utils.save_checkpoint(manager, 3, params, opt_state, seed=11)
  manager.wait_until_finished()

  fresh_params = jax.tree.map(jnp.zeros_like, params)
  fresh_state = tx.init(fresh_params)
  restored_params, restored_state, step = utils.restore_checkpoint(
      manager, manager.latest_step(), fresh_params, fresh_state, seed=11)
  manager.close()
  assert step == 3
  assert jax.tree.structure(restored_state) == jax.tree.structure(opt_state)
  assert type(restored_state) is type(opt_state)
  for got, want in zip(jax.tree.leaves((restored_params, restored_state)),
                       jax.tree.leaves((params, opt_state))):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_restore_refuses_a_checkpoint_of_another_seed(bert, tmp_path):
  utils = bert["utils"]
  params = _params()
  opt_state = lamb_optax.lamb(1e-2).init(params)
  manager = _manager(tmp_path / "checkpoints")
  utils.save_checkpoint(manager, 2, params, opt_state, seed=1)
  manager.wait_until_finished()
  with pytest.raises(ValueError, match=r"seed 1, not `seed`=2"):
    utils.restore_checkpoint(manager, 2, params, opt_state, seed=2)
  manager.close()


# ----------------------------------------------------------------------------
# Sharding and process rows.


def test_process_rows_and_global_batch_on_one_process(bert):
  """One process holds every row: block 0 of 1, the batch as it is."""
  utils = bert["utils"]
  mesh = utils.make_mesh()
  assert utils.process_rows(mesh) == (0, 1)
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  local = {"input_ids": np.arange(2 * 8 * 3).reshape(2, 8, 3)}
  batch = utils.global_batch(local, NamedSharding(mesh, P(None, "data")))
  np.testing.assert_array_equal(np.asarray(batch["input_ids"]),
                                local["input_ids"])


_SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import jax, numpy as np
    import models, utils
    shapes = models.init_shapes(models.BertConfig(
        vocab_size=64, hidden_size=16, num_layers=2, num_heads=2,
        intermediate_size=24, max_position_embeddings=16, scan_layers=True))
    mesh = utils.make_mesh()
    out = {}
    for fsdp in (False, True):
      shardings = utils.param_sharding(shapes, mesh, fsdp, min_size=300)
      flat = jax.tree_util.tree_leaves_with_path(shardings)
      boxed = jax.tree.leaves(shapes, is_leaf=lambda x: hasattr(x, "names"))
      out[str(fsdp)] = {
          "/".join(k.key for k in path): [list(box.value.shape),
                                          list(box.names),
                                          [a for a in s.spec]]
          for (path, s), box in zip(flat, boxed)}
    print(json.dumps({"devices": len(jax.devices()), "leaves": out}))
""")


def test_param_sharding_on_eight_devices(bert):
  del bert
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(_EXAMPLE.parents[1])] + env.get("PYTHONPATH", "").split(os.pathsep))
  result = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT,
                           str(_EXAMPLE)], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  replicated = out["leaves"]["False"]
  assert all(not any(spec) for _, _, spec in replicated.values())
  sharded_count = 0
  for name, (shape, names, spec) in out["leaves"]["True"].items():
    spec = spec + [None] * (len(shape) - len(spec))
    divisible = [i for i, d in enumerate(shape)
                 if d % 8 == 0 and names[i] != "layers"]
    if np.prod(shape) < 300 or not divisible:
      assert not any(spec), (name, spec)
      continue
    # The largest divisible axis, never the stacked "layers" axis.
    axis = max(divisible, key=lambda i: shape[i])
    assert spec == ["data" if i == axis else None
                    for i in range(len(shape))], (name, shape, names, spec)
    sharded_count += 1
  assert sharded_count >= 4


# ----------------------------------------------------------------------------
# Metrics.


def _scalar_events(directory):
  """(tag, step, value) of every scalar in a directory of event files."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars = []
  for path in sorted(pathlib.Path(directory).glob("events.out.tfevents.*")):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):  # TFRecord: length, crc, payload, crc.
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      payload = data[offset + 12:offset + 12 + length]
      offset += 12 + length + 4
      event = event_pb2.Event.FromString(payload)
      for value in event.summary.value:
        scalars.append((value.tag, event.step, value.simple_value))
  return scalars


def test_per_layer_ratios_are_geometric_means(bert):
  metrics = bert["metrics"]
  named = {"encoder/layer_0/attention/query/kernel": 0.5,
           "encoder/layer_0/mlp/kernel": 2.0,
           "encoder/layer_1/attention/query/kernel": 3.0,
           "encoder/layers/mlp/kernel": [4.0, 9.0],  # A scanned stack.
           "embeddings/word/embedding": 0.25}
  got = metrics.per_layer_ratios(named)
  assert set(got) == {"layer 0", "layer 1", "embeddings/word"}
  np.testing.assert_allclose(got["layer 0"], (0.5 * 2.0 * 4.0) ** (1 / 3))
  np.testing.assert_allclose(got["layer 1"], (3.0 * 9.0) ** (1 / 2))
  np.testing.assert_allclose(got["embeddings/word"], 0.25)


def test_metric_writer_resumes_and_writes_tensorboard(bert, tmp_path):
  metrics = bert["metrics"]
  writer = metrics.MetricWriter(str(tmp_path), resume_step=0)
  for step in range(1, 6):
    writer.write({"kind": "train", "step": step, "loss": 10.0 - step,
                  "trust_ratios": {"encoder/layer_0/kernel": 0.5 * step}})
  writer.write({"kind": "eval", "step": 5, "loss": 4.5, "baseline_token": "-"})
  writer.close()
  # A run resumed from the checkpoint of step 3 drops the rows after it.
  writer = metrics.MetricWriter(str(tmp_path), resume_step=3)
  writer.write({"kind": "train", "step": 4, "loss": 1.0})
  writer.close()
  rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
  assert [(r["kind"], r["step"], r["loss"]) for r in rows] == [
      ("train", 1, 9.0), ("train", 2, 8.0), ("train", 3, 7.0),
      ("train", 4, 1.0)]
  scalars = _scalar_events(tmp_path / "tensorboard")
  assert ("train/loss", 2, 8.0) in scalars
  # (tensorboardX writes the space of "layer 0" as "_".)
  assert ("trust_ratio/layer_0", 3, 1.5) in scalars
  assert ("eval/loss", 5, 4.5) in scalars
  assert not any(tag.endswith(("step", "kind", "baseline_token"))
                 for tag, _, _ in scalars)
  # Not the first process: nothing written.
  other = tmp_path / "other"
  other.mkdir()
  writer = metrics.MetricWriter(str(other), enabled=False)
  writer.write({"kind": "train", "step": 1, "loss": 1.0})
  writer.close()
  assert not list(other.iterdir())


def test_distributed_fields_reach_initialize_with_gloo_on_cpu(bert,
                                                              monkeypatch):
  """``config.distributed``'s fields go to ``jax.distributed.initialize``."""
  utils = bert["utils"]
  calls, updates = [], []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(jax.config, "update",
                      lambda name, value: updates.append((name, value)))
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES",
               "JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    monkeypatch.delenv(name, raising=False)

  def initialize(**fields):
    monkeypatch.setattr(utils.maybe_initialize_distributed, "done", False,
                        raising=False)
    distributed = bert["test_config"].get_config().distributed
    distributed.update(fields)
    utils.maybe_initialize_distributed(distributed)

  initialize()  # "auto" and nothing set: a single process.
  initialize(initialize="no", coordinator_address="127.0.0.1:1234")
  assert not calls and not updates
  initialize(coordinator_address="127.0.0.1:1234", num_processes=2,
             process_id=1)
  assert calls == [dict(coordinator_address="127.0.0.1:1234",
                        num_processes=2, process_id=1)]
  assert updates == [("jax_cpu_collectives_implementation", "gloo")]
  initialize(initialize="yes")  # A cluster's environment fills them in.
  assert calls[-1] == {}
  with pytest.raises(ValueError, match=r"`distributed.initialize` must be "):
    initialize(initialize="maybe")
