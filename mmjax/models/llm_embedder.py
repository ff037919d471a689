"""The LLM-based multimodal embedder (VLM2Vec / E5-V / GME style) in Flax.

Images go through the mmjax ViT (patch tokens, no pooling), neighbouring patches are merged
`merge x merge` (Qwen2-VL's patch merger) and an MLP projector maps them to the decoder width.
The data side (mmjax.data.llm_tasks) has already expanded every image placeholder into one
`IMAGE_SLOT` id per visual token, so splicing is a gather: the n-th slot of a row takes the n-th
visual token of that row's images, in order. Text-only, image-only and image+text (composed)
sequences therefore all run through the same decoder and land in one space. The embedding is
the final hidden state of the last real token (EOS; exact for left or right padding, since
positions come from the mask) or the masked mean, L2-normalised.

The model implements the generic train-step contract: `embed_batch(batch, train=, rows=)` gives
'query' [u, d], 'candidate' [u, d] and, with hard negatives, 'neg_candidate' [u, K, d];
`logit_params()` is a fixed temperature 1/`temperature` and bias 0, not parameters. Matryoshka
dimensions are applied by the objective (`matryoshka_objective`) and the evaluator, not here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses.contrastive import l2_normalize
import mmjax.models.layers as layers
import mmjax.models.lora as lora
import mmjax.models.poolers as poolers
from mmjax.models.decoder import Decoder, positions_from_mask
from mmjax.models.two_tower import normalize_images
from mmjax.models.vit import ViT
# Re-exported: the config and constants lived here before mmjax.types.
from mmjax.types import IMAGE_SLOT, LLM_ROLE_PREFIX, LLMEmbedderConfig, LoraConfig  # noqa: F401


def merge_patches(x: jax.Array, merge: int) -> jax.Array:
  """[N, g*g, W] patch tokens -> [N, (g/merge)^2, merge*merge*W], neighbours concatenated."""
  if merge == 1:
    return x
  n, p, w = x.shape
  g, k = int(round(p ** 0.5)), merge
  x = x.reshape(n, g // k, k, g // k, k, w).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, (g // k) ** 2, k * k * w)


def splice(text_emb: jax.Array, visual: jax.Array, tokens: jax.Array) -> jax.Array:
  """The n-th IMAGE_SLOT of each row takes that row's n-th visual token ([B, I*T, D])."""
  is_img = tokens == IMAGE_SLOT
  idx = jnp.clip(jnp.cumsum(is_img, axis=1) - 1, 0, visual.shape[1] - 1)
  gathered = jnp.take_along_axis(visual, idx[..., None], axis=1)
  return jnp.where(is_img[..., None], gathered.astype(text_emb.dtype), text_emb)


class Projector(nn.Module):
  """LLaVA-1.5's projector: Dense-GELU-Dense ('mlp') or one Dense ('linear')."""

  kind: str
  width: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def dense(name, axes, h):
      return layers.DenseND((self.width,), axes, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)(h)
    if self.kind == 'mlp':
      x = nn.gelu(dense('hidden', (None, 'mlp'), x), approximate=False)
      return dense('out', ('mlp', 'embed'), x)
    return dense('out', (None, 'embed'), x)


