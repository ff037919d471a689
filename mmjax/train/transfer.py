"""Starting a run from released weights: `config.init.<tower>`, locked towers and freezing.

`frozen_pattern(config)` is the regex of parameters the optimizer leaves alone (the config's own
plus every locked tower); `apply_init(config, state, shardings)` replaces freshly initialised
tower parameters with a Hugging Face checkpoint's, after checking that the run's tower config
is the checkpoint's architecture (the error lists the fields to set). See docs/pretrained.md.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib

import jax
import numpy as np
from flax import traverse_util

from mmjax import config as config_lib
from mmjax import hf

log = logging.getLogger(__name__)

TOWERS = {'image': ('img', 'img_head'), 'text': ('txt', 'txt_head')}
# Fields a run may choose freely over an imported tower; every other field is architecture.
RUN_FIELDS = frozenset({'dropout', 'remat', 'locked', 'max_len', 'pool'})


def frozen_pattern(config) -> str:
  """config.optimizer.frozen, plus '^img/' / '^txt/' for locked towers and, with LoRA on the LLM
  embedder, its decoder's base weights."""
  parts = [config.optimizer.frozen] if config.optimizer.frozen else []
  for tower, (prefix, _) in TOWERS.items():
    if config.model[tower].locked:
      parts.append(f'^{prefix}/')
  if config.model.kind == 'llm_embedder' and config.model.lora.rank:
    from mmjax.models import lora  # pylint: disable=import-outside-toplevel
    parts.append(lora.base_pattern('llm/'))  # LoRA: the decoder trains its adapters only.
  return '|'.join(f'(?:{p})' for p in parts)


def tokenizer_path(config) -> str:
  """config.tokenizer.path ('pkg:' resolved), else the directory of config.init.text, else ''."""
  if config.tokenizer.path:
    path = config.tokenizer.path
    return str(hf.resolve_dir(path)) if path.startswith('pkg:') else path
  if config.model.kind == 'llm_embedder' and config.init.decoder:  # Its own, when it has one.
    directory = hf.resolve_dir(config.init.decoder)
    if (directory / 'tokenizer.json').exists():
      return str(directory)
  if config.init.text:
    return str(hf.resolve_dir(config.init.text))
  return ''


def architecture_mismatch(tower: str, run_cfg, ckpt_cfg) -> list[str]:
  """'--config.model.text.width=384 (run has 256)' for every architecture field that differs."""
  out = []
  for f in dataclasses.fields(ckpt_cfg):
    if f.name in RUN_FIELDS:
      continue
    want, have = getattr(ckpt_cfg, f.name), getattr(run_cfg, f.name)
    if f.name == 'num_positions':
      want, have = ckpt_cfg.positions, run_cfg.positions
    if want != have:
      out.append(f'--config.model.{tower}.{f.name}={want!r} (run has {have!r})')
  return out


