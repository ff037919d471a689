"""Llama/Qwen2-style decoder tower: RMSNorm, rotary positions, SwiGLU, grouped-query attention.

The LLM embedder (mmjax.models.llm_embedder) reads its final hidden states; there is no LM head.
Inputs are embeddings, not ids, so image tokens can be spliced into the sequence:
`embed_tokens(ids)` looks up the text part and `__call__(x, mask, positions)` runs the stack.
Positions are an input so that left and right padding give the same result at every real token
(`positions_from_mask`). Parameters name their logical axes like the other towers ('embed',
'heads', 'kv', 'mlp', 'vocab'; 'kv_heads' for the key/value heads, 'layers' for the stacked axis
of a scanned stack: both replicated unless the rules map them).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.types import DecoderConfig
import mmjax.models.layers as layers

Dtype = layers.Dtype


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Position of each token among the real tokens of its row (padding before the first gets 0):
  a left-padded row gets the same positions at its real tokens as the right-padded one."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0).astype(jnp.int32)


def rope_frequencies(head_dim: int, theta: float, scaling: tuple[float, ...] = ()) -> np.ndarray:
  """Inverse frequencies [head_dim / 2] of the rotary embedding; `scaling` (factor,
  low_freq_factor, high_freq_factor, original context) stretches the long wavelengths the way
  Llama 3.x does (transformers' 'llama3' rope type)."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))
  if not scaling:
    return inv_freq.astype(np.float32)
  factor, low, high, original = scaling
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
  smooth = (original / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= original / high) & (wavelen <= original / low)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, head_dim: int, theta: float,
                scaling: tuple[float, ...] = ()) -> tuple[jax.Array, jax.Array]:
  """cos, sin [B, L, head_dim] of the rotary embedding, in the half-split layout of HF Llama."""
  freqs = positions.astype(jnp.float32)[..., None] * rope_frequencies(head_dim, theta, scaling)
  angles = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [B, L, heads, head_dim] by the per-position angles (computed in float32)."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  return (xf * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def attention_mask(mask: jax.Array) -> jax.Array:
  """[B, 1, L, L] bool: causal, keys restricted to real tokens. Every query also sees itself so
  that no row is empty (a padding query's output is unused; real queries never see padding)."""
  length = mask.shape[1]
  causal = jnp.tril(jnp.ones((length, length), bool))
  keys = mask.astype(bool)[:, None, :] | jnp.eye(length, dtype=bool)[None]
  return (causal[None] & keys)[:, None]


class GQAttention(nn.Module):
  """Grouped-query self-attention with rotary positions: `num_kv_heads` key/value heads shared
  by groups of the `num_heads` query heads (jax.nn.dot_product_attention handles the groups)."""

  num_heads: int
  num_kv_heads: int
  head_dim: int
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    def proj(name: str, heads: int, axis: str) -> jax.Array:
      return layers.DenseND((heads, self.head_dim), ('embed', axis, 'kv'),
                            use_bias=self.qkv_bias, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)(x)

    # Key/value heads have their own axis name: there are often fewer of them than the tensor
    # axis has devices (Qwen2-1.5B: 2), so they stay replicated unless the rules say otherwise.
    q = apply_rope(proj('query', self.num_heads, 'heads'), cos, sin)
    k = apply_rope(proj('key', self.num_kv_heads, 'kv_heads'), cos, sin)
    v = proj('value', self.num_kv_heads, 'kv_heads')
    out = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return layers.DenseND((x.shape[-1],), ('heads', 'kv', 'embed'), in_dims=2, use_bias=False,
                          dtype=self.dtype, param_dtype=self.param_dtype, name='out')(out)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""

  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(name: str, features: int, axes: tuple[str, str], h: jax.Array) -> jax.Array:
      return layers.DenseND((features,), axes, use_bias=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)(h)

    h = nn.silu(dense('gate', self.mlp_dim, ('embed', 'mlp'), x)) * dense(
        'up', self.mlp_dim, ('embed', 'mlp'), x)
    return dense('down', x.shape[-1], ('mlp', 'embed'), h)


