"""Implementation modules of lamb_optax; import from `lamb_optax` instead."""
