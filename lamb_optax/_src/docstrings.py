"""The argument text that ``lamb``, ``lars`` and every preset share, written
once.

A docstring holds lines ``<shared args: name name ...>`` where its ``Args:``
list would describe those arguments; :func:`with_shared_args` replaces it by
the entries below, indented like the line. The rendered documentation and
``help()`` show every argument in full.
"""

import re
import textwrap
from typing import Callable, TypeVar

SHARED_ARGS = {
    "weight_decay_mask": (
        "A bool pytree with the params' structure (or a prefix of it), or a "
        "callable ``params -> such a tree``: the leaves that get weight decay "
        "(optax's ``mask``). None: every leaf."),
    "trust_ratio_mask": (
        "The same forms: the leaves that get the trust ratio; the others "
        "take :math:`r = 1`. None: every leaf."),
    "max_grad_norm": (
        "Optional clip (> 0) of the global norm of the raw gradients, before "
        "anything else (NVIDIA's pre-normalisation); None: no clip."),
    "layer_axes": (
        "The axes of stacked leaves that index layers (scanned models), so "
        "that each layer gets its own ratio: None (a layer is a leaf), an "
        "int or a tuple of ints for every leaf, a pytree (or prefix) of "
        "such values matching the params, or a callable ``params -> such a "
        "tree`` (see :func:`lamb_optax.layer_axes_from_metadata`). Norms "
        "reduce over the other axes; the ratios, their bounds and the state "
        "take the shape of the layer axes."),
    "axis_name": (
        "Under ``shard_map``, the mesh axes each leaf is split along: None, "
        "one name or a tuple of names for every leaf, or a per-leaf pytree "
        "(see :func:`lamb_optax.axis_names_from_specs`). The trust ratio's "
        "squared norms and the ``max_grad_norm`` global norm are summed "
        "over them. Never name an axis along which a leaf is replicated. "
        "Not needed under ``jax.jit`` with ``NamedSharding``."),
}

_LINE = re.compile(r"^( *)<shared args: ([\w ]+)>$", re.M)
F = TypeVar("F", bound=Callable)


def with_shared_args(fn: F) -> F:
  """Fills the ``<shared args: ...>`` line of ``fn``'s docstring."""

  def entries(match):
    indent, names = match.group(1), match.group(2).split()
    return "\n".join(
        textwrap.fill(f"{name}: {SHARED_ARGS[name]}", width=80,
                      initial_indent=indent, subsequent_indent=indent + "  ",
                      break_on_hyphens=False, break_long_words=False)
        for name in names)

  doc, count = _LINE.subn(entries, fn.__doc__)
  if not count:
    raise ValueError(f"{fn.__name__}'s docstring has no shared-args line.")
  fn.__doc__ = doc
  return fn
