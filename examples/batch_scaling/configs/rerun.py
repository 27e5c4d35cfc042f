"""The default study on disjoint seeds: the pre-registered reproducibility
check (docs/batch_scaling.md, "Reproducibility check").

Everything is the default config's except the seeds, which share none with
it (selection or report, either task). The check passes for an optimizer
when this run's critical batch lies inside the default run's 95% interval.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """The default config on other seeds."""
  config = default.get_config()
  config.selection_seeds = (10, 11, 12)
  config.report_seeds = (110, 111, 112)
  config.mlm.selection_seeds = (10, 11)
  config.mlm.report_seeds = (110, 111)
  config.noise_seed = 17
  return config
