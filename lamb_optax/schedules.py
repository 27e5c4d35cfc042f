"""The paper's learning-rate recipe: warmup, decay, LEGW and phase lengths."""

from lamb_optax._src.schedules import LEGWConfig
from lamb_optax._src.schedules import legw
from lamb_optax._src.schedules import legw_config
from lamb_optax._src.schedules import linear_scaled
from lamb_optax._src.schedules import mixed_batch
from lamb_optax._src.schedules import phase_steps_from_epochs
from lamb_optax._src.schedules import phase_steps_from_tokens
from lamb_optax._src.schedules import split_steps
from lamb_optax._src.schedules import sqrt_scaled
from lamb_optax._src.schedules import warmup_polynomial_decay

__all__ = (
    "LEGWConfig",
    "legw",
    "legw_config",
    "linear_scaled",
    "mixed_batch",
    "phase_steps_from_epochs",
    "phase_steps_from_tokens",
    "split_steps",
    "sqrt_scaled",
    "warmup_polynomial_decay",
)
