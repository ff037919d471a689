"""Index builds from an embedding store, a promotion gate, an atomic `current` alias, rollback.

  python -m mmjax.deploy.index build --store=runs/store [--version=V] --out=runs/index
  python -m mmjax.deploy.index promote --out=runs/index --build=NAME [--min_recall=0.95] \
      [--eval=queries.jsonl --tolerance=0.01]
  python -m mmjax.deploy.index rollback --out=runs/index
  python -m mmjax.deploy.index search --out=runs/index --model=runs/demo/serving --text='a red star'

  ROOT/builds/NAME/      the ScaNN index (`mmjax.index.ScannIndex`), ids.npy, build.json
  ROOT/current, previous symbolic links to builds/NAME, each switched by one rename
  ROOT/history.jsonl     one line per promotion or rollback

A build records its store version (the model version), the store's corpus fingerprint and its
recall@10 against exact search on a held-out sample of the store's vectors (each sample vector a
query, its own row left out of both result lists). `promote` switches `current` only through the
gate: the build's recall must reach `min_recall` and, given an evaluation set (JSONL lines
{"query": text, "relevant": [ids]}), its hit rate at 10 (the fraction of queries with a relevant
id among the top 10, each build queried with its own model) must be at least the current build's
minus `tolerance`. The previous `current` is kept as `previous`; `rollback` swaps them back.
A search whose query embeddings are of another model version than the index is refused.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from mmjax.deploy import serving, store as store_lib
from mmjax.index import ExactSearch, ScannIndex, recall_at_k

BUILD_FILE = 'build.json'
ALIASES = ('current', 'previous')


class GateError(ValueError):
  """A build that did not pass the promotion gate (or cannot be promoted or rolled back)."""


def held_out_recall(index: ScannIndex, vectors: np.ndarray, rows: np.ndarray, k: int,
                    exact: ExactSearch | None = None) -> float:
  """recall@k of `index` against exact search, the sample rows as queries, self matches left
  out (a query's own row is trivially its nearest neighbour)."""
  queries = vectors[rows]
  kk = min(k + 1, len(vectors))
  _, exact_ids = (exact or ExactSearch(vectors)).search(queries, kk)
  _, ann_ids = index.search(queries, kk)

  def drop_self(ids):
    return np.stack([[j for j in row if j != r][:kk - 1] for row, r in zip(ids, rows)])

  return recall_at_k(drop_self(ann_ids), drop_self(exact_ids))


def build(store: str | pathlib.Path, out: str | pathlib.Path, *, version: str | None = None,
          name: str = '', held_out: int = 1000, k: int = 10, seed: int = 0,
          overrides: dict[str, Any] | None = None) -> dict[str, Any]:
  """Builds a ScaNN index of a store version into OUT/builds/NAME; returns its build.json."""
  data = store_lib.load(store, version)
  n = len(data.ids)
  if n < 2:
    raise ValueError(f'{data.path} holds {n} vectors: an index needs at least 2.')
  fingerprint = data.manifest['corpus']['fingerprint']
  name = name or f'{data.version}-{fingerprint[:8]}'
  directory = pathlib.Path(out).absolute() / 'builds' / name
  if (directory / BUILD_FILE).is_file():
    raise FileExistsError(f'{directory} already holds a build; pass another --name.')
  rows = np.sort(np.random.default_rng(seed).choice(n, min(n, held_out), replace=False))
  exact = ExactSearch(data.vectors)
  index = ScannIndex.build(data.vectors, model_version=data.version, k=k, overrides=overrides,
                           recall_queries=data.vectors[rows], exact=exact, seed=seed)
  recall = held_out_recall(index, data.vectors, rows, k, exact)
  index.save(directory / 'scann')
  np.save(directory / 'ids.npy', data.ids)
  info = {'name': name, 'model_version': data.version, 'store': str(data.path),
          'model': data.manifest['model'], 'modality': data.manifest['modality'],
          'corpus_fingerprint': fingerprint, 'size': n, 'dim': int(data.vectors.shape[1]),
          'k': k, f'recall@{k}': recall, 'recall': recall, 'held_out': len(rows),
          'params': index.meta['params']}
  store_lib.write_json(directory / BUILD_FILE, info)
  return info


def _build_dir(root: pathlib.Path, build_or_alias: str) -> pathlib.Path:
  path = root / build_or_alias if build_or_alias in ALIASES else root / 'builds' / build_or_alias
  if not (path / BUILD_FILE).is_file():
    have = sorted(p.name for p in (root / 'builds').iterdir()) if (root / 'builds').is_dir() else []
    raise FileNotFoundError(f'{root} has no build {build_or_alias!r} (builds: {have or "none"}).')
  return path.resolve()


def alias(root: str | pathlib.Path, which: str = 'current') -> str | None:
  """The build name an alias points at, or None."""
  link = pathlib.Path(root).absolute() / which
  return pathlib.Path(os.readlink(link)).name if link.is_symlink() else None


def _point(root: pathlib.Path, which: str, name: str | None) -> None:
  """Switches alias `which` to builds/NAME with one atomic rename (or removes it)."""
  link = root / which
  if name is None:
    if link.is_symlink():
      link.unlink()
    return
  tmp = root / f'.{which}.tmp'
  if tmp.is_symlink() or tmp.exists():
    tmp.unlink()
  os.symlink(pathlib.Path('builds') / name, tmp)
  os.replace(tmp, link)


def _log(root: pathlib.Path, event: dict[str, Any]) -> None:
  with open(root / 'history.jsonl', 'a', encoding='utf-8') as f:
    f.write(json.dumps(event, sort_keys=True) + '\n')


class Searcher:
  """A build, loaded for search (checksums and model version checked by `ScannIndex.load`)."""

  def __init__(self, root: str | pathlib.Path, build_or_alias: str = 'current'):
    self.root = pathlib.Path(root).absolute()
    self.path = _build_dir(self.root, build_or_alias)
    self.info = json.loads((self.path / BUILD_FILE).read_text())
    self.version: str = self.info['model_version']
    self.index = ScannIndex.load(self.path / 'scann', expect_dim=self.info['dim'],
                                 expect_model_version=self.version)
    self.ids = np.load(self.path / 'ids.npy')

  def search(self, queries: np.ndarray, k: int = 10, *,
             query_version: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k] of item ids); queries must be of the index's model version."""
    store_lib.check_same_version('The query embeddings', query_version,
                                 f'the index {self.path.name}', self.version)
    scores, rows = self.index.search(np.asarray(queries, np.float32), min(k, len(self.ids)))
    return scores, self.ids[rows]

  def search_texts(self, model: serving.ServingModel, texts: Sequence[str], k: int = 10):
    return self.search(model.embed_texts(list(texts)), k, query_version=model.version)

  def model(self, path: str | pathlib.Path | None = None) -> serving.ServingModel:
    """The serving model of this build (the store's, unless `path` is given)."""
    return serving.load(path or self.info['model']['path'])


