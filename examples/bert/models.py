"""BERT's encoder with its masked-LM head, in Flax linen.

Devlin et al. (2019): token, position and segment embeddings, LayerNorm, then
``num_layers`` post-LayerNorm Transformer layers (self-attention with
separate query/key/value/output projections, a GELU feed-forward block), then
the masked-LM head (Dense + GELU + LayerNorm, and logits through the word
embedding matrix plus a bias) evaluated only at the masked positions. There
is no pooler and no next-sentence head (the paper's LAMB runs use the MLM
objective; the two would add 592,130 parameters to BERT-base).

Parameter paths (``/``-joined) look like ``embeddings/word/embedding``,
``encoder/layer_0/attention/query/kernel`` (or, with ``scan_layers``,
``encoder/layers/attention/query/kernel`` of shape ``(num_layers, ...)``),
``encoder/layer_0/attention_norm/scale``, ``mlm_head/bias``.
:func:`lamb_optax.masks.exclude_bias_and_norm` therefore leaves every bias
and LayerNorm parameter out of weight decay and the trust ratio, as BERT
does.

Every parameter carries Flax partitioning metadata (logical axis names, see
``nn.with_partitioning``); with ``scan_layers`` the stacked axis is named
``"layers"`` (``LAYERS_AXIS``), which is how the training script finds the
per-layer axis to give LAMB.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

LAYERS_AXIS = "layers"
# Logical names of the activations' axes (``nn.with_logical_constraint``);
# the training step maps them to mesh axes (utils.ACTIVATION_RULES). Outside
# such rules they are no-ops.
HIDDEN_AXES = ("batch", "length", "embed")
MASK_AXES = ("batch", "length")


def _constrain(x: jax.Array, names: tuple[str, ...]) -> jax.Array:
  return nn.with_logical_constraint(x, names)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of :class:`BertMLM`."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.
  scan_layers: bool = False
  remat: bool = False  # Recompute each layer's activations in the backward.


def _init(config: BertConfig, names: tuple[str, ...]) -> Callable:
  return nn.with_partitioning(
      nn.initializers.truncated_normal(config.initializer_range), names)


def _dense(config: BertConfig, features: int, names: tuple[str, str],
           name: str) -> nn.Dense:
  return nn.Dense(
      features, dtype=config.dtype, name=name,
      kernel_init=_init(config, names),
      bias_init=nn.with_partitioning(nn.initializers.zeros_init(),
                                     (names[1],)))


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=config.layer_norm_eps, dtype=config.dtype, name=name,
      scale_init=nn.with_partitioning(nn.initializers.ones_init(),
                                      ("embed",)),
      bias_init=nn.with_partitioning(nn.initializers.zeros_init(),
                                     ("embed",)))


class SelfAttention(nn.Module):
  """Multi-head self-attention with BERT's four projections."""
  config: BertConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    config = self.config
    batch, length, hidden = x.shape
    head_dim = hidden // config.num_heads

    def heads(name):
      y = _dense(config, hidden, ("embed", "heads"), name)(x)
      return y.reshape(batch, length, config.num_heads, head_dim)

    y = jax.nn.dot_product_attention(
        heads("query"), heads("key"), heads("value"),
        mask=attention_mask[:, None, None, :].astype(bool))
    y = _dense(config, hidden, ("heads", "embed"), "output")(
        y.reshape(batch, length, hidden))
    return nn.Dropout(config.dropout_rate)(y, deterministic=self.deterministic)


class EncoderLayer(nn.Module):
  """Post-LayerNorm Transformer layer: (carry, mask) -> (carry, None)."""
  config: BertConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array):
    config = self.config
    # The scan's carry and its broadcast mask keep the batch sharded.
    x = _constrain(x, HIDDEN_AXES)
    attention_mask = _constrain(attention_mask, MASK_AXES)
    h = SelfAttention(config, self.deterministic, name="attention")(
        x, attention_mask)
    x = _layer_norm(config, "attention_norm")(x + h)
    h = _dense(config, config.intermediate_size, ("embed", "mlp"),
               "intermediate")(x)
    h = nn.gelu(h, approximate=False)
    h = _dense(config, config.hidden_size, ("mlp", "embed"), "output")(h)
    h = nn.Dropout(config.dropout_rate)(h, deterministic=self.deterministic)
    x = _layer_norm(config, "output_norm")(x + h)
    return _constrain(x, HIDDEN_AXES), None


