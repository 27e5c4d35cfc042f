"""BERT-base with the paper's mixed-batch LAMB recipe (an accelerator job).

12 layers, hidden 768, 12 heads, intermediate 3072, vocabulary 30522, 512
positions (109.5M parameters with the MLM head). Phase 1: sequences of 128
at batch 65536; phase 2: sequences of 512 at batch 32768; 8599 steps in all
(the paper's Table 1 for the 64k/32k mixed batch). The split of the steps
(7038 + 1561), the peak learning rates (6e-3, 4e-3) and the warmups (2000,
200 steps, each from zero) follow NVIDIA's DeepLearningExamples LAMB recipe
for the same batches (which runs 7038 + 1563). Set `micro_batch_size` to
what fits your accelerators' memory (it must divide both batches and be a
multiple of the number of devices); on fewer devices scale the batches down
and keep the rest. Prepare the shards once with prepare_data.py (README:
"Pretraining on your own corpus on a pod").
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The BERT-base configuration."""
  config = default.get_config()
  config.vocab_size = 30522
  config.hidden_size = 768
  config.num_layers = 12
  config.num_heads = 12
  config.intermediate_size = 3072
  config.max_position_embeddings = 512
  config.dropout_rate = 0.1
  config.dtype = "bfloat16"
  config.scan_layers = True
  config.remat = True

  config.seq_lengths = (128, 512)
  config.total_steps = 8599
  config.phase_steps = (7038, 1561)
  config.global_batch_size = 65536
  config.phase_batch_sizes = (65536, 32768)
  config.num_micro_batches = 0
  config.micro_batch_size = 256  # Per accumulation step, all devices.
  config.optimizer = "lamb"
  config.phase_learning_rates = (6e-3, 4e-3)
  config.warmup_steps = (2000, 200)
  config.eval_examples = 2048
  config.eval_batch_size = 256
  config.fsdp = True
  # grain worker processes per host, each computing whole batches ahead:
  # about 5x what an 8-GPU host's BERT-base step reads (README, "Throughput
  # and memory"); fewer on a smaller host.
  config.data_workers = 32
  config.log_every = 10
  config.eval_every = 500
  config.checkpoint_every = 500
  return config
