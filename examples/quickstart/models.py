"""A small character-level language model in Flax nnx."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class Block(nnx.Module):
  """Dense -> LayerNorm -> GELU."""

  def __init__(self, features_in: int, features_out: int, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(features_in, features_out, rngs=rngs)
    self.norm = nnx.LayerNorm(features_out, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.gelu(self.norm(self.dense(x)))


class CharMLP(nnx.Module):
  """Predicts the next character from the previous ``context`` characters.

  Bengio et al. (2003)'s neural language model with modern parts: each
  character is embedded, the ``context`` embeddings are concatenated and go
  through ``num_layers`` Dense/LayerNorm/GELU blocks, then a Dense layer
  gives the logits of the next character.

  The parameter paths are ``embed/embedding``, ``blocks/<i>/dense/kernel``,
  ``blocks/<i>/dense/bias``, ``blocks/<i>/norm/scale``,
  ``blocks/<i>/norm/bias``, ``head/kernel`` and ``head/bias``:
  :func:`lamb_optax.masks.exclude_bias_and_norm` leaves the biases and the
  LayerNorm parameters out of weight decay and the trust ratio.
  """

  def __init__(self, vocab_size: int, context: int, embed_dim: int,
               hidden: int, num_layers: int, *, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab_size, embed_dim, rngs=rngs)
    sizes = [context * embed_dim] + [hidden] * num_layers
    self.blocks = nnx.List([
        Block(n_in, n_out, rngs=rngs)
        for n_in, n_out in zip(sizes[:-1], sizes[1:])])
    self.head = nnx.Linear(sizes[-1], vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """int tokens (batch, context) -> logits (batch, vocab_size)."""
    x = self.embed(tokens)
    x = x.reshape(x.shape[0], -1)
    for block in self.blocks:
      x = block(x)
    return self.head(x).astype(jnp.float32)
