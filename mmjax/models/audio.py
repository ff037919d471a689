"""The audio tower: a log-mel spectrogram computed on the device, then an AST-style ViT over
(time x frequency) patches of it, masked past each clip's end.

The front end follows librosa's conventions (`melspectrogram(center=True, pad_mode='constant',
window='hann', power=2)` then `power_to_db(ref=1)`), checked against it in
tests/test_audio.py. Padding with zeros is what makes variable-length clips exact: a clip of n
samples gives 1 + n // hop frames whether or not zeros follow it, the frames past those are set
to the mean, and the patches past the clip are masked out of attention and pooling, so a padded
clip embeds as the clip alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import mmjax.models.layers as layers
import mmjax.models.poolers as poolers
from mmjax.types import AudioConfig


def hz_to_mel(f: np.ndarray, scale: str) -> np.ndarray:
  """Hz -> mel: HTK's 2595 log10(1 + f/700), or Slaney's (linear below 1 kHz, log above)."""
  f = np.asarray(f, np.float64)
  if scale == 'htk':
    return 2595.0 * np.log10(1.0 + f / 700.0)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  logstep = np.log(6.4) / 27.0
  mel = f / f_sp
  log_part = min_log_hz / f_sp + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
  return np.where(f >= min_log_hz, log_part, mel)


def mel_to_hz(m: np.ndarray, scale: str) -> np.ndarray:
  m = np.asarray(m, np.float64)
  if scale == 'htk':
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(cfg: AudioConfig) -> np.ndarray:
  """Triangular mel filters [n_fft // 2 + 1, n_mels] (librosa.filters.mel, transposed)."""
  freqs = np.fft.rfftfreq(cfg.n_fft, 1.0 / cfg.sample_rate)
  mels = np.linspace(hz_to_mel(cfg.fmin, cfg.mel_scale), hz_to_mel(cfg.f_max, cfg.mel_scale),
                     cfg.n_mels + 2)
  edges = mel_to_hz(mels, cfg.mel_scale)
  fdiff = np.diff(edges)
  ramps = edges[:, None] - freqs[None, :]
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  if cfg.mel_norm:
    weights *= (2.0 / (edges[2:cfg.n_mels + 2] - edges[:cfg.n_mels]))[:, None]
  return weights.T.astype(np.float32)


def hann_window(cfg: AudioConfig) -> np.ndarray:
  """The periodic Hann window of win_length, centred in n_fft (librosa's `get_window` +
  `pad_center`)."""
  win = cfg.win_length or cfg.n_fft
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
  left = (cfg.n_fft - win) // 2
  return np.pad(w, (left, cfg.n_fft - win - left)).astype(np.float32)


def num_frames(lengths: jax.Array, hop_length: int) -> jax.Array:
  """Centred frames of clips of `lengths` samples: 1 + n // hop."""
  return 1 + lengths // hop_length


def power_spectrogram(waves: jax.Array, cfg: AudioConfig) -> jax.Array:
  """|STFT|^2 [B, frames, n_fft // 2 + 1] of float waves [B, S], frames centred on t * hop
  (zero padding of n_fft // 2 on both sides)."""
  pad = cfg.n_fft // 2
  x = jnp.pad(waves, ((0, 0), (pad, pad)))
  frames = 1 + waves.shape[1] // cfg.hop_length
  idx = np.arange(frames)[:, None] * cfg.hop_length + np.arange(cfg.n_fft)[None, :]
  spec = jnp.fft.rfft(x[:, idx] * jnp.asarray(hann_window(cfg), x.dtype), axis=-1)
  return jnp.real(spec) ** 2 + jnp.imag(spec) ** 2


def log_mel(waves: jax.Array, cfg: AudioConfig) -> jax.Array:
  """The dB mel spectrogram [B, frames, n_mels]: 10 log10(max(mel power, amin))."""
  mel = power_spectrogram(waves.astype(jnp.float32), cfg) @ jnp.asarray(mel_filterbank(cfg))
  return 10.0 * jnp.log10(jnp.maximum(mel, cfg.amin))


def spec_augment(spec: jax.Array, frames: jax.Array, cfg: AudioConfig, key: jax.Array,
                 rows: jax.Array) -> jax.Array:
  """SpecAugment (Park et al. 2019) time and frequency masks on normalised spectrograms
  [B, T, F] (masked cells become 0, the mean). Each row's masks come from fold_in(key, row), so
  a GradCache micro-batch redraws exactly the masks of the whole batch."""
  t_len, f_len = spec.shape[1:]

  def one(k, n_frames):
    keep = jnp.ones((t_len, f_len), bool)
    for i, (count, width, size, axis) in enumerate(
        ((cfg.spec_time_masks, cfg.spec_time_width, n_frames, 0),
         (cfg.spec_freq_masks, cfg.spec_freq_width, f_len, 1))):
      pos = jnp.arange(t_len if axis == 0 else f_len)
      for j in range(count):
        kw, ks = jax.random.split(jax.random.fold_in(k, 2 * j + i))
        w = jax.random.randint(kw, (), 0, width + 1)
        start = jax.random.randint(ks, (), 0, jnp.maximum(size - w, 0) + 1)
        hit = (pos >= start) & (pos < start + w)
        keep &= ~(hit[:, None] if axis == 0 else hit[None, :])
    return keep

  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows.astype(jnp.uint32))
  return jnp.where(jax.vmap(one)(keys, frames), spec, 0.0).astype(spec.dtype)


