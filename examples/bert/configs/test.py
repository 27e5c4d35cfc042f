"""A tiny configuration for tests and CI: seconds on a CPU, logs every step."""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The test configuration."""
  config = default.get_config()
  config.vocab_size = 1024
  config.eval_examples = 64
  config.eval_batch_size = 64
  config.hidden_size = 32
  config.num_layers = 2
  config.num_heads = 2
  config.intermediate_size = 64
  config.max_position_embeddings = 64
  config.seq_lengths = (32, 64)
  config.total_steps = 12
  config.phase_fractions = (0.75, 0.25)
  config.global_batch_size = 16
  config.phase_batch_sizes = ()
  config.num_micro_batches = 2
  config.learning_rate = 5e-2
  config.warmup_fraction = 0.25
  config.log_every = 1
  config.eval_every = 6
  config.checkpoint_every = 6
  config.progress_bar = False
  return config
