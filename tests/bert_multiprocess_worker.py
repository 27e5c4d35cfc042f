"""One process of a two-process job that dumps its rows (test_bert_input_pipeline).

``python tests/bert_multiprocess_worker.py PROCESS_ID PORT CONFIG_JSON OUT_DIR``:
with ``configs/test.py`` overridden by the JSON object in CONFIG_JSON, joins
a 2-process job on 127.0.0.1:PORT through ``config.distributed`` (the path
of ``main.py``: ``utils.maybe_initialize_distributed``; CPU, gloo, one
device each), loads the prepared shards of ``config.data_dir`` and writes
this process's rows of the first ``ROW_STEPS`` training batches of phase 1
to OUT_DIR/rows_<id>.npz with its block (``utils.process_rows``).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

ROW_STEPS = 3


def main(process_id: int, port: int, overrides: dict, out_dir: str) -> None:
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]
                         / "examples" / "bert"))
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  import prepare_data
  import train
  import utils
  from configs import test as test_config
  # pylint: enable=import-outside-toplevel

  config = test_config.get_config()
  config.update(overrides)
  config.distributed.update(coordinator_address=f"127.0.0.1:{port}",
                            num_processes=2, process_id=process_id)
  utils.maybe_initialize_distributed(config.distributed)
  data = prepare_data.load(config, config.data_dir)
  rows = utils.process_rows(utils.make_mesh())
  phase = train.make_phases(config, jax.device_count())[0]
  iterator = train.train_iterator(config, data, phase, rows)
  batches = [next(iterator) for _ in range(ROW_STEPS)]
  np.savez(os.path.join(out_dir, f"rows_{process_id}.npz"),
           rows=np.asarray(rows),
           **{f"{step}/{k}": v for step, batch in enumerate(batches)
              for k, v in batch.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  os.environ.pop("XLA_FLAGS", None)  # One CPU device per process.
  main(int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]),
       sys.argv[4])
