"""The clustering, grounding and MMEB-suite evaluators (mmjax.eval.clustering / grounding / mmeb):
exact on an oracle embedder, at chance on a random one, reachable from config.evals."""

from __future__ import annotations

import hashlib

import ml_collections
import numpy as np
import pytest

from configs import demo as demo_config
from mmjax import config as config_lib
from mmjax.data import demo
from mmjax.eval import clustering, evaluators, grounding, specs

SIZE = 32


def _key(x) -> str:
  return hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest()


def _random_vector(key: str, dim: int = 256) -> np.ndarray:
  return np.random.default_rng(int(key[:12], 16)).normal(size=dim)


class TableEmbedder:
  """Looks every input up in `table` (image pixels / text -> vector); unknown inputs get a
  random vector seeded by their content (the random embedder when `table` is empty)."""

  def __init__(self, table=None):
    self.table = table or {}

  def _get(self, key):
    return self.table.get(key, _random_vector(key))

  def embed_images(self, images):
    return np.stack([self._get(_key(x)) for x in images])

  def embed_texts(self, texts):
    return np.stack([self._get(hashlib.sha1(t.encode()).hexdigest()) for t in texts])


class RandomEmbedder:
  """I.i.d. Gaussian vectors for every input, whatever its content (repeated captions too)."""

  def __init__(self, seed=0):
    self.rng = np.random.default_rng(seed)

  def embed_images(self, images):
    return self.rng.normal(size=(len(images), 64))

  embed_texts = embed_images


def _attributes(obj: demo.SceneObject | None = None, words=()) -> np.ndarray:
  """One-hot colour | shape | size of an object, or of the words of an expression."""
  names = list(demo.COLOURS) + list(demo.SHAPES) + list(demo.SIZES)
  v = np.zeros(len(names))
  for w in ((obj.colour, obj.shape, obj.size) if obj is not None else words):
    if w in names:
      v[names.index(w)] = 1.0
  return v


def _spec(type_, **kw):
  return specs.resolved(specs.spec(type_, **kw))


@pytest.mark.parametrize('modality', ['image', 'text'])
def test_clustering_is_exact_on_an_oracle_and_at_chance_on_a_random_embedder(modality):
  ev = evaluators.make(_spec('clustering', attribute='colour', modality=modality,
                             num_images=200), SIZE)
  inputs, labels = ev.data
  keys = ([hashlib.sha1(t.encode()).hexdigest() for t in inputs] if modality == 'text'
          else [_key(x) for x in inputs])
  oracle = TableEmbedder({k: np.eye(10)[y] for k, y in zip(keys, labels)})
  out = ev(oracle)
  assert out['nmi'] == pytest.approx(1.0) and out['ari'] == pytest.approx(1.0)
  assert out['ami'] == pytest.approx(1.0)
  rand = ev(RandomEmbedder())
  assert abs(rand['ari']) < 0.03 and abs(rand['ami']) < 0.03, rand
  assert rand['nmi'] < 3 * rand['chance/nmi'] + 0.05, rand  # Uncorrected NMI: ~its chance.


def test_cluster_metrics_against_scikit_learn_and_a_permutation():
  labels = np.repeat(np.arange(3), 5)
  z = np.eye(3)[(labels + 1) % 3] + 1e-3 * np.random.default_rng(0).normal(size=(15, 3))
  out = clustering.cluster_metrics(z, labels, seed=0)
  assert out['nmi'] == pytest.approx(1.0) and out['ari'] == pytest.approx(1.0)  # Ids permuted.
  with pytest.raises(ValueError, match='15 embeddings for 14 labels'):
    clustering.cluster_metrics(z, labels[:14], seed=0)


def _grounding_oracle(gset, llm=False):
  table = {_key(c): _attributes(o) for c, o in zip(gset.crops, gset.crop_objects)}
  if not llm:
    for q in gset.queries:
      table[hashlib.sha1(f'{q.expression}.'.encode()).hexdigest()] = _attributes(
          words=q.expression.split())
  return table


def test_grounding_set_ground_truth():
  gset = grounding.make_set(40, SIZE, seed=0, num_distractors=3)
  assert gset.images.shape[1:] == (SIZE, SIZE, 3) and gset.crops.shape[1:] == (SIZE, SIZE, 3)
  for q in gset.queries:
    target = gset.crop_objects[q.candidates[0]]
    assert target == q.target and grounding.describes(q.expression, target)
    assert len(set(q.candidates)) == len(q.candidates)
    assert not any(grounding.describes(q.expression, gset.crop_objects[j])
                   for j in q.candidates[1:])  # The expression names one candidate only.
  assert grounding.expression(demo.SceneObject('star', 'red', 'small', 'top'),
                              [demo.SceneObject('star', 'red', 'large', 'left')]) == \
      'a small red star'
  assert grounding.expression(demo.SceneObject('star', 'red', 'small', 'top'),
                              [demo.SceneObject('star', 'red', 'small', 'left')]) is None


