"""Evaluators built from the config, run by the training loop and by `--mode=eval`.

`build_suite(config)` turns `config.eval` (the validation retrieval eval, whose metric keys carry
no prefix: 'i2t/recall@1', ...) and every `config.evals.<name>` (keys '<name>/...') into one
`Suite`. Each evaluator is a callable `embedder -> {metric: value}` with its own cadence; the
suite runs those that are due at a step (and all of them at the last step). Data sets are built
once, lazily, on first use.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import numpy as np

from mmjax import kinds
from mmjax.data import augment
from mmjax.eval import classification as cls_lib
from mmjax.eval import specs as specs_lib
from mmjax.data import sources
from mmjax.eval import llm_retrieval, robustness
from mmjax.eval.retrieval import RetrievalEvaluator, format_table
from mmjax.types import Embedder



class ZeroShotEvaluator:
  """Zero-shot accuracy on one-object demo scenes (class prompts x templates)."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec = spec
    self.image_size = image_size
    self.templates = tuple(spec['templates']) or cls_lib.DEMO_TEMPLATES[spec['attribute']]

  @functools.cached_property
  def data(self):
    return cls_lib.demo_single_objects(self.spec['num_images'], self.image_size,
                                       self.spec['attribute'], self.spec['seed'])

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    images, labels, names = self.data
    class_emb = cls_lib.class_embeddings(embedder.embed_texts, names, self.templates)
    out = cls_lib.zero_shot_metrics(embedder.embed_images(images), labels, class_emb, names)
    return _select(out, self.spec['metrics'])


class LinearProbeEvaluator:
  """Few-shot ridge probe on frozen image embeddings of one-object demo scenes."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec = spec
    self.image_size = image_size

  @functools.cached_property
  def data(self):
    s = self.spec
    num_classes = len(cls_lib.DEMO_CLASSES[s['attribute']])
    images, labels, names = cls_lib.demo_single_objects(
        s['shots'] * num_classes + s['num_test'], self.image_size, s['attribute'], s['seed'])
    train = cls_lib.few_shot_indices(labels, s['shots'], s['seed'])
    test = np.setdiff1d(np.arange(len(labels)), train)
    return images, labels, names, train, test

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    images, labels, names, train, test = self.data
    z = embedder.embed_images(images)
    w = cls_lib.ridge_fit(z[train], labels[train], len(names), self.spec['l2'])
    out = cls_lib.accuracy_metrics(cls_lib.ridge_scores(w, z[test]), labels[test], names)
    return _select(out, self.spec['metrics'])


def _select(out: dict[str, float], wanted) -> dict[str, float]:
  return {k: v for k, v in out.items()
          if k in wanted or ('per_class' in wanted and k.startswith('per_class/'))}


def retrieval_evaluator(spec: dict[str, Any], image_size: int, view=None) -> RetrievalEvaluator:
  kwargs = dict(names=spec['metrics'], index_min_corpus=spec['index_min_corpus'],
                index_overrides=specs_lib.index_overrides(spec))
  if spec['dataset'] == 'demo_validation':
    return RetrievalEvaluator.demo_validation(spec['num_scenes'], image_size, spec['seed'],
                                              **kwargs)
  source = sources.make(sources.SourceSpec(name=spec['dataset'], path=spec['path'],
                                           tfds_name=spec['tfds_name'], split=spec['split'],
                                           image_key=spec['image_key'],
                                           captions_key=spec['captions_key']),
                        num_demo_examples=0, image_size=image_size, seed=0)
  return RetrievalEvaluator.from_source(source, spec['max_examples'], image_size, view, **kwargs)


def make(spec: dict[str, Any], image_size: int, view=None
         ) -> Callable[[Embedder], dict[str, float]]:
  """The evaluator of a resolved spec. `view`: how stored images are resized (the run's
  `config.data.resize`); the other evaluators render their images at image_size."""
  if spec['type'] == 'retrieval':
    return retrieval_evaluator(spec, image_size, view)
  if spec['type'] == 'zero_shot':
    return ZeroShotEvaluator(spec, image_size)
  if spec['type'] == 'linear_probe':
    return LinearProbeEvaluator(spec, image_size)
  if spec['type'] == 'llm_retrieval':
    return llm_retrieval.LLMRetrievalEvaluator(spec, image_size)
  return robustness.RobustnessEvaluator(spec, image_size)


@dataclasses.dataclass
class Named:
  name: str  # '' for the primary (config.eval) evaluator: its keys have no prefix.
  every_steps: int
  spec: dict[str, Any]
  image_size: int
  view: Any = None  # mmjax.data.images.View of the run (None: centre crop).

  @functools.cached_property
  def evaluator(self):
    return make(self.spec, self.image_size, self.view)

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    out = self.evaluator(embedder)
    return {(f'{self.name}/{k}' if self.name else k): v for k, v in out.items()}


class Suite:
  """The run's evaluators; `select(step, last)` gives the ones due at `step`."""

  def __init__(self, evaluators: list[Named]):
    self.evaluators = evaluators

  @property
  def primary(self) -> RetrievalEvaluator:
    return next(e for e in self.evaluators if not e.name).evaluator

  @property
  def chance_recall_at_1(self) -> float:
    return self.primary.chance_recall_at_1

  @property
  def images(self):
    return self.primary.images

  @property
  def captions(self) -> list[str]:
    return self.primary.captions

  def select(self, step: int, last: bool = False) -> Suite:
    return Suite([e for e in self.evaluators if last or step % e.every_steps == 0])

  def __bool__(self) -> bool:
    return bool(self.evaluators)

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    out = {}
    for e in self.evaluators:
      out.update(e(embedder))
    return out


def primary_spec(config) -> dict[str, Any]:
  """The resolved spec of the model kind's primary evaluator, from the config.eval fields its
  type takes."""
  kind = kinds.get(config).primary_eval_type
  return specs_lib.resolved({'type': kind, **{k: config.eval[k] for k in specs_lib.DEFAULTS[kind]
                                              if k in config.eval}})


def build_suite(config) -> Suite:
  """`config.eval` (primary validation retrieval) + every `config.evals.<name>`."""
  size = config.model.image.image_size
  default_every = config.eval.every_steps
  primary = primary_spec(config)
  view = augment.view(config.data, size)
  evaluators = [Named('', default_every, primary, size, view)]
  evals = config.get('evals', None) or {}
  for name in sorted(evals.keys()):
    spec = specs_lib.resolved(evals[name])
    evaluators.append(Named(name, spec['every_steps'] or default_every, spec, size, view))
  return Suite(evaluators)


def format_results(metrics: dict[str, float], title: str = '') -> str:
  """The i2t/t2i table of the primary evaluator, then one line per named evaluator."""
  primary = {k: v for k, v in metrics.items() if k.split('/')[0] in ('i2t', 't2i', 'composed')}
  lines = [format_table(primary, title=title)] if primary else []
  named: dict[str, list[str]] = {}
  for k, v in metrics.items():
    if k not in primary and '/' in k and '/per_class/' not in k:
      name, metric = k.split('/', 1)
      named.setdefault(name, []).append(f'{metric}={v:.4f}')
  lines += [f'{name}: {", ".join(values)}' for name, values in named.items()]
  return '\n'.join(lines)