class AudioViT(nn.Module):
  """Pooled features [B, width] of float waves [B, S] (S <= max_samples, at sample_rate) with
  `lengths` [B] valid samples each; `patch_tokens=True` returns ([B, N, width], token mask)."""

  config: AudioConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, waves: jax.Array, lengths: jax.Array, *, train: bool = False,
               rows: jax.Array | None = None, patch_tokens: bool = False):
    cfg = self.config
    b, s = waves.shape
    if s > cfg.max_samples:
      raise ValueError(f'Audio of {s} samples exceeds max_seconds * sample_rate = '
                       f'{cfg.max_samples}.')
    rows = jnp.arange(b, dtype=jnp.int32) if rows is None else rows
    frames = num_frames(jnp.minimum(lengths, s), cfg.hop_length)
    spec = (log_mel(waves, cfg) - cfg.db_mean) / cfg.db_std
    t = spec.shape[1]
    spec = jnp.where((jnp.arange(t)[None, :] < frames[:, None])[..., None], spec, 0.0)
    if train and (cfg.spec_time_masks or cfg.spec_freq_masks):
      spec = spec_augment(spec, frames, cfg, self.make_rng('dropout'), rows)
    pt, pf = cfg.patch_time, cfg.patch_freq
    nt, nf = -(-t // pt), cfg.freq_patches
    spec = jnp.pad(spec, ((0, 0), (0, nt * pt - t), (0, 0)))
    patches = spec.reshape(b, nt, pt, nf, pf).transpose(0, 1, 3, 2, 4).reshape(b, nt * nf, pt * pf)
    kernel = self.param('patch_kernel', layers.dense_init((None, None, None, 'embed'),
                                                          nn.initializers.lecun_normal()),
                        (pt, pf, 1, cfg.width), self.param_dtype)
    x = jnp.dot(patches.astype(self.dtype), kernel.reshape(pt * pf, cfg.width).astype(self.dtype))
    bias = self.param('patch_bias', nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)),
                      (cfg.width,), self.param_dtype)
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(stddev=1 / np.sqrt(cfg.width)), (None, None, None, 'embed')),
                     (1, cfg.time_patches, nf, cfg.width), self.param_dtype)
    x = x + bias.astype(self.dtype) + pos[:, :nt].reshape(1, nt * nf, cfg.width).astype(self.dtype)
    # A time patch is valid when its first frame is one of the clip's.
    mask = jnp.repeat(jnp.arange(nt)[None, :] * pt < frames[:, None], nf, axis=1)
    x = layers.Dropout(cfg.dropout)(x, deterministic=not train, rows=rows)
    x = layers.Encoder(cfg.depth, cfg.num_heads, cfg.mlp_dim, causal=False, dropout=cfg.dropout,
                       remat=cfg.remat, dtype=self.dtype, param_dtype=self.param_dtype,
                       norm=cfg.norm, act=cfg.act, ln_eps=cfg.ln_eps, final_ln=cfg.final_ln,
                       name='encoder')(x, mask, deterministic=not train, rows=rows)
    if patch_tokens:
      return x, mask
    if cfg.pool == 'map':
      return layers.MAPHead(cfg.num_heads, cfg.mlp_dim, self.dtype, self.param_dtype, cfg.act,
                            cfg.ln_eps, name='map_head')(x, mask)
    return poolers.mean_pool(x, mask)
