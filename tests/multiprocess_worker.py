"""One process of tests/test_multiprocess.py's two-process run.

``python tests/multiprocess_worker.py PROCESS_ID PORT OUT_DIR``: joins a
2-process ``jax.distributed`` job on 127.0.0.1:PORT (CPU, gloo collectives,
2 local devices each), builds a (2, 2) ("data", "model") mesh whose "data"
axis spans the processes, shards the params of distributed_scenarios (FSDP
over "data", tensor parallel over "model"), runs 5 jitted steps of each
optimizer with the state placed by ``state_shardings``, gathers the params
and trust ratios of every step on every process
(``multihost_utils.process_allgather``) and writes them to
OUT_DIR/process_<id>.npz, with facts about the placement in
OUT_DIR/process_<id>.json. Prints ``DISTRIBUTED_UNAVAILABLE: <reason>`` and
exits 3 if this jax build cannot run multi-process on CPU.
"""

from __future__ import annotations

import json
import os
import sys

if __name__ == "__main__":  # Before jax initialises its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=2")

import jax  # pylint: disable=g-import-not-at-top

import helpers  # pylint: disable=g-import-not-at-top

TIMEOUT_S = 60


def main(process_id: int, port: int, out_dir: str) -> None:
  helpers.join_loopback_job(process_id, port, timeout_s=TIMEOUT_S)

  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils
  from jax.sharding import AxisType, Mesh, NamedSharding
  import numpy as np
  from distributed_scenarios import (OPTIMIZERS, SPECS, scenario_grads,
                                     make_optimizer, scenario_params,
                                     moment_leaves, train_step)
  import lamb_optax
  from lamb_optax._src.sharding import state_shardings
  # pylint: enable=g-import-not-at-top

  assert jax.process_count() == 2 and jax.device_count() == 4, (
      jax.process_count(), jax.devices())
  # Row i of the mesh holds process i's devices: "data" spans the processes.
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(2, 2), ("data", "model"),
              axis_types=(AxisType.Auto,) * 2)
  param_sh = jax.tree.map(lambda s: NamedSharding(mesh, s), SPECS)

  def to_global(tree):
    # Every process builds only its own shards of the global arrays.
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s,
                                                  lambda idx: x[idx]),
        tree, param_sh)

  arrays, facts = {}, {"process_index": jax.process_index(),
                       "process_count": jax.process_count(),
                       "device_count": jax.device_count()}
  for name in OPTIMIZERS:
    tx = make_optimizer(name)
    params = to_global(scenario_params())
    state_sh = state_shardings(tx, params, param_sh)
    state = jax.jit(tx.init, out_shardings=state_sh)(params)
    step = jax.jit(train_step(tx), in_shardings=(param_sh, state_sh, param_sh),
                   out_shardings=(param_sh, state_sh))
    for t, grads in enumerate(scenario_grads()):
      params, state = step(params, state, to_global(grads))
      host_params = multihost_utils.process_allgather(params, tiled=True)
      host_ratios = multihost_utils.process_allgather(
          lamb_optax.trust_ratios(state), tiled=True)
      for i, x in enumerate(jax.tree.leaves(host_params)):
        arrays[f"{name}/{t}/params/{i}"] = np.asarray(x)
      for i, r in enumerate(jax.tree.leaves(host_ratios)):
        arrays[f"{name}/{t}/ratios/{i}"] = np.asarray(r)
    mu = moment_leaves(state)
    first = next(p for p in mu if p.endswith("blocks/kernel"))
    facts[name] = {
        "blocks_moment_global_shape": list(mu[first].shape),
        "blocks_moment_local_shapes": [
            list(s.data.shape) for s in mu[first].addressable_shards],
        "blocks_moment_is_fully_addressable": mu[first].is_fully_addressable,
        "moment_shardings_match_params": all(
            leaf.sharding.is_equivalent_to(
                param_sh[p.split("/")[1]][p.split("/")[2]], leaf.ndim)
            for p, leaf in mu.items()),
        "step_compilations": step._cache_size(),  # pylint: disable=protected-access
    }
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **arrays)
  with open(os.path.join(out_dir, f"process_{process_id}.json"), "w") as f:
    json.dump(facts, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
