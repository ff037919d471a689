"""Loading a serving export: `load(path)` -> `ServingModel`, with JAX and NumPy only.

A serving export (`mmjax.deploy.export`) holds each tower's embedding function serialized with
`jax.export` (StableHLO with a symbolic batch dimension, one file per modality and platform),
the parameters as a flat `params.npz`, the tokenizer, the preprocessing spec and the model
version. Loading it runs none of the model code (`mmjax.models` is never imported): the
functions are deserialized and called with the parameters. Texts are tokenized with the export's
own `tokenizer.json` by the same `TextEncoder` training used; images must already be uint8
[N, S, S, 3] at the spec's size (`mmjax.data.images.load` with a `View` of the spec makes them).

Inputs go through in fixed-size batches (the last one padded, the padding dropped), so each
modality compiles once per batch size. Given several devices, each batch is split over them with
`shard_map`: every device runs the exported function on its rows (the symbolic batch dimension
makes any per-device row count valid).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from mmjax.data import tokenizer as tokenizer_lib

FORMAT = 'mmjax.serving.v1'
INFO_FILE = 'serving.json'
PARAMS_FILE = 'params.npz'
MODALITIES = ('image', 'text')


class ServingExportError(ValueError):
  """A directory that is not a usable serving export (missing, damaged or another format)."""


def sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def function_file(modality: str, platform: str) -> str:
  return f'{modality}.{platform}.jax_exported'


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """{'a/b/kernel': x} -> {'a': {'b': {'kernel': x}}} (the params pytree the functions take)."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def read_info(path: str | pathlib.Path) -> tuple[pathlib.Path, dict[str, Any]]:
  """(directory, serving.json) after checking the format and every file's checksum."""
  path = pathlib.Path(path).absolute()
  info_file = path / INFO_FILE
  if not info_file.is_file():
    raise ServingExportError(f'{path} is not a serving export (no {INFO_FILE}). Create one with '
                             '`python -m mmjax.deploy.export --model=WORKDIR/export --out=DIR`.')
  info = json.loads(info_file.read_text())
  if info.get('format') != FORMAT:
    raise ServingExportError(f'{info_file}: format {info.get("format")!r}, expected {FORMAT!r}.')
  for name, meta in info['files'].items():
    file = path / name
    if not file.is_file():
      raise ServingExportError(f'Serving export file {file} is missing.')
    if file.stat().st_size != meta['bytes'] or sha256(file) != meta['sha256']:
      raise ServingExportError(f'Serving export file {file} does not match its recorded size '
                               'and SHA-256: it is truncated or altered. Export again.')
  return path, info


class ServingModel:
  """A loaded serving export: `embed_images`, `embed_texts`, `version`, `spec`."""

  def __init__(self, path: str | pathlib.Path, *, batch_size: int = 256,
               devices: Sequence[jax.Device] | None = None):
    self.path, self.info = read_info(path)
    self.version: str = self.info['version']['id']
    self.spec: dict[str, Any] = self.info['preprocessing']
    self.embed_dim: int = self.info['embed_dim']
    self.devices = list(devices or jax.local_devices()[:1])
    platform = self.devices[0].platform
    platform = 'cuda' if platform == 'gpu' else platform
    if platform not in self.info['platforms']:
      raise ServingExportError(f'{self.path} was exported for {self.info["platforms"]}, not for '
                               f'this {platform!r} device: export again with '
                               f'--platforms={platform}.')
    shards = len(self.devices)
    self.batch_size = -(-batch_size // shards) * shards
    with np.load(self.path / PARAMS_FILE) as npz:
      flat = {k: npz[k] for k in npz.files}
    self._mesh = Mesh(np.asarray(self.devices), ('batch',))
    repl = jax.sharding.NamedSharding(self._mesh, P())
    self.params = jax.device_put(unflatten(flat), repl)
    self._rows = jax.sharding.NamedSharding(self._mesh, P('batch'))
    self.encoder = tokenizer_lib.TextEncoder(tokenizer_lib.load(self.path),
                                             self.spec['max_text_len'])
    self._fns = {m: self._compile(m, platform) for m in MODALITIES}

  def _compile(self, modality: str, platform: str):
    exported = jax.export.deserialize(
        (self.path / function_file(modality, platform)).read_bytes())
    nargs = len(exported.in_avals) - len(jax.tree.leaves(self.params))
    body = jax.shard_map(exported.call, mesh=self._mesh, in_specs=(P(),) + (P('batch'),) * nargs,
                         out_specs=P('batch'))
    return jax.jit(body)

  def _run(self, modality: str, arrays: Sequence[np.ndarray],
           batch_size: int | None = None) -> np.ndarray:
    n, out = len(arrays[0]), []
    batch_size = batch_size or self.batch_size
    if batch_size % len(self.devices):
      raise ValueError(f'batch_size={batch_size} is not a multiple of the {len(self.devices)} '
                       'devices the model is split over.')
    for start in range(0, n, batch_size):
      chunk = [a[start:start + batch_size] for a in arrays]
      valid = len(chunk[0])
      if valid < batch_size:
        chunk = [np.concatenate([c, np.zeros((batch_size - valid,) + c.shape[1:], c.dtype)])
                 for c in chunk]
      chunk = [jax.device_put(c, self._rows) for c in chunk]
      out.append(np.asarray(self._fns[modality](self.params, *chunk))[:valid])
    return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

  def embed_images(self, images: np.ndarray, *, batch_size: int | None = None) -> np.ndarray:
    """uint8 [N, S, S, 3] (S = spec['image_size']) -> float32 [N, D], L2-normalised. The batches
    are of `batch_size` rows (default: the model's), the last padded: one compile per size."""
    images = np.asarray(images)
    size = self.spec['image_size']
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
      raise ValueError(f'Expected uint8 images [N, {size}, {size}, 3], got {images.dtype} '
                       f'{images.shape}.')
    return self._run('image', [images], batch_size)

  def embed_texts(self, texts: Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
    """list of str -> float32 [N, D], L2-normalised (batches as in `embed_images`)."""
    if isinstance(texts, str):
      raise TypeError('embed_texts takes a list of strings, got one string.')
    return self._run('text', list(self.encoder(list(texts))), batch_size)

  def embed(self, modality: str, inputs, *, batch_size: int | None = None) -> np.ndarray:
    if modality not in MODALITIES:
      raise ValueError(f'modality={modality!r} is not one of {MODALITIES}.')
    if modality == 'image':
      return self.embed_images(inputs, batch_size=batch_size)
    return self.embed_texts(inputs, batch_size=batch_size)


def load(path: str | pathlib.Path, **kwargs) -> ServingModel:
  """The serving export at `path` (see `ServingModel` for batch_size and devices)."""
  return ServingModel(path, **kwargs)
