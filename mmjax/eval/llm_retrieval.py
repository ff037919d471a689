"""Retrieval evaluation of the LLM embedder on the demo validation split.

Three tasks, each query carrying its task instruction: image->text ('i2t': the image, against
every caption), text->image ('t2i': the caption, against every image) and composed
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
  """`embedder` (a mmjax.embedder.MultimodalEmbedder) -> {'i2t/recall@1': ..., ...}."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec, self.image_size = spec, image_size
    self.names = tuple(spec['metrics'])
    metrics_lib.parse(self.names)

  @functools.cached_property
  def data(self) -> dict[str, Any]:
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

  def embeddings(self, embedder) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{task: (query embeddings [Q, d], candidate embeddings [N, d])}; row i of the
    candidates is query i's target."""
    d = self.data
    token = embedder.encoder.image_token
    images = [[x] for x in d['images']]
    no_images = [[] for _ in d['captions']]
    z_images = embedder.embed_candidates([token] * len(images), images)
    out = {'i2t': (embedder.embed_queries('i2t', [token] * len(images), images),
                   embedder.embed_candidates(d['captions'], no_images)),
           't2i': (embedder.embed_queries('t2i', d['captions'], no_images), z_images)}
    c = d['composed']
    if len(c['sources']):
      queries = embedder.embed_queries('composed', [f'{token} {t}' for t in c['texts']],
                                       [[d['images'][i]] for i in c['sources']])
      targets = embedder.embed_candidates([token] * len(c['targets']),
                                          [[x] for x in c['targets']])
      # The gallery: every target, then the reference images (distractors).
      out['composed'] = (queries, np.concatenate([targets, z_images[c['sources']]]))
    return out

  def __call__(self, embedder) -> dict[str, float]:
    out = {}
    full = embedder.config.embed_dim
    for task, (q, c) in self.embeddings(embedder).items():
      for dim in embedder.config.eval_dims:
        qd, cd = (q, c) if dim == full else (_normalise(q[:, :dim]), _normalise(c[:, :dim]))
        ranks = metrics_lib.ranks_of_true(qd @ cd.T, np.arange(len(qd)))
        prefix = f'{task}/' if dim == full else f'dim{dim}/{task}/'
        out.update({prefix + k: v for k, v in metrics_lib.from_ranks(ranks, self.names).items()})
    return out
