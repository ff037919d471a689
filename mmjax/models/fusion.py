"""Heads on the towers' token outputs: the image-text matching (ITM) fusion and the captioner.

- `MatchHead` (ALBEF/BLIP): text tokens run through a few blocks of self-attention,
  cross-attention to the image patch tokens and an MLP; the masked mean of the fused text tokens
  gives one binary match logit. It scores a pair, so it re-ranks the top candidates of the
  embedding search (mmjax.eval.rerank).
- `CaptionDecoder` (CoCa): a causal text decoder with its own token embedding (tied output
  projection) whose blocks cross-attend to the image tokens; its next-token loss trains the image
  tower, and `greedy` decodes a caption to read.

Both take the image tokens at the ViT width and project them to the text width once.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import mmjax.models.layers as layers
import mmjax.models.poolers as poolers

Dtype = layers.Dtype


class CrossBlock(nn.Module):
  """Pre-LN block: x + SelfAttn(LN x), x + CrossAttn(LN x, context), x + MLP(LN x)."""

  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, context, *, deterministic: bool, rows=None):
    def ln(name):
      return layers.layer_norm(self.dtype, self.param_dtype, name)

    def drop(h):
      return layers.Dropout(self.dropout)(h, deterministic=deterministic, rows=rows)

    h = layers.Attention(self.num_heads, self.causal, self.dtype, self.param_dtype,
                         name='self_attn')(ln('ln1')(x), mask=mask)
    x = x + drop(h)
    h = layers.Attention(self.num_heads, False, self.dtype, self.param_dtype,
                         name='cross_attn')(ln('ln2')(x), context)
    x = x + drop(h)
    h = layers.MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name='mlp')(
        ln('ln3')(x), deterministic=deterministic, rows=rows)
    return x + drop(h)


class _Stack(nn.Module):
  """Image tokens projected to the text width, then `depth` cross blocks and a final LN."""

  depth: int
  num_heads: int
  mlp_dim: int
  causal: bool = False
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mask, image_tokens, *, deterministic: bool, rows=None):
    width = x.shape[-1]
    context = layers.DenseND((width,), (None, 'embed'), dtype=self.dtype,
                             param_dtype=self.param_dtype, name='image_proj')(image_tokens)
    mlp = self.mlp_dim or 4 * width
    for i in range(self.depth):
      x = CrossBlock(self.num_heads, mlp, self.causal, self.dropout, self.dtype,
                     self.param_dtype, name=f'block{i}')(x, mask, context,
                                                         deterministic=deterministic, rows=rows)
    return layers.layer_norm(self.dtype, self.param_dtype, 'ln_final')(x)


class MatchHead(nn.Module):
  """(text tokens [n, L, Wt], mask [n, L], image tokens [n, P, Wi]) -> match logits [n]."""

  depth: int
  num_heads: int
  mlp_dim: int = 0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, text_tokens, mask, image_tokens, *, deterministic: bool = True, rows=None):
    mask = mask.astype(bool)
    x = _Stack(self.depth, self.num_heads, self.mlp_dim, False, self.dropout, self.dtype,
               self.param_dtype, name='fusion')(text_tokens.astype(self.dtype), mask,
                                                image_tokens.astype(self.dtype),
                                                deterministic=deterministic, rows=rows)
    pooled = poolers.POOLERS['mean'](x, mask)
    logit = layers.DenseND((1,), ('embed', None), dtype=self.dtype, param_dtype=self.param_dtype,
                           name='logit')(pooled)
    return logit[..., 0].astype(jnp.float32)


class CaptionDecoder(nn.Module):
  """Teacher-forced next-token logits: position t predicts tokens[:, t] from a learned BOS and
  tokens[:, :t], attending to the image tokens. (tokens [n, L], image tokens) -> [n, L, V]."""

  vocab_size: int
  max_len: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int = 0
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embed = self.param('token_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), ('vocab', 'embed')),
                            (self.vocab_size, self.width), self.param_dtype)
    self.bos = self.param('bos', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.02), (None, None, 'embed')), (1, 1, self.width),
                          self.param_dtype)
    self.pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=0.01), (None, None, 'embed')),
                          (1, self.max_len, self.width), self.param_dtype)
    self.stack = _Stack(self.depth, self.num_heads, self.mlp_dim, True, self.dropout, self.dtype,
                        self.param_dtype, name='decoder')

  def __call__(self, tokens, image_tokens, *, deterministic: bool = True, rows=None):
    n, length = tokens.shape
    prev = jnp.take(self.embed, tokens[:, :-1], axis=0).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(self.bos.astype(self.dtype), (n, 1, self.width)),
                         prev], axis=1) + self.pos[:, :length].astype(self.dtype)
    # Causal attention only reads earlier positions, which are valid wherever a target is.
    x = self.stack(x, None, image_tokens.astype(self.dtype), deterministic=deterministic,
                   rows=rows)
    return jnp.einsum('nld,vd->nlv', x, self.embed.astype(self.dtype)).astype(jnp.float32)


def greedy(logits_fn, n: int, length: int) -> jax.Array:
  """Greedy decoding of `CaptionDecoder`: [n, length] ids, each position the argmax given the
  ones before. `logits_fn(tokens [n, length]) -> [n, length, V]` is a pure function (e.g. a
  bound `model.apply`), so the loop is one compiled `fori_loop`, not `length` copies."""
  def body(t, tokens):
    logits = jax.lax.dynamic_index_in_dim(logits_fn(tokens), t, axis=1, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(
        tokens, jnp.argmax(logits, axis=-1).astype(jnp.int32), t, axis=1)
  return jax.lax.fori_loop(0, length, body, jnp.zeros((n, length), jnp.int32))
