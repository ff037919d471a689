"""mmjax.eval.metrics against scikit-learn (nDCG, AP, LRAP, coverage) and a brute-force ranking
on random cases, and against hand-computed cases with ties."""

import numpy as np
import pytest
from sklearn import metrics as skm

from mmjax.eval import metrics

NAMES = ('recall@1', 'recall@3', 'recall@10', 'precision@1', 'precision@5', 'ndcg@1', 'ndcg@5',
         'ndcg@20', 'map', 'mrr', 'median_rank')


def brute_force(scores, relevance, names):
  """Per query: sort pessimistically with Python's sorted, then the textbook definitions."""
  per = {n: [] for n in names}
  for s, rel in zip(scores, relevance):
    if not (rel > 0).any():
      continue
    order = sorted(range(len(s)), key=lambda j: (-s[j], rel[j]))
    g = [rel[j] for j in order]
    hit = [x > 0 for x in g]
    nrel = sum(hit)
    first = hit.index(True) + 1
    ideal = sorted(rel, reverse=True)
    for name in names:
      kind, _, k = name.partition('@')
      k = int(k) if k else None
      if kind == 'recall':
        v = sum(hit[:k]) / nrel
      elif kind == 'precision':
        v = sum(hit[:k]) / k
      elif kind == 'ndcg':
        dcg = sum(x / np.log2(i + 2) for i, x in enumerate(g[:k]))
        v = dcg / sum(x / np.log2(i + 2) for i, x in enumerate(ideal[:k]))
      elif kind == 'map':
        v = sum(sum(hit[:i + 1]) / (i + 1) for i in range(len(hit)) if hit[i]) / nrel
      elif kind == 'mrr':
        v = 1 / first
      else:
        v = first
      per[name].append(v)
  return {n: float(np.median(v) if n == 'median_rank' else np.mean(v)) for n, v in per.items()}


def random_case(seed, q=12, n=30, graded=False):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(q, n))
  rel = (rng.random((q, n)) < 0.15) * (rng.integers(1, 4, (q, n)) if graded else 1)
  rel[np.arange(q), rng.integers(0, n, q)] = rng.integers(1, 4, q) if graded else 1
  return scores, rel.astype(np.float64)


@pytest.mark.parametrize('seed', range(5))
def test_ndcg_matches_sklearn_graded(seed):
  scores, rel = random_case(seed, graded=True)
  for k in (1, 3, 10, 30):
    got = metrics.from_scores(scores, rel, [f'ndcg@{k}'])[f'ndcg@{k}']
    assert got == pytest.approx(skm.ndcg_score(rel, scores, k=k), abs=1e-6)


@pytest.mark.parametrize('seed', range(5))
def test_map_matches_sklearn_average_precision_and_lrap(seed):
  scores, rel = random_case(seed)
  want = np.mean([skm.average_precision_score(r, s) for r, s in zip(rel, scores)])
  got = metrics.from_scores(scores, rel, ['map'])['map']
  assert got == pytest.approx(want, abs=1e-6)
  assert got == pytest.approx(skm.label_ranking_average_precision_score(rel, scores), abs=1e-6)


@pytest.mark.parametrize('seed', range(4))
def test_single_relevant_ranks_match_sklearn_coverage_with_ties(seed):
  # coverage_error counts ties against the label, as ranks_of_true does.
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 4, (20, 20)).astype(np.float64)
  ranks = metrics.ranks_of_true(scores)
  assert ranks.mean() == pytest.approx(skm.coverage_error(np.eye(20), scores), abs=1e-6)


@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('kind', ['continuous', 'ties', 'graded_ties'])
def test_from_scores_matches_brute_force(seed, kind):
  rng = np.random.default_rng(seed)
  scores, rel = random_case(seed, graded=kind == 'graded_ties')
  if kind != 'continuous':
    scores = rng.integers(0, 3, scores.shape).astype(np.float64)
  want = brute_force(scores, rel, NAMES)
  assert metrics.from_scores(scores, rel, NAMES, chunk=5) == pytest.approx(want, abs=1e-9)


@pytest.mark.parametrize('seed', range(4))
def test_single_relevant_paths_agree(seed):
  """from_ranks (closed forms), from_scores (sort) and from_labels (top-k ids) agree."""
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 5, (25, 25)).astype(np.float64)
  want = metrics.from_scores(scores, np.eye(25), NAMES)
  assert metrics.from_ranks(metrics.ranks_of_true(scores), NAMES) == pytest.approx(want)
  ids = metrics.pessimistic_order(scores, np.eye(25))
  assert metrics.from_labels(ids, np.arange(25), np.arange(25), NAMES) == pytest.approx(want)


