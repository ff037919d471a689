"""The embedding store: versioned, sharded, checksummed vectors of a corpus.

  STORE/<model version>/manifest.json       the committed state (written last, atomically)
  STORE/<model version>/shards/gGGGG-sSSSSS.npz
  STORE/<model version>/plans/gGGGG.json    what generation G embeds and deletes
  STORE/<model version>/reports/gGGGG.json  bad inputs, counts and timings of generation G

Each model version has its own directory (blue-green: a new version is backfilled beside the
old one, never into it). A backfill run is one *generation*: its plan (the items to embed, in
shards of a fixed size, and the ids deleted from the corpus) is written first, each shard is
written to a temporary file and renamed when complete, and the manifest, naming every committed
shard with its SHA-256, is replaced last. A shard file that exists is never rewritten.

A shard holds `ids`, `hashes` (content hashes), `vectors` (float32, float16, or int8 with
per-row float32 `scales`) and the generation's bad inputs among its items (`bad_ids`,
`bad_hashes`, `bad_reasons`). The live set is the replay of the generations in order: a later
entry for an id replaces an earlier one, a bad entry removes the id's vector, a deletion removes
the id. Shards are zip files written with fixed timestamps, so equal content is equal bytes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pathlib
import zipfile
from typing import Any

import numpy as np

from mmjax.deploy.serving import sha256

FORMAT = 'mmjax.embedding_store.v1'
MANIFEST = 'manifest.json'
DTYPES = ('float32', 'float16', 'int8')


class StoreError(ValueError):
  """A store that cannot be read as asked: missing, damaged, or of another version."""


class VersionMismatchError(StoreError):
  """Vectors of two model versions would be mixed."""


@dataclasses.dataclass
class Store:
  """One version of a store, loaded: ids [N] (sorted), float32 vectors [N, D], its manifest and
  the bad inputs [{id, reason}]."""

  ids: np.ndarray
  vectors: np.ndarray
  manifest: dict[str, Any]
  path: pathlib.Path

  @property
  def version(self) -> str:
    return self.manifest['model_version']

  @property
  def bad(self) -> list[dict[str, str]]:
    return self.manifest['bad']


def shard_name(gen: int, index: int) -> str:
  return f'g{gen:04d}-s{index:05d}.npz'


def write_json(path: pathlib.Path, value: Any) -> None:
  """Atomically (temporary file, fsync, rename)."""
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(json.dumps(value, indent=1, sort_keys=True))
    f.flush()
    os.fsync(f.fileno())
  tmp.replace(path)


def write_shard(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """An .npz whose bytes depend only on `arrays` (fixed zip timestamps), written atomically."""
  tmp = path.with_name(path.name + '.tmp')
  with zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED) as zf:
    for name in sorted(arrays):
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
      zf.writestr(zipfile.ZipInfo(name + '.npy', date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
  with open(tmp, 'rb+') as f:
    os.fsync(f.fileno())
  tmp.replace(path)


def read_shard(path: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def quantize(vectors: np.ndarray, dtype: str) -> dict[str, np.ndarray]:
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {DTYPES}.')
  vectors = np.asarray(vectors, np.float32)
  if dtype == 'int8':
    scales = np.maximum(np.abs(vectors).max(axis=1), 1e-12).astype(np.float32) / 127.0
    return {'vectors': np.round(vectors / scales[:, None]).astype(np.int8), 'scales': scales}
  return {'vectors': vectors.astype(dtype)}


def dequantize(shard: dict[str, np.ndarray]) -> np.ndarray:
  vectors = shard['vectors'].astype(np.float32)
  return vectors * shard['scales'][:, None] if 'scales' in shard else vectors


def versions(store: str | pathlib.Path) -> list[str]:
  """The model versions a store holds (directories with a manifest)."""
  root = pathlib.Path(store)
  return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []


def version_dir(store: str | pathlib.Path, version: str | None = None) -> pathlib.Path:
  """The directory of `version` in `store`; `store` may also be a version directory itself.
  Without a version, the store must hold exactly one."""
  root = pathlib.Path(store).absolute()
  if (root / MANIFEST).is_file():
    got = read_manifest(root)['model_version']
    if version and got != version:
      raise VersionMismatchError(f'{root} holds model version {got!r}, not {version!r}.')
    return root
  held = versions(root)
  if version:
    if version not in held:
      raise StoreError(f'{root} has no version {version!r}; it holds {held or "none"}.')
    return root / version
  if len(held) != 1:
    raise StoreError(f'{root} holds {len(held)} model versions ({held or "none"}): pass the one '
                     'to read (--version=...).')
  return root / held[0]


def read_manifest(directory: pathlib.Path) -> dict[str, Any]:
  file = pathlib.Path(directory) / MANIFEST
  if not file.is_file():
    raise StoreError(f'{directory} holds no {MANIFEST}: not an embedding store version, or no '
                     'backfill of it has finished.')
  manifest = json.loads(file.read_text())
  if manifest.get('format') != FORMAT:
    raise StoreError(f'{file}: format {manifest.get("format")!r}, expected {FORMAT!r}.')
  return manifest


def replay(directory: pathlib.Path, manifest: dict[str, Any], *, verify: bool = True,
           vectors: bool = True):
  """(live {id: (hash, shard file, row)}, bad {id: (hash, reason)}, shards {file: arrays})."""
  live: dict[str, tuple[str, str, int]] = {}
  bad: dict[str, tuple[str, str]] = {}
  loaded = {}
  for gen in manifest['generations']:
    for entry in gen['shards']:
      path = directory / 'shards' / entry['file']
      if not path.is_file():
        raise StoreError(f'Store shard {path} is missing.')
      if verify and (path.stat().st_size != entry['bytes'] or sha256(path) != entry['sha256']):
        raise StoreError(f'Store shard {path} does not match the SHA-256 and size in the '
                         'manifest: it is damaged. Restore it, or backfill a new store.')
      shard = read_shard(path)
      if shard['model_version'].item() != manifest['model_version']:
        raise VersionMismatchError(
            f'Store shard {path} holds model version {shard["model_version"].item()!r} but the '
            f'store is {manifest["model_version"]!r}: versions must not be mixed.')
      for row, (item_id, h) in enumerate(zip(shard['ids'].tolist(), shard['hashes'].tolist())):
        live[item_id] = (h, entry['file'], row)
        bad.pop(item_id, None)
      for item_id, h, reason in zip(shard['bad_ids'].tolist(), shard['bad_hashes'].tolist(),
                                    shard['bad_reasons'].tolist()):
        bad[item_id] = (h, reason)
        live.pop(item_id, None)
      if vectors:
        loaded[entry['file']] = dequantize(shard)
    for item_id in gen['deleted']:
      live.pop(item_id, None)
      bad.pop(item_id, None)
  return live, bad, loaded


def load(store: str | pathlib.Path, version: str | None = None, *, verify: bool = True) -> Store:
  """A store version's ids (sorted), float32 vectors and manifest (every shard's checksum is
  verified first unless `verify=False`)."""
  directory = version_dir(store, version)
  manifest = read_manifest(directory)
  live, _, shards = replay(directory, manifest, verify=verify)
  ids = sorted(live)
  vecs = np.zeros((len(ids), manifest['dim']), np.float32)
  for i, item_id in enumerate(ids):
    _, file, row = live[item_id]
    vecs[i] = shards[file][row]
  return Store(np.asarray(ids, dtype=str), vecs, manifest, directory)


def check_same_version(what: str, version: str, other_what: str, other: str) -> None:
  """Refuses mixing vectors of two model versions, naming both."""
  if version != other:
    raise VersionMismatchError(
        f'{what} is of model version {version!r} but {other_what} is of {other!r}: vectors of '
        'two model versions are not comparable. Use the model the store was backfilled with, or '
        'backfill (and index) the corpus with this one.')
