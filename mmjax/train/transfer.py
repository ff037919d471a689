"""Starting a run from released weights: `config.init.<tower>`, locked towers and freezing.

`frozen_pattern(config)` is the regex of parameters the optimizer leaves alone (the config's own,
every locked tower and what the model kind freezes); `apply_init(config, state, shardings)`
replaces freshly initialised parameters with a checkpoint's, the way the model kind imports
weights (`mmjax.kinds`: the dual encoder's towers from Hugging Face checkpoints, after checking
that the run's tower config is the checkpoint's architecture; the LLM embedder's decoder). See
docs/pretrained.md.
"""

from __future__ import annotations

from mmjax import hf, kinds
from mmjax.hf.convert import describe  # noqa: F401  (re-exported)
from mmjax.kinds.dual_encoder import (RUN_FIELDS, TOWERS, architecture_mismatch,  # noqa: F401
                                      load_init)
from mmjax.kinds.llm import load_decoder_init  # noqa: F401


def frozen_pattern(config) -> str:
  """config.optimizer.frozen, plus '^img/' / '^txt/' for locked towers and the model kind's own
  (with LoRA on the LLM embedder, its decoder's base weights)."""
  parts = [config.optimizer.frozen] if config.optimizer.frozen else []
  for tower, (prefix, _) in TOWERS.items():
    if config.model[tower].locked:
      parts.append(f'^{prefix}/')
  parts += kinds.get(config).frozen_patterns(config)
  return '|'.join(f'(?:{p})' for p in parts)


def tokenizer_path(config) -> str:
  """config.tokenizer.path ('pkg:' resolved), else the kind's own (an imported decoder's), else
  the directory of config.init.text, else ''."""
  if config.tokenizer.path:
    path = config.tokenizer.path
    return str(hf.resolve_dir(path)) if path.startswith('pkg:') else path
  if own := kinds.get(config).tokenizer_dir(config):
    return own
  if config.init.text:
    return str(hf.resolve_dir(config.init.text))
  return ''


def apply_init(config, state, shardings, model_config):
  """`state` with the config.init weights put in place (with their shardings), as the model
  kind imports them."""
  return kinds.get(config).apply_init(config, state, shardings, model_config)
