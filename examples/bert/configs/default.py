"""Default configuration: a small BERT, about 2.5 minutes on a 2-core CPU.

Two phases as in the paper's mixed-batch recipe (short sequences for 90% of
the steps, then long ones, the learning rate re-warmed from zero at the
change), LAMB with BERT's exclusions, the global batch reached by gradient
accumulation over micro-batches. Override any field on the command line, e.g.
``--config.optimizer=adamw --config.total_steps=500``.
"""

import ml_collections
from ml_collections import config_dict

# Peak learning rates used when `learning_rate` is unset. LAMB, LARS and the
# LAMB presets take relative step sizes (a layer moves by about
# lr * ||layer|| per step); AdamW takes an absolute one.
DEFAULT_LEARNING_RATES = {"lamb": 1e-2, "lars": 1e-2, "adamw": 1e-3}
DEFAULT_LAMB_LEARNING_RATE = DEFAULT_LEARNING_RATES["lamb"]


def get_config() -> ml_collections.ConfigDict:
  """The default configuration."""
  config = ml_collections.ConfigDict()

  # Data. "builtin": Python's own documentation (offline); or a path to a
  # text, .jsonl or .parquet file or a directory of them.
  config.corpus = "builtin"
  config.text_field = "text"  # The text's field (.jsonl) or column (.parquet).
  config.held_out_percent = 10
  # A WordPiece vocab.txt or a tokenizer.json; "": train one on the corpus.
  config.tokenizer = ""
  # WordPiece vocabulary trained when `tokenizer` is unset = embedding rows
  # (with `tokenizer`, its vocabulary size is used).
  config.vocab_size = 4096
  config.lowercase = True
  config.mask_rate = 0.15
  config.eval_examples = 512  # Held-out sequences per evaluation (at most).
  config.eval_batch_size = 128
  # The tokenised shards (prepare_data.py): "" is WORKDIR/data, prepared on
  # first use.
  config.data_dir = ""
  config.examples_per_shard = 65536
  # Check every shard's SHA-256 against the manifest when the data is loaded.
  # This reads every shard, so it is off by default; a shard with bad bytes is
  # named when it is read anyway.
  config.verify_shards = False
  # grain: worker processes (0: a thread of the training process) and steps
  # read ahead.
  config.data_workers = 0
  config.prefetch_batches = 2

  # Model (BERT's post-LayerNorm encoder + MLM head).
  config.hidden_size = 128
  config.num_layers = 2
  config.num_heads = 2
  config.intermediate_size = 512
  config.max_position_embeddings = 256
  config.dropout_rate = 0.0
  config.dtype = "float32"  # Compute dtype ("bfloat16" on accelerators).
  # Stack the layers with nn.scan (one compiled layer; LAMB then needs the
  # layer axis to keep one trust ratio per layer, see train.py).
  config.scan_layers = False
  config.remat = False

  # Phases: sequence length and share of the steps of each.
  config.seq_lengths = (64, 256)
  config.total_steps = 400  # All phases together.
  config.phase_fractions = (0.9, 0.1)
  config.phase_steps = ()  # Explicit steps per phase (overrides fractions).
  config.global_batch_size = 128
  # Per-phase global batch (overrides); the long phase takes a quarter of the
  # sequences, so both phases step through the same 8192 tokens.
  config.phase_batch_sizes = (128, 32)
  # Gradient accumulation: set one of these (0: unset). The default splits
  # each global batch in two micro-batches.
  config.micro_batch_size = 0
  config.num_micro_batches = 2

  # Optimizer: "lamb", "adamw", "lars" or a name in lamb_optax.presets
  # ("nvlamb", "timm", "torch_optimizer", "deepspeed", "tensorflow",
  # "keras").
  config.optimizer = "lamb"
  config.learning_rate = config_dict.placeholder(float)  # Peak; None: per optimizer.
  config.phase_learning_rates = ()  # Per-phase peaks (overrides).
  config.warmup_fraction = 0.1  # Of each phase's steps.
  config.warmup_steps = ()  # Per-phase warmup steps (overrides).
  config.schedule_power = 1.0  # Polynomial decay after warmup (1: linear).
  config.weight_decay = 0.01
  config.max_grad_norm = 0.0  # LAMB's optional global clip (0: none).

  config.seed = 0

  # Devices: one jit over a Mesh of all devices, batch sharded over "data".
  config.num_devices = 0  # 0: all devices.
  config.fsdp = False  # Also shard params and optimizer state over "data".
  config.fsdp_min_size = 2**14  # Smaller leaves stay replicated.
  # jax.distributed.initialize(): `initialize` "auto" (when the fields below
  # are set or a cluster launcher's environment is detected), "yes" or "no".
  # The coordinator ("host:port" of process 0), the number of processes and
  # this process's id; None: unset (JAX detects Slurm, Open MPI, TPU pods).
  config.distributed = ml_collections.ConfigDict({
      "initialize": "auto",
      "coordinator_address": config_dict.placeholder(str),
      "num_processes": config_dict.placeholder(int),
      "process_id": config_dict.placeholder(int),
  })

  # Logging and checkpoints (in steps).
  config.log_every = 10
  config.eval_every = 100
  config.checkpoint_every = 200
  config.max_checkpoints_to_keep = 2
  config.stop_at_step = 0  # Stop (and checkpoint) early, as if preempted.
  config.progress_bar = True
  return config
