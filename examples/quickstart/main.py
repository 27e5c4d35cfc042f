r"""Quickstart: LAMB on a character-level model of Python's own docstrings.

Run from the repository root (about a minute on a 2-core CPU, offline):

  python examples/quickstart/main.py
  python examples/quickstart/main.py --optimizer adamw
  python examples/quickstart/main.py --config test --workdir /tmp/quickstart
"""

import argparse
import dataclasses

import train
from configs import default as default_config
from configs import test as test_config

CONFIGS = {"default": default_config.get_config,
           "test": test_config.get_config}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n", 1)[0],
      formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  parser.add_argument("--config", choices=sorted(CONFIGS), default="default",
                      help="Base configuration (configs/<name>.py).")
  parser.add_argument("--steps", type=int, help="Training steps.")
  parser.add_argument("--batch-size", type=int, help="Batch size.")
  parser.add_argument("--optimizer", choices=("lamb", "adamw", "lars"),
                      help="Optimizer (default lamb).")
  parser.add_argument("--learning-rate", type=float,
                      help="Peak learning rate (default: per optimizer).")
  parser.add_argument("--seed", type=int, help="Seed of init and batches.")
  parser.add_argument("--workdir", help="Writes metrics.json here.")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(argv)
  overrides = {name: getattr(args, name)
               for name in ("steps", "batch_size", "optimizer",
                            "learning_rate", "seed")
               if getattr(args, name) is not None}
  config = dataclasses.replace(CONFIGS[args.config](), **overrides)
  train.train_and_evaluate(config, args.workdir)


if __name__ == "__main__":
  main()
