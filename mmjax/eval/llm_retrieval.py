"""Retrieval evaluation of the LLM embedder on the demo validation split or a held-out split of
ingested records / TFDS.

On the demo, three tasks, each query carrying its task instruction: image->text ('i2t': the
image, against every caption), text->image ('t2i': the caption, against every image) and composed
image+text->image ('composed': a scene plus an edit such as "make the red circle blue", against
the edited scenes AND the unedited reference images, so a model that ignores the edit ranks the
reference first). The dual encoder has no way to form the composed query.

With Matryoshka dimensions, every metric is also reported at each truncated dimension d (the
first d coordinates, re-normalised) as 'dim<d>/<task>/<metric>'.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from mmjax.data import demo, llm_tasks
from mmjax.eval import metrics as metrics_lib


def _normalise(z: np.ndarray) -> np.ndarray:
  return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


class LLMRetrievalEvaluator:
  """`embedder` (a mmjax.embedder.MultimodalEmbedder) -> {'i2t/recall@1': ..., ...}.

  `pairs`: a held-out image-caption set (a `RetrievalEvaluator.from_source`, its images, captions
  and caption owners); None: the demo validation scenes of the spec."""

  def __init__(self, spec: dict[str, Any], image_size: int, pairs=None):
    self.spec, self.image_size, self.pairs = spec, image_size, pairs
    self.names = tuple(spec['metrics'])
    metrics_lib.parse(self.names)
    if pairs is not None and pairs.images is None:
      raise ValueError(f"llm_retrieval on {pairs.description}: the LLM embedder's tasks are "
                       'image-caption retrieval; this source holds text-text pairs.')

  @functools.cached_property
  def data(self) -> dict[str, Any]:
    if self.pairs is not None:
      p = self.pairs
      return {'images': p.images, 'captions': p.captions, 'owners': p.owners}
    s = self.spec
    data = demo.make_eval_set(num_scenes=s['num_scenes'], image_size=self.image_size,
                              seed=s['seed'])
    data['composed'] = llm_tasks.composed_eval_set(data['scene_keys'], self.image_size,
                                                   s['seed'], s['num_composed'])
    return data

  @property
  def captions(self) -> list[str]:
    return self.data['captions']

  @property
  def images(self) -> np.ndarray:
    return self.data['images']

  @property
  def chance_recall_at_1(self) -> float:
    return 1.0 / len(self.captions)

  @property
  def description(self) -> str:
    return self.pairs.description if self.pairs is not None else (
        f'demo validation scenes (seed {self.spec["seed"]})')

  @property
  def size_description(self) -> str:
    if self.pairs is not None:
      return self.pairs.size_description
    return f'{len(self.captions)} pairs, {len(self.data["composed"]["sources"])} composed queries'

  @property
  def chance(self) -> dict[str, float]:
    """Recall@1 of a random ranking per task: 1 / the number of candidates."""
    out = {'i2t/recall@1': 1.0 / len(self.captions), 't2i/recall@1': 1.0 / len(self.images)}
    if self.pairs is None and len(self.data['composed']['sources']):
      out['composed/recall@1'] = 1.0 / (len(self.data['composed']['sources']) + len(self.images))
    return out

  def embeddings(self, embedder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{task: (query embeddings [Q, d], candidate embeddings [N, d])}; on the demo row i of the
    candidates is query i's target, on held-out pairs `relevance` says which are."""
    d, enc, ins = self.data, embedder.encoder, embedder.instructions
    token = enc.image_token
    images = [[x] for x in d['images']]
    no_images = [[] for _ in d['captions']]
    z_images = embedder.embed_candidates([token] * len(images), images)
    # Captions longer than the context are cut at a word boundary, as in training.
    out = {'i2t': (embedder.embed_queries('i2t', [token] * len(images), images),
                   embedder.embed_candidates([enc.fit(ins.candidate, c) for c in d['captions']],
                                             no_images)),
           't2i': (embedder.embed_queries('t2i', [enc.fit(ins.query['t2i'], c)
                                                  for c in d['captions']], no_images), z_images)}
    c = d.get('composed')
    if c is not None and len(c['sources']):
      queries = embedder.embed_queries('composed', [f'{token} {t}' for t in c['texts']],
                                       [[d['images'][i]] for i in c['sources']])
      targets = embedder.embed_candidates([token] * len(c['targets']),
                                          [[x] for x in c['targets']])
      # The gallery: every target, then the reference images (distractors).
      out['composed'] = (queries, np.concatenate([targets, z_images[c['sources']]]))
    return out

  def relevance(self, task: str) -> np.ndarray | None:
    """[Q, N] relevance of a held-out set's task (every caption of an image; None: row i)."""
    owners = self.data.get('owners')
    if owners is None:
      return None
    rel = (np.arange(len(self.images))[:, None] == owners[None, :]).astype(np.float32)
    return rel if task == 'i2t' else rel.T

  def __call__(self, embedder) -> dict[str, float]:
    out = {}
    full = embedder.config.embed_dim
    for task, (q, c) in self.embeddings(embedder).items():
      rel = self.relevance(task)
      for dim in embedder.config.eval_dims:
        qd, cd = (q, c) if dim == full else (_normalise(q[:, :dim]), _normalise(c[:, :dim]))
        scores = qd @ cd.T
        values = (metrics_lib.from_ranks(metrics_lib.ranks_of_true(scores, np.arange(len(qd))),
                                         self.names) if rel is None
                  else metrics_lib.from_scores(scores, rel, self.names))
        prefix = f'{task}/' if dim == full else f'dim{dim}/{task}/'
        out.update({prefix + k: v for k, v in values.items()})
    if self.pairs is not None and getattr(self.pairs, 'skipped', 0):
      out['skipped_images'] = float(self.pairs.skipped)
    return out
