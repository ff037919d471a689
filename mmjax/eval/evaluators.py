"""Evaluators built from the config, run by the training loop and by `--mode=eval`.

`build_suite(config)` turns `config.eval` (the demo validation retrieval, named 'demo') and every
`config.evals.<name>` into one `Suite`. The primary evaluator (`config.eval.primary`, see
`specs.primary_name`) reports its metric keys without a prefix ('i2t/recall@1', ...), the others
as '<name>/...'. Each evaluator is a callable `embedder -> {metric: value}` with its own
cadence; the suite runs those that are due at a step (and all of them at the last step). Data
sets are built once, lazily, on first use.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Callable

import numpy as np

from mmjax import kinds
from mmjax.data import augment
from mmjax.eval import audio as audio_eval
from mmjax.eval import classification as cls_lib
from mmjax.eval import specs as specs_lib
from mmjax.data import sources
from mmjax.eval import clustering, grounding, llm_retrieval, mmeb, rerank, robustness
from mmjax.eval.retrieval import RetrievalEvaluator, format_table
from mmjax.types import Embedder

log = logging.getLogger(__name__)
# The directions of the printed table (text-text held-out sets read q2t / t2q).
PRIMARY_DIRECTIONS = ('i2t', 't2i', 'composed', 'q2t', 't2q', 'a2t', 't2a')


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
  kwargs = dict(names=spec['metrics'])
  if 'index_min_corpus' in spec:
    kwargs.update(index_min_corpus=spec['index_min_corpus'],
                  index_overrides=specs_lib.index_overrides(spec))
  if spec['dataset'] == 'demo_validation':
    return RetrievalEvaluator.demo_validation(spec['num_scenes'], image_size, spec['seed'],
                                              **kwargs)
  source = sources.make(sources.SourceSpec(name=spec['dataset'], path=spec['path'],
                                           tfds_name=spec['tfds_name'], split=spec['split'],
                                           image_key=spec['image_key'],
                                           captions_key=spec['captions_key']),
                        num_demo_examples=0, image_size=image_size, seed=0)
  return RetrievalEvaluator.from_source(source, spec['max_examples'], image_size, view,
                                        description=dataset_description(spec), **kwargs)


def dataset_description(spec: dict[str, Any]) -> str:
  """'records data/val' | 'tfds coco_captions:validation' of a records/TFDS spec."""
  if spec['dataset'] == 'tfds':
    return f"tfds {spec['tfds_name']}:{spec['split']}"
  return f"{spec['dataset']} {spec['path']}"


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
  if spec['type'] == 'audio_retrieval':
    return audio_eval.AudioRetrievalEvaluator(spec)
  if spec['type'] == 'audio_zero_shot':
    return audio_eval.AudioZeroShotEvaluator(spec)
  if spec['type'] == 'clustering':
    return clustering.ClusteringEvaluator(spec, image_size)
  if spec['type'] == 'grounding':
    return grounding.GroundingEvaluator(spec, image_size)
  if spec['type'] == 'mmeb':
    return mmeb.MMEBEvaluator(spec, image_size)
  if spec['type'] == 'llm_retrieval':
    pairs = None if spec['dataset'] == 'demo_validation' else retrieval_evaluator(
        spec, image_size, view)  # The held-out images, captions and owners.
    return llm_retrieval.LLMRetrievalEvaluator(spec, image_size, pairs)
  if spec['type'] == 'rerank':
    return rerank.RerankEvaluator(spec, image_size)
  return robustness.RobustnessEvaluator(spec, image_size)


@dataclasses.dataclass
class Named:
  name: str  # 'demo' (built from config.eval) or the config.evals.<name> key.
  every_steps: int
  spec: dict[str, Any]
  image_size: int
  view: Any = None  # mmjax.data.images.View of the run (None: centre crop).
  primary: bool = False  # The primary evaluator's keys carry no prefix.

  @functools.cached_property
  def evaluator(self):
    return make(self.spec, self.image_size, self.view)

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    out = self.evaluator(embedder)
    return {(k if self.primary else f'{self.name}/{k}'): v for k, v in out.items()}


class Suite:
  """The run's evaluators, the primary one first; `select(step, last)` gives the ones due at
  `step`."""

  def __init__(self, evaluators: list[Named]):
    self.evaluators = evaluators

  @property
  def primary_named(self) -> Named:
    return next(e for e in self.evaluators if e.primary)

  @property
  def primary(self) -> RetrievalEvaluator:
    return self.primary_named.evaluator

  @property
  def chance(self) -> dict[str, float]:
    """{'i2t/recall@1': ..., 't2i/recall@1': ...} of a random ranking on the primary set."""
    return self.primary.chance

  @property
  def chance_recall_at_1(self) -> float:
    return self.primary.chance_recall_at_1

  @property
  def images(self):
    return self.primary.images

  @property
  def captions(self) -> list[str]:
    return self.primary.captions

  def headline(self) -> dict[str, Any]:
    """What eval.json says about the primary evaluation set beside its metrics."""
    return {'primary': self.primary_named.name, 'primary_dataset': self.primary.description,
            'num_eval_pairs': len(self.captions), 'chance/recall@1': self.chance_recall_at_1,
            **{f'chance/{k}': v for k, v in self.chance.items()}}

  def with_prefixed_primary(self, metrics: dict[str, float]) -> dict[str, float]:
    """`metrics` plus a copy of the primary's under '<its name>/' (what eval.json holds), so a
    script reads e.g. 'held_out/i2t/recall@10' whichever evaluator is the primary."""
    others = {e.name for e in self.evaluators if not e.primary}
    name = self.primary_named.name
    return {**metrics, **{f'{name}/{k}': v for k, v in metrics.items()
                          if k.split('/')[0] not in others}}

  def title(self, step: int) -> str:
    """The printed table's title: which set, its size and chance level."""
    chance = self.chance
    if len(set(chance.values())) == 1:
      level = f'chance R@1 = {next(iter(chance.values())):.4f}'
    else:
      level = 'chance R@1 ' + ', '.join(f'{k.split("/")[0]} {v:.4f}' for k, v in chance.items())
    name = self.primary_named.name
    what = 'Validation retrieval' if name == specs_lib.DEMO else f'{name} retrieval'
    return f'{what} at step {step} ({self.primary.size_description}, {level}):'

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
  """The resolved spec of the model kind's demo evaluator, from the config.eval fields its type
  takes."""
  kind = kinds.get(config).primary_eval_type
  return specs_lib.resolved({'type': kind, **{k: config.eval[k] for k in specs_lib.DEFAULTS[kind]
                                              if k in config.eval}})


