"""BERT-Large with the paper's mixed-batch LAMB recipe, for a TPU pod.

24 layers, hidden 1024, 16 heads, intermediate 4096, vocabulary 30522, 512
positions (335M parameters with the MLM head). The paper's Table 1 recipe
for the 64k/32k mixed batch (You et al., 2020): phase 1, sequences of 128
at batch 65536; phase 2, sequences of 512 at batch 32768; 8599 steps in all
(split 7038 + 1561, peak learning rates 6e-3 and 4e-3, warmups of 2000 and
200 steps from zero, as configs/bert_base.py follows NVIDIA's recipe for
the same batches). On the paper's TPUv3 pod (1024 chips, 2048 TensorCores
of 16 GiB) that is 32 sequences of 128, then 16 of 512, per core, with no
accumulation; check it before paying for the pod:

  python examples/bert/train_compile.py \\
      --config=examples/bert/configs/bert_large.py --topology=v3-1024

On fewer devices set `micro_batch_size` (a multiple of the device count
that divides both batches) to accumulate the same global batches.
"""

import ml_collections

from configs import bert_base


def get_config() -> ml_collections.ConfigDict:
  """The BERT-Large configuration."""
  config = bert_base.get_config()
  config.hidden_size = 1024
  config.num_layers = 24
  config.num_heads = 16
  config.intermediate_size = 4096
  # The whole global batch in one step on the paper's pod (2048 cores).
  config.micro_batch_size = 0
  config.num_micro_batches = 1
  return config