def load_init(config, model_config: config_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Flat {'txt/encoder/...': array} of every tower that config.init names (heads and the logit
  scale/bias too when their shapes fit), in config.model.param_dtype whatever the file stores."""
  flat: dict[str, np.ndarray] = {}
  loaded: dict[str, hf.Pretrained] = {}
  for tower, (prefix, head) in TOWERS.items():
    spec = config.init[tower]
    if not spec:
      continue
    ckpt = loaded.get(spec) or hf.load(spec, dtype=model_config.param_dtype)
    loaded[spec] = ckpt
    ckpt_cfg = getattr(ckpt, tower)
    if ckpt_cfg is None:
      raise config_lib.ConfigError(f'config.init.{tower}={spec!r}: the {ckpt.family} checkpoint '
                                   f'has no {tower} tower.')
    diff = architecture_mismatch(tower, getattr(model_config, tower), ckpt_cfg)
    if diff:
      raise config_lib.ConfigError(
          f'config.init.{tower}={spec!r} is a different architecture than config.model.{tower}; '
          'set: ' + ' '.join(diff))
    params = traverse_util.flatten_dict(ckpt.params, sep='/')
    flat.update({k: v for k, v in params.items() if k.startswith(f'{prefix}/')})
    flat.update({k: v for k, v in params.items() if k.startswith(f'{head}/')})
    log.info('config.init.%s: %s tower from %s (%s).', tower, ckpt.family, spec, ckpt.directory)
  if config.init.image and config.init.image == config.init.text:
    flat.update({k: v for k, v in traverse_util.flatten_dict(
        loaded[config.init.text].params, sep='/').items() if k in ('t_prime', 'bias')})
  return flat


def apply_init(config, state, shardings, model_config: config_lib.ModelConfig):
  """`state` with the config.init towers' parameters put in place (with their shardings).

  A head or logit parameter whose shape differs from the run's (another embed_dim or head kind)
  keeps its random initialisation; a tower parameter that differs is an error.
  """
  if config.model.kind == 'llm_embedder':
    flat = load_decoder_init(config)
    return _put(state, shardings, flat) if flat else state
  flat = load_init(config, model_config)
  if not flat:
    return state
  params = traverse_util.flatten_dict(state.params, sep='/')
  sh = traverse_util.flatten_dict(shardings.params, sep='/')
  tower_prefixes = tuple(f'{p}/' for p, _ in TOWERS.values())
  imported = {k.split('/')[0] for k in flat}
  missing = sorted(k for k in params if k.split('/')[0] in imported and k.startswith(
      tower_prefixes) and k not in flat)
  kept = []
  for key, value in flat.items():
    if key not in params or params[key].shape != value.shape:
      if key.startswith(tower_prefixes):
        raise config_lib.ConfigError(f'config.init: checkpoint parameter {key} {value.shape} '
                                     f'does not fit the run ({params.get(key, None)}).')
      kept.append(key)
      continue
    params[key] = jax.device_put(value.astype(params[key].dtype), sh[key])
  if missing:
    raise config_lib.ConfigError(f'config.init: the run has tower parameters the checkpoint '
                                 f'lacks: {missing}.')
  if kept:
    log.info('config.init: kept the random initialisation of %s (shapes differ).', kept)
  return state.replace(params=traverse_util.unflatten_dict(params, sep='/'))


def load_decoder_init(config) -> dict[str, np.ndarray]:
  """Flat {'llm/...': array} of config.init.decoder (a Llama/Qwen2 checkpoint), in the run's
  layer layout; the run's model.decoder must match the checkpoint's architecture."""
  spec = config.init.decoder
  if not spec:
    return {}
  ckpt = hf.load_decoder(spec)
  run = config_lib.DecoderConfig(**config.model.decoder.to_dict())
  from mmjax.hf import llama  # pylint: disable=import-outside-toplevel
  differ = [f.name for f in dataclasses.fields(run) if f.name not in llama.RUN_FIELDS
            and getattr(run, f.name) != getattr(ckpt.config, f.name)]
  if differ:
    raise config_lib.ConfigError(
        f'config.init.decoder={spec!r}: config.model.decoder differs from the checkpoint in '
        f'{differ}; set:\n{llama.describe(ckpt.directory)}')
  return traverse_util.flatten_dict({'llm': ckpt.params_for(run)}, sep='/')


def _put(state, shardings, flat: dict[str, np.ndarray]):
  """`state` with the parameters of `flat` (same shapes) put in place with their shardings."""
  params = traverse_util.flatten_dict(state.params, sep='/')
  sh = traverse_util.flatten_dict(shardings.params, sep='/')
  for key, value in flat.items():
    if key not in params or params[key].shape != value.shape:
      raise config_lib.ConfigError(f'config.init: checkpoint parameter {key} {value.shape} does '
                                   f'not fit the run ({params.get(key, None)}).')
    params[key] = jax.device_put(value.astype(params[key].dtype), sh[key])
  return state.replace(params=traverse_util.unflatten_dict(params, sep='/'))


def describe(directory: str | pathlib.Path) -> str:
  """The config overrides that make a run's towers match a checkpoint (for docs and errors)."""
  ckpt = hf.load(directory)
  lines = []
  for tower in ('image', 'text'):
    cfg = getattr(ckpt, tower)
    if cfg is not None:
      lines += [f'--config.model.{tower}.{f.name}={getattr(cfg, f.name)!r}'
                for f in dataclasses.fields(cfg) if f.name not in ('dropout', 'remat', 'locked')]
  return '\n'.join(lines)
