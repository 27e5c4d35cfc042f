r"""BERT masked-LM pre-training with LAMB (You et al., 2020), offline.

Run from the repository root (about 2.5 minutes on a 2-core CPU):

  python examples/bert/main.py --workdir=/tmp/bert \
      --config=examples/bert/configs/default.py

Override any config field, e.g. `--config.optimizer=adamw`,
`--config.total_steps=1000`, `--config.corpus=/path/to/texts/`. Running again
with the same workdir resumes from the latest checkpoint. See README.md.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import train

_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for outputs and checkpoints.")
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Training configuration (a configs/*.py file).", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file at INFO.
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
