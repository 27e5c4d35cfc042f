"""A tiny study for tests and CI: every output written, in seconds.

mnist1d only (2 batch sizes, 8x apart) and the three optimizers the verdict
needs; the mlm task is tested on its own (tests/test_batch_scaling.py). Its
numbers mean nothing: it checks the machinery, not the claim.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The test configuration."""
  config = default.get_config()
  config.tasks = ("mnist1d",)
  config.optimizers = ("lamb", "adamw", "lars")
  config.num_learning_rates = 3
  config.max_extensions = 1
  config.selection_seeds = (0, 1)
  config.report_seeds = (100, 101)
  config.num_evals = 4
  config.min_steps = 4  # The numbers mean nothing here.
  config.num_workers = 1
  config.mnist1d.num_samples = 1000
  config.mnist1d.hidden_sizes = (16,)
  config.mnist1d.batch_sizes = (16, 128)
  config.mnist1d.budget_examples = 1024
  config.mnist1d.warmup_steps = 2
  config.mnist1d.target = 0.2
  config.mnist1d.max_batch = {}
  config.mnist1d.noise_examples = 800  # The whole training set.
  config.mlm.vocab_size = 256
  config.mlm.seq_length = 16
  config.mlm.eval_examples = 32
  config.mlm.hidden_size = 16
  config.mlm.num_layers = 1
  config.mlm.num_heads = 1
  config.mlm.intermediate_size = 32
  config.mlm.batch_sizes = (4, 32)
  config.mlm.budget_examples = 256
  config.mlm.warmup_steps = 2
  config.mlm.max_batch = {}
  config.mlm.noise_examples = 16
  config.progress_bar = False
  return config