def read_eval_set(path: str | pathlib.Path) -> list[dict[str, Any]]:
  rows = []
  for n, line in enumerate(pathlib.Path(path).read_text().splitlines(), start=1):
    if not line.strip():
      continue
    row = json.loads(line)
    if not isinstance(row.get('query'), str) or not isinstance(row.get('relevant'), list):
      raise ValueError(f'{path} line {n}: expected {{"query": str, "relevant": [ids]}}, got '
                       f'{line[:200]!r}.')
    rows.append(row)
  if not rows:
    raise ValueError(f'{path}: the evaluation set is empty.')
  return rows


def eval_quality(searcher: Searcher, eval_set: list[dict[str, Any]], k: int = 10) -> float:
  """Hit rate at k: the fraction of queries with a relevant id among the top k."""
  _, ids = searcher.search_texts(searcher.model(), [r['query'] for r in eval_set], k)
  return float(np.mean([bool(set(map(str, r['relevant'])) & set(row.tolist()))
                        for r, row in zip(eval_set, ids)]))


def promote(root: str | pathlib.Path, build_name: str, *, min_recall: float = 0.95,
            eval_set: str | pathlib.Path | None = None, tolerance: float = 0.01) -> dict[str, Any]:
  """Makes `build_name` current if it passes the gate; the old current becomes `previous`."""
  root = pathlib.Path(root).absolute()
  new = Searcher(root, build_name)
  gate: dict[str, Any] = {'build': new.info['name'], 'model_version': new.version,
                          'recall': new.info['recall'], 'min_recall': min_recall}
  if new.info['recall'] < min_recall:
    raise GateError(f'Build {build_name} has recall@{new.info["k"]} {new.info["recall"]:.4f} '
                    f'against exact search, under --min_recall={min_recall}: not promoted. '
                    'Rebuild with more leaves searched or more reordering.')
  current = alias(root, 'current')
  if eval_set is not None:
    rows = read_eval_set(eval_set)
    gate['quality'] = eval_quality(new, rows)
    if current is not None and current != new.info['name']:
      gate['current'] = current
      gate['current_quality'] = eval_quality(Searcher(root, 'current'), rows)
      if gate['quality'] < gate['current_quality'] - tolerance:
        raise GateError(
            f'Build {build_name} ({new.version}) has hit rate@10 {gate["quality"]:.4f} on '
            f'{eval_set}, under the current build {current}\'s {gate["current_quality"]:.4f} '
            f'minus --tolerance={tolerance}: not promoted.')
  if current != new.info['name']:
    _point(root, 'previous', current)
    _point(root, 'current', new.info['name'])
  _log(root, {'event': 'promote', **gate, 'previous': current})
  return gate


def rollback(root: str | pathlib.Path) -> dict[str, Any]:
  """Switches `current` back to `previous` (and `previous` to what was current)."""
  root = pathlib.Path(root).absolute()
  current, previous = alias(root, 'current'), alias(root, 'previous')
  if previous is None:
    raise GateError(f'{root} has no previous build to roll back to (current: {current}).')
  _point(root, 'current', previous)
  _point(root, 'previous', current)
  event = {'event': 'rollback', 'current': previous, 'previous': current}
  _log(root, event)
  return event


if __name__ == '__main__':  # The command lives in the CLI layer (mmjax.cli.deploy_index).
  import runpy
  runpy.run_module('mmjax.cli.deploy_index', run_name='__main__')
