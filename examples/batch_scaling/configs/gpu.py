"""The same study at a size that means something on one GPU (not run here).

Wider batch ranges (512x, 10 sizes), more data, a bigger MLP and a BERT with
4 layers, a wider grid and more seeds. Nothing else changes: the protocol
(at least 100 steps at every batch, warmup a fifth of the shortest run, a
fixed budget of examples, the mid-budget target, five optimizers), the
verdict rule and the code are the default config's. No GPU was lent to the
authors of this example, so no result of this config is committed.

The masked-LM budget (819,200 sequences of 128 tokens, 105M tokens) is far
more text than the built-in corpus holds (it would be repeated about 200
times); point ``config.mlm.corpus`` at a larger collection of ``.txt`` files.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The GPU configuration."""
  config = default.get_config()
  config.num_learning_rates = 7
  config.selection_seeds = (0, 1, 2)
  config.report_seeds = (100, 101, 102, 103, 104)
  config.num_workers = 1  # One accelerator: cells one after the other.

  # MNIST-1D: 32,000 training signals, an MLP with 3 x 512 (about 550k
  # parameters), batches 32 .. 16384, 100 steps at 16384 (51.2 epochs).
  config.mnist1d.num_samples = 40_000
  config.mnist1d.hidden_sizes = (512, 512, 512)
  config.mnist1d.batch_sizes = tuple(32 * 2**i for i in range(10))
  config.mnist1d.budget_examples = 100 * 16384
  config.mnist1d.warmup_steps = 20  # 1/5 of the 100 steps at batch 16384.

  # Masked LM: BERT 4 x 256 (4 heads), vocabulary 8192, sequences of 128,
  # batches 16 .. 8192, 100 steps at 8192 (819,200 sequences).
  config.mlm.vocab_size = 8192
  config.mlm.seq_length = 128
  config.mlm.eval_examples = 2048
  config.mlm.hidden_size = 256
  config.mlm.num_layers = 4
  config.mlm.num_heads = 4
  config.mlm.intermediate_size = 1024
  config.mlm.batch_sizes = tuple(16 * 2**i for i in range(10))
  config.mlm.budget_examples = 100 * 8192
  config.mlm.warmup_steps = 20  # 1/5 of the 100 steps at batch 8192.
  return config
