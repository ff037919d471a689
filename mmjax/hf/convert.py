"""Conversion between Hugging Face checkpoint directories and mmjax tower parameters.

Each supported family (`bert`, `clip`, `siglip`) is described twice, once per direction-free
table: `*_configs` turns `config.json` into mmjax tower configs (architecture options included),
and `*_rules` lists every tensor as (HF key, mmjax path, layout). Import and export both run off
the same rules, so a round trip is exact. Every tensor of the file must be mapped or explicitly
known-and-unused (BERT's pooler, `position_ids` buffers: kept for export); anything else, a
missing tensor or a wrong shape is a `CheckpointError` naming all offending keys at once.

Checkpoints stored in float32, bfloat16 or float16 are read (via `ml_dtypes`, no torch) into the
dtype asked for; export writes each tensor in the checkpoint's own dtype or the one asked for.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import pathlib
import re
import shutil
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from mmjax.types import ModelConfig, TextConfig, ViTConfig
import mmjax.data.tokenizer as tokenizer_lib
import mmjax.models.two_tower as two_tower

WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
# Files copied along on export (the tokenizer and its settings).
SIDE_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt',
              'merges.txt', 'vocab.json', 'spiece.model')

HF_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                  'quick_gelu': 'quick_gelu', 'relu': 'relu'}


# safetensors dtype names of the parameter tensors mmjax reads and writes; anything else
# (quantised int8/float8, float64) is refused by key.
DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16),
          'F16': np.dtype(np.float16)}
DTYPE_NAMES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}


class CheckpointError(ValueError):
  """A checkpoint directory that does not match what mmjax can load; names the keys."""


# A rule: (HF key, mmjax path 'txt/encoder/block0/attn/query/kernel', layout).
# Layouts: 'same'; 'flat' (any reshape, HF side flat or leading ones dropped: biases [h, hd],
# position tables [1, N, d], CLS [1, 1, d]); ('linear', n_in) (torch [out, in] <-> kernel
# [*in, *out]); 'conv' (torch [out, C, p, p] <-> [p, p, C, out]).
Rule = tuple[str, str, Any]


# ---------------------------------------------------------------------------------------------
# Directories.


def resolve_dir(spec: str | pathlib.Path) -> pathlib.Path:
  """A directory from 'DIR', 'hf:DIR' or 'pkg:MODULE/sub/dir' (inside an installed package)."""
  spec = str(spec)
  spec = spec[3:] if spec.startswith('hf:') else spec
  if spec.startswith('pkg:'):
    module, _, sub = spec[4:].partition('/')
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
      raise FileNotFoundError(f'{spec!r}: Python package {module!r} is not installed.')
    return pathlib.Path(list(found.submodule_search_locations)[0]) / sub
  return pathlib.Path(spec).expanduser()


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """`model.safetensors`, or the shards its index names."""
  if (directory / WEIGHTS).is_file():
    return [directory / WEIGHTS]
  if (directory / INDEX).is_file():
    shards = sorted(set(json.loads((directory / INDEX).read_text())['weight_map'].values()))
    return [directory / shard for shard in shards]
  present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
  raise CheckpointError(f'{directory}: no {WEIGHTS} (or {INDEX}); found {present}. Only '
                        'safetensors checkpoints are read (pickle-based .bin files are not).')


def read_dtypes(directory: pathlib.Path) -> dict[str, str]:
  """Every tensor's safetensors dtype name ('F32', 'BF16', ...), from the headers alone."""
  out = {}
  for file in weight_files(directory):
    with safe_open(file, 'np') as f:
      out.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
  return out


