"""Devices, sharding and checkpoints of the BERT example.

* ``maybe_initialize_distributed``: ``jax.distributed.initialize()`` under a
  multi-process launch.
* ``make_mesh``, ``param_sharding``, ``to_global``, ``global_eval_batches``:
  one ``Mesh`` of all devices with a ``"data"`` axis; the batch is sharded
  over it and, with FSDP, the large parameters (and their optimizer state)
  too.
* ``checkpoint_tree``, ``save_checkpoint``, ``restore_checkpoint``: what an
  orbax checkpoint holds (params, optimizer state, step and data position),
  built by one function for both saving and restoring.
"""

from __future__ import annotations

import math
import os
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import models

DATA_AXIS = "data"


# ----------------------------------------------------------------------------
# Devices and sharding.


def maybe_initialize_distributed(mode: str) -> None:
  """``jax.distributed.initialize()`` when asked or launched by a cluster.

  "auto" initialises when the environment of a multi-process launch is
  present (``JAX_COORDINATOR_ADDRESS``, Slurm with several tasks, Open MPI
  or a TPU pod), where JAX's auto-detection fills in the arguments.

  Args:
    mode: ``config.distributed``: "auto", "yes" or "no".
  """
  if mode not in ("auto", "yes", "no"):
    raise ValueError(f"`distributed` must be 'auto', 'yes' or 'no', got "
                     f"{mode!r}.")
  env = os.environ
  launched = ("JAX_COORDINATOR_ADDRESS" in env
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
              or "TPU_WORKER_HOSTNAMES" in env)
  if mode == "yes" or (mode == "auto" and launched):
    if not getattr(maybe_initialize_distributed, "done", False):
      jax.distributed.initialize()
      maybe_initialize_distributed.done = True


def make_mesh(num_devices: int = 0) -> Mesh:
  """A one-axis (``"data"``) mesh of the first ``num_devices`` (0: all)."""
  devices = jax.devices()
  if num_devices:
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


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


def to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Host numpy (the same global batch on every process) -> global arrays."""
  return {k: jax.make_array_from_callback(v.shape, sharding,
                                          lambda index, v=v: v[index])
          for k, v in batch.items()}


def global_eval_batches(examples: dict[str, np.ndarray], batch_size: int,
                 mesh: Mesh) -> list[dict[str, jax.Array]]:
  """Held-out examples as global batches, sharded over ``"data"``.

  The batch size is rounded down to a multiple of the devices (at least one
  example per device), and the last batch is padded with rows of zeros, whose
  ``masked_weights`` are zero, so they count for nothing.
  """
  num_devices = mesh.shape[DATA_AXIS]
  size = max(num_devices, batch_size - batch_size % num_devices)
  count = len(examples["input_ids"])
  padded = -(-count // size) * size
  examples = {k: np.concatenate([v, np.zeros((padded - count,) + v.shape[1:],
                                             v.dtype)])
              for k, v in examples.items()}
  sharding = NamedSharding(mesh, P(DATA_AXIS))
  return [to_global({k: v[i:i + size] for k, v in examples.items()}, sharding)
          for i in range(0, padded, size)]


# ----------------------------------------------------------------------------
# Checkpoints.


def checkpoint_tree(params, opt_state, step: int, seed: int) -> dict[str, Any]:
  """What a checkpoint holds after ``step``: train state and data position.

  The same function builds the tree that is saved and (with any ``step`` and
  ``seed``, only shapes, dtypes and shardings count) the target it is
  restored into, so the two cannot drift apart.

  Args:
    params: The parameters.
    opt_state: The optimizer state.
    step: The last step trained (1-based; 0 before the first).
    seed: ``config.seed``: with the next step, where the data stream is.

  Returns:
    ``{"params", "opt_state", "step", "data": {"seed", "next_step"}}``, the
    scalars as int64 numpy arrays.
  """
  return {"params": params, "opt_state": opt_state,
          "step": np.asarray(step, np.int64),
          "data": {"seed": np.asarray(seed, np.int64),
                   "next_step": np.asarray(step + 1, np.int64)}}


def save_checkpoint(manager: ocp.CheckpointManager, step: int, params,
                    opt_state, seed: int) -> None:
  """Saves the state after ``step`` (asynchronously: see orbax)."""
  manager.save(step, args=ocp.args.StandardSave(
      checkpoint_tree(params, opt_state, step, seed)))


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, params,
                       opt_state, seed: int) -> tuple[Any, Any, int]:
  """Restores the checkpoint of ``step`` like ``params`` and ``opt_state``.

  Args:
    manager: The checkpoint manager of the workdir.
    step: The checkpoint to restore (``manager.latest_step()``).
    params: Parameters (arrays or ``jax.ShapeDtypeStruct``) whose shapes,
      dtypes and shardings the restored ones take.
    opt_state: Likewise for the optimizer state.
    seed: ``config.seed``; the checkpoint must have been trained with it.

  Returns:
    ``(params, opt_state, step)`` restored.

  Raises:
    ValueError: if the checkpoint was trained with another seed (its data
      stream would not continue).
  """
  target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                        checkpoint_tree(params, opt_state, 0, 0))
  restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  saved_seed = int(restored["data"]["seed"])
  if saved_seed != seed:
    raise ValueError(
        f"The checkpoint in {manager.directory} was trained with seed "
        f"{saved_seed}, not `seed`={seed}: the data stream would not "
        "continue. Use another workdir or that seed.")
  return restored["params"], restored["opt_state"], int(restored["step"])
