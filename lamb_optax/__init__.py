"""lamb_optax: LAMB and LARS (You et al., 2020) as composable Optax transforms.

References:
  You et al., `Large Batch Optimization for Deep Learning: Training BERT in 76
  minutes <https://arxiv.org/abs/1904.00962>`_, ICLR 2020.
"""

from lamb_optax import masks
from lamb_optax import presets
from lamb_optax import schedules
from lamb_optax._src.accumulation import accumulate_gradients
from lamb_optax._src.accumulation import multi_steps
from lamb_optax._src.adam import ScaleByAdamState
from lamb_optax._src.adam import scale_by_adam
from lamb_optax._src.lamb import lamb
from lamb_optax._src.layers import axis_names_from_specs
from lamb_optax._src.layers import layer_axes_from_metadata
from lamb_optax._src.lars import lars
from lamb_optax._src.prefix import param_path_str as param_path
from lamb_optax._src.sharding import state_shardings
from lamb_optax._src.state_utils import trust_ratios
from lamb_optax._src.stored_direction import StoredDirectionState
from lamb_optax._src.trust_ratio import ScaleByTrustRatioState
from lamb_optax._src.trust_ratio import scale_by_trust_ratio

__version__ = "0.1.0"

__all__ = (
    "ScaleByAdamState",
    "ScaleByTrustRatioState",
    "StoredDirectionState",
    "accumulate_gradients",
    "axis_names_from_specs",
    "lamb",
    "layer_axes_from_metadata",
    "lars",
    "masks",
    "multi_steps",
    "param_path",
    "presets",
    "scale_by_adam",
    "scale_by_trust_ratio",
    "schedules",
    "state_shardings",
    "trust_ratios",
)
