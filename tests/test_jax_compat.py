"""lamb_optax._src.jax_compat on the installed JAX: the one place that reads
what JAX does not expose the same way in every supported version."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import pytest

from lamb_optax._src import jax_compat


def _seen_inside_shard_map(check_vma):
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  seen = {}

  def body(x):
    seen["enabled"] = jax_compat.check_vma_enabled()
    seen["varying"] = jax_compat.varying_axes(x)
    return x

  x = jax.device_put(jnp.ones(4), NamedSharding(mesh, P("data")))
  jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("data"),
                        out_specs=P("data"), check_vma=check_vma))(x)
  return seen


@pytest.mark.parametrize("check_vma", [True, False])
def test_check_vma_follows_the_enclosing_shard_map(check_vma):
  assert _seen_inside_shard_map(check_vma)["enabled"] is check_vma


def test_check_vma_matches_the_private_flag_where_it_exists():
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    private = jax_config._check_vma  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pytest.skip("this JAX has no private _check_vma")
  for check_vma in (True, False):
    with private(check_vma):
      assert jax_compat.check_vma_enabled() is check_vma


def test_check_vma_falls_back_to_the_private_flag(monkeypatch):
  """Without the public ``jax.config.check_vma`` (older JAX), the private
  flag is read."""
  try:
    from jax._src import config as jax_config  # pylint: disable=g-import-not-at-top
    private = jax_config._check_vma  # pylint: disable=protected-access
  except (ImportError, AttributeError):
    pytest.skip("this JAX has no private _check_vma")
  monkeypatch.setattr(type(jax.config), "check_vma", None, raising=False)
  for check_vma in (True, False):
    with private(check_vma):
      assert jax_compat.check_vma_enabled() is check_vma


def test_varying_axes_of_a_sharded_value_under_check_vma():
  assert _seen_inside_shard_map(True)["varying"] == frozenset({"data"})


def test_no_varying_axes_outside_shard_map():
  assert jax_compat.varying_axes(jnp.ones(3)) == frozenset()