class Encoder(nn.Module):
  """``num_layers`` layers, as a Python loop or one ``nn.scan``."""
  config: BertConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
    config = self.config
    layer_cls = EncoderLayer
    if config.remat:
      layer_cls = nn.remat(layer_cls, prevent_cse=not config.scan_layers)
    if config.scan_layers:
      stack = nn.scan(
          layer_cls, variable_axes={"params": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=nn.broadcast, length=config.num_layers,
          metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
      x, _ = stack(config, self.deterministic, name="layers")(
          x, attention_mask)
      return x
    for i in range(config.num_layers):
      x, _ = layer_cls(config, self.deterministic, name=f"layer_{i}")(
          x, attention_mask)
    return x


class Embeddings(nn.Module):
  """Word + position + segment embeddings, LayerNorm, dropout."""
  config: BertConfig
  deterministic: bool

  def setup(self):
    config = self.config
    self.word = nn.Embed(
        config.vocab_size, config.hidden_size,
        embedding_init=_init(config, ("vocab", "embed")))
    self.position = nn.Embed(
        config.max_position_embeddings, config.hidden_size,
        embedding_init=_init(config, ("position", "embed")))
    self.segment = nn.Embed(
        config.type_vocab_size, config.hidden_size,
        embedding_init=_init(config, ("segment", "embed")))
    self.norm = _layer_norm(config, "norm")
    self.dropout = nn.Dropout(config.dropout_rate)

  def word_table(self) -> jax.Array:
    """The word embeddings, whole on every device where they are used.

    FSDP shards the table over the data axis like any large parameter (its
    vocabulary axis); gathering it before the lookup, as FSDP gathers every
    kernel, keeps the lookup local to each device's rows. Left to itself,
    XLA looks every token of the global batch up in each device's slice of
    the vocabulary and then reduces: a (global batch, length, hidden)
    buffer on every device.
    """
    return _constrain(self.word.embedding, (None, None))

  def __call__(self, input_ids: jax.Array) -> jax.Array:
    length = input_ids.shape[1]
    x = (jnp.take(self.word_table(), input_ids, axis=0)
         + self.position(jnp.arange(length))[None]
         + self.segment(jnp.zeros_like(input_ids)))
    x = self.norm(x).astype(self.config.dtype)
    return _constrain(self.dropout(x, deterministic=self.deterministic),
                      HIDDEN_AXES)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits against the word embeddings (BERT ties the decoder to them)."""
    return x @ self.word_table().T


class MlmHead(nn.Module):
  """Dense + GELU + LayerNorm, then logits through the word embeddings."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, embeddings: Embeddings) -> jax.Array:
    config = self.config
    x = _dense(config, config.hidden_size, ("embed", "embed_out"),
               "transform")(x)
    x = nn.gelu(x, approximate=False)
    x = _layer_norm(config, "transform_norm")(x)
    bias = self.param(
        "bias", nn.with_partitioning(nn.initializers.zeros_init(),
                                     ("vocab",)),
        (config.vocab_size,))
    return embeddings.attend(x.astype(jnp.float32)) + bias


class BertMLM(nn.Module):
  """BERT encoder + masked-LM head: logits at the masked positions only."""
  config: BertConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, input_ids: jax.Array, input_mask: jax.Array,
               masked_positions: jax.Array) -> jax.Array:
    """int (batch, length) x2, (batch, P) -> float32 logits (batch, P, vocab)."""
    embeddings = Embeddings(self.config, self.deterministic,
                            name="embeddings")
    x = embeddings(input_ids)
    x = Encoder(self.config, self.deterministic, name="encoder")(
        x, input_mask)
    x = jnp.take_along_axis(x, masked_positions[..., None], axis=1)
    x = _constrain(x, ("batch", "predictions", "embed"))
    logits = MlmHead(self.config, name="mlm_head")(x, embeddings)
    return _constrain(logits, ("batch", "predictions", "vocab"))


def init_shapes(config: BertConfig, seq_length: int = 8):
  """Boxed parameter shapes (with partitioning metadata), no allocation."""
  model = BertMLM(config)
  ids = jnp.zeros((1, seq_length), jnp.int32)
  positions = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), ids, ids, positions))["params"]


def stack_layers(params, num_layers: int):
  """Unscanned params -> the scanned model's (``layer_i`` -> ``layers``).

  The training script initialises a scanned model this way, so that
  ``scan_layers`` changes how the encoder is compiled but not its initial
  weights (``nn.scan`` would draw other random numbers).
  """
  encoder = dict(params["encoder"])
  layers = [encoder.pop(f"layer_{i}") for i in range(num_layers)]
  encoder["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return {**params, "encoder": encoder}


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(nn.unbox(params)))
