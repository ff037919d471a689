"""Llama- and Qwen2-family decoder checkpoints in and out of mmjax (the LLM embedder's tower).

Same machinery as the dual-encoder families (mmjax.hf.convert, mmjax.hf.families): `config.json`
becomes a `DecoderConfig`, one rule table maps every tensor both ways, and a missing, unknown or
wrongly shaped tensor is a `CheckpointError` naming the keys. Causal-LM checkpoints ('model.'
prefix, an `lm_head`) load too: the head is not used for embeddings and is written back unchanged
on export.
Architecture options mmjax does not implement (rope scaling, sliding windows, biases Llama can
add) are refused by name rather than loaded into a model that would compute something else.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.types import ConfigError, DecoderConfig
import mmjax.data.tokenizer as tokenizer_lib
import mmjax.hf.convert as convert
import mmjax.hf.storage as storage
from mmjax.hf.families import DECODER_FAMILIES, Rule, dense
from mmjax.hf.storage import CheckpointError
from mmjax.models import decoder as decoder_lib

FAMILIES = DECODER_FAMILIES
PREFIX = 'model.'  # *ForCausalLM wraps the decoder in `.model`.
# Tensors a causal-LM checkpoint holds that an embedder does not use (kept for export).
UNUSED = (r'^lm_head\.', r'(^|\.)rotary_emb\.inv_freq$')


def rope(c: dict, where: str) -> tuple[float, tuple[float, ...]]:
  """(base, Llama 3 scaling) of a config.json's rotary embedding (transformers 5
  `rope_parameters` or 4's `rope_theta` and `rope_scaling`); other scaled variants (linear,
  dynamic, yarn, ...) and partial rotary embeddings are refused."""
  params = c.get('rope_parameters') or c.get('rope_scaling') or {}
  kind = params.get('rope_type', params.get('type', 'default'))
  theta = float(params.get('rope_theta', c.get('rope_theta', 10_000.0)))
  if params.get('partial_rotary_factor', c.get('partial_rotary_factor', 1.0)) != 1.0:
    raise CheckpointError(f'{where}: partial_rotary_factor != 1 is not supported.')
  if kind == 'default':
    return theta, ()
  if kind == 'llama3':
    return theta, (float(params['factor']), float(params['low_freq_factor']),
                   float(params['high_freq_factor']),
                   float(params['original_max_position_embeddings']))
  raise CheckpointError(f'{where}: rope scaling {kind!r} is not supported (only the default '
                        "rotary embedding and 'llama3').")


def decoder_config(c: dict, where: str = 'config.json') -> DecoderConfig:
  """The DecoderConfig of a Llama/Qwen2 config.json."""
  family = c.get('model_type')
  if family not in FAMILIES:
    raise CheckpointError(f'{where}: model_type={family!r} is not a decoder mmjax imports '
                          f'(supported: {", ".join(FAMILIES)}).')
  refused = {'hidden_act': c.get('hidden_act', 'silu') != 'silu',
             'attention_bias': family == 'llama' and c.get('attention_bias', False),
             'mlp_bias': c.get('mlp_bias', False),
             'use_sliding_window': c.get('use_sliding_window', False),
             'layer_types': any(t != 'full_attention' for t in c.get('layer_types') or ())}
  for key, bad in refused.items():
    if bad:
      raise CheckpointError(f'{where}: {key}={c[key]!r} is not supported by mmjax\'s decoder.')
  width, heads = c['hidden_size'], c['num_attention_heads']
  head_dim = c.get('head_dim') or width // heads
  theta, scaling = rope(c, where)
  try:
    return DecoderConfig(
        vocab_size=c['vocab_size'], width=width, depth=c['num_hidden_layers'], num_heads=heads,
        num_kv_heads=c.get('num_key_value_heads') or heads,
        head_dim=0 if head_dim * heads == width else head_dim,
        mlp_dim=c['intermediate_size'], rope_theta=theta, rope_scaling=scaling,
        rms_eps=float(c.get('rms_norm_eps', 1e-6)),
        max_len=c.get('max_position_embeddings', 2048), qkv_bias=family == 'qwen2')
  except ConfigError as e:
    raise CheckpointError(f'{where}: {e}') from e


def rules(cfg: DecoderConfig) -> list[Rule]:
  """Every tensor of a LlamaModel/Qwen2Model as (HF key, mmjax path, layout), layer-loop layout."""
  out: list[Rule] = [('embed_tokens.weight', 'token_embedding', 'same'),
                     ('norm.weight', 'norm/scale', 'same')]
  for i in range(cfg.depth):
    h, m = f'layers.{i}', f'layers_{i}'
    for x, y in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      out += dense(f'{h}.self_attn.{x}_proj', f'{m}/attn/{y}', bias=cfg.qkv_bias)
    out += dense(f'{h}.self_attn.o_proj', f'{m}/attn/out', n_in=2, bias=False)
    for x in ('gate', 'up', 'down'):
      out += dense(f'{h}.mlp.{x}_proj', f'{m}/mlp/{x}', bias=False)
    out += [(f'{h}.input_layernorm.weight', f'{m}/attn_norm/scale', 'same'),
            (f'{h}.post_attention_layernorm.weight', f'{m}/mlp_norm/scale', 'same')]
  return out


def param_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
  """mmjax path -> shape of the layer-loop Decoder, via `jax.eval_shape` (nothing allocated)."""
  cfg = dataclasses.replace(cfg, scan_layers=False)
  ids = jnp.zeros((1, 1), jnp.int32)
  v = jax.eval_shape(lambda: decoder_lib.Decoder(cfg).init(
      jax.random.key(0), ids, ids, method=decoder_lib.Decoder.encode_ids))
  return {k: tuple(x.shape) for k, x in
          traverse_util.flatten_dict(nn.unbox(v)['params'], sep='/').items()}


@dataclasses.dataclass
class DecoderCheckpoint:
  """An imported decoder: its config, parameters (NumPy, layer-loop layout: 'layers_0', ...),
  the unused tensors under their original names and the prefix of the used ones."""

  family: str
  directory: pathlib.Path
  hf_config: dict[str, Any]
  config: DecoderConfig
  params: dict[str, Any]
  unused: dict[str, np.ndarray]
  prefix: str = ''

  def params_for(self, config: DecoderConfig) -> dict[str, Any]:
    """The parameters in the layout of `config` (stacked when it scans its layers)."""
    return decoder_lib.stack_layers(self.params, self.config.depth) if config.scan_layers else (
        self.params)

  def tokenizer(self):

    return tokenizer_lib.load(self.directory)


def load(directory: str | pathlib.Path) -> DecoderCheckpoint:
  """Imports a local Llama/Qwen2 checkpoint directory (config.json + model.safetensors, or its
  sharded index)."""
  directory = storage.resolve_dir(directory)
  hf_config = storage.read_config(directory)
  cfg = load_config(directory)
  raw = storage.read_tensors(directory)
  unused = {k: v for k, v in raw.items() if any(re.search(p, k) for p in UNUSED)}
  used = {k: v for k, v in raw.items() if k not in unused}
  prefix = PREFIX if used and all(k.startswith(PREFIX) for k in used) else ''
  tensors = {k[len(prefix):]: v for k, v in used.items()}
  flat, _ = convert.match_tensors(tensors, rules(cfg), param_shapes(cfg), (),
                                  f'{directory} ({hf_config["model_type"]})', prefix)
  return DecoderCheckpoint(hf_config['model_type'], directory, hf_config, cfg,
                           traverse_util.unflatten_dict(flat, sep='/'), unused, prefix)


# DecoderConfig fields a run chooses for itself (not the checkpoint's architecture).
RUN_FIELDS = ('scan_layers', 'remat', 'remat_policy', 'dropout')


def describe(directory: str | pathlib.Path) -> str:
  """The --config.model.decoder.* overrides that make a run's decoder match a checkpoint."""
  cfg = load_config(directory)
  return '\n'.join(f'--config.model.decoder.{f.name}={getattr(cfg, f.name)!r}'
                   for f in dataclasses.fields(cfg) if f.name not in RUN_FIELDS)


