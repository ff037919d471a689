"""The registry of model kinds: `get(config)` is the one place that decides what a
`config.model.kind` needs (see `mmjax.kinds.base.ModelKind`). A new kind (audio, video) is one
module here and one entry in `KINDS` (audio: `audio_text`)."""

from mmjax.kinds.audio_text import AudioTextKind, audio_text_config
from mmjax.kinds.base import DataContract, ModelKind, put_params
from mmjax.kinds.dual_encoder import DualEncoder, dual_encoder_config
from mmjax.kinds.llm import LLMEmbedderKind, llm_embedder_config

KINDS: dict[str, ModelKind] = {'two_tower': DualEncoder(), 'llm_embedder': LLMEmbedderKind(),
                               'audio_text': AudioTextKind()}


def get(config) -> ModelKind:
  """The kind of a run config (config.model.kind, 'two_tower' when absent)."""
  name = config.model.get('kind', 'two_tower')
  if name not in KINDS:
    raise ValueError(f'config.model.kind={name!r} is not one of {", ".join(map(repr, KINDS))}.')
  return KINDS[name]


def contract(config) -> DataContract:
  """The run's data contract (opens the data sources once)."""
  return get(config).contract(config)


__all__ = ['AudioTextKind', 'DataContract', 'DualEncoder', 'KINDS', 'LLMEmbedderKind', 'ModelKind',
           'audio_text_config', 'contract', 'dual_encoder_config', 'get', 'llm_embedder_config',
           'put_params']
