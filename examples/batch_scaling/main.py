r"""Does LAMB scale? LAMB, AdamW, LARS, Nesterov and Muon as the batch grows.

Run from the repository root (the default takes under an hour on a 2-core
CPU, offline):

  python examples/batch_scaling/main.py --workdir=/tmp/batch_scaling \
      --config=examples/batch_scaling/configs/default.py

Override any config field, e.g. `--config.tasks=mnist1d`. Running again with
the same workdir skips the finished cells; `--mode=outputs` rewrites every
output from the workdir's cells without training. The protocol and the
verdict rule are in README.md.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

import study

_HERE = os.path.dirname(os.path.abspath(__file__))

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the study's outputs.")
flags.DEFINE_enum(
    "mode", "run", ["run", "outputs"],
    "run: train the missing cells, then write the outputs; outputs: rewrite "
    "the outputs from the workdir's cells (all of them must be there).")
config_flags.DEFINE_config_file(
    "config", os.path.join(_HERE, "configs", "default.py"),
    "Study configuration (a configs/*.py file).", lock_config=True)
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if FLAGS.mode == "outputs":
    study.rebuild_outputs(FLAGS.config, FLAGS.workdir)
  else:
    study.run_study(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
