"""The default study: both tasks on a 2-core CPU (see README.md for timing).

mnist1d: 7 batch sizes, 16 to 1024 (64x), 102,400 examples (100 steps at
1024). mlm: 4 batch sizes, 4 to 256 (64x), 25,600 sequences of 32 tokens
(819,200 tokens; 100 steps at 256). Every optimizer gets the same grid (5
rates a factor 2 apart), the same edge-extension rule, 2 selection seeds and
3 fresh report seeds. The sizes and the grid centres come from base-batch
pilots only (calibrate.py; README.md, "Calibration").
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The default configuration."""
  config = ml_collections.ConfigDict()
  config.tasks = ("mnist1d", "mlm")
  config.optimizers = ("lamb", "adamw", "lars", "nesterov", "muon")

  # Tuning protocol (README.md): the same for every optimizer.
  config.num_learning_rates = 5  # Trials per (optimizer, batch) cell and seed.
  config.lr_factor = 2.0  # Between neighbouring rates of the grid.
  config.max_extensions = 4  # Edge extensions per cell, at most.
  config.selection_seeds = (0, 1)  # Choose the rate on these (by the mean).
  config.report_seeds = (100, 101, 102)  # Fresh seeds for the results.
  # Held-out evaluations per run (curve, steps-to-target): every 2% of the
  # budget. 50 divides every run length, so the budget is exact.
  config.num_evals = 50
  # Every batch size gets at least this many optimizer steps, and the
  # (LEGW: fixed) warmup is at most this fraction of the shortest run.
  config.min_steps = 100
  config.max_warmup_fraction = 0.25

  # Optimizers: the customary hyperparameters, fixed (only the rate is tuned).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.b1 = 0.9  # LAMB, AdamW, Muon's AdamW fallback.
  # beta2 of LAMB, AdamW and Muon's AdamW fallback: 0.999 at the base batch
  # B0, b2 ** (B / B0) at B (Marek et al., 2025: the second moment's
  # half-life in examples, hence in tokens, is the same at every batch size;
  # under a fixed budget, the same 11% of every run). "fixed" keeps 0.999.
  config.optimizer.b2 = 0.999
  config.optimizer.beta2_rule = "half_life"
  config.optimizer.eps = 1e-6  # BERT's.
  config.optimizer.momentum = 0.9  # LARS, Nesterov.
  config.optimizer.muon_beta = 0.95  # optax.contrib.muon's default.
  # BERT's 0.01 for the Adam family and Muon; ImageNet's 5e-4 for LARS and
  # Nesterov (an SGD-family update is g + wd * x: 0.01 there would dominate g).
  config.optimizer.weight_decay = ml_collections.ConfigDict(
      {"lamb": 0.01, "adamw": 0.01, "lars": 5e-4, "nesterov": 5e-4,
       "muon": 0.01})

  # MNIST-1D with an MLP with LayerNorm (11,978 parameters).
  config.mnist1d = ml_collections.ConfigDict()
  # 8000 training and 2000 held-out signals (mnist1d's default 5000 total
  # overfits within the 102,400-example budget: README.md, "Calibration").
  config.mnist1d.num_samples = 10_000
  config.mnist1d.hidden_sizes = (64, 64, 64)
  config.mnist1d.batch_sizes = (16, 32, 64, 128, 256, 512, 1024)
  config.mnist1d.budget_examples = 102_400  # 100 steps at 1024.
  # LEGW: the same warmup iterations at every batch size. 20 is 1/5 of the
  # 100 steps at the largest batch (the paper's Table 4 at 32K) and 1/320 of
  # the base run (the paper's base ratio).
  config.mnist1d.warmup_steps = 20
  config.mnist1d.decay_power = 1.0  # Linear decay to zero (BERT's).
  # The grid centre at the base batch (from there, edge extensions): each
  # optimizer's best rate in the base-batch pilot (seed 0).
  config.mnist1d.initial_learning_rates = ml_collections.ConfigDict(
      {"lamb": 5e-3, "adamw": 4e-3, "lars": 5e-3, "nesterov": 0.025,
       "muon": 8e-3})
  # Steps-to-target target: the worst tuned base-batch median at this
  # fraction of the budget (a 2x step overhead stays observable).
  config.mnist1d.target_fraction = 0.4

  # Masked-LM, phase 1 only, with the BERT example's model and pipeline.
  config.mlm = ml_collections.ConfigDict()
  config.mlm.corpus = "builtin"
  config.mlm.held_out_percent = 10
  config.mlm.vocab_size = 128
  config.mlm.seq_length = 32
  config.mlm.mask_rate = 0.15
  config.mlm.eval_examples = 256
  config.mlm.hidden_size = 32  # BERT 2 x 32: 31,904 parameters.
  config.mlm.num_layers = 2
  config.mlm.num_heads = 2
  config.mlm.intermediate_size = 128
  config.mlm.batch_sizes = (4, 16, 64, 256)
  config.mlm.budget_examples = 25_600  # Sequences: 100 steps at 256.
  config.mlm.warmup_steps = 20  # 1/5 of the 100 steps at batch 256 (LEGW).
  config.mlm.decay_power = 1.0
  config.mlm.initial_learning_rates = ml_collections.ConfigDict(
      {"lamb": 5e-3, "adamw": 1e-3, "lars": 1e-2, "nesterov": 0.1,
       "muon": 2e-3})
  config.mlm.target_fraction = 0.4

  config.plot_dpi = 80
  config.progress_bar = True
  config.stop_after_cells = 0  # Stop after this many new cells (0: never).
  # Cells trained at once (threads; the numbers do not depend on it).
  config.num_workers = 2
  return config
