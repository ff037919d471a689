"""Retrieval metrics (mmjax.eval.retrieval): hand-computed cases with ties, and a brute-force
argsort reference on random score matrices."""

import numpy as np
import pytest

from mmjax.eval import retrieval

# ---------------------------------------------------------------------------------------------
# Hand-computed cases. Ties count against the true item (it ranks below everything tied with it).

CASE_3 = np.array([[0.9, 0.1, 0.2],   # true 0.9 is the unique max          -> rank 1
                   [0.8, 0.5, 0.3],   # 0.8 beats the true 0.5               -> rank 2
                   [0.4, 0.4, 0.4]])  # all tied                             -> rank 3
CASE_4 = np.array([[1, 1, 0, 0],      # tied with column 1                   -> rank 2
                   [0, 2, 3, 2],      # 3 above, 2 tied                      -> rank 3
                   [5, 5, 5, 5],      # all tied                             -> rank 4
                   [0, 0, 0, 1]], np.float32)  # unique max                  -> rank 1


@pytest.mark.parametrize('scores,want', [(CASE_3, [1, 2, 3]), (CASE_4, [2, 3, 4, 1])])
def test_ranks_of_true_hand_cases(scores, want):
  ranks = retrieval.ranks_of_true(scores)
  np.testing.assert_array_equal(ranks, want)
  assert ranks.dtype.kind == 'i'


@pytest.mark.parametrize('n', [1, 2, 5])
def test_all_tied_rows_rank_last(n):
  np.testing.assert_array_equal(retrieval.ranks_of_true(np.zeros((n, n))), [n] * n)
  m = retrieval.ranking_metrics(retrieval.ranks_of_true(np.ones((n, n))), ks=(1,))
  assert m['recall@1'] == (1.0 if n == 1 else 0.0)  # A collapsed model scores at most chance.


def test_ranks_of_true_with_explicit_true_index():
  # Row 0: true 0.2 is below 0.9 -> 2; row 1: true 0.8 is the max -> 1; row 2: all tied -> 3.
  np.testing.assert_array_equal(retrieval.ranks_of_true(CASE_3, np.array([2, 0, 1])), [2, 1, 3])
  # Rectangular: 2 queries over 4 candidates.
  s = np.array([[0.1, 0.7, 0.7, 0.2], [0.3, 0.2, 0.1, 0.0]])
  np.testing.assert_array_equal(retrieval.ranks_of_true(s, [1, 3]), [2, 4])


def test_ranking_metrics_hand_case_3():
  m = retrieval.ranking_metrics(np.array([1, 2, 3]), ks=(1, 2, 5))
  assert m == pytest.approx({'recall@1': 1 / 3, 'recall@2': 2 / 3, 'recall@5': 1.0,
                             'mrr': (1 + 1 / 2 + 1 / 3) / 3, 'median_rank': 2.0})
  assert m['mrr'] == pytest.approx(11 / 18)


def test_ranking_metrics_hand_case_4():
  m = retrieval.ranking_metrics(retrieval.ranks_of_true(CASE_4), ks=(1, 2, 3, 4))
  assert m == pytest.approx({'recall@1': 0.25, 'recall@2': 0.5, 'recall@3': 0.75,
                             'recall@4': 1.0, 'mrr': 25 / 48, 'median_rank': 2.5})


def test_ranking_metrics_default_ks():
  m = retrieval.ranking_metrics(np.arange(1, 21))
  assert set(m) == {'recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank'}
  assert m['recall@1'] == pytest.approx(0.05)
  assert m['recall@5'] == pytest.approx(0.25)
  assert m['recall@10'] == pytest.approx(0.5)
  assert m['median_rank'] == pytest.approx(10.5)


def test_retrieval_metrics_hand_case_both_directions():
  zimg = np.array([[3, 0], [1, 1], [0, 2]], np.float32)
  ztxt = np.array([[1, 0], [0, 1], [1, 1]], np.float32)
  # scores = [[3, 0, 3], [1, 1, 2], [0, 2, 2]]
  # i2t (rows):    true 3 tied with 3 -> 2; true 1 with 1, 2 above -> 3; true 2 tied -> 2.
  # t2i (columns): [3, 1, 0] -> 1; [0, 1, 2] -> 2; [3, 2, 2] -> 3.
  m = retrieval.retrieval_metrics(zimg, ztxt, ks=(1, 2, 5))
  assert m == pytest.approx({
      'i2t/recall@1': 0.0, 'i2t/recall@2': 2 / 3, 'i2t/recall@5': 1.0,
      'i2t/mrr': (1 / 2 + 1 / 3 + 1 / 2) / 3, 'i2t/median_rank': 2.0,
      't2i/recall@1': 1 / 3, 't2i/recall@2': 2 / 3, 't2i/recall@5': 1.0,
      't2i/mrr': (1 + 1 / 2 + 1 / 3) / 3, 't2i/median_rank': 2.0,
  })


