"""Two-stage retrieval: top-k candidates from the embeddings, re-scored by the ITM head.

For each query (an image for i2t, a caption for t2i) the exact top-k of the embedding scores is
re-ordered by the match logit of (caption, image) from the fusion module (ALBEF/BLIP). Reported,
both directions: R@1 of the embeddings alone and after re-ranking, the same on the queries whose
scene has a one-attribute near duplicate in the set (the hard pairs), the ITM's own
compositionality (true caption vs two attributes swapped, scored by the match logit, beside the
embeddings' score of mmjax.eval.robustness), and the cost: pairs scored per query and the wall
seconds of the re-scoring vs of embedding the set.
"""

from __future__ import annotations

import time

import numpy as np

from mmjax.data import demo
from mmjax.eval import robustness


def topk(scores: np.ndarray, k: int) -> np.ndarray:
  """[Nq, k] candidate ids, best first (exact)."""
  k = min(k, scores.shape[1])
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind='stable')
  return np.take_along_axis(part, order, axis=1)


def rerank(candidates: np.ndarray, rescore) -> np.ndarray:
  """`candidates` [Nq, k] re-ordered by `rescore(query ids [n], candidate ids [n]) -> [n]`."""
  nq, k = candidates.shape
  q = np.repeat(np.arange(nq), k)
  s = np.asarray(rescore(q, candidates.reshape(-1))).reshape(nq, k)
  return np.take_along_axis(candidates, np.argsort(-s, axis=1, kind='stable'), axis=1)


def recall_at_1(ranked: np.ndarray, rows: np.ndarray | None = None) -> float:
  """Share of queries i whose first result is i (optionally over the query ids `rows`)."""
  hit = ranked[:, 0] == np.arange(len(ranked))
  return float(np.mean(hit if rows is None else hit[rows]))


def itm_compositionality(embedder, image_tokens: np.ndarray,
                         scene_keys) -> dict[str, float]:
  """Per attribute: the share of images whose match logit ranks the true canonical caption above
  the one with the attribute swapped between two objects (chance 0.5; ties fail)."""
  out = {}
  for attribute in ('colour', 'shape', 'size'):
    rows, true_caps, swapped = [], [], []
    for i, key in enumerate(scene_keys):
      scene = robustness.parse_scene_key(key)
      other = robustness.swapped_scene(scene, attribute)
      if other is not None:
        rows.append(i)
        true_caps.append(demo.canonical_caption(scene))
        swapped.append(demo.canonical_caption(other))
    if rows:
      img = image_tokens[rows]
      st = embedder.match_scores(*embedder.text_tokens(true_caps), img)
      ss = embedder.match_scores(*embedder.text_tokens(swapped), img)
      out[f'itm_compositionality/{attribute}'] = float(np.mean(st > ss))
  return out


class RerankEvaluator(robustness.DemoSetEvaluator):
  """`config.evals.<name> = spec('rerank', k=10, ...)` on the demo validation scenes."""

  def __call__(self, embedder) -> dict[str, float]:
    if not getattr(embedder, 'has_itm', False):
      raise ValueError("A 'rerank' evaluator needs a model with an ITM head "
                       '(config.model.itm.depth > 0, config.loss.itm_weight > 0).')
    data, k = self.data, self.spec['k']
    start = time.perf_counter()
    zimg, ztxt = embedder.embed_images(data['images']), embedder.embed_texts(data['captions'])
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    img_tok = embedder.image_tokens(data['images'])
    txt_tok, mask = embedder.text_tokens(data['captions'])

    def score(texts, images):
      return embedder.match_scores(txt_tok[texts], mask[texts], img_tok[images])

    scores = zimg @ ztxt.T
    hard = np.flatnonzero(np.asarray(data['near_duplicate_of']) >= 0)
    out = {}
    for direction, s, rescore in (('i2t', scores, lambda q, c: score(c, q)),
                                  ('t2i', scores.T, lambda q, c: score(q, c))):
      first = topk(s, k)
      second = rerank(first, rescore)
      out[f'{direction}/recall@1'] = recall_at_1(first)
      out[f'{direction}/reranked_recall@1'] = recall_at_1(second)
      out[f'{direction}/recall@{k}'] = float(np.mean(np.any(first == np.arange(len(s))[:, None],
                                                            axis=1)))
      if len(hard):
        out[f'{direction}/near_duplicates/recall@1'] = recall_at_1(first, hard)
        out[f'{direction}/near_duplicates/reranked_recall@1'] = recall_at_1(second, hard)
    out['rerank_seconds'] = time.perf_counter() - start
    out['embed_seconds'] = embed_s
    out['pairs_scored_per_query'] = float(min(k, len(scores)))
    out.update(robustness.compositionality(zimg, embedder.embed_texts, data['scene_keys']))
    out.update(itm_compositionality(embedder, img_tok, data['scene_keys']))
    return out
