"""Image-text retrieval evaluation in both directions (i2t, t2i) on paired embeddings.

The metrics themselves live in `mmjax.eval.metrics` (pure NumPy, tested against scikit-learn and
hand-computed cases). Ranks are pessimistic on ties (an item tied with the true one counts as
ranked above it), so a collapsed model that scores everything equally gets chance, not a
perfect score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from mmjax.data import demo
from mmjax.eval import metrics as metrics_lib
from mmjax.embedder import Embedder
from mmjax.data import images as images_lib, records, transforms
from mmjax.index.ann import ScannIndex

DEFAULT_KS = (1, 5, 10)
ranks_of_true = metrics_lib.ranks_of_true


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> tuple[str, ...]:
  return tuple(f'recall@{k}' for k in ks) + ('mrr', 'median_rank')


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                    names: Sequence[str] | None = None) -> dict[str, float]:
  """Metrics of 1-based ranks of the one true item per query (`metrics.from_ranks`)."""
  return metrics_lib.from_ranks(ranks, names or metric_names(ks))


def retrieval_metrics(zimg: np.ndarray, ztxt: np.ndarray, ks: Sequence[int] = DEFAULT_KS,
                      names: Sequence[str] | None = None,
                      relevance: np.ndarray | None = None) -> dict[str, float]:
  """'i2t/...' and 't2i/...' metrics of image and text embeddings.

  Without `relevance`, row i of each is a positive pair (one relevant item per query). With
  `relevance` [num_images, num_texts] (graded, 0 = not relevant), any number of texts may be
  relevant to an image and vice versa (the t2i direction uses its transpose).
  """
  names = names or metric_names(ks)
  if relevance is None and zimg.shape != ztxt.shape:
    raise ValueError(f'Paired embeddings must have equal shapes, got {zimg.shape} vs {ztxt.shape}.')
  scores = zimg.astype(np.float32) @ ztxt.astype(np.float32).T
  out = {}
  for direction, s, rel in (('i2t', scores, relevance),
                            ('t2i', scores.T, None if relevance is None else relevance.T)):
    values = (metrics_lib.from_ranks(ranks_of_true(s), names) if rel is None
              else metrics_lib.from_scores(s, rel, names))
    out.update({f'{direction}/{name}': v for name, v in values.items()})
  return out


def indexed_retrieval_metrics(zimg: np.ndarray, ztxt: np.ndarray, names: Sequence[str],
                              image_labels: np.ndarray | None = None,
                              text_labels: np.ndarray | None = None,
                              index_overrides: dict | None = None,
                              depth: int = 100) -> dict[str, float]:
  """The metrics of `retrieval_metrics`, with each direction's corpus searched by a ScaNN index.

  Relevance is binary: same label (row i of each is the pair when no labels are given). Metrics
  come from the top-`depth` results (MRR@depth, median rank inf beyond depth). The index's own
  recall@10 against exact search on the same queries is reported as '<dir>/index_recall@10'.
  """

  image_labels = np.arange(len(zimg)) if image_labels is None else np.asarray(image_labels)
  text_labels = np.arange(len(ztxt)) if text_labels is None else np.asarray(text_labels)
  depth = max(depth, metrics_lib.max_k(names))
  out = {}
  for direction, queries, corpus, q_labels, c_labels in (
      ('i2t', zimg, ztxt, image_labels, text_labels),
      ('t2i', ztxt, zimg, text_labels, image_labels)):
    k = min(depth, len(corpus))
    index = ScannIndex.build(corpus, k=k, overrides=index_overrides, recall_queries=queries)
    _, ids = index.search(queries, k)
    values = metrics_lib.from_labels(ids, q_labels, c_labels, names)
    out.update({f'{direction}/{name}': v for name, v in values.items()})
    out[f'{direction}/index_recall@{min(10, k)}'] = index.meta[f'recall@{k}']
  return out


class RetrievalEvaluator:
  """Embeds a fixed set of images (or query texts) and captions and reports retrieval metrics.

  By default caption i belongs to image i. With `owners` (int [num_captions]), caption j belongs
  to image owners[j], so an image may have several captions (COCO-style: i2t counts any of its
  captions as relevant, t2i the one image). With `queries` instead of `images`, text queries
  are retrieved against the captions (text-text pairs; directions q2t / t2q).

  Corpora of `index_min_corpus` items or more are searched with a ScaNN index (its recall
  against exact search reported alongside); smaller ones with the exact dense score matrix.
  """

  def __init__(self, images: np.ndarray | None, captions: Sequence[str],
               ks: Sequence[int] = DEFAULT_KS, names: Sequence[str] | None = None,
               index_min_corpus: int = 100_000, index_overrides: dict | None = None,
               owners: np.ndarray | None = None, queries: Sequence[str] | None = None,
               description: str = ''):
    num = len(queries) if images is None else len(images)
    if owners is None and num != len(captions):
      raise ValueError(f'{num} images but {len(captions)} captions.')
    if owners is not None and (len(owners) != len(captions) or np.any(owners >= num)):
      raise ValueError(f'owners must give each of the {len(captions)} captions one of the {num} '
                       'images.')
    self.images, self.queries, self.owners = images, queries, owners
    self.captions = list(captions)
    self.ks = tuple(ks)
    self.names = tuple(names or metric_names(ks))
    metrics_lib.parse(self.names)
    self.index_min_corpus = index_min_corpus
    self.index_overrides = index_overrides
    self.description = description  # Which set: 'demo validation scenes', 'records data/val'.

  @classmethod
  def demo_validation(cls, num_scenes: int, image_size: int, seed: int,
                      **kwargs) -> RetrievalEvaluator:
    """The demo's validation split: unique scenes, half in one-attribute near-duplicate pairs."""
    data = demo.make_eval_set(num_scenes=num_scenes, image_size=image_size, seed=seed)
    return cls(data['images'], data['captions'],
               description=f'demo validation scenes (seed {seed})', **kwargs)

  @property
  def chance_recall_at_1(self) -> float:
    return 1.0 / len(self.captions)

  @property
  def num_queries(self) -> int:
    """Images (or query texts) of the set."""
    return len(self.queries) if self.images is None else len(self.images)

  @property
  def chance(self) -> dict[str, float]:
    """Recall@1 of a random ranking per direction: 1 / the number of candidates (with several
    relevant candidates recall@1 is their share found, so the expectation is the same)."""
    fwd, back = ('q2t', 't2q') if self.images is None else ('i2t', 't2i')
    return {f'{fwd}/recall@1': 1.0 / len(self.captions),
            f'{back}/recall@1': 1.0 / self.num_queries}

  @property
  def size_description(self) -> str:
    if self.owners is None:
      return f'{len(self.captions)} pairs'
    what = 'images' if self.images is not None else 'queries'
    return f'{self.num_queries} {what}, {len(self.captions)} captions'

  @classmethod
  def from_source(cls, source, max_examples: int, image_size: int, view=None,
                  **kwargs) -> RetrievalEvaluator:
    """The first `max_examples` elements of a data source (`mmjax.data.sources`: ingested
    records or TFDS), every caption of each; unreadable images are skipped and counted
    (`self.skipped`). `view`: the run's deterministic resize (`mmjax.data.images.View`;
    None: centre crop at image_size)."""
    view = view or images_lib.View(image_size)
    images, queries, captions, owners, skipped = [], [], [], [], 0
    for index in range(min(max_examples, len(source))):
      ex = source[index]
      if ex['query'] is not None:
        queries.append(records.normalise_caption(ex['query']))
      else:
        try:
          images.append(images_lib.load(ex['image'], view))
        except Exception:  # pylint: disable=broad-except  # PIL raises many types on bad files
          skipped += 1
          continue
      for caption in ex['captions']:
        captions.append(records.normalise_caption(caption))
        owners.append(len(queries) + len(images) - 1)
    if not captions:
      raise ValueError(f'The evaluation source has no readable examples ({skipped} skipped).')
    out = cls(np.stack(images) if images else None, captions, owners=np.asarray(owners),
              queries=queries or None, **kwargs)
    out.skipped = skipped
    return out

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    if self.queries is not None:
      zq = embedder.embed_texts(self.queries)
    else:
      zq = embedder.embed_images(self.images)
    ztxt = embedder.embed_texts(self.captions)
    if len(self.captions) >= self.index_min_corpus:
      out = indexed_retrieval_metrics(zq, ztxt, self.names, text_labels=self.owners,
                                      index_overrides=self.index_overrides)
    else:
      relevance = None
      if self.owners is not None:
        relevance = (np.arange(len(zq))[:, None] == self.owners[None, :]).astype(np.float32)
      out = retrieval_metrics(zq, ztxt, names=self.names, relevance=relevance)
    if self.queries is not None:  # i2t / t2i read q2t / t2q for text queries.
      out = {k.replace('i2t/', 'q2t/').replace('t2i/', 't2q/'): v for k, v in out.items()}
    if getattr(self, 'skipped', 0):
      out['skipped_images'] = float(self.skipped)
    return out


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
