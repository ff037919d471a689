"""The frozen configs of the towers: the shared transformer stack, ViT, text, audio, the
Llama/Qwen2 decoder and its LoRA adapters. Part of `mmjax.types` (imports nothing outside it);
each checks itself on construction where a shape can be impossible."""

from __future__ import annotations

import dataclasses
import re

from mmjax.types.common import ConfigError


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """The encoder stack every tower shares."""

  width: int = 256
  depth: int = 6
  num_heads: int = 4
  mlp_dim: int = 1024
  dropout: float = 0.0
  remat: bool = False
  remat_policy: str = 'nothing_saveable'  # What a remat'ed block keeps: ENCODER_REMAT_POLICIES.
  # Architecture options of released checkpoints (docs/pretrained.md); the defaults are mmjax's.
  norm: str = 'pre'  # 'pre' | 'post' (BERT) layer norm placement.
  act: str = 'gelu_tanh'  # MLP activation: 'gelu_tanh' | 'gelu' | 'quick_gelu' | 'relu'.
  ln_eps: float = 1e-6
  embed_ln: bool = False  # LayerNorm on the embeddings before the blocks (BERT, CLIP vision).
  final_ln: bool = True  # LayerNorm after the last block.
  locked: bool = False  # LiT: no gradient through the tower, its parameters frozen.


@dataclasses.dataclass(frozen=True)
class ViTConfig(TransformerConfig):
  image_size: int = 64
  patch_size: int = 8
  posemb: str = 'learn'
  pool: str = 'gap'
  patch_bias: bool = True
  posemb_cls: bool = False  # The learned position embedding also covers the CLS token (CLIP).
  pixel_mean: tuple[float, ...] = ()  # uint8 pixels -> (x/255 - mean)/std; () maps to [-1, 1].
  pixel_std: tuple[float, ...] = ()
  stem_channels: tuple[int, ...] = ()  # 3x3 conv + GELU layers before the patches; (): none.
  # How each stem conv downsamples: '' keeps full resolution; 'maxpool' (3x3 conv, then 2x2 max
  # pool) or 'stride' (3x3 stride-2 conv) halve it per conv.
  stem_downsample: str = ''

  @property
  def stem_reduction(self) -> int:
    """How many pixels one stem output position spans per side (2 ** convs when downsampling)."""
    return 2 ** len(self.stem_channels) if self.stem_downsample else 1

  @property
  def grid_size(self) -> int:
    """Side of the patch-token grid: image_size / (stem reduction x patch_size)."""
    return self.image_size // self.stem_reduction // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig(TransformerConfig):
  max_len: int = 32
  vocab_size: int = 32_000
  causal: bool = True
  pool: str = 'last'
  num_positions: int = 0  # Rows of the position embedding; 0: max_len.
  type_vocab_size: int = 0  # BERT token-type embeddings (type 0 is added); 0: none.
  attend_padding: bool = False  # Ignore the mask in attention and pooling (SigLIP pads to max_len).

  @property
  def positions(self) -> int:
    return self.num_positions or self.max_len


# jax.checkpoint_policies a remat'ed decoder layer may use (what it keeps for the backward pass).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'everything_saveable')
# An encoder block may also keep only named activations (mmjax.models.layers tags them):
# 'save_attention' keeps q/k/v and the attention context (recomputes the LayerNorms and the MLP),
# 'save_mlp_hidden' keeps the MLP's hidden layer before its activation (recomputes attention).
ENCODER_REMAT_POLICIES = REMAT_POLICIES + ('save_attention', 'save_mlp_hidden')


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Llama/Qwen2-style decoder (mmjax.models.decoder): RMSNorm, RoPE, SwiGLU, grouped-query
  attention. Checked on construction, so an impossible shape fails before any compute."""

  vocab_size: int = 32_000
  width: int = 256  # hidden_size.
  depth: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4  # < num_heads: grouped-query attention; 1: multi-query.
  head_dim: int = 0  # 0: width // num_heads.
  mlp_dim: int = 1024  # intermediate_size.
  rope_theta: float = 10_000.0
  # Llama 3.x rope scaling: (factor, low_freq_factor, high_freq_factor, original context); ().
  rope_scaling: tuple[float, ...] = ()
  rms_eps: float = 1e-6
  max_len: int = 512  # Context length: longer inputs are refused.
  qkv_bias: bool = False  # Qwen2: biases on q/k/v (not on the output projection).
  scan_layers: bool = False  # nn.scan over layers: one compiled layer, parameters stacked.
  remat: bool = False
  remat_policy: str = 'nothing_saveable'  # One of REMAT_POLICIES.
  dropout: float = 0.0  # Residual dropout (per example, see layers.Dropout).

  def __post_init__(self):
    object.__setattr__(self, 'rope_scaling', tuple(self.rope_scaling))  # JSON gives a list.
    if len(self.rope_scaling) not in (0, 4):
      raise ConfigError(f'DecoderConfig.rope_scaling={self.rope_scaling} must be () or (factor, '
                        'low_freq_factor, high_freq_factor, original_max_len).')
    for name in ('vocab_size', 'width', 'depth', 'num_heads', 'num_kv_heads', 'mlp_dim',
                 'max_len'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'DecoderConfig.{name}={getattr(self, name)} must be positive.')
    if self.num_heads % self.num_kv_heads:
      raise ConfigError(f'DecoderConfig.num_heads={self.num_heads} is not a multiple of '
                        f'num_kv_heads={self.num_kv_heads} (grouped-query attention).')
    if not self.head_dim and self.width % self.num_heads:
      raise ConfigError(f'DecoderConfig.width={self.width} is not divisible by num_heads='
                        f'{self.num_heads}; set head_dim.')
    if self.dim_per_head % 2:
      raise ConfigError(f'DecoderConfig head dimension {self.dim_per_head} must be even (RoPE).')
    if self.remat_policy not in REMAT_POLICIES:
      raise ConfigError(f'DecoderConfig.remat_policy={self.remat_policy!r} is not one of '
                        f'{", ".join(REMAT_POLICIES)}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ConfigError(f'DecoderConfig.dropout={self.dropout} must be in [0, 1).')

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.width // self.num_heads


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA adapters (mmjax.models.lora) on the DenseND projections whose module path ('llm/
  layers_0/attn/query') matches `targets`; rank 0 adds none."""

  rank: int = 0
  alpha: float = 16.0  # The update is (alpha / rank) * x A B.
  targets: str = r'attn/(query|key|value|out)$'

  def __post_init__(self):
    if self.rank < 0:
      raise ConfigError(f'LoraConfig.rank={self.rank} must be >= 0 (0: no adapters).')
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ConfigError(f'LoraConfig.targets={self.targets!r} is not a valid regex ({e}).') from e

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


