"""The dual encoder: image and text towers, projection heads, learnable temperature and bias."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses import multitask
from mmjax.losses.contrastive import l2_normalize  # noqa: F401  (re-exported)
import mmjax.models.fusion as fusion
import mmjax.models.layers as layers
from mmjax.models.text import TextTransformer
from mmjax.models.vit import ViT
from mmjax.types import ModelConfig

# Dropout row ids of the roles beyond the pair start at multiples of this (see embed_batch).
ROLE_ROW_STRIDE = 1 << 26


class ProjectionHead(nn.Module):
  """'linear': one Dense; 'mlp': Dense-GELU-Dense; 'none': identity (width must equal embed_dim)."""

  kind: str
  embed_dim: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.kind == 'none':
      if x.shape[-1] != self.embed_dim:
        raise ValueError(f"head='none' needs tower width {x.shape[-1]} == embed_dim {self.embed_dim}.")
      return x
    def dense(features, axes, name):
      return layers.DenseND((features,), axes, dtype=self.dtype, param_dtype=self.param_dtype,
                            use_bias=self.use_bias, name=name)

    if self.kind == 'mlp':
      x = nn.gelu(dense(x.shape[-1], ('embed', 'mlp'), 'hidden')(x), approximate=True)
      return dense(self.embed_dim, ('mlp', 'embed'), 'out')(x)
    return dense(self.embed_dim, ('embed', None), 'out')(x)


def _locked(features: jax.Array, locked: bool) -> jax.Array:
  """A locked tower (LiT) runs in eval mode and passes no gradient: autodiff then emits none of
  its backward pass."""
  return jax.lax.stop_gradient(features) if locked else features


def normalize_images(images: jax.Array, dtype, mean=(), std=()) -> jax.Array:
  """uint8 [0, 255] -> [-1, 1], or (x / 255 - mean) / std per channel when `mean`/`std` are
  given (CLIP's statistics); float inputs are taken as already normalised."""
  if images.dtype == jnp.uint8:
    if mean:
      x = images.astype(dtype) / 255.0
      return (x - jnp.asarray(mean, dtype)) / jnp.asarray(std, dtype)
    return images.astype(dtype) * (2.0 / 255.0) - 1.0
  return images.astype(dtype)


class TwoTower(nn.Module):
  """SigLIP/CLIP dual encoder returning L2-normalised embeddings and the logit scale/bias."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.img = ViT(cfg.image, dtype, pdtype)
    self.txt = TextTransformer(cfg.text, dtype, pdtype)
    self.img_head = ProjectionHead(cfg.tower_head('image'), cfg.embed_dim, dtype, pdtype,
                                   cfg.head_bias)
    self.txt_head = ProjectionHead(cfg.tower_head('text'), cfg.embed_dim, dtype, pdtype,
                                   cfg.head_bias)
    self.t_prime = self.param('t_prime', nn.initializers.constant(cfg.temperature_init), (),
                              jnp.float32)
    if cfg.bias_init is not None:
      self.bias = self.param('bias', nn.initializers.constant(cfg.bias_init), (), jnp.float32)
    if cfg.task_log_vars:  # Multi-task uncertainty weighting: params 'multitask/log_var_<task>'.
      names, init = zip(*cfg.task_log_vars)
      self.multitask = multitask.UncertaintyWeights(tuple(names), tuple(init))
      _ = self.multitask.log_vars  # Created in init, not on first use.
    if cfg.itm_depth:
      self.itm = fusion.MatchHead(cfg.itm_depth, cfg.itm_heads, cfg.itm_mlp_dim, cfg.text.dropout,
                                  dtype, pdtype)
    if cfg.caption_depth:
      self.captioner = fusion.CaptionDecoder(
          cfg.text.vocab_size, cfg.text.max_len, cfg.text.width, cfg.caption_depth,
          cfg.caption_heads, cfg.caption_mlp_dim, cfg.text.dropout, dtype, pdtype)

  # `rows`: the examples' rows in the global batch, which seed their dropout masks (see
  # layers.Dropout); only a call that sees part of the batch (a GradCache micro-batch) passes them.
  def init_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
    """The inputs `init` traces the model with."""
    s, n = self.config.image.image_size, self.config.text.max_len
    return (jnp.zeros((batch, s, s, 3), jnp.uint8), jnp.zeros((batch, n), jnp.int32),
            jnp.ones((batch, n), jnp.int32))

  def image_features(self, images: jax.Array, *, train: bool = False,
                     rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(L2-normalised embeddings [n, d], the ViT's tokens [n, P, Wi]) of one pass."""
    img = self.config.image
    x = normalize_images(images, jnp.dtype(self.config.dtype), tuple(img.pixel_mean),
                         tuple(img.pixel_std))
    pooled, tokens = self.img(x, train=train and not img.locked, rows=rows, with_tokens=True)
    pooled, tokens = _locked(pooled, img.locked), _locked(tokens, img.locked)
    return l2_normalize(self.img_head(pooled)), tokens

  def text_features(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False,
                    rows: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(L2-normalised embeddings [n, d], the text tower's tokens [n, L, Wt]) of one pass."""
    locked = self.config.text.locked
    pooled, out = self.txt(tokens, mask, train=train and not locked, rows=rows, with_tokens=True)
    return l2_normalize(self.txt_head(_locked(pooled, locked))), _locked(out, locked)

  def embed_images(self, images: jax.Array, *, train: bool = False,
                   rows: jax.Array | None = None) -> jax.Array:
    return self.image_features(images, train=train, rows=rows)[0]

  def embed_texts(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False,
                  rows: jax.Array | None = None) -> jax.Array:
    return self.text_features(tokens, mask, train=train, rows=rows)[0]

  def match_logits(self, text_tokens: jax.Array, mask: jax.Array, image_tokens: jax.Array, *,
                   train: bool = False, rows: jax.Array | None = None) -> jax.Array:
    """ITM logits [n] of (text i, image i) from the towers' token outputs."""
    return self.itm(text_tokens, mask, image_tokens, deterministic=not train, rows=rows)

  def caption_logits(self, tokens: jax.Array, image_tokens: jax.Array, *, train: bool = False,
                     rows: jax.Array | None = None) -> jax.Array:
    """Teacher-forced next-token logits [n, L, V] of captions `tokens` given image tokens."""
    return self.captioner(tokens, image_tokens, deterministic=not train, rows=rows)

  def embed_batch(self, batch, *, train: bool = False, rows: jax.Array | None = None):
    """The embeddings of a batch, by role (the train step's model contract):
    'image' (`image`), 'text' (`tokens`/`mask`), 'query' (text-text pairs: `query_tokens`/
    `query_mask`), 'neg_text' [B, K, d] (`neg_tokens`/`neg_mask`) and 'neg_image' [B, K, d]
    (`neg_image`), for the columns the batch has; with ITM / captioning heads also the towers'
    token outputs 'image_tokens' [B, P, Wi] and 'text_tokens' [B, L, Wt]. Roles other than the
    pair get row ids offset by multiples of `ROLE_ROW_STRIDE`, so no two embeddings share a
    dropout mask."""
    n = batch['tokens'].shape[0]
    rows = jnp.arange(n, dtype=jnp.int32) if rows is None else rows
    out = {}
    out['text'], text_tokens = self.text_features(batch['tokens'], batch['mask'], train=train,
                                                  rows=rows)
    if 'image' in batch:
      out['image'], image_tokens = self.image_features(batch['image'], train=train, rows=rows)
      if self.config.token_heads:  # The heads' inputs: GradCache caches and differentiates them.
        out['image_tokens'], out['text_tokens'] = image_tokens, text_tokens
    if 'query_tokens' in batch:
      out['query'] = self.embed_texts(batch['query_tokens'], batch['query_mask'], train=train,
                                      rows=rows + ROLE_ROW_STRIDE)

    def negatives(embed, offset, *xs):  # [n, K, ...] -> [n, K, d], one row id per negative.
      k = xs[0].shape[1]
      neg_rows = offset * ROLE_ROW_STRIDE + (rows[:, None] * k + jnp.arange(k)).reshape(-1)
      z = embed(*(x.reshape((n * k,) + x.shape[2:]) for x in xs), train=train, rows=neg_rows)
      return z.reshape(n, k, -1)

    if 'neg_tokens' in batch:
      out['neg_text'] = negatives(self.embed_texts, 2, batch['neg_tokens'], batch['neg_mask'])
    if 'neg_image' in batch:
      out['neg_image'] = negatives(self.embed_images, 3, batch['neg_image'])
    if self.config.task_log_vars:
      # Learned task log-variances ride along as a per-row role [n, T] (every row equal): the
      # objective takes their row mean, so GradCache's per-micro-batch VJPs sum to their exact
      # gradient without the step knowing about them.
      s = jnp.stack([self.multitask.log_vars[k] for k, _ in self.config.task_log_vars])
      out['task_log_vars'] = jnp.broadcast_to(s, (n, s.shape[0]))
    return out

  def logit_params(self) -> tuple[jax.Array, jax.Array]:
    """(temperature, bias): temperature = exp(t'); bias is 0 for the softmax loss."""
    bias = self.bias if self.config.bias_init is not None else jnp.zeros((), jnp.float32)
    return jnp.exp(self.t_prime), bias

  def __call__(self, images: jax.Array, tokens: jax.Array, mask: jax.Array, *,
               train: bool = False):
    zimg, image_tokens = self.image_features(images, train=train)
    ztxt, text_tokens = self.text_features(tokens, mask, train=train)
    if self.config.itm_depth:  # Run once here so that `init` creates the heads' parameters.
      self.match_logits(text_tokens, mask, image_tokens)
    if self.config.caption_depth:
      self.caption_logits(tokens, image_tokens)
    t, bias = self.logit_params()
    return zimg, ztxt, t, bias
