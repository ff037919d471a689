"""The bottom layer: plain types every other mmjax module may import; it imports nothing of mmjax.

- `ConfigError`, the frozen dataclasses each layer receives instead of the ConfigDict (tower,
  decoder and LoRA configs in `towers`, the model configs in `models`), and the names shared
  across layers (`common`): mesh axes, the batch axes, the LLM embedder's roles, tasks and
  image-slot id.
- `Embedder`: the protocol evaluators embed through (the dual encoder's and the LLM embedder's
  runners in `mmjax.embedder` implement it), so evaluation never depends on the trainer.

Every name is importable from `mmjax.types` itself; the submodules only keep each file short.
"""

from mmjax.types.common import (BATCH_AXES, DEFAULT_MESH, IMAGE_SLOT, LLM_ROLE_PREFIX, LLM_TASKS,
                                MESH_AXES, Batch, ConfigError, Embedder, Embeddings,
                                check_batch_divides, lists_to_tuples, require)
from mmjax.types.models import (LLM_POOLS, LLM_PROJECTORS, AudioTextConfig, LLMEmbedderConfig,
                                ModelConfig, tokens_per_image)
from mmjax.types.towers import (AUDIO_POOLS, ENCODER_REMAT_POLICIES, MEL_SCALES, REMAT_POLICIES,
                                AudioConfig, DecoderConfig, LoraConfig, TextConfig,
                                TransformerConfig, ViTConfig)

__all__ = [
    'BATCH_AXES', 'DEFAULT_MESH', 'IMAGE_SLOT', 'LLM_ROLE_PREFIX', 'LLM_TASKS', 'MESH_AXES',
    'Batch', 'ConfigError', 'Embedder', 'Embeddings', 'check_batch_divides', 'lists_to_tuples',
    'require',
    'LLM_POOLS', 'LLM_PROJECTORS', 'AudioTextConfig', 'LLMEmbedderConfig', 'ModelConfig',
    'tokens_per_image',
    'AUDIO_POOLS', 'ENCODER_REMAT_POLICIES', 'MEL_SCALES', 'REMAT_POLICIES', 'AudioConfig',
    'DecoderConfig', 'LoraConfig', 'TextConfig', 'TransformerConfig', 'ViTConfig',
]
