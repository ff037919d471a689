"""A small MMEB-style suite for the LLM embedder on the offline demo scenes.

MMEB (Jiang et al., 2024, "VLM2Vec") casts every task as ranking candidates for an instructed
query and reports hit@1 per dataset, grouped in four meta-tasks. Here each meta-task has demo
datasets with exact answers:

- classification: a one-object scene -> its shape among the 8 shape names, its colour among the
  10 colour names ('classification/shape', 'classification/colour');
- vqa: a validation scene + a question with one answer among the answers of its kind ("What
  colour is the star at the top left?" -> 10 colours; "What shape is at the top left?" -> 8
  shapes; "How many shapes are there?" -> one..four);
- retrieval: image -> caption and caption -> image over the demo validation set ('i2t', 't2i',
  with the instructions the model was trained with);
- grounding: image + referring expression -> the object's region crop (`mmjax.eval.grounding`).

Metrics: '<meta>/<dataset>/hit@1', '<meta>/hit@1' (the mean of its datasets, as MMEB averages)
and 'overall/hit@1' (the mean of the meta-tasks), plus 'chance/<meta>/<dataset>'. Queries carry
an MMEB-style instruction; candidates get the model's candidate instruction.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from mmjax.data import demo
from mmjax.eval import classification as cls_lib, grounding, metrics as metrics_lib

INSTRUCTIONS = {
    'shape': 'Represent the given image for classification of its shape:',
    'colour': 'Represent the given image for classification of its colour:',
    'vqa': 'Represent the given image with the following question:',
    'grounding': grounding.INSTRUCTION,
}
COUNT_WORDS = ('one', 'two', 'three', 'four')


@dataclasses.dataclass
class Task:
  """Ranked retrieval with one right candidate per query. A query is (text, images); `query_task`
  set: text is the content of the embedder's own trained task instruction (embed_queries)."""

  queries: list  # [(text with image placeholders, [images])]
  candidates: list  # [(text, [images])]
  targets: np.ndarray  # [Q] index of each query's right candidate.
  query_task: str = ''


def _classification(attribute: str, num: int, size: int, seed: int, token: str) -> Task:
  images, labels, names = cls_lib.demo_single_objects(num, size, attribute, seed)
  queries = [(f'{INSTRUCTIONS[attribute]} {token}', [x]) for x in images]
  return Task(queries, [(n, []) for n in names], np.asarray(labels))


def _vqa(scenes: list, images: np.ndarray, rng: np.random.Generator, token: str
         ) -> dict[str, Task]:
  """Three question kinds per scene, each about one of its objects picked by `rng`."""
  kinds = {'colour': list(demo.COLOURS), 'shape': list(demo.SHAPES), 'count': list(COUNT_WORDS)}
  qs: dict[str, list] = {k: [] for k in kinds}
  answers: dict[str, list] = {k: [] for k in kinds}
  for scene, image in zip(scenes, images):
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    where = demo.POSITION_PHRASES[obj.position][0]
    for kind, question, answer in (
        ('colour', f'What colour is the {obj.shape} {where}?', obj.colour),
        ('shape', f'What shape is {where}?', obj.shape),
        ('count', 'How many shapes are there?', COUNT_WORDS[len(scene.objects) - 1])):
      qs[kind].append((f'{INSTRUCTIONS["vqa"]} {token} {question}', [image]))
      answers[kind].append(kinds[kind].index(answer))
  return {k: Task(qs[k], [(a, []) for a in kinds[k]], np.asarray(answers[k])) for k in kinds}


def _retrieval(data: dict, token: str) -> dict[str, Task]:
  images, captions = data['images'], data['captions']
  n = np.arange(len(captions))
  return {'i2t': Task([(token, [x]) for x in images], [(c, []) for c in captions], n, 'i2t'),
          't2i': Task([(c, []) for c in captions], [(token, [x]) for x in images], n, 't2i')}


def _grounding(gset: grounding.GroundingSet, token: str) -> dict[str, Task]:
  """One candidate list for all queries is not MMEB's protocol (each query ranks its own
  crops), so the grounding task keeps the per-query candidates of `gset` (`hit_at_1`)."""
  queries = [(f'{INSTRUCTIONS["grounding"]} {token} {q.expression}', [gset.images[q.image]])
             for q in gset.queries]
  return {'crops': Task(queries, [(token, [c]) for c in gset.crops],
                        np.asarray([q.candidates[0] for q in gset.queries]))}