def read_tensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of `model.safetensors` (or its shards), via `safetensors.numpy` (no pickle)."""
  out = {}
  for file in weight_files(directory):
    out.update(load_file(file))
  return out


def numpy_dtype(name: str, where: str) -> np.dtype:
  """'float32' | 'bfloat16' | 'float16' -> the NumPy dtype (bfloat16 from ml_dtypes)."""
  if name not in DTYPE_NAMES:
    raise CheckpointError(f'{where}: dtype {name!r} is not supported (supported: '
                          f'{", ".join(DTYPE_NAMES)}).')
  return DTYPES[DTYPE_NAMES[name]]


# ---------------------------------------------------------------------------------------------
# config.json -> mmjax configs.


def _act(name: str, where: str) -> str:
  if name not in HF_ACTIVATIONS:
    raise CheckpointError(f'{where}: hidden_act={name!r} is not supported '
                          f'(supported: {", ".join(HF_ACTIVATIONS)}).')
  return HF_ACTIVATIONS[name]


def _encoder_fields(c: dict, where: str) -> dict[str, Any]:
  return dict(width=c['hidden_size'], depth=c['num_hidden_layers'],
              num_heads=c['num_attention_heads'], mlp_dim=c['intermediate_size'],
              act=_act(c['hidden_act'], where), ln_eps=float(c['layer_norm_eps']))


# Defaults of transformers' CLIP/SigLIP sub-configs, for fields a config.json leaves out.
_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77, hidden_act='quick_gelu',
                  layer_norm_eps=1e-5)
_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                    hidden_act='quick_gelu', layer_norm_eps=1e-5)
_SIGLIP_TEXT = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072,
                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=64,
                    hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6)
_SIGLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                      hidden_act='gelu_pytorch_tanh', layer_norm_eps=1e-6, vision_use_head=True)


def bert_configs(c: dict) -> tuple[None, TextConfig, dict[str, Any]]:
  if c.get('position_embedding_type', 'absolute') != 'absolute':
    raise CheckpointError(f"config.json: position_embedding_type={c['position_embedding_type']!r}"
                          " is not supported (only 'absolute').")
  text = TextConfig(**_encoder_fields(c, 'config.json'), max_len=c['max_position_embeddings'],
                    num_positions=c['max_position_embeddings'],
                    vocab_size=c['vocab_size'], causal=False, pool='mean', norm='post',
                    embed_ln=True, final_ln=False, type_vocab_size=c.get('type_vocab_size', 2))
  return None, text, dict(embed_dim=text.width, head='none')


# OpenAI CLIP's pixel statistics (its image processor's defaults). SigLIP's (0.5, 0.5) is
# mmjax's own [-1, 1] mapping.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_configs(c: dict) -> tuple[ViTConfig, TextConfig, dict[str, Any]]:
  t = {**_CLIP_TEXT, **c.get('text_config', {})}
  v = {**_CLIP_VISION, **c.get('vision_config', {})}
  _channels(v)
  image = ViTConfig(**_encoder_fields(v, 'vision_config'), image_size=v['image_size'],
                    patch_size=v['patch_size'], posemb='learn', pool='cls', posemb_cls=True,
                    patch_bias=False, embed_ln=True, pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD)
  text = TextConfig(**_encoder_fields(t, 'text_config'), max_len=t['max_position_embeddings'],
                    num_positions=t['max_position_embeddings'],
                    vocab_size=t['vocab_size'], causal=True, pool='last')
  return image, text, dict(embed_dim=c.get('projection_dim', 512), head='linear',
                           head_bias=False, loss='softmax',
                           temperature_init=float(c.get('logit_scale_init_value', 2.6592)),
                           bias_init=None)


def siglip_configs(c: dict) -> tuple[ViTConfig, TextConfig, dict[str, Any]]:
  t = {**_SIGLIP_TEXT, **c.get('text_config', {})}
  v = {**_SIGLIP_VISION, **c.get('vision_config', {})}
  _channels(v)
  if not v['vision_use_head']:
    raise CheckpointError('vision_config: vision_use_head=False is not supported (mmjax pools '
                          'SigLIP images with the MAP head).')
  proj = t.get('projection_size') or t['hidden_size']
  if proj != v['hidden_size']:
    raise CheckpointError(f"text_config.projection_size={proj} != vision_config.hidden_size="
                          f"{v['hidden_size']}: the two embeddings would not share a space.")
  image = ViTConfig(**_encoder_fields(v, 'vision_config'), image_size=v['image_size'],
                    patch_size=v['patch_size'], posemb='learn', pool='map')
  text = TextConfig(**_encoder_fields(t, 'text_config'), max_len=t['max_position_embeddings'],
                    num_positions=t['max_position_embeddings'],
                    vocab_size=t['vocab_size'], causal=False, pool='last', attend_padding=True)
  return image, text, dict(embed_dim=v['hidden_size'], head='linear', image_head='none',
                           loss='sigmoid', temperature_init=0.0, bias_init=0.0)


def _channels(v: dict) -> None:
  if v.get('num_channels', 3) != 3:
    raise CheckpointError(f"vision_config.num_channels={v['num_channels']} is not supported (3).")


FAMILIES = {'bert': bert_configs, 'clip': clip_configs, 'siglip': siglip_configs}
# Decoder LLMs: the LLM embedder's tower, imported by mmjax.hf.llama.
DECODER_FAMILIES = ('llama', 'qwen2')


def family_of(c: dict, where: str) -> str:
  kind = c.get('model_type')
  if kind in DECODER_FAMILIES:
    raise CheckpointError(f'{where}: model_type={kind!r} is a decoder LLM, not a dual-encoder '
                          'tower: import it with mmjax.hf.load_decoder.')
  if kind not in FAMILIES:
    raise CheckpointError(f'{where}: model_type={kind!r} is a different architecture than mmjax '
                          f'imports (supported: {", ".join(FAMILIES)}).')
  return kind


# ---------------------------------------------------------------------------------------------
# Tensor tables.


def _dense(hf: str, mm: str, n_in: int = 1, bias: bool = True) -> list[Rule]:
  rules = [(f'{hf}.weight', f'{mm}/kernel', ('linear', n_in))]
  return rules + ([(f'{hf}.bias', f'{mm}/bias', 'flat')] if bias else [])


def _ln(hf: str, mm: str) -> list[Rule]:
  return [(f'{hf}.weight', f'{mm}/scale', 'same'), (f'{hf}.bias', f'{mm}/bias', 'same')]


BERT_BLOCK = dict(q='attention.self.query', k='attention.self.key', v='attention.self.value',
                  o='attention.output.dense', ln1='attention.output.LayerNorm',
                  fc1='intermediate.dense', fc2='output.dense', ln2='output.LayerNorm')
CLIP_BLOCK = dict(q='self_attn.q_proj', k='self_attn.k_proj', v='self_attn.v_proj',
                  o='self_attn.out_proj', ln1='layer_norm1', fc1='mlp.fc1', fc2='mlp.fc2',
                  ln2='layer_norm2')


def _blocks(hf: str, mm: str, depth: int, names: dict[str, str]) -> list[Rule]:
  rules = []
  for i in range(depth):
    h, m = f'{hf}.{i}', f'{mm}/encoder/block{i}'
    for x, y in (('q', 'query'), ('k', 'key'), ('v', 'value')):
      rules += _dense(f'{h}.{names[x]}', f'{m}/attn/{y}')
    rules += _dense(f'{h}.{names["o"]}', f'{m}/attn/out', n_in=2)
    rules += _ln(f'{h}.{names["ln1"]}', f'{m}/ln1') + _ln(f'{h}.{names["ln2"]}', f'{m}/ln2')
    rules += _dense(f'{h}.{names["fc1"]}', f'{m}/mlp/fc1')
    rules += _dense(f'{h}.{names["fc2"]}', f'{m}/mlp/fc2')
  return rules


def bert_rules(image, text, model) -> list[Rule]:
  del image, model
  e = 'embeddings'
  return [(f'{e}.word_embeddings.weight', 'txt/token_embedding', 'same'),
          (f'{e}.position_embeddings.weight', 'txt/pos_embedding', 'flat'),
          (f'{e}.token_type_embeddings.weight', 'txt/type_embedding', 'same'),
          *_ln(f'{e}.LayerNorm', 'txt/embed_ln'),
          *_blocks('encoder.layer', 'txt', text.depth, BERT_BLOCK)]


def _clip_text(text) -> list[Rule]:
  e = 'text_model.embeddings'
  return [(f'{e}.token_embedding.weight', 'txt/token_embedding', 'same'),
          (f'{e}.position_embedding.weight', 'txt/pos_embedding', 'flat'),
          *_blocks('text_model.encoder.layers', 'txt', text.depth, CLIP_BLOCK),
          *_ln('text_model.final_layer_norm', 'txt/encoder/ln_final')]


def _vision_blocks(image) -> list[Rule]:
  return _blocks('vision_model.encoder.layers', 'img', image.depth, CLIP_BLOCK) + _ln(
      'vision_model.post_layernorm', 'img/encoder/ln_final')


def clip_rules(image, text, model) -> list[Rule]:
  del model
  e = 'vision_model.embeddings'
  return [(f'{e}.class_embedding', 'img/cls', 'flat'),
          (f'{e}.patch_embedding.weight', 'img/patch_kernel', 'conv'),
          (f'{e}.position_embedding.weight', 'img/pos_embedding', 'flat'),
          *_ln('vision_model.pre_layrnorm', 'img/embed_ln'),  # sic: HF's spelling.
          *_vision_blocks(image), *_clip_text(text),
          *_dense('visual_projection', 'img_head/out', bias=False),
          *_dense('text_projection', 'txt_head/out', bias=False),
          ('logit_scale', 't_prime', 'same')]


def siglip_rules(image, text, model) -> list[Rule]:
  del model
  e, h = 'vision_model.embeddings', 'vision_model.head'
  return [(f'{e}.patch_embedding.weight', 'img/patch_kernel', 'conv'),
          (f'{e}.patch_embedding.bias', 'img/patch_bias', 'same'),
          (f'{e}.position_embedding.weight', 'img/pos_embedding', 'flat'),
          *_vision_blocks(image),
          (f'{h}.probe', 'img/map_head/probe', 'same'),
          # torch.nn.MultiheadAttention packs q/k/v; split by _unpack / joined by _pack.
          *[r for x, y in (('q', 'query'), ('k', 'key'), ('v', 'value'))
            for r in _dense(f'{h}.attention.in_proj:{x}', f'img/map_head/attn/{y}')],
          *_dense(f'{h}.attention.out_proj', 'img/map_head/attn/out', n_in=2),
          *_ln(f'{h}.layernorm', 'img/map_head/ln'),
          *_dense(f'{h}.mlp.fc1', 'img/map_head/mlp/fc1'),
          *_dense(f'{h}.mlp.fc2', 'img/map_head/mlp/fc2'),
          *_clip_text(text),
          *_dense('text_model.head', 'txt_head/out'),
          ('logit_scale', 't_prime', 'flat'), ('logit_bias', 'bias', 'flat')]


RULES = {'bert': bert_rules, 'clip': clip_rules, 'siglip': siglip_rules}
# Tensors a family's checkpoints may hold that mmjax does not use: kept for export only.
UNUSED = {'bert': (r'(^|\.)position_ids$', r'^pooler\.', r'^cls\.'),
          'clip': (r'(^|\.)position_ids$',), 'siglip': (r'(^|\.)position_ids$',)}


def _unpack(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits MultiheadAttention's packed in_proj_{weight,bias} into q/k/v (SigLIP's MAP head)."""
  out = {}
  for key, value in tensors.items():
    m = re.fullmatch(r'(.*)\.in_proj_(weight|bias)', key)
    if m and value.shape[0] % 3 == 0:
      for x, part in zip('qkv', np.split(value, 3, axis=0)):
        out[f'{m.group(1)}.in_proj:{x}.{m.group(2)}'] = part
    else:
      out[key] = value
  return out