class LLMEmbedder(nn.Module):
  """ViT -> projector -> visual tokens spliced into the ids' embeddings -> decoder -> pooled,
  L2-normalised embedding of the full decoder width."""

  config: LLMEmbedderConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    # Parameter prefixes 'img/' (locked with model.image.locked), 'projector/', 'llm/'. The ViT
    # gives its patch tokens (image.pool only says whether a CLS token joins the sequence), so a
    # CLIP/SigLIP tower imported through config.init.image runs as released.
    self.img = ViT(cfg.image, dtype, pdtype)
    self.projector = Projector(cfg.projector, cfg.decoder.width, dtype, pdtype)
    # With LoRA the decoder's base is read through stop_gradient: no base gradient is formed.
    self.llm = (lora.freeze_base(Decoder) if cfg.lora.rank else Decoder)(cfg.decoder, dtype,
                                                                          pdtype)

  def init_inputs(self, batch: int = 1) -> tuple[dict[str, jax.Array]]:
    """The inputs `init` traces the model with: one batch dict."""
    return (dummy_batch(self.config, batch),)

  def visual_tokens(self, images: jax.Array, *, train: bool = False,
                    rows: jax.Array | None = None) -> jax.Array:
    """uint8 [B, I, S, S, 3] -> [B, I * tokens_per_image, width]."""
    b, n = images.shape[:2]
    cfg = self.config
    x = normalize_images(images.reshape((b * n,) + images.shape[2:]), jnp.dtype(cfg.dtype),
                         tuple(cfg.image.pixel_mean), tuple(cfg.image.pixel_std))
    img_rows = None if rows is None else (rows[:, None] * n + jnp.arange(n)).reshape(-1)
    x = self.img(x, train=train and not cfg.image.locked, rows=img_rows, patch_tokens=True)
    if cfg.image.locked:
      x = jax.lax.stop_gradient(x)
    x = self.projector(merge_patches(x, cfg.merge))
    return x.reshape(b, n * x.shape[1], x.shape[2])

  def embed(self, tokens: jax.Array, mask: jax.Array, images: jax.Array, *, train: bool = False,
            rows: jax.Array | None = None) -> jax.Array:
    """The L2-normalised embeddings [B, width] of ids [B, L] (IMAGE_SLOT where visual tokens go),
    mask [B, L] and images [B, I, S, S, 3]. LoRA adapters (`config.lora`) are created and
    applied here, so init, the train step and the embedder all see them."""
    with lora.adapters(self.config.lora):
      x = self.llm.embed_tokens(jnp.where(tokens == IMAGE_SLOT, 0, tokens))
      x = splice(x, self.visual_tokens(images, train=train, rows=rows), tokens)
      hidden = self.llm(x, mask, positions_from_mask(mask), train=train, rows=rows)
    pool = poolers.last_token if self.config.pool == 'last' else poolers.mean_pool
    return l2_normalize(pool(hidden, mask))

  def embed_batch(self, batch: Mapping[str, jax.Array], *, train: bool = False,
                  rows: jax.Array | None = None) -> dict[str, jax.Array]:
    """{'query', 'candidate'[, 'neg_candidate']} embeddings of a (micro-)batch."""
    u = batch['query_tokens'].shape[0]
    rows = jnp.arange(u, dtype=jnp.int32) if rows is None else rows
    out = {}
    for role, prefix in LLM_ROLE_PREFIX.items():
      if f'{prefix}tokens' not in batch:
        continue
      tokens, mask, images = (batch[f'{prefix}{k}'] for k in ('tokens', 'mask', 'images'))
      if tokens.ndim == 3:  # [u, K, L] hard negatives: K rows per example.
        k = tokens.shape[1]
        flat = lambda x: x.reshape((u * k,) + x.shape[2:])  # noqa: E731
        z = self.embed(flat(tokens), flat(mask), flat(images), train=train,
                       rows=(rows[:, None] * k + jnp.arange(k)).reshape(-1))
        out[role] = z.reshape(u, k, -1)
      else:
        out[role] = self.embed(tokens, mask, images, train=train, rows=rows)
    return out

  def logit_params(self) -> tuple[jax.Array, jax.Array]:
    """A fixed temperature (not a parameter): logits = sim / temperature; no bias."""
    return jnp.asarray(1.0 / self.config.temperature, jnp.float32), jnp.zeros((), jnp.float32)

  def __call__(self, batch: Mapping[str, jax.Array], *, train: bool = False):
    return self.embed_batch(batch, train=train)


def export_parts(cfg: LLMEmbedderConfig, params, encoder, instructions):
  """(config, params, settings) to export: LoRA adapters merged into the base kernels (the
  exported config has rank 0) and what `load_embedder` needs to rebuild the encoder."""
  if cfg.lora.rank:
    params, cfg = lora.merge(params, cfg.lora), dataclasses.replace(cfg, lora=LoraConfig())
  settings = {'encoder': {'max_len': encoder.max_len, 'image_token': encoder.image_token,
                          'tokens_per_image': encoder.tokens_per_image,
                          'max_images': encoder.max_images, 'pad_side': encoder.pad_side,
                          'eos_token': encoder.tokenizer.id_to_token(encoder.eos_id)},
              'instructions': dataclasses.asdict(instructions)}
  return cfg, params, settings


def dummy_batch(cfg: LLMEmbedderConfig, batch: int = 1) -> dict[str, jax.Array]:
  """The smallest batch `init` needs (query and candidate, no negatives)."""
  s = cfg.image.image_size
  out = {}
  for prefix in ('query_', 'cand_'):
    out |= {f'{prefix}tokens': jnp.zeros((batch, cfg.max_len), jnp.int32),
            f'{prefix}mask': jnp.ones((batch, cfg.max_len), jnp.int32),
            f'{prefix}images': jnp.zeros((batch, cfg.max_images, s, s, 3), jnp.uint8)}
  return out
