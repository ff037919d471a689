"""Text transformer tower: token + position embedding -> encoder -> pooled features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.config import TextConfig
from mmjax.models import layers, poolers


class TextTransformer(nn.Module):
  """Returns pooled features [batch, width] of token ids [batch, len] with a key mask.

  'last' pooling reads the last valid position (the EOS the tokenizer appends), which is exact for
  causal attention and for both left and right padding.
  """

  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False,
               rows: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if tokens.shape[1] > cfg.max_len:
      raise ValueError(f'Text of {tokens.shape[1]} tokens exceeds max_len={cfg.max_len}.')
    embed = self.param('token_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
                       (cfg.vocab_size, cfg.width), self.param_dtype)
    x = jnp.take(embed, tokens, axis=0).astype(self.dtype)
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1 / np.sqrt(cfg.width)), (None, None, 'embed')),
                     (1, cfg.max_len, cfg.width), self.param_dtype)
    x = x + pos[:, :tokens.shape[1]].astype(self.dtype)
    x = layers.Dropout(cfg.dropout)(x, deterministic=not train, rows=rows)
    mask = mask.astype(bool)
    x = layers.Encoder(cfg.depth, cfg.num_heads, cfg.mlp_dim, causal=cfg.causal,
                       dropout=cfg.dropout, remat=cfg.remat, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='encoder')(
                           x, mask, deterministic=not train, rows=rows)
    if cfg.pool == 'map':
      return layers.MAPHead(cfg.num_heads, cfg.mlp_dim, self.dtype, self.param_dtype,
                            name='map_head')(x, mask)
    return poolers.POOLERS[cfg.pool](x, mask)
