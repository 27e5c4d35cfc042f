"""One process of the BERT example's two-process run (test_bert_input_pipeline).

``python tests/bert_multiprocess_worker.py PROCESS_ID PORT CONFIG_JSON OUT_DIR``:
joins a 2-process ``jax.distributed`` job on 127.0.0.1:PORT (CPU, gloo, one
device each), then, with ``configs/test.py`` overridden by the JSON object in
CONFIG_JSON:

1. ``train.train_and_evaluate`` with ``stop_at_step`` from the JSON, then
   again to the end (resumed from the checkpoint, data iterator included),
   in the workdir OUT_DIR/work (shards in ``config.data_dir``, prepared by
   process 0 on first use);
2. this process's rows of the first ``ROW_STEPS`` training batches of phase
   1, written to OUT_DIR/rows_<id>.npz with its block (``process_rows``).

Prints ``DISTRIBUTED_UNAVAILABLE: <reason>`` and exits if this jax build
cannot run multi-process on CPU.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

TIMEOUT_S = 60
ROW_STEPS = 3


def main(process_id: int, port: int, overrides: dict, out_dir: str) -> None:
  # pylint: disable=import-outside-toplevel
  import jax
  import helpers
  # pylint: enable=import-outside-toplevel
  helpers.join_loopback_job(process_id, port, timeout_s=TIMEOUT_S)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "examples" / "bert"))
  # pylint: disable=import-outside-toplevel
  import numpy as np
  import prepare_data
  import train
  import utils
  from configs import test as test_config
  # pylint: enable=import-outside-toplevel

  def config(**more):
    result = test_config.get_config()
    result.update(dict(overrides, **more))
    return result

  workdir = os.path.join(out_dir, "work")
  summaries = [train.train_and_evaluate(config(), workdir),
               train.train_and_evaluate(config(stop_at_step=0), workdir)]

  base = config()
  data = prepare_data.load(base, base.data_dir)
  rows = utils.process_rows(utils.make_mesh())
  phase = train.make_phases(base, jax.device_count())[0]
  iterator = train.train_iterator(base, data, phase, rows)
  batches = [next(iterator) for _ in range(ROW_STEPS)]
  np.savez(os.path.join(out_dir, f"rows_{process_id}.npz"),
           rows=np.asarray(rows),
           **{f"{step}/{k}": v for step, batch in enumerate(batches)
              for k, v in batch.items()})
  with open(os.path.join(out_dir, f"summary_{process_id}.json"), "w") as f:
    json.dump(summaries, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  os.environ.pop("XLA_FLAGS", None)  # One CPU device per process.
  main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]),
       sys.argv[4])