def build_suite(config) -> Suite:
  """The primary evaluator (`specs.primary_name`: config.eval.primary) first, then the others:
  'demo' (config.eval's fields) unless the primary is real data the run trains without the
  demo, and every `config.evals.<name>`."""
  size = config.model.image.image_size
  default_every = config.eval.every_steps
  primary = specs_lib.primary_name(config)
  view = augment.view(config.data, size)
  if primary == specs_lib.DEMO and not specs_lib.trains_on_demo(config):
    log.warning(
        'The primary evaluation is the demo validation scenes, but the run trains on other data: '
        "add a held-out split, e.g. config.evals.held_out = spec('retrieval', dataset='records', "
        "path=...), or set config.eval.primary (docs/eval.md).")
  named = {}
  if primary == specs_lib.DEMO or 'demo' in specs_lib.source_names(config):
    named[specs_lib.DEMO] = (default_every, primary_spec(config))
  evals = config.get('evals', None) or {}
  for name in sorted(evals.keys()):
    spec = specs_lib.resolved(evals[name])
    named[name] = (spec['every_steps'] or default_every, spec)
  order = [primary] + [n for n in named if n != primary]
  return Suite([Named(n, named[n][0], named[n][1], size, view, primary=n == primary)
                for n in order])


def format_results(metrics: dict[str, float], title: str = '') -> str:
  """The i2t/t2i table of the primary evaluator, then one line per named evaluator."""
  primary = {k: v for k, v in metrics.items() if k.split('/')[0] in PRIMARY_DIRECTIONS}
  lines = [format_table(primary, title=title)] if primary else []
  named: dict[str, list[str]] = {}
  for k, v in metrics.items():
    if k not in primary and '/' in k and '/per_class/' not in k:
      name, metric = k.split('/', 1)
      named.setdefault(name, []).append(f'{metric}={v:.4f}')
  lines += [f'{name}: {", ".join(values)}' for name, values in named.items()]
  return '\n'.join(lines)
