"""The ScaNN approximate nearest-neighbour index: build, measure, search, save and load safely.

A ScaNN searcher partitions the corpus (k-means tree), scores the probed partitions with
anisotropic asymmetric hashing (AH, 4-bit LUT16 codes) and re-scores the best candidates exactly
(reordering). Its parameters are derived from the corpus size (`default_params`) and can be
overridden one by one. Every build measures the index's recall@k against exact search on device
(`mmjax.index.exact`) and logs it: an ANN index whose own error is unknown is not used for
evaluation.

On disk an index is a directory holding ScaNN's artifacts plus `index.json`: format, model
version (a fingerprint of the embedding model), dimension, metric, corpus size, build
parameters, measured recall, and the SHA-256 of every artifact. `ScannIndex.load` refuses an
index whose dimension or model version differs from what the caller expects, and one whose files
are missing, truncated or altered, before ScaNN reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import time
from typing import Any

import numpy as np

from mmjax.index.exact import METRICS, ExactSearch

log = logging.getLogger(__name__)

FORMAT = 'mmjax.scann_index.v1'
META_FILE = 'index.json'


class IndexRefusedError(ValueError):
  """An index that must not be searched: wrong model/dimension, or damaged files."""


class IndexMismatchError(IndexRefusedError):
  """The index was built for another model version, dimension or metric."""


class CorruptIndexError(IndexRefusedError):
  """An index file is missing, truncated or altered (checksum or size mismatch)."""


@dataclasses.dataclass(frozen=True)
class IndexParams:
  """ScaNN build and search parameters (see `default_params` for how they scale with N)."""

  num_leaves: int  # k-means partitions; 0 = no partitioning (small corpora).
  num_leaves_to_search: int  # Partitions probed per query.
  training_sample_size: int  # Points used to train the partitioner and the AH codebooks.
  dims_per_block: int = 2  # AH: dimensions per 4-bit code (2 is ScaNN's recommendation).
  anisotropic_quantization_threshold: float = 0.2  # AH loss weighting (dot product only).
  reorder: int = 100  # Candidates re-scored exactly (pre_reorder_num_neighbors).

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def default_params(n: int, dim: int, k: int = 10) -> IndexParams:
  """Parameters from the corpus size: about sqrt(N) partitions of ~sqrt(N) points each, a
  probe fraction that shrinks with N, and 10k candidates to reorder (at least 100)."""
  del dim  # AH blocks of 2 dimensions suit every dimension; kept for future use.
  reorder = max(100, 10 * k)
  if n < 4096:  # A tree over a few thousand points saves nothing: AH + reorder over all of them.
    return IndexParams(0, 0, n, reorder=min(n, reorder))
  leaves = int(min(max(round(math.sqrt(n)), 16), n // 64))
  # Probe ~15% of 100 leaves, ~10% of 1000 leaves, never fewer than 8.
  search = int(min(leaves, max(8, round(leaves / math.log2(leaves)))))
  return IndexParams(leaves, search, min(n, 250_000), reorder=min(n, reorder))


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with path.open('rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def model_fingerprint(params: Any) -> str:
  """A model version for `model_version`: SHA-256 (first 16 hex digits) over the parameter
  tree's paths, shapes, dtypes and values, so any retrained or different model differs."""
  import jax  # pylint: disable=import-outside-toplevel

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    value = np.asarray(jax.device_get(leaf))
    h.update(f'{jax.tree_util.keystr(path)}:{value.shape}:{value.dtype};'.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()[:16]


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
  """Fraction of the exact top-k ids that the approximate top-k found (order ignored)."""
  k = exact_ids.shape[1]
  found = (approx_ids[:, :k, None] == exact_ids[:, None, :]).any(axis=1)
  return float(found.mean())


class ScannIndex:
  """A built or loaded ScaNN searcher with its metadata (`self.meta`)."""

  def __init__(self, searcher, meta: dict[str, Any]):
    self.searcher = searcher
    self.meta = meta
    self.params = IndexParams(**meta['params'])

  @property
  def dim(self) -> int:
    return self.meta['dim']

  @property
  def size(self) -> int:
    return self.meta['size']

  @classmethod
  def build(cls, corpus: np.ndarray, *, metric: str = 'dot_product', model_version: str = '',
            k: int = 10, overrides: dict[str, Any] | None = None,
            recall_queries: np.ndarray | None = None, num_recall_queries: int = 1000,
            exact: ExactSearch | None = None, seed: int = 0) -> ScannIndex:
    """Builds the index and measures its recall@k against exact search.

    `recall_queries` are the queries recall is measured on (default: `num_recall_queries`
    corpus rows drawn with `seed`); `exact` reuses an existing exact searcher of the corpus.
    """
    import scann  # pylint: disable=import-outside-toplevel

    corpus = np.ascontiguousarray(corpus, np.float32)
    if corpus.ndim != 2 or len(corpus) < 2:
      raise ValueError(f'corpus must be [N >= 2, D], got shape {corpus.shape}.')
    if metric not in METRICS:
      raise ValueError(f'metric={metric!r} is not one of {METRICS}.')
    n, dim = corpus.shape
    params = default_params(n, dim, k)
    if overrides:
      unknown = set(overrides) - set(params.to_dict())
      if unknown:
        raise ValueError(f'Unknown ScaNN index parameters {sorted(unknown)}; known: '
                         f'{sorted(params.to_dict())}.')
      params = dataclasses.replace(params, **overrides)
    _check_params(params, n)
    t0 = time.perf_counter()
    builder = scann.scann_ops_pybind.builder(corpus, k, metric)
    if params.num_leaves:
      builder = builder.tree(num_leaves=params.num_leaves,
                             num_leaves_to_search=params.num_leaves_to_search,
                             training_sample_size=params.training_sample_size)
    threshold = (params.anisotropic_quantization_threshold if metric == 'dot_product'
                 else float('nan'))
    builder = builder.score_ah(params.dims_per_block, anisotropic_quantization_threshold=threshold,
                               training_sample_size=params.training_sample_size)
    searcher = builder.reorder(params.reorder).build()
    build_s = time.perf_counter() - t0
    meta = {'format': FORMAT, 'model_version': model_version, 'dim': dim, 'size': n,
            'metric': metric, 'k': k, 'params': params.to_dict(), 'build_seconds': build_s}
    index = cls(searcher, meta)
    if recall_queries is None:
      rows = np.random.default_rng(seed).choice(n, min(n, num_recall_queries), replace=False)
      recall_queries = corpus[np.sort(rows)]
    exact = exact or ExactSearch(corpus, metric=metric)
    kk = min(k, n)
    _, exact_ids = exact.search(recall_queries, kk)
    _, ids = index.search(recall_queries, kk)
    meta[f'recall@{kk}'] = recall_at_k(ids, exact_ids)
    meta['recall_queries'] = len(recall_queries)
    log.info('ScaNN index over %d x %d (%s) built in %.1f s: recall@%d vs exact = %.4f on %d '
             'queries; params %s.', n, dim, metric, build_s, kk, meta[f'recall@{kk}'],
             len(recall_queries), params.to_dict())
    return index

  def search(self, queries: np.ndarray, k: int | None = None, *,
             num_leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(scores [Q, k], ids [Q, k]) best first; scores as in `ExactSearch.search`."""
    queries = np.ascontiguousarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f'queries must be [Q, {self.dim}], got shape {queries.shape}.')
    k = k or self.meta['k']
    leaves = num_leaves_to_search if self.params.num_leaves else None
    reorder = max(reorder or self.params.reorder, k)
    ids, dist = self.searcher.search_batched_parallel(
        queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder,
        leaves_to_search=leaves)
    ids, dist = np.asarray(ids, np.int64), np.asarray(dist, np.float32)
    # ScaNN returns dot products for dot_product and squared distances for squared_l2.
    return (dist if self.meta['metric'] == 'dot_product' else -dist), ids

  # -------------------------------------------------------------------------------------------
  # Persistence.

  def save(self, directory: str | pathlib.Path) -> pathlib.Path:
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():  # A stale artifact must not survive into the checksums.
      if old.is_file():
        old.unlink()
    self.searcher.serialize(str(directory), relative_path=True)
    files = {p.name: {'sha256': _sha256(p), 'bytes': p.stat().st_size}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != META_FILE}
    tmp = directory / (META_FILE + '.tmp')
    tmp.write_text(json.dumps({**self.meta, 'files': files}, indent=2, sort_keys=True))
    tmp.replace(directory / META_FILE)  # index.json last: a half-written index has none.
    return directory

  @classmethod
  def load(cls, directory: str | pathlib.Path, *, expect_dim: int | None = None,
           expect_model_version: str | None = None,
           expect_metric: str | None = None) -> ScannIndex:
    """Loads a saved index after checking its metadata and every file's size and checksum."""
    import scann  # pylint: disable=import-outside-toplevel

    directory = pathlib.Path(directory).absolute()
    meta_file = directory / META_FILE
    if not meta_file.exists():
      raise CorruptIndexError(f'{directory} holds no {META_FILE}: not an mmjax ScaNN index, or '
                              'its save did not finish.')
    try:
      meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
      raise CorruptIndexError(f'{meta_file} is not valid JSON ({e}).') from e
    if meta.get('format') != FORMAT:
      raise IndexMismatchError(f'{meta_file}: format {meta.get("format")!r}, expected {FORMAT!r}.')
    for what, want, got in (('dimension', expect_dim, meta['dim']),
                            ('model version', expect_model_version, meta['model_version']),
                            ('metric', expect_metric, meta['metric'])):
      if want is not None and want != got:
        raise IndexMismatchError(
            f'The index in {directory} was built with {what} {got!r}, but {want!r} is expected: '
            'rebuild it for this model (an index of other embeddings returns wrong neighbours).')
    for name, info in meta['files'].items():
      path = directory / name
      if not path.exists():
        raise CorruptIndexError(f'Index file {path} is missing.')
      size = path.stat().st_size
      if size != info['bytes']:
        raise CorruptIndexError(f'Index file {path} has {size} bytes, {info["bytes"]} were '
                                'saved: it is truncated or altered. Rebuild the index.')
      if _sha256(path) != info['sha256']:
        raise CorruptIndexError(f'Index file {path} does not match its saved SHA-256: it is '
                                'corrupt. Rebuild the index.')
    meta = {k: v for k, v in meta.items() if k != 'files'}
    searcher = scann.scann_ops_pybind.load_searcher(str(directory))
    return cls(searcher, meta)


def _check_params(p: IndexParams, n: int) -> None:
  if p.num_leaves < 0 or p.num_leaves > n:
    raise ValueError(f'num_leaves={p.num_leaves} must be in [0, corpus size {n}].')
  if p.num_leaves and not 1 <= p.num_leaves_to_search <= p.num_leaves:
    raise ValueError(f'num_leaves_to_search={p.num_leaves_to_search} must be in '
                     f'[1, num_leaves={p.num_leaves}].')
  for name in ('training_sample_size', 'dims_per_block', 'reorder'):
    if getattr(p, name) < 1:
      raise ValueError(f'{name}={getattr(p, name)} must be >= 1.')
