"""Hugging Face checkpoint directories: where they are, their safetensors files and dtypes,
`config.json`, and writing one back (mmjax.hf.convert and mmjax.hf.llama read and write through
this; never pickle, never the hub)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil
from typing import Any

import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

WEIGHTS = 'model.safetensors'
INDEX = 'model.safetensors.index.json'
# Files copied along on export (the tokenizer and its settings).
SIDE_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.txt',
              'merges.txt', 'vocab.json', 'spiece.model')

# safetensors dtype names of the parameter tensors mmjax reads and writes; anything else
# (quantised int8/float8, float64) is refused by key.
DTYPES = {'F32': np.dtype(np.float32), 'BF16': np.dtype(ml_dtypes.bfloat16),
          'F16': np.dtype(np.float16)}
DTYPE_NAMES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}


class CheckpointError(ValueError):
  """A checkpoint directory that does not match what mmjax can load; names the keys."""


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


def read_config(directory: pathlib.Path) -> dict[str, Any]:
  config_file = directory / 'config.json'
  if not config_file.is_file():
    raise CheckpointError(f'{directory}: no config.json (a Hugging Face checkpoint directory '
                          'holds config.json and model.safetensors).')
  return json.loads(config_file.read_text())


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
