"""The inputs of a drift report (`mmjax.deploy.drift`): embedding sets read from .npy / .npz files
or embedding-store directories, checked (numeric [N, d], finite, at least MIN_ITEMS rows, unique
ids) with a ValueError that names the file, and the alignment of two versions' sets by id.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import numpy as np

from mmjax.deploy import store as store_lib

MIN_ITEMS = 20  # Fewer vectors than this per set make every statistic noise.


@dataclasses.dataclass(frozen=True)
class Embeddings:
  """One embedding set: float32 vectors [n, d], their ids (None: positional) and provenance."""
  vectors: np.ndarray
  ids: np.ndarray | None
  source: str
  model_version: str | None = None


def _checked(vectors: Any, ids: Any, source: str, model_version: str | None = None) -> Embeddings:
  vectors = np.asarray(vectors)
  if vectors.ndim != 2 or not np.issubdtype(vectors.dtype, np.number):
    raise ValueError(f'{source}: expected numeric vectors [N, d], got {vectors.dtype} '
                     f'{list(vectors.shape)}.')
  if len(vectors) < MIN_ITEMS or vectors.shape[1] < 1:
    raise ValueError(f'{source}: {len(vectors)} vectors of dimension {vectors.shape[1]}; a drift '
                     f'report needs at least {MIN_ITEMS}.')
  vectors = vectors.astype(np.float32)
  bad = ~np.isfinite(vectors).all(axis=1)
  if bad.any():
    raise ValueError(f'{source}: {int(bad.sum())} vectors hold NaN or inf (first at row '
                     f'{int(np.argmax(bad))}).')
  if ids is not None:
    ids = np.asarray(ids)
    if ids.shape != (len(vectors),):
      raise ValueError(f'{source}: {ids.shape} ids for {len(vectors)} vectors.')
    if len(np.unique(ids)) != len(ids):
      raise ValueError(f'{source}: duplicate ids.')
  return Embeddings(vectors, ids, source, model_version)


def load_store(path: str | pathlib.Path, version: str | None = None) -> Embeddings:
  """An embedding store (`mmjax.deploy.store`, written by backfill): a store holding one model
  version, or one version's directory (STORE/<version>); every shard's checksum is verified."""
  data = store_lib.load(path, version)
  return _checked(data.vectors, data.ids, str(data.path), data.version)


def _load_npy(path: pathlib.Path) -> np.ndarray:
  try:
    return np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path}: cannot read ({e}).') from e


def load_embeddings(path: str | pathlib.Path) -> Embeddings:
  """An .npy / .npz file or an embedding-store directory (module docstring)."""
  path = pathlib.Path(path)
  if path.is_dir():
    return load_store(path)
  if not path.exists():
    raise ValueError(f'{path}: no such file or directory.')
  if path.suffix == '.npy':
    return _checked(_load_npy(path), None, str(path))
  if path.suffix == '.npz':
    with np.load(path, allow_pickle=False) as z:
      keys = [k for k in ('vectors', 'embeddings') if k in z.files]
      if not keys and len(z.files) == 1:
        keys = z.files
      if not keys:
        raise ValueError(f'{path}: no "vectors" or "embeddings" array (has {z.files}).')
      return _checked(z[keys[0]], z['ids'] if 'ids' in z.files else None, str(path),
                      str(z['model_version']) if 'model_version' in z.files else None)
  raise ValueError(f'{path}: expected .npy, .npz or an embedding-store directory.')


def align(a: Embeddings, b: Embeddings) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """Row indices of the items both sets hold (in a's order) and the counts of the rest."""
  if a.ids is None or b.ids is None:
    if len(a.vectors) != len(b.vectors):
      raise ValueError(f'versions mode without ids aligns by position, but {a.source} has '
                       f'{len(a.vectors)} vectors and {b.source} {len(b.vectors)}.')
    idx = np.arange(len(a.vectors))
    return idx, idx, {'aligned': len(idx), 'only_reference': 0, 'only_current': 0}
  if a.ids.dtype.kind != b.ids.dtype.kind and {a.ids.dtype.kind, b.ids.dtype.kind} - {'i', 'u'}:
    raise ValueError(f'ids of {a.source} ({a.ids.dtype}) and {b.source} ({b.ids.dtype}) are not '
                     'comparable.')
  _, ia, ib = np.intersect1d(a.ids, b.ids, assume_unique=True, return_indices=True)
  order = np.argsort(ia)
  ia, ib = ia[order], ib[order]
  if len(ia) < MIN_ITEMS:
    raise ValueError(f'{a.source} and {b.source} share {len(ia)} ids; a versions report needs '
                     f'at least {MIN_ITEMS}.')
  return ia, ib, {'aligned': len(ia), 'only_reference': len(a.ids) - len(ia),
                  'only_current': len(b.ids) - len(ib)}
