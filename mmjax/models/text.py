"""Text transformer tower: token + position embedding -> encoder -> pooled features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.types import TextConfig
import mmjax.models.layers as layers
import mmjax.models.poolers as poolers


TOKEN_EMBED_STD = 0.02
POS_EMBED_STD = 0.01


class TextTransformer(nn.Module):
  """Returns pooled features [batch, width] of token ids [batch, len] with a key mask.

  'last' pooling reads the last valid position (the EOS the tokenizer appends), which is exact for
  causal attention and for both left and right padding. With `with_tokens=True`: (pooled, the
  encoder's tokens [batch, len, width]).
  """

  config: TextConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False,
               rows: jax.Array | None = None, with_tokens: bool = False):
    cfg = self.config
    if tokens.shape[1] > cfg.max_len:
      raise ValueError(f'Text of {tokens.shape[1]} tokens exceeds max_len={cfg.max_len}.')
    embed = self.param('token_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=TOKEN_EMBED_STD), ('vocab', 'embed')),
                       (cfg.vocab_size, cfg.width), self.param_dtype)
    x = jnp.take(embed, tokens, axis=0).astype(self.dtype)
    # Positions start at half the token scale (open_clip: tokens 0.02, positions 0.01). At
    # 1/sqrt(width) (0.10 at width 96, 5x the tokens) the position signal swamped the tokens:
    # every caption pooled to nearly the same vector at init (mean pairwise cosine 0.80-0.86).
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=POS_EMBED_STD), (None, None, 'embed')),
                     (1, cfg.positions, cfg.width), self.param_dtype)
    x = x + pos[:, :tokens.shape[1]].astype(self.dtype)
    if cfg.type_vocab_size:
      # BERT's segment embedding; single-segment inputs are all type 0.
      types = self.param('type_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=0.02), (None, 'embed')),
                         (cfg.type_vocab_size, cfg.width), self.param_dtype)
      x = x + types[0].astype(self.dtype)
    if cfg.embed_ln:
      x = layers.layer_norm(self.dtype, self.param_dtype, 'embed_ln', cfg.ln_eps)(x)
    x = layers.Dropout(cfg.dropout)(x, deterministic=not train, rows=rows)
    mask = jnp.ones(tokens.shape, bool) if cfg.attend_padding else mask.astype(bool)
    x = layers.Encoder(cfg.depth, cfg.num_heads, cfg.mlp_dim, causal=cfg.causal,
                       dropout=cfg.dropout, remat=cfg.remat, remat_policy=cfg.remat_policy,
                       dtype=self.dtype,
                       param_dtype=self.param_dtype, norm=cfg.norm, act=cfg.act,
                       ln_eps=cfg.ln_eps, final_ln=cfg.final_ln, name='encoder')(
                           x, mask, deterministic=not train, rows=rows)
    if cfg.pool == 'map':
      pooled = layers.MAPHead(cfg.num_heads, cfg.mlp_dim, self.dtype, self.param_dtype, cfg.act,
                              cfg.ln_eps, name='map_head')(x, mask)
    else:
      pooled = poolers.POOLERS[cfg.pool](x, mask)
    return (pooled, x) if with_tokens else pooled
