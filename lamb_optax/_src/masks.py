"""Builders of weight-decay and trust-ratio masks from parameter paths.

Each builder returns a callable ``params -> pytree of bools`` that can be passed
as ``weight_decay_mask`` or ``trust_ratio_mask`` (True: the leaf gets decay /
the trust ratio). Paths are joined with ``/``, e.g. ``'encoder/layer_0/
attention/query/kernel'`` for a Flax linen tree or ``'layers/0/linear/kernel'``
for a Flax nnx state.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Union

import jax

from lamb_optax._src import prefix
from lamb_optax._src import validation

MaskFn = Callable[[Any], Any]
Patterns = Union[str, Iterable[str]]

# Leaf names of biases and normalisation parameters in Flax (linen and nnx),
# Haiku and Hugging Face Flax models.
BIAS_NAMES = ("bias", "b", "beta", "offset")
NORM_PARAM_NAMES = ("scale", "gamma")
# Module names of normalisation layers: LayerNorm_0, layer_norm, ln_f, ln1,
# RMSNorm, BatchNorm_1, GroupNorm, norm, final_norm, input_layernorm, norm2,
# ... (a name that ends in "norm", optionally numbered; not "normal_head").
NORM_MODULE_PATTERN = r"(?i)(norm(_?\d+)?$|^ln(_?[a-z0-9]+)?$)"


def path_mask(predicate: Callable[[str, Any], bool]) -> MaskFn:
  """A mask from ``predicate(path, leaf) -> bool`` on '/'-joined leaf paths."""
  def mask_fn(params):
    def leaf(path, x):
      value = predicate(prefix.param_path_str(path), x)
      if not isinstance(value, bool):
        raise TypeError(
            f"mask predicate must return a bool, got {value!r} for "
            f"'{prefix.param_path_str(path)}'.")
      return value
    return jax.tree_util.tree_map_with_path(leaf, params)
  return mask_fn


def exclude_paths(patterns: Patterns) -> MaskFn:
  """False for leaves whose path matches any regex (``re.search``), else True.

  The form of TF's ``exclude_from_weight_decay`` /
  ``exclude_from_layer_adaptation`` lists.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lamb_optax import masks
    >>> params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}}
    >>> masks.exclude_paths(['bias$'])(params)
    {'dense': {'bias': False, 'kernel': True}}
  """
  compiled = validation.check_patterns("patterns", patterns, single=True)
  return path_mask(lambda path, _: not any(p.search(path) for p in compiled))


def include_paths(patterns: Patterns) -> MaskFn:
  """True only for leaves whose path matches any regex (``re.search``)."""
  compiled = validation.check_patterns("patterns", patterns, single=True)
  return path_mask(lambda path, _: any(p.search(path) for p in compiled))


def is_bias_or_norm(path: str) -> bool:
  """Whether a '/'-joined path names a bias or a normalisation parameter."""
  parts = [p for p in path.split("/") if p]
  if not parts:
    return False
  if parts[-1] in ("value", "raw_value") and len(parts) > 1:
    parts = parts[:-1]  # an nnx Variable's attribute, written into the path
  name = parts[-1]
  if name in BIAS_NAMES or name in NORM_PARAM_NAMES:
    return True
  return any(re.search(NORM_MODULE_PATTERN, p) for p in parts[:-1])


def exclude_bias_and_norm() -> MaskFn:
  """BERT's convention: False for biases and normalisation parameters.

  A leaf is excluded when its name is a bias (``bias``, ``b``, ``beta``,
  ``offset``) or a norm parameter (``scale``, ``gamma``), or when a module
  on its path is a normalisation layer (``LayerNorm_0``, ``layer_norm``,
  ``ln_f``, ``RMSNorm``, ...). Pass it as both ``weight_decay_mask`` and
  ``trust_ratio_mask`` to train BERT as NVIDIA and Google do.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lamb_optax import masks
    >>> params = {'Dense_0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
    ...           'LayerNorm_0': {'scale': jnp.ones(2), 'bias': jnp.ones(2)}}
    >>> masks.exclude_bias_and_norm()(params)
    {'Dense_0': {'bias': False, 'kernel': True}, 'LayerNorm_0': {'bias': False, 'scale': False}}
  """
  return path_mask(lambda path, _: not is_bias_or_norm(path))


def rank_at_least(rank: int = 2) -> MaskFn:
  """True for leaves with at least ``rank`` dimensions (matrices and up).

  Examples:
    >>> import jax.numpy as jnp
    >>> from lamb_optax import masks
    >>> masks.rank_at_least(2)({'w': jnp.ones((2, 2)), 'b': jnp.ones(2)})
    {'b': False, 'w': True}
  """
  validation.check_int("rank", rank, 0, expected="an int >= 0")
  return path_mask(lambda _, x: len(getattr(x, "shape", ())) >= rank)


def all_of(*mask_fns: MaskFn) -> MaskFn:
  """True where every mask is True (e.g. rank >= 2 and not a norm)."""
  if not mask_fns:
    raise ValueError("`all_of` needs at least one mask.")
  def mask_fn(params):
    trees = [m(params) if callable(m) else m for m in mask_fns]
    return jax.tree.map(lambda *bs: all(bs), *trees)
  return mask_fn
