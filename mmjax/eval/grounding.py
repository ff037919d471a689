"""Visual grounding in the MMEB sense: an image plus a referring expression -> the right region
crop among candidates, scored by hit@1.

MMEB (Jiang et al., 2024: RefCOCO, Visual7W-pointing, ...) asks a model to embed an image and a
referring expression ("the small red star") and to rank crops of regions by similarity. The demo
scenes give exact ground truth: every object sits in one cell of a 3x3 grid and the renderer
keeps it inside its cell, so a cell of the image *is* the object's region.

Each validation scene with two or more objects is rendered at 3x the model's image size, so a
cell is exactly `image_size` pixels and needs no resampling; the query image is the same
rendering box-downsampled to `image_size`. For every object that a short expression identifies
within its scene (colour + shape, plus size when another object shares both; objects with an
identical twin are left out) the candidates are the crops of every object of the scene and
`num_distractors` crops of other scenes' objects that the expression does not describe.
With `crop='isolate'` a candidate is instead the scene re-rendered with that object alone in
its cell (the same layout the towers were trained on, without the zoom).

The query: with an LLM embedder (`embed_queries`) the image and the expression together, under
an MMEB-style instruction; a dual encoder has no way to form an image+text query, so its query
is the expression alone ("a small red star.") against the crops. Ties rank pessimistically, so a
collapsed model scores chance (`chance`: the mean of 1 / candidates). 'same_colour/...' repeats
the figures on the queries whose target shares its colour with another candidate, which colour
alone cannot answer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from mmjax.data import demo
from mmjax.eval import metrics as metrics_lib
from mmjax.types import Embedder

CROPS = ('zoom', 'isolate')
INSTRUCTION = 'Select the portion of the image that isolates the object described:'
_SALT = 0x67726E64  # "grnd"


@dataclasses.dataclass(frozen=True)
class Query:
  image: int  # Index into GroundingSet.images.
  expression: str  # "a small red star"
  candidates: tuple[int, ...]  # Indices into GroundingSet.crops; the first is the target.
  target: demo.SceneObject


@dataclasses.dataclass
class GroundingSet:
  images: np.ndarray  # uint8 [S, size, size, 3]: the query scenes.
  crops: np.ndarray  # uint8 [C, size, size, 3]: every object's region.
  crop_objects: list  # [C] the SceneObject each crop shows.
  queries: list  # [Q] Query


def expression(obj: demo.SceneObject, others: list) -> str | None:
  """The shortest 'a [size] colour shape' naming `obj` among `others`; None if a twin exists."""
  same = [o for o in others if (o.colour, o.shape) == (obj.colour, obj.shape)]
  if not same:
    return f'a {obj.colour} {obj.shape}'
  if all(o.size != obj.size for o in same):
    return f'a {obj.size} {obj.colour} {obj.shape}'
  return None


def describes(expr: str, obj: demo.SceneObject) -> bool:
  """Whether `expr` (from `expression`) fits `obj`."""
  words = expr.split()[1:]
  return (words[-2:] == [obj.colour, obj.shape]) and (len(words) == 2 or words[0] == obj.size)


def _cell(image: np.ndarray, position: str, size: int) -> np.ndarray:
  row, col = divmod(demo.POSITIONS.index(position), 3)
  return image[row * size:(row + 1) * size, col * size:(col + 1) * size]


def _downsample(image: np.ndarray, factor: int) -> np.ndarray:
  h, w, c = image.shape
  x = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float32)
  return np.round(x.mean(axis=(1, 3))).astype(np.uint8)


def make_set(num_scenes: int, image_size: int, seed: int, num_distractors: int = 0,
             crop: str = 'zoom') -> GroundingSet:
  """The grounding queries of `num_scenes` distinct validation scenes with >= 2 objects."""
  if crop not in CROPS:
    raise ValueError(f'crop={crop!r} is not one of {CROPS}.')
  rng = np.random.default_rng([_SALT, seed])
  images, crops, objects, per_scene, used = [], [], [], [], set()
  while len(images) < num_scenes:
    scene = demo.sample_scene_in('validation', rng)
    if len(scene.objects) < 2 or scene.key() in used:
      continue
    used.add(scene.key())
    big = demo.render(scene, 3 * image_size, rng)
    images.append(_downsample(big, 3))
    ids = []
    for obj in scene.objects:
      ids.append(len(crops))
      crops.append(_cell(big, obj.position, image_size) if crop == 'zoom' else
                   demo.render(demo.Scene(scene.background, (obj,)), image_size, rng))
      objects.append(obj)
    per_scene.append(ids)
  queries = []
  for s, ids in enumerate(per_scene):
    for i in ids:
      expr = expression(objects[i], [objects[j] for j in ids if j != i])
      if expr is None:
        continue
      others = [j for j in ids if j != i]
      pool = [j for j in rng.permutation(len(crops)) if j not in ids
              and not describes(expr, objects[j])]
      queries.append(Query(s, expr, (i, *others, *pool[:num_distractors]), objects[i]))
  return GroundingSet(np.stack(images), np.stack(crops), objects, queries)


def hit_at_1(query_emb: np.ndarray, crop_emb: np.ndarray, queries: list) -> dict[str, float]:
  """hit@1 over each query's own candidates (the target first in `candidates`), ties
  pessimistic, and its chance level."""
  width = max(len(q.candidates) for q in queries)
  scores = np.full((len(queries), width), -np.inf)
  for r, q in enumerate(queries):
    scores[r, :len(q.candidates)] = crop_emb[list(q.candidates)] @ query_emb[r]
  ranks = metrics_lib.ranks_of_true(scores, np.zeros(len(queries), np.int64))
  return {'hit@1': float(np.mean(ranks == 1)),
          'chance': float(np.mean([1.0 / len(q.candidates) for q in queries]))}


class GroundingEvaluator:
  """`config.evals` type 'grounding' on the demo validation scenes (module docstring)."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec, self.image_size = spec, image_size

  @functools.cached_property
  def data(self) -> GroundingSet:
    s = self.spec
    return make_set(s['num_scenes'], self.image_size, s['seed'], s['num_distractors'], s['crop'])

  def query_embeddings(self, embedder) -> np.ndarray:
    d = self.data
    if hasattr(embedder, 'embed_queries'):  # The LLM embedder: image + expression.
      token = embedder.encoder.image_token
      return embedder.embed([f'{INSTRUCTION} {token} {q.expression}' for q in d.queries],
                            [[d.images[q.image]] for q in d.queries])
    return embedder.embed_texts([f'{q.expression}.' for q in d.queries])

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    d = self.data
    q = np.asarray(self.query_embeddings(embedder), np.float64)
    c = np.asarray(embedder.embed_images(d.crops), np.float64)
    out = hit_at_1(q, c, d.queries)
    out['num_queries'] = float(len(d.queries))
    # The queries colour alone cannot answer: another candidate has the target's colour.
    hard = [r for r, x in enumerate(d.queries) if any(
        d.crop_objects[j].colour == x.target.colour for j in x.candidates[1:])]
    if hard:
      sub = hit_at_1(q[hard], c, [d.queries[r] for r in hard])
      out.update({'same_colour/hit@1': sub['hit@1'], 'same_colour/chance': sub['chance'],
                  'same_colour/num_queries': float(len(hard))})
    return out