def load_config(directory: str | pathlib.Path) -> DecoderConfig:
  """The DecoderConfig of a checkpoint directory (its config.json only: no tensors read)."""
  directory = storage.resolve_dir(directory)
  return decoder_config(storage.read_config(directory), str(directory / 'config.json'))


def save(directory: str | pathlib.Path, ckpt: DecoderCheckpoint,
         params: dict[str, Any] | None = None) -> pathlib.Path:
  """Writes decoder `params` (either layout; default: the imported ones; LoRA merged first, see
  mmjax.models.lora.merge) as the checkpoint it came from: same keys, config.json, tokenizer."""
  params = ckpt.params if params is None else jax.device_get(params)
  if 'layers' in params:
    params = decoder_lib.unstack_layers(params)
  flat = traverse_util.flatten_dict(params, sep='/')
  shapes = param_shapes(ckpt.config)
  extra = sorted(k for k in flat if k not in shapes)
  if extra:
    raise CheckpointError(f'save: params have entries the checkpoint has no tensor for: {extra} '
                          '(merge LoRA adapters into the base weights first).')
  out = convert.hf_tensors(flat, rules(ckpt.config), shapes)
  out = {ckpt.prefix + k: v for k, v in out.items()}
  return storage.write_checkpoint(pathlib.Path(directory), {**out, **ckpt.unused},
                                  ckpt.hf_config, ckpt.directory)