@pytest.mark.parametrize('crop,distractors', [('zoom', 0), ('isolate', 4)])
def test_grounding_is_exact_on_an_oracle_and_at_chance_on_a_random_embedder(crop, distractors):
  ev = evaluators.make(_spec('grounding', num_scenes=120, crop=crop,
                             num_distractors=distractors), SIZE)
  out = ev(TableEmbedder(_grounding_oracle(ev.data)))
  assert out['hit@1'] == 1.0 and out['same_colour/hit@1'] == 1.0
  assert 0 < out['same_colour/num_queries'] < out['num_queries']
  rand = ev(TableEmbedder())
  n = rand['num_queries']
  sigma = np.sqrt(rand['chance'] * (1 - rand['chance']) / n)
  assert abs(rand['hit@1'] - rand['chance']) < 4 * sigma, rand
  collapsed = TableEmbedder()
  collapsed._get = lambda key: np.ones(4)  # Every score tied: pessimistic ranks, hit@1 = 0.
  assert ev(collapsed)['hit@1'] == 0.0


class FakeLLMEmbedder:
  """The MultimodalEmbedder interface over a table keyed by (text, image pixels)."""

  class encoder:  # noqa: N801
    image_token = '<image>'

    @staticmethod
    def fit(instruction, content, num_images=0):
      return content

  instructions = type('I', (), {'query': {'i2t': '', 't2i': ''}, 'candidate': ''})()

  def __init__(self, table=None):
    self.table = table or {}

  def key(self, text, images):
    return hashlib.sha1((text + '|' + ','.join(_key(x) for x in images)).encode()).hexdigest()

  def embed(self, texts, images):
    return np.stack([self.table.get(self.key(t, x), _random_vector(self.key(t, x), 512))
                     for t, x in zip(texts, images)])

  def embed_queries(self, task, contents, images):  # The task's instruction: '<task>:'.
    return self.embed([f'{task}:{c}' for c in contents], images)

  def embed_candidates(self, contents, images):
    return self.embed(contents, images)

  def embed_images(self, images):
    return self.embed([self.encoder.image_token] * len(images), [[x] for x in images])


def test_grounding_with_an_llm_embedder_queries_image_and_expression():
  ev = evaluators.make(_spec('grounding', num_scenes=60), SIZE)
  fake = FakeLLMEmbedder()
  gset = ev.data
  for c, o in zip(gset.crops, gset.crop_objects):
    fake.table[fake.key('<image>', [c])] = _attributes(o)
  for q in gset.queries:
    text = f'{grounding.INSTRUCTION} <image> {q.expression}'
    fake.table[fake.key(text, [gset.images[q.image]])] = _attributes(words=q.expression.split())
  assert ev(fake)['hit@1'] == 1.0


def test_mmeb_suite_exact_on_an_oracle_and_at_chance_on_a_random_embedder():
  ev = evaluators.make(_spec('mmeb', num_scenes=60), SIZE)
  oracle = FakeLLMEmbedder()
  for meta, datasets in ev.tasks('<image>').items():
    for name, task in datasets.items():
      vectors = [oracle.table.setdefault(oracle.key(t, x), _random_vector(oracle.key(t, x), 512))
                 for t, x in task.candidates]
      for (t, x), target in zip(task.queries, task.targets):
        t = f'{task.query_task}:{t}' if task.query_task else t
        oracle.table[oracle.key(t, x)] = vectors[target]
  out = ev(oracle)
  hits = {k: v for k, v in out.items() if k.endswith('/hit@1')}
  assert {'classification/shape/hit@1', 'classification/colour/hit@1', 'vqa/colour/hit@1',
          'vqa/shape/hit@1', 'vqa/count/hit@1', 'retrieval/i2t/hit@1', 'retrieval/t2i/hit@1',
          'grounding/crops/hit@1', 'overall/hit@1', 'classification/hit@1', 'vqa/hit@1',
          'retrieval/hit@1', 'grounding/hit@1'} == set(hits)
  assert all(v == 1.0 for v in hits.values()), hits
  rand = ev(FakeLLMEmbedder())
  for k, chance in ((k, v) for k, v in rand.items() if k.startswith('chance/')):
    name = k[len('chance/'):] + '/hit@1'
    n = len(ev.grounding_set.queries) if 'grounding' in k else 60
    assert abs(rand[name] - chance) < 4 * np.sqrt(chance * (1 - chance) / n) + 1e-9, (k, rand)
  with pytest.raises(ValueError, match="type 'mmeb' is the LLM embedder's suite"):
    ev(TableEmbedder())


@pytest.mark.parametrize('fields,match', [
    (dict(type='clustering', modality='audio'), "modality='audio' is not one of"),
    (dict(type='clustering', metrics=('purity',)), 'each must be one of'),
    (dict(type='clustering', n_init=0), 'n_init=0 must be >= 1'),
    (dict(type='grounding', crop='box'), "crop='box' is not one of"),
    (dict(type='grounding', num_distractors=-1), 'num_distractors=-1 must be >= 0'),
    (dict(type='mmeb', tasks=('ocr',)), "tasks=\\('ocr',\\)"),
])
def test_bad_fields_are_named(fields, match):
  with pytest.raises(specs.SpecError, match=match):
    specs.resolved(ml_collections.ConfigDict(fields))


def test_mmeb_needs_the_llm_embedder_and_the_demo_config_validates():
  c = demo_config.get_config()
  config_lib.validate(c)
  assert {'cluster_shape', 'cluster_colour', 'grounding'} <= set(c.evals.keys())
  c.evals.suite = specs.spec('mmeb')
  with pytest.raises(config_lib.ConfigError, match="config.evals.suite: type 'mmeb' is the LLM"):
    config_lib.validate(c)
