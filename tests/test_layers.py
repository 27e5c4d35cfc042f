"""axis_names_from_specs: the mesh axes a layer's squared norm is summed over."""

from jax.sharding import PartitionSpec as P
import pytest

import lamb_optax


def test_names_the_axes_that_split_each_leaf_and_nothing_else():
  specs = {"fsdp_tp": P("data", "model"), "replicated": P(),
           "tuple_entry": P(("data", "model"), None), "short": P(None, "model")}
  assert lamb_optax.axis_names_from_specs(specs) == {
      "fsdp_tp": ("data", "model"), "replicated": None,
      "tuple_entry": ("data", "model"), "short": ("model",)}


def test_axes_that_split_layers_are_left_out():
  # Devices along "stage" hold different layers: their norms must not add.
  specs = {"stack": P("stage", None, "model"), "head": P("stage")}
  names = lamb_optax.axis_names_from_specs(
      specs, layer_axes={"stack": 0, "head": None})
  assert names == {"stack": ("model",), "head": ("stage",)}
  # A layer axis past the spec's length is unsplit: nothing to leave out.
  assert lamb_optax.axis_names_from_specs(
      {"w": P("model")}, layer_axes=2) == {"w": ("model",)}


def test_negative_layer_axes_are_refused_because_specs_omit_trailing_dims():
  # P(None, "model") fits a (L, d, d) leaf: -1 would be read as dim 1.
  with pytest.raises(ValueError, match="`layer_axes`.*non-negative"):
    lamb_optax.axis_names_from_specs({"w": P(None, "model")}, layer_axes=-1)


def test_bad_inputs_name_the_argument():
  with pytest.raises(TypeError, match="`specs`.*PartitionSpec"):
    lamb_optax.axis_names_from_specs({"w": ("data",)})
  with pytest.raises(TypeError, match="`layer_axes`.*callable"):
    lamb_optax.axis_names_from_specs({"w": P("data")}, layer_axes=lambda p: 0)
  with pytest.raises(ValueError, match="`layer_axes` does not fit"):
    lamb_optax.axis_names_from_specs({"w": P("data")},
                                     layer_axes={"v": 0})
