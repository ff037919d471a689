"""Conversion between Hugging Face checkpoint directories and mmjax tower parameters.

Each supported family (`bert`, `clip`, `siglip`) is described twice, once per direction-free
table (mmjax.hf.families): `*_configs` turns `config.json` into mmjax tower configs (architecture
options included), and `*_rules` lists every tensor as (HF key, mmjax path, layout). Import and
export both run off the same rules, so a round trip is exact. Every tensor of the file must be
mapped or explicitly known-and-unused (BERT's pooler, `position_ids` buffers: kept for export);
anything else, a missing tensor or a wrong shape is a `CheckpointError` naming all offending keys
at once. The directory and file side (safetensors, dtypes, config.json) is mmjax.hf.storage.

Checkpoints stored in float32, bfloat16 or float16 are read (via `ml_dtypes`, no torch) into the
dtype asked for; export writes each tensor in the checkpoint's own dtype or the one asked for.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmjax.types import ModelConfig, TextConfig, ViTConfig
import mmjax.data.tokenizer as tokenizer_lib
import mmjax.hf.families as families
import mmjax.hf.storage as storage
import mmjax.models.two_tower as two_tower
from mmjax.hf.families import CLIP_MEAN, CLIP_STD  # noqa: F401  (public here before the split)
from mmjax.hf.storage import CheckpointError, numpy_dtype

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
  family = families.family_of(hf_config, where)
  return (family, *families.FAMILIES[family](hf_config))


def _strip_prefix(family: str, keys) -> str:
  """BertModel keys have no prefix; BertFor* models prefix them with 'bert.'."""
  if family == 'bert' and any(k.startswith('bert.') for k in keys):
    return 'bert.'
  return ''


def load(directory: str | pathlib.Path, dtype: str = 'float32') -> Pretrained:
  """Imports a local HF checkpoint directory (config.json + model.safetensors).

  Parameters come as NumPy arrays of `dtype` ('float32', 'bfloat16', 'float16': a run passes
  its config.model.param_dtype) whatever the stored float dtype; a parameter tensor stored in
  another dtype (int8, float8, float64) is refused by key.
  """
  directory = storage.resolve_dir(directory)
  param_dtype = numpy_dtype(dtype, f'hf.load({str(directory)!r})')
  hf_config = storage.read_config(directory)
  family, image, text, model = _configs(hf_config, str(directory / 'config.json'))
  rules = families.RULES[family](image, text, model)
  shapes = tower_shapes(image, text, model)
  stored = storage.read_dtypes(directory)
  prefix = _strip_prefix(family, stored)
  stored = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in stored.items()}
  unused_patterns = families.UNUSED[family]
  bad = sorted(f'{prefix}{k} ({v})' for k, v in stored.items()
               if v not in storage.DTYPES and not any(re.search(p, k) for p in unused_patterns))
  if bad:
    raise CheckpointError(f'{directory}: tensors of unsupported dtype (mmjax reads '
                          f'{", ".join(storage.DTYPES)}): {", ".join(bad)}.')
  raw = storage.read_tensors(directory)
  tensors = families.unpack({k[len(prefix):] if k.startswith(prefix) else k: v
                             for k, v in raw.items()})
  flat, unused = match_tensors(tensors, rules, shapes, unused_patterns,
                               f'{directory} ({family})', prefix, param_dtype)
  # Unused tensors keep their own names: BertForPreTraining's 'cls.*' has no 'bert.' prefix.
  unused = {k if k in raw else prefix + k: v for k, v in unused.items()}
  params = traverse_util.unflatten_dict(flat, sep='/')
  return Pretrained(family, directory, hf_config, image, text, model, params, unused, prefix,
                    stored)


def match_tensors(tensors: dict[str, np.ndarray], rules: list[families.Rule],
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


def _check_rules_cover(rules: list[families.Rule], shapes: dict[str, tuple[int, ...]],
                       where: str):
  """Every mmjax parameter has a rule (else the config has an option the table lacks)."""
  uncovered = sorted(set(shapes) - {mm for _, mm, _ in rules})
  if uncovered:
    raise CheckpointError(f'{where}: no checkpoint tensor for mmjax parameters {uncovered}.')


def hf_tensors(flat: dict[str, Any], rules: list[families.Rule],
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
  out = families.pack(hf_tensors(flat, families.RULES[family](image, text, model),
                        tower_shapes(image, text, model)))
  out = {k: v.astype(target if target is not None
                     else storage.DTYPES[pretrained.dtypes.get(k, 'F32')]) for k, v in out.items()}
  out = {**{pretrained.prefix + k: v for k, v in out.items()}, **pretrained.unused}
  return storage.write_checkpoint(directory, out, pretrained.hf_config, pretrained.directory)


def describe(directory: str | pathlib.Path) -> str:
  """The config overrides that make a run's towers match a checkpoint (for docs and errors)."""
  ckpt = load(directory)
  lines = []
  for tower in ('image', 'text'):
    cfg = getattr(ckpt, tower)
    if cfg is not None:
      lines += [f'--config.model.{tower}.{f.name}={getattr(cfg, f.name)!r}'
                for f in dataclasses.fields(cfg)
                if f.name not in ('dropout', 'remat', 'remat_policy', 'locked')]
  return '\n'.join(lines)
