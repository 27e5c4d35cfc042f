"""lamb_optax.masks: which leaves get weight decay / the trust ratio.

The masks are checked leaf by leaf on real Flax parameter trees (linen and
nnx), on Hugging Face / TF / Haiku style names, and, plugged into lamb and
lars, numerically: masked-out leaves get no decay and a ratio of exactly 1,
against a float64 statement of the first step.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lamb_optax
from lamb_optax import masks


def path_of(key_path):
  """'/'-joined path of a jax key path (independent of the package)."""
  parts = []
  for k in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
  return "/".join(parts)


def flat_by_path(tree):
  return {path_of(p): v for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def strip_value(path):
  return re.sub(r"/value$", "", path)


# --------------------------------------------------------------------------
# Real models.
# --------------------------------------------------------------------------


class Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4,
                                        name="attention")(x)
    x = nn.LayerNorm(name="layer_norm")(x)
    return nn.Dense(4, name="mlp")(x)


class TinyEncoder(nn.Module):
  """Embed, LayerNorm, attention, Conv, RMSNorm, a bias-free head."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(10, 4)(ids)
    x = nn.LayerNorm()(x)
    x = Block()(x)
    x = nn.Conv(4, (3,))(x)
    x = nn.RMSNorm(name="final_norm")(x)
    return nn.Dense(2, use_bias=False, name="head")(x)


LINEN_EXPECTED = {
    # Attention biases are 2-D in Flax: only their name says they are biases.
    "Block_0/attention/key/bias": False,
    "Block_0/attention/key/kernel": True,
    "Block_0/attention/out/bias": False,
    "Block_0/attention/out/kernel": True,
    "Block_0/attention/query/bias": False,
    "Block_0/attention/query/kernel": True,
    "Block_0/attention/value/bias": False,
    "Block_0/attention/value/kernel": True,
    "Block_0/layer_norm/bias": False,
    "Block_0/layer_norm/scale": False,
    "Block_0/mlp/bias": False,
    "Block_0/mlp/kernel": True,
    "Conv_0/bias": False,
    "Conv_0/kernel": True,
    "Embed_0/embedding": True,
    "LayerNorm_0/bias": False,
    "LayerNorm_0/scale": False,
    "final_norm/scale": False,
    "head/kernel": True,
}


@functools.lru_cache(maxsize=None)
def _linen_params():
  init = jax.jit(TinyEncoder().init)
  return init(jax.random.PRNGKey(0), jnp.zeros((1, 5), jnp.int32))["params"]


def linen_params():
  return jax.tree.map(lambda x: x, _linen_params())  # a fresh container


class NnxModel(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 4, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs),
                            nnx.Linear(4, 4, rngs=rngs)])
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.rms = nnx.RMSNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


NNX_EXPECTED = {
    "embed/embedding": True,
    "head/kernel": True,
    "layers/0/bias": False,
    "layers/0/kernel": True,
    "layers/1/bias": False,
    "layers/1/kernel": True,
    "norm/bias": False,
    "norm/scale": False,
    "rms/scale": False,
}


def nnx_state():
  return nnx.state(NnxModel(nnx.Rngs(0)), nnx.Param)


