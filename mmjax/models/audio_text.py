"""The audio-text dual encoder (CLAP-style): audio tower + text tower, projection heads and the
learnable temperature/bias, with the model contract of the dual encoder (`embed_batch` by role,
`logit_params`), so the train step, GradCache and the losses run on it unchanged."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmjax.losses.contrastive import l2_normalize
import mmjax.models.audio as audio_lib
import mmjax.models.two_tower as two_tower
from mmjax.models.text import TextTransformer
from mmjax.types import AudioTextConfig


def _locked(z: jax.Array, locked: bool) -> jax.Array:
  """A locked tower passes no gradient (as the dual encoder's)."""
  return jax.lax.stop_gradient(z) if locked else z


class AudioText(nn.Module):
  """Roles: 'audio' (batch columns `audio` float [B, S] and `audio_len` int [B]) and 'text'."""

  config: AudioTextConfig

  def setup(self):
    cfg = self.config
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.aud = audio_lib.AudioViT(cfg.audio, dtype, pdtype)
    self.txt = TextTransformer(cfg.text, dtype, pdtype)
    self.aud_head = two_tower.ProjectionHead(cfg.tower_head('audio'), cfg.embed_dim, dtype, pdtype,
                                             cfg.head_bias)
    self.txt_head = two_tower.ProjectionHead(cfg.tower_head('text'), cfg.embed_dim, dtype, pdtype,
                                             cfg.head_bias)
    self.t_prime = self.param('t_prime', nn.initializers.constant(cfg.temperature_init), (),
                              jnp.float32)
    if cfg.bias_init is not None:
      self.bias = self.param('bias', nn.initializers.constant(cfg.bias_init), (), jnp.float32)

  def init_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
    n = self.config.text.max_len
    return (jnp.zeros((batch, self.config.audio.max_samples), jnp.float32),
            jnp.full((batch,), self.config.audio.max_samples, jnp.int32),
            jnp.zeros((batch, n), jnp.int32), jnp.ones((batch, n), jnp.int32))

  def embed_audio(self, waves: jax.Array, lengths: jax.Array, *, train: bool = False,
                  rows: jax.Array | None = None) -> jax.Array:
    locked = self.config.audio.locked
    z = self.aud(waves, lengths, train=train and not locked, rows=rows)
    return l2_normalize(self.aud_head(_locked(z, locked)))

  def embed_texts(self, tokens: jax.Array, mask: jax.Array, *, train: bool = False,
                  rows: jax.Array | None = None) -> jax.Array:
    locked = self.config.text.locked
    z = self.txt(tokens, mask, train=train and not locked, rows=rows)
    return l2_normalize(self.txt_head(_locked(z, locked)))

  def embed_batch(self, batch, *, train: bool = False, rows: jax.Array | None = None):
    n = batch['tokens'].shape[0]
    rows = jnp.arange(n, dtype=jnp.int32) if rows is None else rows
    return {'text': self.embed_texts(batch['tokens'], batch['mask'], train=train, rows=rows),
            'audio': self.embed_audio(batch['audio'], batch['audio_len'], train=train,
                                      rows=rows + two_tower.ROLE_ROW_STRIDE)}

  def logit_params(self) -> tuple[jax.Array, jax.Array]:
    bias = self.bias if self.config.bias_init is not None else jnp.zeros((), jnp.float32)
    return jnp.exp(self.t_prime), bias

  def __call__(self, waves, lengths, tokens, mask, *, train: bool = False):
    t, bias = self.logit_params()
    return (self.embed_audio(waves, lengths, train=train),
            self.embed_texts(tokens, mask, train=train), t, bias)
