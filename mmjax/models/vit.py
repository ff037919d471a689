"""Vision Transformer tower: patches -> position embedding -> encoder -> pooled features."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmjax.types import ViTConfig
import mmjax.models.layers as layers
import mmjax.models.poolers as poolers


PATCH_KERNEL_INIT = nn.initializers.lecun_normal()


def sincos2d(h: int, w: int, width: int, temperature: float = 10_000.0) -> np.ndarray:
  """Fixed 2-D sin-cos position embedding (MoCo v3 / big_vision layout), [1, h*w, width]."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width divisible by 4, got {width}.')
  y, x = np.mgrid[:h, :w]
  omega = 1.0 / temperature ** (np.arange(width // 4) / (width // 4 - 1 or 1))
  y = np.einsum('m,d->md', y.ravel(), omega)
  x = np.einsum('m,d->md', x.ravel(), omega)
  return np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)[None].astype(
      np.float32)


class ViT(nn.Module):
  """Returns pooled features [batch, width] of float images [batch, H, W, C] in [-1, 1], or with
  `patch_tokens=True` the encoder's patch tokens [batch, patches, width] (a CLS token, when the
  config has one, still takes part in attention but is left out; no pooling head is built or
  run), as LLaVA reads a CLIP/SigLIP tower. With `with_tokens=True`: (pooled, every encoder
  token [batch, tokens, width]) of one pass, for the heads on token outputs (models.fusion)."""

  config: ViTConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False, rows: jax.Array | None = None,
               patch_tokens: bool = False, with_tokens: bool = False):
    cfg = self.config
    x, gh, gw = self._patchify(images)
    x = self._position_and_cls(x, gh, gw)
    x = layers.Dropout(cfg.dropout)(x, deterministic=not train, rows=rows)
    x = layers.Encoder(cfg.depth, cfg.num_heads, cfg.mlp_dim, causal=False, dropout=cfg.dropout,
                       remat=cfg.remat, remat_policy=cfg.remat_policy, dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       norm=cfg.norm, act=cfg.act, ln_eps=cfg.ln_eps, final_ln=cfg.final_ln,
                       name='encoder')(x, deterministic=not train, rows=rows)
    if patch_tokens:
      return x[:, 1:] if cfg.pool == 'cls' else x
    if cfg.pool == 'map':
      pooled = layers.MAPHead(cfg.num_heads, cfg.mlp_dim, self.dtype, self.param_dtype, cfg.act,
                              cfg.ln_eps, name='map_head')(x)
    else:
      pooled = poolers.POOLERS[cfg.pool](x)
    return (pooled, x) if with_tokens else pooled

  def _patchify(self, images: jax.Array) -> tuple[jax.Array, int, int]:
    """(patch tokens [batch, gh * gw, width], gh, gw): the optional conv stem, then the patch
    embedding (called from `__call__`, so its parameters are the tower's own)."""
    cfg = self.config
    b, h, w, c = images.shape
    p, r = cfg.patch_size, cfg.stem_reduction
    if h % (p * r) or w % (p * r):
      raise ValueError(f'Image size {h}x{w} is not a multiple of patch_size={p} x the stem '
                       f'reduction {r} (stem_downsample={cfg.stem_downsample!r}).')
    gh, gw = h // (p * r), w // (p * r)
    # Patch embedding as one matmul over flattened patches; the kernel keeps the conv layout
    # [p, p, C, width] so released conv weights load unchanged. LeCun normal over the fan-in
    # p*p*C (big_vision's ViT, flax's Conv default): std 1/sqrt(p*p*C). The Xavier default of
    # the other layers would count the patch area in the fan-out too (std ~0.035 at p=4, C=3,
    # width=96, 4x smaller), which starts every patch token near the position embedding alone.
    # Optional convolutional stem (config.model.image.stem_channels): 3x3 convs + GELU, so a
    # patch token sees local edges and corners, not only raw pixels. stem_downsample='' keeps
    # the full resolution; 'maxpool' halves it per conv with a 2x2 max pool after the GELU (a
    # hybrid CNN-ViT front end); 'stride' with stride-2 convs, the early-convolution stem of
    # Xiao et al. 2021. On the demo's 32 px scenes max pooling is what lets the tower see shape
    # (bench/shape_supervised.py, BENCHMARKS.md): a stride-2 conv subsamples a 4-pixel object.
    stride = 2 if cfg.stem_downsample == 'stride' else 1
    for i, ch in enumerate(cfg.stem_channels):
      images = nn.Conv(ch, (3, 3), (stride, stride), padding='SAME', dtype=self.dtype,
                       param_dtype=self.param_dtype,
                       kernel_init=layers.dense_init((None, None, None, None), PATCH_KERNEL_INIT),
                       bias_init=layers.dense_init((None,), nn.initializers.zeros),
                       name=f'stem_{i}')(images)
      images = nn.gelu(images, approximate=True)
      if cfg.stem_downsample == 'maxpool':
        images = nn.max_pool(images, (2, 2), (2, 2))
      c = ch
    kernel = self.param('patch_kernel', layers.dense_init((None, None, None, 'embed'),
                                                          PATCH_KERNEL_INIT),
                        (p, p, c, cfg.width), self.param_dtype)
    patches = images.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, gh * gw, p * p * c).astype(self.dtype)
    x = jnp.dot(patches, kernel.reshape(p * p * c, cfg.width).astype(self.dtype))
    if cfg.patch_bias:
      bias = self.param('patch_bias', nn.with_logical_partitioning(
          nn.initializers.zeros, ('embed',)), (cfg.width,), self.param_dtype)
      x = x + bias.astype(self.dtype)
    return x, gh, gw

  def _position_and_cls(self, x: jax.Array, gh: int, gw: int) -> jax.Array:
    """The position embedding and the CLS token (when pooling by it), then the embedding
    LayerNorm (CLIP vision)."""
    cfg = self.config
    b = x.shape[0]
    # With posemb_cls (CLIP) the CLS token is prepended first and gets its own position row.
    with_cls = cfg.pool == 'cls' and cfg.posemb_cls
    if cfg.posemb == 'learn':
      pos = self.param('pos_embedding', nn.with_logical_partitioning(
          nn.initializers.normal(stddev=1 / np.sqrt(cfg.width)), (None, None, 'embed')),
                       (1, gh * gw + with_cls, cfg.width), self.param_dtype)
    else:
      pos = jnp.asarray(sincos2d(gh, gw, cfg.width))
    if not with_cls:
      x = x + pos.astype(self.dtype)

    if cfg.pool == 'cls':
      cls = self.param('cls', nn.with_logical_partitioning(nn.initializers.zeros, (None, None, 'embed')),
                       (1, 1, cfg.width), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, cfg.width)), x], axis=1)
    if with_cls:
      x = x + pos.astype(self.dtype)
    if cfg.embed_ln:
      x = layers.layer_norm(self.dtype, self.param_dtype, 'embed_ln', cfg.ln_eps)(x)
    return x