class DecoderLayer(nn.Module):
  """x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)). Returns (x, None): a scan body."""

  config: DecoderConfig
  train: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, cos: jax.Array, sin: jax.Array,
               rows: jax.Array | None) -> tuple[jax.Array, None]:
    cfg = self.config
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))
    drop = layers.Dropout(cfg.dropout)
    h = layers.rms_norm(self.dtype, self.param_dtype, 'attn_norm', cfg.rms_eps)(x)
    h = GQAttention(cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head, cfg.qkv_bias, self.dtype,
                    self.param_dtype, name='attn')(h, mask, cos, sin)
    x = x + drop(h, deterministic=not self.train, rows=rows)
    h = layers.rms_norm(self.dtype, self.param_dtype, 'mlp_norm', cfg.rms_eps)(x)
    h = SwiGLU(cfg.mlp_dim, self.dtype, self.param_dtype, name='mlp')(h)
    return x + drop(h, deterministic=not self.train, rows=rows), None


class Decoder(nn.Module):
  """Token embedding, `depth` decoder layers (optionally scanned and remat'ed) and a final
  RMSNorm. `__call__` returns the final hidden states [B, L, width] of input embeddings."""

  config: DecoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    self.token_embedding = self.param(
        'token_embedding', nn.with_logical_partitioning(nn.initializers.normal(stddev=0.02),
                                                        ('vocab', 'embed')),
        (cfg.vocab_size, cfg.width), self.param_dtype)
    self.norm = layers.rms_norm(self.dtype, self.param_dtype, eps=cfg.rms_eps)

  def embed_tokens(self, ids: jax.Array) -> jax.Array:
    """Token ids [B, L] -> input embeddings [B, L, width]."""
    return jnp.take(self.token_embedding, ids, axis=0).astype(self.dtype)

  def encode_ids(self, ids: jax.Array, mask: jax.Array, *, train: bool = False,
                 rows: jax.Array | None = None) -> jax.Array:
    """Hidden states of token ids alone (text-only input, left or right padded)."""
    return self(self.embed_tokens(ids), mask, positions_from_mask(mask), train=train, rows=rows)

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array, *,
               train: bool = False, rows: jax.Array | None = None) -> jax.Array:
    cfg = self.config
    if x.shape[1] > cfg.max_len:
      raise ValueError(f'A sequence of {x.shape[1]} tokens exceeds the decoder context '
                       f'max_len={cfg.max_len}.')
    cos, sin = rope_tables(positions, cfg.dim_per_head, cfg.rope_theta, cfg.rope_scaling)
    attn_mask = attention_mask(mask)
    x = x.astype(self.dtype)
    layer = DecoderLayer
    if cfg.remat:
      layer = nn.remat(layer, policy=getattr(jax.checkpoint_policies, cfg.remat_policy),
                       prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(layer, variable_axes={'params': 0}, split_rngs={'params': True,
                                                                       'dropout': True},
                      in_axes=(nn.broadcast,) * 4, length=cfg.depth,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, train, self.dtype, self.param_dtype, name='layers')(
          x, attn_mask, cos, sin, rows)
    else:
      for i in range(cfg.depth):
        x, _ = layer(cfg, train, self.dtype, self.param_dtype, name=f'layers_{i}')(
            x, attn_mask, cos, sin, rows)
    return self.norm(x)


def stack_layers(params: dict, depth: int) -> dict:
  """Per-layer parameters ('layers_0', ...) -> the scanned layout ('layers', leading axis)."""
  params = dict(params)
  per_layer = [params.pop(f'layers_{i}') for i in range(depth)]
  # NumPy in, NumPy out (an imported checkpoint on the host); jax arrays stay on device.
  params['layers'] = jax.tree.map(
      lambda *xs: (np.stack if isinstance(xs[0], np.ndarray) else jnp.stack)(xs), *per_layer)
  return params


def unstack_layers(params: dict) -> dict:
  """The scanned layout -> per-layer parameters (the inverse of `stack_layers`)."""
  params = dict(params)
  stacked = params.pop('layers')
  depth = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(depth):
    params[f'layers_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params
