"""The audio-text dual encoder (model.kind='audio_text'): the audio tower (log-mel front end +
AST-style ViT) and the text transformer in one space, trained with the contrastive loss on
config.data.audio (synthetic captioned sounds or ingested clips); docs/modalities.md."""

from __future__ import annotations

import math

from mmjax.data import audio_pipeline, tokenizer as tokenizer_lib
from mmjax.embedder import AUDIO_EXPORT_FORMAT, AudioEmbedder
from mmjax.kinds.base import DataContract, ModelKind
from mmjax.losses import objectives
from mmjax.models.audio_text import AudioText
from mmjax.types import AudioTextConfig, ConfigError, TextConfig, require


def audio_text_config(config) -> AudioTextConfig:
  """The typed model config of a run config with model.kind='audio_text'."""
  m = config.model
  t_init = config.loss.temperature_init
  if t_init is None:
    t_init = math.log(10.0) if config.loss.kind == 'sigmoid' else math.log(1 / 0.07)
  return AudioTextConfig(
      audio=audio_pipeline.audio_config(config), text=TextConfig(**m.text.to_dict()),
      embed_dim=m.embed_dim, head=m.head, loss=config.loss.kind, temperature_init=float(t_init),
      bias_init=float(config.loss.bias_init) if config.loss.kind == 'sigmoid' else None,
      dtype=m.dtype, param_dtype=m.param_dtype, audio_head=m.audio_head, text_head=m.text_head,
      head_bias=m.head_bias)


class AudioTextKind(ModelKind):
  """model.kind='audio_text'."""

  name = 'audio_text'
  export_format = AUDIO_EXPORT_FORMAT
  primary_eval_type = 'audio_retrieval'

  def validate(self, config) -> None:
    a = config.data.audio
    require(a.source in audio_pipeline.SOURCES, f'config.data.audio.source={a.source!r} is not '
            f'one of {audio_pipeline.SOURCES}.')
    require(a.source != 'records' or a.path, "config.data.audio.path is empty: a 'records' "
            'source needs the directory of `python -m mmjax.data.prepare --audio_dir=... '
            '--out=PATH`.')
    require(a.num_train_clips > 0 and a.max_events >= 1,
            f'config.data.audio.num_train_clips={a.num_train_clips} must be > 0 and '
            f'max_events={a.max_events} >= 1.')
    au = config.model.audio
    require(au.width % au.num_heads == 0, f'config.model.audio.width={au.width} is not a '
            f'multiple of config.model.audio.num_heads={au.num_heads}.')
    require(not (config.distill.weight or config.multitask.tasks
                 or config.multitask.log_grad_norms or config.data.mixture
                 or config.data.num_hard_negatives or config.init.image or config.init.text),
            "config.distill / multitask / data.mixture / data.num_hard_negatives / init are for "
            "model.kind='two_tower'; the audio-text kind trains one audio-caption source.")
    try:
      audio_text_config(config)
    except ConfigError as e:
      raise ConfigError(f'config.{e}') from e

  def model_config(self, config) -> AudioTextConfig:
    return audio_text_config(config)

  def model(self, model_config: AudioTextConfig) -> AudioText:
    return AudioText(model_config)

  def contract(self, config) -> DataContract:
    spec = audio_pipeline.batch_spec(config)
    return DataContract(spec, tuple(k for k in spec if k != 'source'), ('audio', 'text'))

  def tokenizer_corpus(self, config):
    return audio_pipeline.caption_corpus(config)

  def prepare_tokenizer(self, tokenizer, config):
    return tokenizer, ('model.text.vocab_size', config.model.text.vocab_size)

  def encoder(self, config, tokenizer) -> tokenizer_lib.TextEncoder:
    return tokenizer_lib.TextEncoder(tokenizer, config.model.text.max_len)

  def train_dataset(self, config, encoder, contract, *, process_index: int = 0,
                    process_count: int = 1, teacher_encoder=None):
    del contract, teacher_encoder  # One batch layout; no distillation (validate).
    return audio_pipeline.make_train_dataset(config, encoder, process_index=process_index,
                                             process_count=process_count)

  def objective(self, config, loss_fn, contract: DataContract, *, mesh=None):  # noqa: ARG002
    return objectives.Contrastive(loss_fn, *contract.roles,
                                  drop_noisy_fraction=config.loss.drop_noisy_fraction)

  def embedder(self, model_config, params, encoder, config, *, mesh, batch_size: int):
    return AudioEmbedder(model_config, params, encoder, mesh=mesh, batch_size=batch_size)
