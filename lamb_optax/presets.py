"""LAMB as each peer computes it: apex/NVIDIA, timm, torch-optimizer,
DeepSpeed, TensorFlow and Keras, with their defaults.

Each function returns an :class:`optax.GradientTransformation` whose update is
step for step the peer's (see ``docs/presets.md`` for how each differs from
Algorithm 2 of You et al., 2020, and porting notes).
"""

from lamb_optax._src.presets import deepspeed
from lamb_optax._src.presets import keras
from lamb_optax._src.presets import nvlamb
from lamb_optax._src.presets import PeerTrustRatioState
from lamb_optax._src.presets import tensorflow
from lamb_optax._src.presets import timm
from lamb_optax._src.presets import torch_optimizer

__all__ = (
    "PeerTrustRatioState",
    "deepspeed",
    "keras",
    "nvlamb",
    "tensorflow",
    "timm",
    "torch_optimizer",
)