def test_exclude_bias_and_norm_on_linen_params():
  params = linen_params()
  assert set(flat_by_path(params)) == set(LINEN_EXPECTED)  # model as assumed
  mask = masks.exclude_bias_and_norm()(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  assert flat_by_path(mask) == LINEN_EXPECTED
  assert all(type(b) is bool for b in jax.tree.leaves(mask))


def test_exclude_bias_and_norm_on_nnx_state():
  state = nnx_state()
  mask = masks.exclude_bias_and_norm()(state)
  got = {strip_value(p): b for p, b in flat_by_path(mask).items()}
  assert got == NNX_EXPECTED
  assert jax.tree.structure(mask) == jax.tree.structure(state)


def test_exclude_bias_and_norm_on_pure_nnx_state():
  # What nnx.Optimizer.update passes to the optimizer: plain arrays.
  state = nnx.as_pure(nnx_state())
  assert flat_by_path(masks.exclude_bias_and_norm()(state)) == NNX_EXPECTED


@pytest.mark.parametrize("path, keep", [
    # Hugging Face Flax BERT.
    ("bert/embeddings/word_embeddings/embedding", True),
    ("bert/embeddings/LayerNorm/scale", False),
    ("bert/embeddings/LayerNorm/bias", False),
    ("bert/encoder/layer/0/attention/self/query/kernel", True),
    ("bert/encoder/layer/0/attention/self/query/bias", False),
    ("bert/encoder/layer/0/attention/output/LayerNorm/scale", False),
    ("bert/pooler/dense/kernel", True),
    # TF BERT names.
    ("bert/encoder/layer_0/output/LayerNorm/gamma", False),
    ("bert/encoder/layer_0/output/LayerNorm/beta", False),
    ("bert/encoder/layer_0/intermediate/dense/kernel", True),
    # GPT-2 (HF Flax).
    ("transformer/h/0/ln_1/scale", False),
    ("transformer/h/0/ln_2/bias", False),
    ("transformer/ln_f/scale", False),
    ("transformer/h/0/attn/c_attn/kernel", True),
    ("transformer/h/0/attn/c_attn/bias", False),
    ("transformer/wte/embedding", True),
    # T5X.
    ("encoder/layers_0/pre_attention_layer_norm/scale", False),
    ("encoder/encoder_norm/scale", False),
    ("encoder/layers_0/mlp/wi/kernel", True),
    ("token_embedder/embedding", True),
    # Haiku.
    ("mlp/~/linear_0/w", True),
    ("mlp/~/linear_0/b", False),
    ("layer_norm/scale", False),
    ("layer_norm/offset", False),
    # nnx Variable paths.
    ("layers/0/kernel/value", True),
    ("layers/0/bias/value", False),
    ("norm/scale/value", False),
    # Not biases: names that only contain "bias".
    ("encoder/rel_pos/relative_attention_bias/embedding", True),
    ("swin/relative_position_bias_table", True),
    # Not normalisation layers: module names that only contain "norm".
    ("decoder/surface_normal_head/kernel", True),
    ("abnormality_classifier/Dense_0/kernel", True),
    ("", True),
])
def test_is_bias_or_norm_on_common_names(path, keep):
  # keep: the leaf gets decay / the ratio under BERT's convention.
  assert masks.is_bias_or_norm(path) is (not keep)


def test_exclude_bias_and_norm_on_hf_style_tree():
  params = {"bert": {
      "embeddings": {"word_embeddings": {"embedding": jnp.ones((5, 4))},
                     "LayerNorm": {"gamma": jnp.ones(4), "beta": jnp.ones(4)}},
      "encoder": {"layer": {"0": {"attention": {"output": {
          "dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
          "LayerNorm": {"gamma": jnp.ones(4), "beta": jnp.ones(4)}}}}}},
  }}
  got = flat_by_path(masks.exclude_bias_and_norm()(params))
  assert got == {
      "bert/embeddings/word_embeddings/embedding": True,
      "bert/embeddings/LayerNorm/gamma": False,
      "bert/embeddings/LayerNorm/beta": False,
      "bert/encoder/layer/0/attention/output/dense/kernel": True,
      "bert/encoder/layer/0/attention/output/dense/bias": False,
      "bert/encoder/layer/0/attention/output/LayerNorm/gamma": False,
      "bert/encoder/layer/0/attention/output/LayerNorm/beta": False,
  }


# --------------------------------------------------------------------------
# rank_at_least.
# --------------------------------------------------------------------------


def _ranked_tree():
  return {"scalar": jnp.array(1.0), "vector": jnp.ones(3),
          "matrix": jnp.ones((2, 3)), "conv": jnp.ones((3, 3, 2, 4)),
          "nested": [jnp.ones((2, 2)), jnp.ones(2)]}


@pytest.mark.parametrize("rank", [0, 1, 2, 3, 5])
def test_rank_at_least(rank):
  tree = _ranked_tree()
  got = masks.rank_at_least(rank)(tree)
  want = jax.tree.map(lambda x: np.ndim(x) >= rank, tree)
  assert got == want
  assert all(type(b) is bool for b in jax.tree.leaves(got))


def test_rank_at_least_default_is_matrices_and_up():
  got = flat_by_path(masks.rank_at_least()(linen_params()))
  assert got["Block_0/attention/query/bias"] is True  # 2-D bias
  assert got["Block_0/mlp/bias"] is False
  assert got["Conv_0/kernel"] is True


@pytest.mark.parametrize("rank", [-1, 1.5, True, "2", None])
def test_rank_at_least_rejects_non_natural_rank(rank):
  with pytest.raises((ValueError, TypeError), match=r"\brank\b"):
    masks.rank_at_least(rank)


# --------------------------------------------------------------------------
# exclude_paths / include_paths / path_mask / all_of.
# --------------------------------------------------------------------------


def test_exclude_and_include_paths_with_regex_lists():
  params = linen_params()
  patterns = [r"bias$", r"(?i)norm", r"^Embed_0/"]
  excluded = flat_by_path(masks.exclude_paths(patterns)(params))
  included = flat_by_path(masks.include_paths(patterns)(params))
  for path in LINEN_EXPECTED:
    hit = any(re.search(p, path) for p in patterns)
    assert excluded[path] is (not hit), path
    assert included[path] is hit, path
  assert excluded["Embed_0/embedding"] is False
  assert excluded["head/kernel"] is True


def test_paths_single_string_and_tuple_and_generator():
  params = linen_params()
  one = masks.include_paths(r"attention/(query|key)/kernel$")(params)
  assert [p for p, b in flat_by_path(one).items() if b] == [
      "Block_0/attention/key/kernel", "Block_0/attention/query/kernel"]
  as_tuple = masks.exclude_paths(("mlp", "Conv"))(params)
  as_generator = masks.exclude_paths(p for p in ["mlp", "Conv"])(params)
  assert as_tuple == as_generator
  assert sum(not b for b in jax.tree.leaves(as_tuple)) == 4
  assert all(jax.tree.leaves(masks.exclude_paths([])(params)))
  assert not any(jax.tree.leaves(masks.include_paths([])(params)))


def test_paths_use_slash_joined_keys_with_list_indices():
  params = {"layers": [{"kernel": jnp.ones((2, 2))},
                       {"kernel": jnp.ones((2, 2))}],
            "head": (jnp.ones(2), jnp.ones(2))}
  got = masks.include_paths([r"^layers/1/kernel$", r"^head/0$"])(params)
  assert got == {"layers": [{"kernel": False}, {"kernel": True}],
                 "head": (True, False)}


def test_include_paths_on_nnx_state_uses_documented_paths():
  # The masks module documents nnx paths as 'layers/0/linear/kernel', so a
  # regex anchored at the leaf name must work on an nnx state.
  state = nnx_state()
  got = masks.include_paths([r"^layers/0/kernel$", r"bias$"])(state)
  got = {strip_value(p): b for p, b in flat_by_path(got).items()}
  assert got == {p: p in ("layers/0/kernel", "layers/0/bias", "layers/1/bias",
                          "norm/bias") for p in NNX_EXPECTED}


@pytest.mark.parametrize("patterns", ["(", ["ok", "[unclosed"], ["*bad"]])
@pytest.mark.parametrize("builder", [masks.exclude_paths, masks.include_paths])
def test_invalid_regex_names_the_argument(builder, patterns):
  with pytest.raises(ValueError, match=r"\bpatterns\b"):
    builder(patterns)


@pytest.mark.parametrize("patterns", [[1], ["ok", None], [re.compile("x")]])
def test_non_string_pattern_rejected(patterns):
  with pytest.raises(TypeError, match=r"\bpatterns\b"):
    masks.exclude_paths(patterns)


def test_path_mask_predicate_sees_path_and_leaf():
  seen = {}

  def predicate(path, leaf):
    seen[path] = np.shape(leaf)
    return path.startswith("Block_0/") and np.size(leaf) > 8

  params = linen_params()
  got = flat_by_path(masks.path_mask(predicate)(params))
  shapes = {p: np.shape(x) for p, x in flat_by_path(params).items()}
  assert seen == shapes
  assert got == {p: p.startswith("Block_0/") and int(np.prod(s)) > 8
                 for p, s in shapes.items()}


@pytest.mark.parametrize("value", [1, None, "yes", np.float32(1.0)])
def test_path_mask_predicate_must_return_bool(value):
  with pytest.raises(TypeError):
    masks.path_mask(lambda path, leaf: value)({"w": jnp.ones(2)})


def test_all_of_is_the_conjunction():
  params = linen_params()
  combined = masks.all_of(masks.rank_at_least(2),
                          masks.exclude_bias_and_norm())(params)
  rank2 = flat_by_path(masks.rank_at_least(2)(params))
  got = flat_by_path(combined)
  assert got == {p: rank2[p] and LINEN_EXPECTED[p] for p in LINEN_EXPECTED}
  # Rank alone would decay the 2-D attention biases; the conjunction does not.
  assert rank2["Block_0/attention/query/bias"] is True
  assert got["Block_0/attention/query/bias"] is False


def test_all_of_accepts_bool_trees_and_nnx_states():
  params = {"a": jnp.ones((2, 2)), "bias": jnp.ones((2, 2)), "c": jnp.ones(2)}
  tree = {"a": True, "bias": True, "c": False}
  got = masks.all_of(tree, masks.exclude_bias_and_norm())(params)
  assert got == {"a": True, "bias": False, "c": False}
  single = masks.all_of(masks.rank_at_least(1))(params)
  assert single == masks.rank_at_least(1)(params)
  state = nnx_state()
  got = masks.all_of(masks.rank_at_least(2),
                     masks.exclude_bias_and_norm())(state)
  got = {strip_value(p): b for p, b in flat_by_path(got).items()}
  assert got == {p: b and p.endswith(("kernel", "embedding"))
                 for p, b in NNX_EXPECTED.items()}


def test_all_of_needs_a_mask():
  with pytest.raises(ValueError):
    masks.all_of()


# --------------------------------------------------------------------------
# Masks plugged into lamb and lars.
# --------------------------------------------------------------------------


def _first_step_grads(params):
  rng = np.random.default_rng(0)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(np.shape(x)), jnp.float32),
      params)