def test_from_labels_many_relevant_matches_from_scores():
  rng = np.random.default_rng(0)
  corpus_labels = rng.integers(0, 6, 40)
  query_labels = rng.integers(0, 7, 15)  # Label 6 has no relevant item: left out.
  scores = rng.normal(size=(15, 40))
  rel = (query_labels[:, None] == corpus_labels[None, :]).astype(float)
  want = metrics.from_scores(scores, rel, NAMES)
  ids = np.argsort(-scores, axis=1)
  assert metrics.from_labels(ids, query_labels, corpus_labels, NAMES) == pytest.approx(want)
  # Truncated to depth 10: @K metrics with K <= 10 are unchanged.
  trunc = metrics.from_labels(ids[:, :10], query_labels, corpus_labels, ('recall@3', 'ndcg@5'))
  assert trunc == pytest.approx({'recall@3': want['recall@3'], 'ndcg@5': want['ndcg@5']})


def test_hand_case_with_ties_and_many_relevant():
  # Query 0: scores [3, 2, 2, 1], relevant {2} (tied with item 1) -> pessimistic order 0, 1, 2, 3.
  # Query 1: scores [1, 1, 1, 1], relevant {0, 3} -> all tied: both relevant ones go last.
  scores = np.array([[3, 2, 2, 1], [1, 1, 1, 1]], np.float64)
  rel = np.array([[0, 0, 1, 0], [1, 0, 0, 1]], np.float64)
  m = metrics.from_scores(scores, rel, ('recall@2', 'recall@3', 'precision@3', 'mrr', 'map',
                                         'ndcg@4', 'median_rank'))
  # q0: first hit at 3; q1: hits at 3 and 4.
  assert m == pytest.approx({
      'recall@2': 0.0, 'recall@3': (1 + 0.5) / 2, 'precision@3': (1 / 3 + 1 / 3) / 2,
      'mrr': 1 / 3, 'map': (1 / 3 + (1 / 3 + 2 / 4) / 2) / 2,
      'ndcg@4': (1 / np.log2(4) + (1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))) / 2,
      'median_rank': 3.0})


def test_graded_ties_put_lower_gain_first():
  # Items 0 and 1 tie; gains 2 and 1: pessimistically the gain-1 item ranks first.
  m = metrics.from_scores(np.array([[1.0, 1.0, 0.0]]), np.array([[2.0, 1.0, 0.0]]), ['ndcg@1'])
  assert m['ndcg@1'] == pytest.approx(0.5)


def test_collapsed_model_gets_no_credit():
  m = metrics.from_scores(np.zeros((5, 5)), np.eye(5), ('recall@1', 'mrr'))
  assert m == pytest.approx({'recall@1': 0.0, 'mrr': 1 / 5})


def test_bad_inputs_are_refused():
  with pytest.raises(ValueError, match='Unknown metric'):
    metrics.parse(['recall@0'])
  with pytest.raises(ValueError, match='Unknown metric'):
    metrics.parse(['auc'])
  with pytest.raises(TypeError):
    metrics.parse('mrr')
  with pytest.raises(ValueError, match=r'\[Q, N\]'):
    metrics.from_scores(np.zeros((2, 3)), np.zeros((2, 4)))
  with pytest.raises(ValueError, match='No query has a relevant item'):
    metrics.from_scores(np.zeros((2, 3)), np.zeros((2, 3)))
  with pytest.raises(ValueError, match='1-based'):
    metrics.from_ranks(np.array([0, 1]))


def test_indexed_retrieval_matches_dense():
  """The ScaNN path of the evaluator gives the dense path's metrics when the index is exact."""
  from mmjax.eval import retrieval  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  zimg = rng.normal(size=(300, 16)).astype(np.float32)
  ztxt = (zimg + 0.8 * rng.normal(size=zimg.shape)).astype(np.float32)
  names = ('recall@1', 'recall@10', 'ndcg@10', 'mrr')
  dense = retrieval.retrieval_metrics(zimg, ztxt, names=names)
  # Under the training mesh (as in the loop): the exact reference uses its own mesh inside it.
  from mmjax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
  with mesh_lib.activate(mesh_lib.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1}), ()):
    indexed = retrieval.indexed_retrieval_metrics(zimg, ztxt, names, depth=300,
                                                  index_overrides={'reorder': 300})
  assert indexed.pop('i2t/index_recall@10') == indexed.pop('t2i/index_recall@10') == 1.0
  assert indexed == pytest.approx(dense)
