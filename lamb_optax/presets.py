"""LAMB as each peer computes it: apex/NVIDIA, timm, torch-optimizer,
DeepSpeed, TensorFlow and Keras, with their defaults.

Each function returns an :class:`optax.GradientTransformationExtraArgs` whose
update is step for step the peer's (see ``docs/presets.md`` for how each
differs from Algorithm 2 of You et al., 2020, and porting notes). All take
one vocabulary (``weight_decay_mask``, ``trust_ratio_mask``,
``max_grad_norm``, ``layer_axes``, ``axis_name``), so a plain name -> factory
mapping can call any of them.
"""

from lamb_optax._src.presets import deepspeed
from lamb_optax._src.presets import keras
from lamb_optax._src.presets import nvlamb
from lamb_optax._src.presets import tensorflow
from lamb_optax._src.presets import timm
from lamb_optax._src.presets import torch_optimizer

__all__ = (
    "deepspeed",
    "keras",
    "nvlamb",
    "tensorflow",
    "timm",
    "torch_optimizer",
)