def _norm(x):
  return np.sqrt(np.sum(np.square(x)))


MASK_PAIRS = {
    "bert": (masks.exclude_bias_and_norm, masks.exclude_bias_and_norm),
    "different": (lambda: masks.rank_at_least(2),
                  lambda: masks.include_paths([r"^Block_0/", r"^head/"])),
}


@pytest.mark.parametrize("pair", sorted(MASK_PAIRS))
def test_lamb_masks_give_no_decay_and_unit_ratio_to_masked_leaves(pair):
  lr, wd, eps = 1e-2, 0.1, 1e-6
  decay_fn, adapt_fn = (f() for f in MASK_PAIRS[pair])
  params = linen_params()
  grads = _first_step_grads(params)
  tx = lamb_optax.lamb(lr, eps=eps, weight_decay=wd,
                       weight_decay_mask=decay_fn, trust_ratio_mask=adapt_fn)
  updates, state = tx.update(grads, tx.init(params), params)
  ratios = flat_by_path(lamb_optax.trust_ratios(state))
  decay = flat_by_path(decay_fn(params))
  adapt = flat_by_path(adapt_fn(params))
  assert any(decay.values()) and not all(decay.values())
  assert any(adapt.values()) and not all(adapt.values())
  flat_x, flat_g = flat_by_path(params), flat_by_path(grads)
  for path, got in flat_by_path(updates).items():
    x = np.asarray(flat_x[path], np.float64)
    g = np.asarray(flat_g[path], np.float64)
    u = g / (np.abs(g) + eps) + (wd * x if decay[path] else 0.0)
    ratio = 1.0
    if adapt[path] and _norm(x) > 0:
      ratio = _norm(x) / _norm(u)
    np.testing.assert_allclose(np.asarray(got, np.float64), -lr * ratio * u,
                               rtol=2e-5, atol=1e-8, err_msg=path)
    if not adapt[path]:
      assert float(ratios[path]) == 1.0, path
    else:
      np.testing.assert_allclose(float(ratios[path]), ratio, rtol=2e-5,
                                 err_msg=path)


def test_lars_masks_give_no_decay_and_unit_ratio_to_masked_leaves():
  lr, wd, momentum = 1e-1, 0.05, 0.9
  mask_fn = masks.exclude_bias_and_norm()
  params = linen_params()
  grads = _first_step_grads(params)
  tx = lamb_optax.lars(lr, momentum=momentum, weight_decay=wd,
                       weight_decay_mask=mask_fn, trust_ratio_mask=mask_fn)
  updates, state = tx.update(grads, tx.init(params), params)
  ratios = flat_by_path(lamb_optax.trust_ratios(state))
  flat_x, flat_g = flat_by_path(params), flat_by_path(grads)
  for path, got in flat_by_path(updates).items():
    x = np.asarray(flat_x[path], np.float64)
    g = np.asarray(flat_g[path], np.float64)
    keep = LINEN_EXPECTED[path]
    m = (1 - momentum) * (g + (wd * x if keep else 0.0))
    ratio = _norm(x) / _norm(m) if keep and _norm(x) > 0 else 1.0
    np.testing.assert_allclose(np.asarray(got, np.float64), -lr * ratio * m,
                               rtol=2e-5, atol=1e-8, err_msg=path)
    if not keep:
      assert float(ratios[path]) == 1.0, path
