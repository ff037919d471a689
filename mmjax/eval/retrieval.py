"""Image-text retrieval evaluation: Recall@K and MRR in both directions, with exact search.

Metrics are pure NumPy functions of a score matrix, so they are tested against hand-computed
cases. Ranks are pessimistic on ties (an item tied with the true one counts as ranked above it),
so a collapsed model that scores everything equally gets chance, not a perfect score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.data import demo
from mmjax.embedder import Embedder

DEFAULT_KS = (1, 5, 10)


def ranks_of_true(scores: np.ndarray, true_index: np.ndarray | None = None) -> np.ndarray:
  """1-based rank of each row's true column (the diagonal by default), ties counted against."""
  n = scores.shape[0]
  true_index = np.arange(n) if true_index is None else np.asarray(true_index)
  true_scores = scores[np.arange(n), true_index][:, None]
  above_or_tied = np.sum(scores >= true_scores, axis=1)  # Includes the true item itself.
  return above_or_tied.astype(np.int64)


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  out = {f'recall@{k}': float(np.mean(ranks <= k)) for k in ks}
  out['mrr'] = float(np.mean(1.0 / ranks))
  out['median_rank'] = float(np.median(ranks))
  return out


def retrieval_metrics(zimg: np.ndarray, ztxt: np.ndarray,
                      ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
  """Paired embeddings (row i of each is a positive pair) -> 'i2t/...' and 't2i/...' metrics."""
  if zimg.shape != ztxt.shape:
    raise ValueError(f'Paired embeddings must have equal shapes, got {zimg.shape} vs {ztxt.shape}.')
  scores = zimg.astype(np.float32) @ ztxt.astype(np.float32).T
  out = {}
  for direction, s in (('i2t', scores), ('t2i', scores.T)):
    for name, value in ranking_metrics(ranks_of_true(s), ks).items():
      out[f'{direction}/{name}'] = value
  return out


class RetrievalEvaluator:
  """Embeds a fixed set of paired images/captions and reports retrieval metrics."""

  def __init__(self, images: np.ndarray, captions: Sequence[str], ks: Sequence[int] = DEFAULT_KS):
    if len(images) != len(captions):
      raise ValueError(f'{len(images)} images but {len(captions)} captions.')
    self.images = images
    self.captions = list(captions)
    self.ks = tuple(ks)

  @classmethod
  def demo_validation(cls, num_scenes: int, image_size: int, seed: int) -> RetrievalEvaluator:
    """The demo's validation split: unique scenes, half in one-attribute near-duplicate pairs."""
    data = demo.make_eval_set(num_scenes=num_scenes, image_size=image_size, seed=seed)
    return cls(data['images'], data['captions'])

  @property
  def chance_recall_at_1(self) -> float:
    return 1.0 / len(self.captions)

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    zimg = embedder.embed_images(self.images)
    ztxt = embedder.embed_texts(self.captions)
    return retrieval_metrics(zimg, ztxt, self.ks)


def format_table(metrics: dict[str, float], title: str = '') -> str:
  """A small fixed-width table: rows are directions, columns the metrics."""
  directions = sorted({k.split('/')[0] for k in metrics if '/' in k})
  names = []
  for k in metrics:
    if '/' in k and k.split('/', 1)[1] not in names:
      names.append(k.split('/', 1)[1])
  lines = [title] if title else []
  lines.append(f'{"":>6} ' + ' '.join(f'{n:>12}' for n in names))
  for d in directions:
    cells = []
    for n in names:
      v = metrics.get(f'{d}/{n}')
      cells.append(f'{v:>12.4f}' if v is not None else f'{"":>12}')
    lines.append(f'{d:>6} ' + ' '.join(cells))
  return '\n'.join(lines)
