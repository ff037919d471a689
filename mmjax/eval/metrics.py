"""Ranking metrics as pure, vectorised NumPy functions: Recall@K, hit@K, precision@K, nDCG@K
(graded), mAP, MRR and the median rank, for one or many relevant items per query.

Recall@K is the share of a query's relevant items in its top K; hit@K is whether any of them
is (what COCO / Flickr30k image->caption tables call R@K, with 5 captions per image). With one
relevant item per query the two are equal.

Metrics are named by strings (`'recall@5'`, `'ndcg@10'`, `'map'`, ...) so that configs can list
them. Three entry points share one per-query implementation:

- `from_ranks(ranks, names)`: one relevant item per query, given its 1-based rank (the cheap
  path for paired image-text sets: ranks come from `ranks_of_true` without sorting);
- `from_scores(scores, relevance, names)`: a score matrix and graded relevance [Q, N];
- `from_ranked(ranked_gains, num_relevant, ideal_gains, names)`: the gains of an already ranked
  (possibly truncated) result list, e.g. the top-k ids of an ANN index.

Ties are pessimistic everywhere: an item tied with a relevant one ranks above it (among tied
items, lower relevance first), so a collapsed model that scores everything equally gets no
better than chance. Queries without any relevant item are left out of the averages.

Truncated rankings (`from_ranked` with depth D < N) give MRR@D, mAP@D (normalised by the number
of relevant items) and a median rank of `inf` for queries whose first hit lies beyond D.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

KINDS_AT_K = ('recall', 'hit', 'precision', 'ndcg')
KINDS = ('map', 'mrr', 'median_rank')
DEFAULT_METRICS = ('recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank')
_NAME = re.compile(r'^(recall|hit|precision|ndcg)@([1-9][0-9]*)$')


def parse(names: Sequence[str]) -> list[tuple[str, int | None]]:
  """['recall@5', 'map'] -> [('recall', 5), ('map', None)]; a clear error for unknown names."""
  if isinstance(names, str):
    raise TypeError(f'metric names must be a sequence of strings, got the string {names!r}.')
  out = []
  for name in names:
    m = _NAME.match(name)
    if m:
      out.append((m.group(1), int(m.group(2))))
    elif name in KINDS:
      out.append((name, None))
    else:
      raise ValueError(f'Unknown metric {name!r}: expected one of {", ".join(KINDS)} or '
                       f'{"|".join(KINDS_AT_K)}@K with K >= 1.')
  return out


def max_k(names: Sequence[str]) -> int:
  return max([k for _, k in parse(names) if k is not None], default=1)


def ranks_of_true(scores: np.ndarray, true_index: np.ndarray | None = None) -> np.ndarray:
  """1-based rank of each row's true column (the diagonal by default), ties counted against."""
  scores = np.asarray(scores)
  n = scores.shape[0]
  true_index = np.arange(n) if true_index is None else np.asarray(true_index)
  true_scores = scores[np.arange(n), true_index][:, None]
  above_or_tied = np.sum(scores >= true_scores, axis=1)  # Includes the true item itself.
  return above_or_tied.astype(np.int64)


def _discounts(n: int) -> np.ndarray:
  return 1.0 / np.log2(np.arange(2, n + 2, dtype=np.float64))


def _per_query(ranked_gains: np.ndarray, num_relevant: np.ndarray, ideal_gains: np.ndarray,
               parsed) -> dict[str, np.ndarray]:
  """Per-query values of each metric from the gains of the ranked list [Q, D]."""
  ranked_gains = np.asarray(ranked_gains, np.float64)
  depth = ranked_gains.shape[1]
  hits = ranked_gains > 0
  # Queries without relevant items are dropped by _average; max(., 1) only avoids 0/0 here.
  num_relevant = np.maximum(np.asarray(num_relevant, np.float64), 1.0)
  found = hits.any(axis=1)
  first = np.where(found, np.argmax(hits, axis=1) + 1, np.inf)  # 1-based rank of the first hit.
  out = {}
  for kind, k in parsed:
    name = kind if k is None else f'{kind}@{k}'
    if kind == 'recall':
      out[name] = hits[:, :k].sum(1) / num_relevant
    elif kind == 'hit':
      out[name] = hits[:, :k].any(1).astype(np.float64)
    elif kind == 'precision':
      out[name] = hits[:, :k].sum(1) / k
    elif kind == 'ndcg':
      disc = _discounts(min(k, depth))
      dcg = (ranked_gains[:, :k] * disc).sum(1)
      ideal = np.asarray(ideal_gains, np.float64)[:, :k]
      idcg = (ideal * _discounts(ideal.shape[1])).sum(1)
      out[name] = dcg / np.where(idcg > 0, idcg, 1.0)
    elif kind == 'map':
      precision_at_i = np.cumsum(hits, axis=1) / np.arange(1, depth + 1)
      out[name] = (precision_at_i * hits).sum(1) / num_relevant
    elif kind == 'mrr':
      out[name] = 1.0 / first
    elif kind == 'median_rank':
      out[name] = first
  return out