def test_retrieval_metrics_perfect_and_shape_mismatch():
  z = np.eye(4, dtype=np.float32)
  m = retrieval.retrieval_metrics(z, z)
  assert all(v == 1.0 for k, v in m.items() if 'recall' in k or 'mrr' in k)
  assert m['i2t/median_rank'] == m['t2i/median_rank'] == 1.0
  with pytest.raises(ValueError, match='equal shapes'):
    retrieval.retrieval_metrics(np.zeros((3, 2)), np.zeros((4, 2)))


# ---------------------------------------------------------------------------------------------
# Brute-force reference.


def brute_force_order(row, true_j):
  """Column indices best first; among equal scores the true column goes last (pessimistic)."""
  return sorted(range(len(row)), key=lambda j: (-row[j], j == true_j))


def brute_force_metrics(scores, ks, true_index=None):
  n = scores.shape[0]
  true_index = list(range(n)) if true_index is None else list(true_index)
  ranks, hits = [], {k: [] for k in ks}
  for i in range(n):
    order = brute_force_order(list(scores[i]), true_index[i])
    ranks.append(order.index(true_index[i]) + 1)
    for k in ks:
      hits[k].append(true_index[i] in order[:k])
  out = {f'recall@{k}': float(np.mean(hits[k])) for k in ks}
  out['mrr'] = float(np.mean([1.0 / r for r in ranks]))
  out['median_rank'] = float(np.median(ranks))
  return np.array(ranks), out


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('kind', ['continuous', 'ties'])
def test_random_scores_match_brute_force(seed, kind):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 30))
  scores = rng.normal(size=(n, n)) if kind == 'continuous' else rng.integers(0, 3, (n, n))
  ks = (1, 2, 5, 10)
  want_ranks, want = brute_force_metrics(scores, ks)
  ranks = retrieval.ranks_of_true(scores)
  np.testing.assert_array_equal(ranks, want_ranks)
  assert retrieval.ranking_metrics(ranks, ks) == pytest.approx(want)


@pytest.mark.parametrize('seed', range(3))
def test_random_rectangular_with_true_index_matches_brute_force(seed):
  rng = np.random.default_rng(100 + seed)
  n, m = 7, 12
  scores = rng.integers(0, 4, (n, m)).astype(np.float32)
  true_index = rng.integers(0, m, n)
  want_ranks, _ = brute_force_metrics(scores, (1,), true_index)
  np.testing.assert_array_equal(retrieval.ranks_of_true(scores, true_index), want_ranks)


@pytest.mark.parametrize('seed', range(3))
def test_retrieval_metrics_random_embeddings_match_brute_force(seed):
  rng = np.random.default_rng(200 + seed)
  n, d = 25, 4
  zimg = rng.normal(size=(n, d)).astype(np.float32)
  ztxt = (zimg + rng.normal(size=(n, d))).astype(np.float32)
  scores = zimg @ ztxt.T
  ks = (1, 3, 10)
  _, i2t = brute_force_metrics(scores, ks)
  _, t2i = brute_force_metrics(scores.T, ks)
  want = {**{f'i2t/{k}': v for k, v in i2t.items()}, **{f't2i/{k}': v for k, v in t2i.items()}}
  assert retrieval.retrieval_metrics(zimg, ztxt, ks) == pytest.approx(want)


# ---------------------------------------------------------------------------------------------
# Table.


def test_format_table_contains_the_numbers():
  metrics = {'i2t/recall@1': 0.12345, 'i2t/mrr': 0.5, 't2i/recall@1': 0.875, 't2i/mrr': 0.0625}
  table = retrieval.format_table(metrics, title='Retrieval @ step 7')
  lines = table.splitlines()
  assert lines[0] == 'Retrieval @ step 7'
  assert 'recall@1' in lines[1] and 'mrr' in lines[1]
  i2t = next(line for line in lines if line.strip().startswith('i2t'))
  t2i = next(line for line in lines if line.strip().startswith('t2i'))
  assert '0.1235' in i2t and '0.5000' in i2t  # Rounded to 4 decimals.
  assert '0.8750' in t2i and '0.0625' in t2i
  assert len(lines) == 4


def test_format_table_of_real_metrics_and_missing_cells():
  z = np.eye(3, dtype=np.float32)
  metrics = retrieval.retrieval_metrics(z, z[[0, 2, 1]], ks=(1, 2))
  table = retrieval.format_table(metrics)
  for key, value in metrics.items():
    assert f'{value:.4f}' in table, key
  assert not table.startswith('\n')
  partial = retrieval.format_table({'i2t/mrr': 0.25, 't2i/recall@1': 0.75})
  lines = partial.splitlines()
  assert len(lines) == 3 and '0.2500' in lines[1] and '0.7500' in lines[2]
