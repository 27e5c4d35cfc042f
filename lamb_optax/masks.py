"""Weight-decay and trust-ratio masks built from parameter paths."""

from lamb_optax._src.masks import all_of
from lamb_optax._src.masks import exclude_bias_and_norm
from lamb_optax._src.masks import exclude_paths
from lamb_optax._src.masks import include_paths
from lamb_optax._src.masks import is_bias_or_norm
from lamb_optax._src.masks import path_mask
from lamb_optax._src.masks import rank_at_least

__all__ = (
    "all_of",
    "exclude_bias_and_norm",
    "exclude_paths",
    "include_paths",
    "is_bias_or_norm",
    "path_mask",
    "rank_at_least",
)