def _average(per_query: dict[str, np.ndarray], valid: np.ndarray) -> dict[str, float]:
  if not valid.any():
    raise ValueError('No query has a relevant item: the metrics are undefined.')
  return {name: float(np.median(v[valid]) if name == 'median_rank' else np.mean(v[valid]))
          for name, v in per_query.items()}


def from_ranks(ranks: np.ndarray, names: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
  """Metrics when each query has exactly one relevant item, at 1-based `ranks` [Q]."""
  ranks = np.asarray(ranks, np.int64)
  if ranks.ndim != 1 or (ranks < 1).any():
    raise ValueError(f'ranks must be 1-based ranks of shape [Q], got {ranks!r}.')
  # Closed forms of _per_query for a one-hot ranked list (tested to agree with from_scores).
  r = ranks.astype(np.float64)
  out = {}
  for kind, k in parse(names):
    name = kind if k is None else f'{kind}@{k}'
    if kind in ('recall', 'hit'):
      out[name] = float(np.mean(r <= k))
    elif kind == 'precision':
      out[name] = float(np.mean(r <= k) / k)
    elif kind == 'ndcg':
      out[name] = float(np.mean(np.where(r <= k, 1.0 / np.log2(r + 1), 0.0)))
    elif kind in ('map', 'mrr'):
      out[name] = float(np.mean(1.0 / r))
    else:
      out[name] = float(np.median(r))
  return out


def pessimistic_order(scores: np.ndarray, relevance: np.ndarray) -> np.ndarray:
  """Column order per row, best first; among tied scores the least relevant comes first."""
  return np.lexsort((relevance, -scores), axis=-1)


def from_scores(scores: np.ndarray, relevance: np.ndarray, names: Sequence[str] = DEFAULT_METRICS,
                chunk: int = 512) -> dict[str, float]:
  """Metrics of a score matrix [Q, N] against graded relevance [Q, N] (0 = not relevant).

  Binary relevance is bool/0-1; graded relevance (nDCG gains) any non-negative numbers. Rows are
  sorted `chunk` at a time, so memory stays O(chunk x N).
  """
  scores = np.asarray(scores, np.float64)
  relevance = np.asarray(relevance, np.float64)
  if scores.shape != relevance.shape or scores.ndim != 2:
    raise ValueError(f'scores {scores.shape} and relevance {relevance.shape} must both be [Q, N].')
  if (relevance < 0).any():
    raise ValueError('relevance must be >= 0.')
  parsed = parse(names)
  parts = []
  for start in range(0, scores.shape[0], chunk):
    s, rel = scores[start:start + chunk], relevance[start:start + chunk]
    ranked = np.take_along_axis(rel, pessimistic_order(s, rel), axis=1)
    ideal = -np.sort(-rel, axis=1)[:, :max_k(names)]
    parts.append(_per_query(ranked, (rel > 0).sum(1), ideal, parsed))
  per_query = {n: np.concatenate([p[n] for p in parts]) for n in parts[0]} if parts else {}
  return _average(per_query, (relevance > 0).any(axis=1))


def from_ranked(ranked_gains: np.ndarray, num_relevant: np.ndarray, ideal_gains: np.ndarray,
                names: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
  """Metrics of ranked result lists: gains [Q, D] of the retrieved items, best first, the number
  of relevant items per query in the whole corpus [Q], and the best possible gains [Q, >= K]."""
  ranked_gains = np.asarray(ranked_gains)
  num_relevant = np.asarray(num_relevant)
  if ranked_gains.ndim != 2 or num_relevant.shape != ranked_gains.shape[:1]:
    raise ValueError(f'ranked_gains {ranked_gains.shape} must be [Q, D] and num_relevant '
                     f'{num_relevant.shape} [Q].')
  return _average(_per_query(ranked_gains, num_relevant, ideal_gains, parse(names)),
                  num_relevant > 0)


def from_labels(ids: np.ndarray, query_labels: np.ndarray, corpus_labels: np.ndarray,
                names: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
  """Metrics of top-k `ids` [Q, D] when the relevant items of a query are the corpus items that
  share its label (binary relevance), e.g. every caption of the query image's scene."""
  query_labels = np.asarray(query_labels)
  corpus_labels = np.asarray(corpus_labels)
  gains = (corpus_labels[np.asarray(ids)] == query_labels[:, None]).astype(np.float64)
  uniq, counts = np.unique(corpus_labels, return_counts=True)
  pos = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
  num_relevant = np.where(uniq[pos] == query_labels, counts[pos], 0)
  depth = max(max_k(names), gains.shape[1])
  ideal = (np.arange(depth)[None, :] < num_relevant[:, None]).astype(np.float64)
  return from_ranked(gains, num_relevant, ideal, names)