class MMEBEvaluator:
  """`config.evals` type 'mmeb': `embedder` (a MultimodalEmbedder) -> hit@1 per dataset."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec, self.image_size = spec, image_size

  @functools.cached_property
  def grounding_set(self) -> grounding.GroundingSet:
    s = self.spec
    return grounding.make_set(s['num_scenes'], self.image_size, s['seed'], s['num_distractors'])

  @functools.lru_cache(maxsize=2)
  def tasks(self, token: str) -> dict[str, dict[str, Task]]:
    """{meta-task: {dataset: Task}} of the spec's meta-tasks (image placeholder `token`)."""
    s, size = self.spec, self.image_size
    out: dict[str, dict[str, Task]] = {}
    if 'classification' in s['tasks']:
      out['classification'] = {a: _classification(a, s['num_scenes'], size, s['seed'], token)
                               for a in cls_lib.DEMO_CLASSES}
    if 'vqa' in s['tasks'] or 'retrieval' in s['tasks']:
      data = demo.make_eval_set(num_scenes=s['num_scenes'], image_size=size, seed=s['seed'])
      if 'vqa' in s['tasks']:
        scenes = [_scene(k) for k in data['scene_keys']]
        out['vqa'] = _vqa(scenes, data['images'], np.random.default_rng([s['seed'], 7]), token)
      if 'retrieval' in s['tasks']:
        out['retrieval'] = _retrieval(data, token)
    if 'grounding' in s['tasks']:
      out['grounding'] = _grounding(self.grounding_set, token)
    return out

  def _embed(self, embedder, task: Task) -> tuple[np.ndarray, np.ndarray]:
    enc, ins = embedder.encoder, embedder.instructions
    texts, images = zip(*task.queries)
    if task.query_task:  # Long captions are cut at a word boundary, as in llm_retrieval.
      texts = [enc.fit(ins.query[task.query_task], t, len(x)) for t, x in zip(texts, images)]
      q = embedder.embed_queries(task.query_task, list(texts), list(images))
    else:
      q = embedder.embed(list(texts), list(images))
    ctexts, cimages = zip(*task.candidates)
    ctexts = [enc.fit(ins.candidate, t, len(x)) for t, x in zip(ctexts, cimages)]
    return (np.asarray(q, np.float64),
            np.asarray(embedder.embed_candidates(list(ctexts), list(cimages)), np.float64))

  def __call__(self, embedder) -> dict[str, float]:
    if not hasattr(embedder, 'embed_queries'):
      raise ValueError("config.evals type 'mmeb' is the LLM embedder's suite "
                       "(model.kind='llm_embedder'); a dual encoder cannot form image+text "
                       "queries (use the 'grounding' / 'zero_shot' / 'retrieval' evaluators).")
    out, metas = {}, {}
    for meta, datasets in self.tasks(embedder.encoder.image_token).items():
      values = []
      for name, task in datasets.items():
        q, c = self._embed(embedder, task)
        if meta == 'grounding':
          r = grounding.hit_at_1(q, c, self.grounding_set.queries)
          hit, chance = r['hit@1'], r['chance']
        else:
          ranks = metrics_lib.ranks_of_true(q @ c.T, task.targets)
          hit, chance = float(np.mean(ranks == 1)), 1.0 / len(task.candidates)
        out[f'{meta}/{name}/hit@1'], out[f'chance/{meta}/{name}'] = hit, chance
        values.append(hit)
      metas[meta] = float(np.mean(values))
      out[f'{meta}/hit@1'] = metas[meta]
    out['overall/hit@1'] = float(np.mean(list(metas.values())))
    return out


def _scene(key: str) -> demo.Scene:
  """The scene of a canonical key ('bg|pos,size,colour,shape;...', `Scene.key`)."""
  background, objs = key.split('|')
  return demo.Scene(background, tuple(demo.SceneObject(shape=o[3], colour=o[2], size=o[1],
                                                       position=o[0])
                                      for o in (x.split(',') for x in objs.split(';'))))