def _pack(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  out, packed = {}, {}
  for key, value in tensors.items():
    m = re.fullmatch(r'(.*)\.in_proj:([qkv])\.(weight|bias)', key)
    if m:
      packed.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
    else:
      out[key] = value
  for (prefix, kind), parts in packed.items():
    out[f'{prefix}.in_proj_{kind}'] = np.concatenate([parts[x] for x in 'qkv'], axis=0)
  return out


def _hf_shape(layout, mm_shape: tuple[int, ...], hf_shape_hint=None) -> tuple[int, ...]:
  if layout == 'same':
    return mm_shape
  if layout == 'conv':
    return (mm_shape[3], mm_shape[2], mm_shape[0], mm_shape[1])
  if layout == 'flat':
    return hf_shape_hint
  n_in = layout[1]
  return (math.prod(mm_shape[n_in:]), math.prod(mm_shape[:n_in]))


def _flat_hf_shape(mm_shape: tuple[int, ...], key: str) -> tuple[int, ...]:
  """The HF shape of a 'flat' tensor: biases flat, position tables 2-D, scalars per family."""
  if key.endswith('position_embedding.weight') or key.endswith('position_embeddings.weight'):
    return mm_shape[-2:]
  return (math.prod(mm_shape),)


def to_mmjax(layout, x: np.ndarray, mm_shape: tuple[int, ...]) -> np.ndarray:
  if layout == 'conv':
    return x.transpose(2, 3, 1, 0)
  if isinstance(layout, tuple):
    return x.T.reshape(mm_shape)
  return x.reshape(mm_shape)


def to_hf(layout, x: np.ndarray, hf_shape: tuple[int, ...]) -> np.ndarray:
  if layout == 'conv':
    return x.transpose(3, 2, 0, 1)
  if isinstance(layout, tuple):
    return x.reshape(hf_shape[::-1]).T
  return x.reshape(hf_shape)


# ---------------------------------------------------------------------------------------------
# mmjax parameter shapes.


def tower_shapes(image: ViTConfig | None, text: TextConfig | None,
                 model: dict[str, Any]) -> dict[str, tuple[int, ...]]:
  """'img/...', 'txt/...', heads and logit parameters -> shape, via `jax.eval_shape` of the
  TwoTower modules (nothing is allocated)."""

  shapes: dict[str, tuple[int, ...]] = {}

  def add(prefix: str, module: nn.Module, *args) -> None:
    v = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    for path, x in traverse_util.flatten_dict(nn.unbox(v)['params'], sep='/').items():
      shapes[f'{prefix}/{path}'] = tuple(x.shape)

  cfg = _model_config(image, text, model)
  if image is not None:
    s = image.image_size
    add('img', two_tower.ViT(image), jnp.zeros((1, s, s, 3), jnp.float32))
    if cfg.tower_head('image') != 'none':
      add('img_head', two_tower.ProjectionHead(cfg.tower_head('image'), cfg.embed_dim,
                                               use_bias=cfg.head_bias),
          jnp.zeros((1, image.width)))
  if text is not None:
    toks = jnp.zeros((1, min(text.max_len, 4)), jnp.int32)
    add('txt', two_tower.TextTransformer(text), toks, jnp.ones_like(toks))
    if cfg.tower_head('text') != 'none':
      add('txt_head', two_tower.ProjectionHead(cfg.tower_head('text'), cfg.embed_dim,
                                               use_bias=cfg.head_bias),
          jnp.zeros((1, text.width)))
  if image is not None and text is not None:
    shapes['t_prime'] = ()
    if cfg.bias_init is not None:
      shapes['bias'] = ()
  return shapes


def _model_config(image, text, model: dict[str, Any]) -> ModelConfig:
  return ModelConfig(image=image or ViTConfig(), text=text or TextConfig(), **model)


# ---------------------------------------------------------------------------------------------
# Import / export.


@dataclasses.dataclass
class Pretrained:
  """An imported checkpoint: mmjax configs, parameters in TwoTower layout, and what export needs.

  `params` holds the subtrees the checkpoint has ('img', 'txt', 'img_head', 'txt_head',
  't_prime', 'bias') as NumPy arrays (in the dtype `load` was asked for); `unused` the tensors
  mmjax does not use (written back on export); `prefix` a model-class prefix stripped from every
  key ('bert.'); `dtypes` each file tensor's stored dtype (export's default).
  """

  family: str
  directory: pathlib.Path
  hf_config: dict[str, Any]
  image: ViTConfig | None
  text: TextConfig | None
  model: dict[str, Any]
  params: dict[str, Any]
  unused: dict[str, np.ndarray]
  prefix: str = ''
  dtypes: dict[str, str] = dataclasses.field(default_factory=dict)  # HF key -> 'F32'|'BF16'|...

  def model_config(self, **overrides) -> ModelConfig:
    """The TwoTower config (a text-only checkpoint gets mmjax's default image tower)."""
    return dataclasses.replace(_model_config(self.image, self.text, self.model), **overrides)

  def tokenizer(self):

    return tokenizer_lib.load(self.directory)


def _configs(hf_config: dict, where: str):
  family = family_of(hf_config, where)
  return (family, *FAMILIES[family](hf_config))


def _strip_prefix(family: str, keys) -> str:
  """BertModel keys have no prefix; BertFor* models prefix them with 'bert.'."""
  if family == 'bert' and any(k.startswith('bert.') for k in keys):
    return 'bert.'
  return ''


def read_config(directory: pathlib.Path) -> dict[str, Any]:
  config_file = directory / 'config.json'
  if not config_file.is_file():
    raise CheckpointError(f'{directory}: no config.json (a Hugging Face checkpoint directory '
                          'holds config.json and model.safetensors).')
  return json.loads(config_file.read_text())


def load(directory: str | pathlib.Path, dtype: str = 'float32') -> Pretrained:
  """Imports a local HF checkpoint directory (config.json + model.safetensors).

  Parameters come as NumPy arrays of `dtype` ('float32', 'bfloat16', 'float16': a run passes
  its config.model.param_dtype) whatever the stored float dtype; a parameter tensor stored in
  another dtype (int8, float8, float64) is refused by key.
  """
  directory = resolve_dir(directory)
  param_dtype = numpy_dtype(dtype, f'hf.load({str(directory)!r})')
  hf_config = read_config(directory)
  family, image, text, model = _configs(hf_config, str(directory / 'config.json'))
  rules = RULES[family](image, text, model)
  shapes = tower_shapes(image, text, model)
  stored = read_dtypes(directory)
  prefix = _strip_prefix(family, stored)
  stored = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in stored.items()}
  bad = sorted(f'{prefix}{k} ({v})' for k, v in stored.items()
               if v not in DTYPES and not any(re.search(p, k) for p in UNUSED[family]))
  if bad:
    raise CheckpointError(f'{directory}: tensors of unsupported dtype (mmjax reads '
                          f'{", ".join(DTYPES)}): {", ".join(bad)}.')
  raw = read_tensors(directory)
  tensors = _unpack({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in raw.items()})
  flat, unused = match_tensors(tensors, rules, shapes, UNUSED[family],
                               f'{directory} ({family})', prefix, param_dtype)
  # Unused tensors keep their own names: BertForPreTraining's 'cls.*' has no 'bert.' prefix.
  unused = {k if k in raw else prefix + k: v for k, v in unused.items()}
  params = traverse_util.unflatten_dict(flat, sep='/')
  return Pretrained(family, directory, hf_config, image, text, model, params, unused, prefix,
                    stored)


