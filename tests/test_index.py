"""mmjax.index: exact search on the 8-device mesh against NumPy, the ScaNN index's measured
recall, and its save/load checks (metadata mismatch, truncated and altered files)."""

import json

import numpy as np
import pytest

from mmjax.index import (CorruptIndexError, ExactSearch, IndexMismatchError, ScannIndex,
                         default_params, model_fingerprint, recall_at_k)


def clustered(n, dim, seed=0, clusters=50):
  centres = np.random.default_rng(0).normal(size=(clusters, dim))  # Queries share the clusters.
  rng = np.random.default_rng(seed)
  x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize('metric', ['dot_product', 'squared_l2'])
def test_exact_search_matches_numpy(metric):
  rng = np.random.default_rng(1)
  corpus = rng.normal(size=(1001, 16)).astype(np.float32)  # Not a multiple of 8 x block.
  queries = rng.normal(size=(37, 16)).astype(np.float32)  # Not a multiple of the query batch.
  ex = ExactSearch(corpus, metric=metric, block_size=64, query_batch=16)
  scores, ids = ex.search(queries, 7)
  ref = (queries @ corpus.T if metric == 'dot_product'
         else -((queries[:, None] - corpus[None]) ** 2).sum(-1))
  want = np.argsort(-ref, axis=1)[:, :7]
  np.testing.assert_array_equal(ids, want)
  np.testing.assert_allclose(scores, np.take_along_axis(ref, want, 1), rtol=1e-4, atol=1e-4)
  assert ex._corpus.sharding.num_devices == 8  # pylint: disable=protected-access


def test_exact_search_compiles_once_per_shape_bucket():
  """Corpora of nearby sizes are padded to one shape bucket and share one compiled search."""
  rng = np.random.default_rng(2)
  queries = rng.normal(size=(5, 16)).astype(np.float32)
  first = None
  for n in (1001, 1010, 1017):  # 126, 127, 128 rows per device: one bucket of 128.
    corpus = rng.normal(size=(n, 16)).astype(np.float32)
    ex = ExactSearch(corpus, block_size=64, query_batch=16)
    _, ids = ex.search(queries, 5)
    np.testing.assert_array_equal(ids, np.argsort(-(queries @ corpus.T), axis=1)[:, :5])
    first = first or ex._compiled(5)  # pylint: disable=protected-access
    assert ex._compiled(5) is first  # pylint: disable=protected-access
  assert first._cache_size() == 1  # pylint: disable=protected-access


def test_exact_search_bad_input():
  ex = ExactSearch(np.eye(4, dtype=np.float32), block_size=2)
  with pytest.raises(ValueError, match=r'\[Q, 4\]'):
    ex.search(np.zeros((2, 3)), 1)
  with pytest.raises(ValueError, match='k=5'):
    ex.search(np.zeros((2, 4)), 5)
  # k larger than a block and than a shard's rows.
  _, ids = ex.search(np.eye(4, dtype=np.float32)[::-1], 4)
  np.testing.assert_array_equal(ids[:, 0], [3, 2, 1, 0])
  assert sorted(ids[0]) == [0, 1, 2, 3]
  with pytest.raises(ValueError, match='metric'):
    ExactSearch(np.eye(4), metric='cosine')


def test_default_params_scale_with_corpus_size():
  small, mid, big = default_params(1000, 64), default_params(50_000, 64), default_params(10**6, 128)
  assert small.num_leaves == 0 and small.reorder == 100
  assert mid.num_leaves == 224 and 8 <= mid.num_leaves_to_search < mid.num_leaves
  assert big.num_leaves == 1000 and big.num_leaves_to_search < mid.num_leaves_to_search * 5
  assert big.training_sample_size == 250_000


@pytest.fixture(scope='module')
def built():
  corpus = clustered(6000, 32)
  queries = clustered(200, 32, seed=1)
  return corpus, queries, ScannIndex.build(corpus, model_version='model-a', recall_queries=queries)


def test_build_measures_recall_against_exact(built):
  corpus, queries, index = built
  assert index.meta['recall@10'] >= 0.95
  assert index.meta['params']['num_leaves'] == default_params(6000, 32).num_leaves > 0
  _, exact_ids = ExactSearch(corpus).search(queries, 10)
  _, ids = index.search(queries)
  assert recall_at_k(ids, exact_ids) == pytest.approx(index.meta['recall@10'])
  # Probing every partition with a deep reorder is exact.
  _, ids = index.search(queries, 10, num_leaves_to_search=index.params.num_leaves, reorder=1000)
  assert recall_at_k(ids, exact_ids) == 1.0


def test_overrides_and_small_corpus():
  corpus = clustered(500, 8)
  index = ScannIndex.build(corpus, overrides={'reorder': 50}, num_recall_queries=50)
  assert index.params.num_leaves == 0 and index.params.reorder == 50
  assert index.meta['recall@10'] >= 0.95
  with pytest.raises(ValueError, match='Unknown ScaNN index parameters'):
    ScannIndex.build(corpus, overrides={'leaves': 3})
  with pytest.raises(ValueError, match='num_leaves_to_search'):
    ScannIndex.build(corpus, overrides={'num_leaves': 10, 'num_leaves_to_search': 11})


def test_save_load_roundtrip_and_mismatch(built, tmp_path):
  _, queries, index = built
  index.save(tmp_path / 'idx')
  loaded = ScannIndex.load(tmp_path / 'idx', expect_dim=32, expect_model_version='model-a',
                           expect_metric='dot_product')
  np.testing.assert_array_equal(loaded.search(queries)[1], index.search(queries)[1])
  assert loaded.meta['recall@10'] == index.meta['recall@10']
  with pytest.raises(IndexMismatchError, match='dimension 32.*64 is expected'):
    ScannIndex.load(tmp_path / 'idx', expect_dim=64)
  with pytest.raises(IndexMismatchError, match="model version 'model-a'.*'model-b' is expected"):
    ScannIndex.load(tmp_path / 'idx', expect_model_version='model-b')


@pytest.mark.parametrize('damage', ['truncate', 'flip', 'delete', 'no_meta'])
def test_damaged_index_is_refused(built, tmp_path, damage):
  _, _, index = built
  d = index.save(tmp_path / 'idx')
  files = json.loads((d / 'index.json').read_text())['files']
  target = d / 'hashed_dataset.npy'
  assert target.name in files
  data = target.read_bytes()
  if damage == 'truncate':
    target.write_bytes(data[:len(data) // 2])
    match = 'truncated'
  elif damage == 'flip':
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    match = 'SHA-256'
  elif damage == 'delete':
    target.unlink()
    match = 'missing'
  else:
    (d / 'index.json').unlink()
    match = 'holds no index.json'
  with pytest.raises(CorruptIndexError, match=match):
    ScannIndex.load(d)


def test_model_fingerprint_changes_with_any_parameter():
  params = {'a': np.ones((2, 3), np.float32), 'b': {'c': np.zeros(4, np.float32)}}
  fp = model_fingerprint(params)
  assert fp == model_fingerprint({'a': np.ones((2, 3), np.float32),
                                  'b': {'c': np.zeros(4, np.float32)}}) and len(fp) == 16
  params['b']['c'][1] = 1e-6
  assert model_fingerprint(params) != fp
  assert model_fingerprint({'a': np.ones((3, 2), np.float32), 'b': {'c': np.zeros(4)}}) != fp