# Front-end choices of the audio tower (mmjax.models.audio).
MEL_SCALES = ('slaney', 'htk')
AUDIO_POOLS = ('gap', 'map')


@dataclasses.dataclass(frozen=True)
class AudioConfig(TransformerConfig):
  """The audio tower: waveform -> log-mel spectrogram (on device) -> AST-style ViT over
  (time x frequency) patches. Clips shorter than `max_seconds` are zero-padded and masked."""

  sample_rate: int = 16_000
  max_seconds: float = 10.0
  n_fft: int = 400
  hop_length: int = 160
  win_length: int = 0  # 0: n_fft (a shorter Hann window is centred in the n_fft frame).
  n_mels: int = 64
  fmin: float = 0.0
  fmax: float = 0.0  # 0: sample_rate / 2.
  mel_scale: str = 'slaney'  # 'slaney' (librosa's default) | 'htk'.
  mel_norm: bool = True  # Slaney area normalisation of the filters (librosa norm='slaney').
  amin: float = 1e-10  # power_to_db floor: 10 log10(max(S, amin)).
  db_mean: float = -50.0  # The dB spectrogram enters the ViT as (S_db - db_mean) / db_std.
  db_std: float = 20.0
  patch_time: int = 8  # Frames per patch.
  patch_freq: int = 8  # Mel bins per patch; must divide n_mels.
  pool: str = 'gap'  # 'gap' (mean over the clip's valid patches) | 'map' (attention pooling).
  # SpecAugment (train only): masks of up to *_width frames / mel bins set to the mean.
  spec_time_masks: int = 0
  spec_time_width: int = 16
  spec_freq_masks: int = 0
  spec_freq_width: int = 8

  def __post_init__(self):
    checks = [
        (self.sample_rate > 0 and self.max_seconds > 0, 'sample_rate and max_seconds must be > 0'),
        (self.n_fft > 0 and 0 < self.hop_length, 'n_fft and hop_length must be > 0'),
        (0 <= self.win_length <= self.n_fft, f'win_length={self.win_length} must be in 0..n_fft'),
        (self.mel_scale in MEL_SCALES, f'mel_scale={self.mel_scale!r} is not one of {MEL_SCALES}'),
        (self.pool in AUDIO_POOLS, f'pool={self.pool!r} is not one of {AUDIO_POOLS}'),
        (self.patch_freq > 0 and self.n_mels % self.patch_freq == 0,
         f'patch_freq={self.patch_freq} must divide n_mels={self.n_mels}'),
        (self.patch_time > 0, f'patch_time={self.patch_time} must be > 0'),
        (0 <= self.fmin < self.f_max <= self.sample_rate / 2,
         f'need 0 <= fmin={self.fmin} < fmax={self.f_max} <= sample_rate/2'),
        (self.db_std > 0 and self.amin > 0, 'db_std and amin must be > 0'),
        (min(self.spec_time_masks, self.spec_freq_masks, self.spec_time_width,
             self.spec_freq_width) >= 0, 'SpecAugment counts and widths must be >= 0'),
    ]
    for ok, msg in checks:
      if not ok:
        raise ConfigError(f'model.audio: {msg}.')

  @property
  def f_max(self) -> float:
    return self.fmax or self.sample_rate / 2

  @property
  def max_samples(self) -> int:
    return int(round(self.max_seconds * self.sample_rate))

  @property
  def max_frames(self) -> int:
    """Frames of a full clip (centred frames: 1 + samples // hop, as librosa)."""
    return 1 + self.max_samples // self.hop_length

  @property
  def time_patches(self) -> int:
    return -(-self.max_frames // self.patch_time)

  @property
  def freq_patches(self) -> int:
    return self.n_mels // self.patch_freq
