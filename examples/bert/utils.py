"""Devices, sharding and checkpoints of the BERT example.

* ``maybe_initialize_distributed``: ``jax.distributed.initialize()`` under a
  multi-process launch.
* ``make_mesh``, ``param_sharding``: one ``Mesh`` of all devices with a
  ``"data"`` axis; the batch is sharded over it and, with FSDP, the large
  parameters (and their optimizer state) too.
* ``process_rows``, ``global_batch``: which block of a batch's rows this
  process reads, and global arrays assembled from every process's block
  (``jax.make_array_from_process_local_data``).
* ``checkpoint_tree``, ``save_checkpoint``, ``restore_checkpoint``: what an
  orbax checkpoint holds (params, optimizer state, step and seed, built by one
  function for both saving and restoring, and the grain iterator's state).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Iterator, Optional

import flax.linen as nn
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import models

DATA_AXIS = "data"
# Logical axis names of the activations (models.py) -> mesh axes: the batch
# over "data"; every other axis (length, embed, heads, mlp, vocab) whole.
ACTIVATION_RULES = (("batch", DATA_AXIS),)


# ----------------------------------------------------------------------------
# Devices and sharding.


def maybe_initialize_distributed(distributed) -> None:
  """``jax.distributed.initialize`` when asked or launched by a cluster.

  The coordinator's address, the number of processes and this process's id
  are passed on when set; unset ones JAX detects from a cluster's
  environment (Slurm, Open MPI, a TPU pod). "auto" initialises when they
  are set or such an environment (or ``JAX_COORDINATOR_ADDRESS``) is present.
  On CPU, collectives between the processes go over gloo (TCP through the
  coordinator) unless ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` chooses others.

  Args:
    distributed: ``config.distributed``: ``initialize`` ("auto", "yes" or
      "no"), ``coordinator_address`` ("host:port"), ``num_processes`` and
      ``process_id`` (None: unset).
  """
  mode = distributed.initialize
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"`distributed.initialize` must be 'auto', 'yes' or "
                     f"'no', got {mode!r}.")
  given = {"coordinator_address": distributed.coordinator_address,
           "num_processes": distributed.num_processes,
           "process_id": distributed.process_id}
  given = {name: value for name, value in given.items() if value is not None}
  env = os.environ
  launched = (bool(given) or "JAX_COORDINATOR_ADDRESS" in env
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
              or "TPU_WORKER_HOSTNAMES" in env)
  if mode == "no" or (mode == "auto" and not launched):
    return
  if getattr(maybe_initialize_distributed, "done", False):
    return
  platforms = jax.config.jax_platforms or ""
  on_cpu = not platforms or "cpu" in platforms.split(",")
  if on_cpu and "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in env:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**given)
  maybe_initialize_distributed.done = True


def sync_processes(name: str = "lamb_optax_bert") -> None:
  """A barrier of all processes (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def make_mesh(num_devices: int = 0) -> Mesh:
  """A one-axis (``"data"``) mesh of the first ``num_devices`` (0: all).

  The devices are in process order (then by id), so each process's devices
  are one block of the axis and it reads one block of each batch's rows
  (``process_rows``).
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def process_rows(mesh: Mesh) -> tuple[int, int]:
  """This process's block of the rows of a batch sharded over ``"data"``.

  Args:
    mesh: The mesh of :func:`make_mesh`.

  Returns:
    ``(index, count)``: the rows are cut into ``count`` equal blocks of
    consecutive rows, one per process, and this process's devices hold block
    ``index`` (``(jax.process_index(), jax.process_count())`` for the mesh
    of ``make_mesh`` with all devices).

  Raises:
    ValueError: if this process's devices are not one block of the axis.
  """
  size = mesh.shape[DATA_AXIS]
  indices = NamedSharding(mesh, P(DATA_AXIS)).addressable_devices_indices_map(
      (size,))
  rows = sorted(index[0].start or 0 for index in indices.values())
  if not rows or rows != list(range(rows[0], rows[0] + len(rows))) or (
      rows[0] % len(rows) or size % len(rows)):
    raise ValueError(
        f"`num_devices`: process {jax.process_index()} holds rows {rows} of "
        f"the {size} devices of the mesh, not one block; in a multi-process "
        "job use all devices (num_devices=0).")
  return rows[0] // len(rows), size // len(rows)


def global_batch(local: dict[str, np.ndarray],
                 sharding: NamedSharding) -> dict[str, jax.Array]:
  """Global arrays from this process's block of rows of each leaf.

  ``sharding`` splits the rows axis over ``"data"``; every process passes
  its own block (``process_rows``), and the global shape follows.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}


@contextlib.contextmanager
def activation_sharding(mesh: Optional[Mesh]) -> Iterator[None]:
  """Within it, the model's activations keep the batch sharded over data.

  ``models.py`` names the axes of its activations (``nn.with_logical_constraint``
  on each layer's input and output, the attention mask, the embeddings and
  the MLM head); ``ACTIVATION_RULES`` maps ``"batch"`` to the mesh's
  ``"data"`` axis. Without these constraints XLA's sharding propagation is
  free to pick another layout inside the scanned, rematerialised encoder and,
  with FSDP parameters sharded over the same axis, it gathers the whole
  global batch on every device (``train_compile.py`` finds such buffers).
  Outside this context (or with ``mesh`` None) the names are ignored.

  Args:
    mesh: The mesh of the step (None: no constraints).
  """
  if mesh is None:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), \
       nn.logical_axis_rules(ACTIVATION_RULES):
    yield


def param_sharding(boxed_params, mesh: Mesh, fsdp: bool, min_size: int):
  """Replicated, or (FSDP) each large leaf's largest divisible axis over data.

  The stacked ``"layers"`` axis of a scanned encoder is never sharded, so
  each device holds a slice of every layer.

  Args:
    boxed_params: Parameters (or their shapes) boxed in ``nn.Partitioned``,
      whose axis names mark the ``"layers"`` axis.
    mesh: The mesh of :func:`make_mesh`.
    fsdp: Shard the leaves of at least ``min_size`` elements.
    min_size: Smaller leaves stay replicated.

  Returns:
    A tree of ``NamedSharding`` with the structure of the unboxed params.
  """
  n = mesh.shape[DATA_AXIS]

  def spec(x):
    shape, names = x.value.shape, x.names
    if not fsdp or n == 1 or math.prod(shape) < min_size:
      return NamedSharding(mesh, P())
    candidates = [i for i, d in enumerate(shape)
                  if d % n == 0 and names[i] != models.LAYERS_AXIS]
    if not candidates:
      return NamedSharding(mesh, P())
    axis = max(candidates, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*[DATA_AXIS if i == axis else None
                                   for i in range(len(shape))]))
  return jax.tree.map(spec, boxed_params,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_tree(params, opt_state, step: int, seed: int) -> dict[str, Any]:
  """What a checkpoint's ``state`` item holds after ``step``.

  The same function builds the tree that is saved and (with any ``step`` and
  ``seed``, only shapes, dtypes and shardings count) the target it is
  restored into, so the two cannot drift apart.

  Args:
    params: The parameters.
    opt_state: The optimizer state.
    step: The last step trained (1-based; 0 before the first).
    seed: ``config.seed``: the data stream's seed (the grain iterator's
      state, saved beside, is its position).

  Returns:
    ``{"params", "opt_state", "step", "data": {"seed", "next_step"}}``, the
    scalars as int64 numpy arrays.
  """
  return {"params": params, "opt_state": opt_state,
          "step": np.asarray(step, np.int64),
          "data": {"seed": np.asarray(seed, np.int64),
                   "next_step": np.asarray(step + 1, np.int64)}}


def save_checkpoint(manager: ocp.CheckpointManager, step: int, params,
                    opt_state, seed: int, data_iterator=None) -> None:
  """Saves the state after ``step`` (asynchronously: see orbax).

  Args:
    manager: The checkpoint manager of the workdir.
    step: The last step trained.
    params: The parameters.
    opt_state: The optimizer state.
    seed: ``config.seed``.
    data_iterator: The grain iterator that gave step ``step``'s batch: its
      state is saved as the ``data_iterator`` item (one file per process,
      grain's orbax handler), taken now, before the next batch is read.
  """
  items = {"state": ocp.args.StandardSave(
      checkpoint_tree(params, opt_state, step, seed))}
  if data_iterator is not None:
    items["data_iterator"] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, params,
                       opt_state, seed: int, data_iterator=None
                       ) -> tuple[Any, Any, int]:
  """Restores the checkpoint of ``step`` like ``params`` and ``opt_state``.

  Args:
    manager: The checkpoint manager of the workdir.
    step: The checkpoint to restore (``manager.latest_step()``).
    params: Parameters (arrays or ``jax.ShapeDtypeStruct``) whose shapes,
      dtypes and shardings the restored ones take.
    opt_state: Likewise for the optimizer state.
    seed: ``config.seed``; the checkpoint must have been trained with it.
    data_iterator: A fresh grain iterator of the same pipeline: its state is
      set to the saved one (None: not restored, e.g. when the next step
      starts a new phase).

  Returns:
    ``(params, opt_state, step)`` restored.

  Raises:
    ValueError: if the checkpoint was trained with another seed (its data
      stream would not continue).
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        checkpoint_tree(params, opt_state, 0, 0))
  items = {"state": ocp.args.StandardRestore(target)}
  if data_iterator is not None:
    items["data_iterator"] = grain.checkpoint.CheckpointRestore(data_iterator)
  restored = manager.restore(step, args=ocp.args.Composite(**items))["state"]
  saved_seed = int(restored["data"]["seed"])
  if saved_seed != seed:
    raise ValueError(
        f"The checkpoint in {manager.directory} was trained with seed "
        f"{saved_seed}, not `seed`={seed}: the data stream would not "
        "continue. Use another workdir or that seed.")
  return restored["params"], restored["opt_state"], int(restored["step"])
