"""The frozen configs of whole models (one per model kind), built from the towers' configs;
each round-trips through JSON (`to_dict` / `from_dict`) for checkpoint meta and exports.
Part of `mmjax.types` (imports nothing outside it)."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

from mmjax.types.common import lists_to_tuples
from mmjax.types.towers import AudioConfig, DecoderConfig, LoraConfig, TextConfig, ViTConfig


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  image: ViTConfig
  text: TextConfig
  embed_dim: int = 256
  head: str = 'linear'
  loss: str = 'sigmoid'
  temperature_init: float = math.log(10.0)
  bias_init: float | None = -10.0
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  image_head: str = ''  # Per-tower head kind; '' uses `head`.
  text_head: str = ''
  head_bias: bool = True  # CLIP's projections have no bias.
  # Multi-task uncertainty weighting: (task, initial log-variance) pairs, trained as the
  # 'multitask' params (config.multitask.weighting='uncertainty'); () = none.
  task_log_vars: tuple[tuple[str, float], ...] = ()
  # Heads on the towers' token outputs (mmjax.models.fusion, docs/objectives.md); depth 0: none.
  # ITM: text tokens cross-attend to image tokens, a binary match logit (ALBEF/BLIP).
  itm_depth: int = 0
  itm_heads: int = 4
  itm_mlp_dim: int = 0  # 0: 4 x the text width.
  # Captioning (CoCa): a causal text decoder cross-attending to the image tokens.
  caption_depth: int = 0
  caption_heads: int = 4
  caption_mlp_dim: int = 0

  @property
  def token_heads(self) -> bool:
    """Whether the model has a head on token outputs (then embed_batch returns them)."""
    return bool(self.itm_depth or self.caption_depth)

  def tower_head(self, tower: str) -> str:
    return (self.image_head if tower == 'image' else self.text_head) or self.head

  def to_dict(self) -> dict[str, Any]:
    """JSON-shaped (tuples as lists), so it compares equal to a saved checkpoint's meta."""
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
    d = dict(d)
    image = lists_to_tuples(d.pop('image'))
    d['task_log_vars'] = tuple(tuple(x) for x in d.get('task_log_vars', ()))
    return cls(image=ViTConfig(**image), text=TextConfig(**d.pop('text')), **d)


LLM_POOLS = ('last', 'mean')
LLM_PROJECTORS = ('mlp', 'linear')


def tokens_per_image(image: ViTConfig, merge: int) -> int:
  """Visual tokens one image becomes in the LLM embedder: (patch grid / merge)^2."""
  return (image.grid_size // merge) ** 2


@dataclasses.dataclass(frozen=True)
class LLMEmbedderConfig:
  """What the LLM embedder's layers need (built from config.model by `from_run_config`)."""

  image: ViTConfig
  decoder: DecoderConfig
  max_len: int = 128  # Sequence length of every row (visual tokens included).
  max_images: int = 1  # Image slots per sequence.
  merge: int = 1  # merge x merge neighbouring patches become one visual token.
  projector: str = 'mlp'
  pool: str = 'last'
  matryoshka_dims: tuple[int, ...] = ()
  temperature: float = 0.02
  lora: LoraConfig = LoraConfig()  # rank 0: no adapters.
  dtype: str = 'float32'
  param_dtype: str = 'float32'

  def __post_init__(self):
    grid = self.image.grid_size
    if self.merge < 1 or grid % self.merge:
      raise ValueError(f'model.llm.merge={self.merge} must divide the {grid}x{grid} patch grid.')
    if self.pool not in LLM_POOLS:
      raise ValueError(f'model.llm.pool={self.pool!r} is not one of {LLM_POOLS}.')
    if self.projector not in LLM_PROJECTORS:
      raise ValueError(f'model.llm.projector={self.projector!r} is not one of {LLM_PROJECTORS}.')
    bad = [d for d in self.matryoshka_dims if not 0 < d <= self.embed_dim]
    if bad or list(self.matryoshka_dims) != sorted(set(self.matryoshka_dims)):
      raise ValueError(f'model.llm.matryoshka_dims={self.matryoshka_dims} must be increasing, '
                       f'each in 1..{self.embed_dim} (the decoder width).')
    if self.max_len > self.decoder.max_len:
      raise ValueError(f'model.llm.max_len={self.max_len} exceeds the decoder context '
                       f'model.decoder.max_len={self.decoder.max_len}.')
    if not self.temperature > 0:
      raise ValueError(f'model.llm.temperature={self.temperature} must be > 0.')

  @property
  def embed_dim(self) -> int:
    return self.decoder.width

  @property
  def tokens_per_image(self) -> int:
    return tokens_per_image(self.image, self.merge)

  @property
  def eval_dims(self) -> tuple[int, ...]:
    """The dimensions trained (and evaluated): the Matryoshka ones and always the full one."""
    return tuple(sorted(set(self.matryoshka_dims) | {self.embed_dim}))

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LLMEmbedderConfig:
    d = dict(d)
    image = lists_to_tuples(d.pop('image'))
    return cls(image=ViTConfig(**image), decoder=DecoderConfig(**d.pop('decoder')),
               lora=LoraConfig(**d.pop('lora', {})), **lists_to_tuples(d))


@dataclasses.dataclass(frozen=True)
class AudioTextConfig:
  """The audio-text dual encoder (model.kind='audio_text', mmjax.models.audio)."""

  audio: AudioConfig
  text: TextConfig
  embed_dim: int = 256
  head: str = 'linear'
  loss: str = 'softmax'
  temperature_init: float = math.log(1 / 0.07)
  bias_init: float | None = None
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  audio_head: str = ''
  text_head: str = ''
  head_bias: bool = True

  def tower_head(self, tower: str) -> str:
    return (self.audio_head if tower == 'audio' else self.text_head) or self.head

  def to_dict(self) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(self)))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> AudioTextConfig:
    d = dict(d)
    return cls(audio=AudioConfig(**d.pop('audio')), text=TextConfig(**d.pop('text')), **d)