def match_tensors(tensors: dict[str, np.ndarray], rules: list[Rule],
                  shapes: dict[str, tuple[int, ...]], unused_patterns, where: str,
                  prefix: str = '', param_dtype=np.float32
                  ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """(mmjax path -> `param_dtype` array, unused HF tensors) of a checkpoint's tensors under `rules`;
  a missing, unknown or wrongly shaped tensor is a CheckpointError naming every such key."""
  _check_rules_cover(rules, shapes, where)
  unused = {k: v for k, v in tensors.items()
            if any(re.search(p, k) for p in unused_patterns)}
  expected = {hf for hf, _, _ in rules}
  missing = sorted(expected - set(tensors))
  unknown = sorted(set(tensors) - expected - set(unused))
  mismatched = []
  flat = {}
  for hf, mm, layout in rules:
    if hf not in tensors:
      continue
    x = tensors[hf]
    want = _hf_shape(layout, shapes[mm], _flat_hf_shape(shapes[mm], hf))
    if tuple(x.shape) != tuple(want):
      mismatched.append(f'{prefix}{hf}: checkpoint {tuple(x.shape)}, config.json implies '
                        f'{tuple(want)} (mmjax {mm} {shapes[mm]})')
      continue
    flat[mm] = to_mmjax(layout, np.asarray(x).astype(param_dtype), shapes[mm])
  problems = []
  if missing:
    problems.append(f'missing tensors: {", ".join(prefix + k for k in missing)}')
  if unknown:
    problems.append(f'unknown tensors: {", ".join(prefix + k for k in unknown)}')
  if mismatched:
    problems.append('shape mismatches: ' + '; '.join(mismatched))
  if problems:
    raise CheckpointError(f'{where} does not match its config.json: ' + ' | '.join(problems))
  return flat, unused


def _check_rules_cover(rules: list[Rule], shapes: dict[str, tuple[int, ...]], where: str):
  """Every mmjax parameter has a rule (else the config has an option the table lacks)."""
  uncovered = sorted(set(shapes) - {mm for _, mm, _ in rules})
  if uncovered:
    raise CheckpointError(f'{where}: no checkpoint tensor for mmjax parameters {uncovered}.')


def hf_tensors(flat: dict[str, Any], rules: list[Rule],
               shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """HF key -> tensor of flat mmjax parameters ('txt/encoder/...' -> array) under `rules`."""
  out = {}
  for hf, mm, layout in rules:
    if mm not in flat:
      raise CheckpointError(f'save: params have no {mm!r} (needed for {hf}).')
    x = np.asarray(flat[mm])
    if tuple(x.shape) != shapes[mm]:
      raise CheckpointError(f'save: {mm} has shape {x.shape}, the checkpoint needs {shapes[mm]}.')
    # .copy(): C-contiguous without np.ascontiguousarray's promotion of scalars to 1-D.
    out[hf] = to_hf(layout, x, _hf_shape(layout, shapes[mm], _flat_hf_shape(shapes[mm], hf))).copy()
  return out


def save(directory: str | pathlib.Path, pretrained: Pretrained,
         params: dict[str, Any] | None = None, dtype: str | None = None) -> pathlib.Path:
  """Writes `params` (TwoTower layout, e.g. after fine-tuning; default: the imported ones) in the
  checkpoint's own layout: config.json, model.safetensors, the tokenizer files, and the tensors
  mmjax did not use, unchanged. Parameter tensors are written in `dtype` ('float32',
  'bfloat16', 'float16'), by default each in the dtype the checkpoint stored it in."""
  target = None if dtype is None else numpy_dtype(dtype, 'hf.save')
  directory = pathlib.Path(directory)
  params = pretrained.params if params is None else params
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  family, image, text, model = _configs(pretrained.hf_config, 'config')
  out = _pack(hf_tensors(flat, RULES[family](image, text, model),
                        tower_shapes(image, text, model)))
  out = {k: v.astype(target if target is not None else DTYPES[pretrained.dtypes.get(k, 'F32')])
         for k, v in out.items()}
  out = {**{pretrained.prefix + k: v for k, v in out.items()}, **pretrained.unused}
  return write_checkpoint(directory, out, pretrained.hf_config, pretrained.directory)


def write_checkpoint(directory: pathlib.Path, tensors: dict[str, np.ndarray],
                     hf_config: dict[str, Any], source: pathlib.Path) -> pathlib.Path:
  """config.json, model.safetensors and the tokenizer files of `source`."""
  directory.mkdir(parents=True, exist_ok=True)
  save_file(tensors, directory / WEIGHTS, metadata={'format': 'pt'})
  (directory / 'config.json').write_text(json.dumps(hf_config, indent=2))
  for name in SIDE_FILES:
    src = source / name
    if src.is_file() and src.resolve() != (directory / name).resolve():
      shutil.copyfile(src, directory / name)
  return directory


def describe(directory: str | pathlib.Path) -> str:
  """The config overrides that make a run's towers match a checkpoint (for docs and errors)."""
  ckpt = load(directory)
  lines = []
  for tower in ('image', 'text'):
    cfg = getattr(ckpt, tower)
    if cfg is not None:
      lines += [f'--config.model.{tower}.{f.name}={getattr(cfg, f.name)!r}'
                for f in dataclasses.fields(cfg) if f.name not in ('dropout', 'remat', 'locked')]
  return '\n'.join(lines)
