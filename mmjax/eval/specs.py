"""Evaluator specs: the fields of each `config.evals.<name>` entry, their defaults and checks.

Kept free of JAX imports so config files can build specs (`spec('zero_shot', attribute='colour')`)
cheaply. Every spec has `type` and `every_steps` (0: `config.eval.every_steps`); the other fields
depend on the type and are listed, with defaults, in `DEFAULTS`. The evaluators themselves live
in `mmjax.eval.evaluators`.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from mmjax.eval import metrics as metrics_lib

RETRIEVAL_METRICS = ('recall@1', 'recall@5', 'recall@10', 'mrr', 'median_rank')
CLASSIFICATION_METRICS = ('top1', 'top5', 'mean_per_class', 'per_class')
CORRUPTIONS = ('gaussian_noise', 'blur', 'jpeg', 'brightness', 'contrast', 'rotation', 'crop')
TEXT_PERTURBATIONS = ('typos', 'word_drop', 'shuffle', 'attribute_swap')

CLUSTERING_METRICS = ('nmi', 'ari', 'ami')
CLUSTERING_MODALITIES = ('image', 'text')
GROUNDING_CROPS = ('zoom', 'isolate')
MMEB_TASKS = ('classification', 'vqa', 'retrieval', 'grounding')
COMMON = {'type': '', 'every_steps': 0}
DEFAULTS: dict[str, dict[str, Any]] = {
    # Image-text retrieval on demo validation scenes (half in one-attribute near-duplicate pairs),
    # or on the first max_examples of an ingested dataset (dataset='records', path=the `prepare
    # --out` directory) or a TFDS split (dataset='tfds', tfds_name, split, data_dir=path, feature
    # keys image_key / captions_key), every caption of each image (text-text data: q2t / t2q).
    # Corpora of index_min_corpus items or more are searched with a ScaNN index; its
    # num_leaves / num_leaves_to_search / reorder come from the corpus size where 0.
    'retrieval': {'dataset': 'demo_validation', 'num_scenes': 1000, 'seed': 1234,
                  'path': '', 'tfds_name': '', 'split': 'validation', 'max_examples': 5000,
                  'image_key': 'image', 'captions_key': 'captions',
                  'metrics': RETRIEVAL_METRICS, 'index_min_corpus': 100_000,
                  'index_num_leaves': 0, 'index_num_leaves_to_search': 0, 'index_reorder': 0},
    # Zero-shot classification of one-object demo scenes by `attribute` (shape | colour); empty
    # templates use mmjax.eval.classification.DEMO_TEMPLATES[attribute].
    'zero_shot': {'dataset': 'demo_single_objects', 'attribute': 'shape', 'num_images': 400,
                  'seed': 4321, 'templates': (), 'metrics': CLASSIFICATION_METRICS},
    # Few-shot linear probe (closed-form ridge) on frozen image embeddings of the same task:
    # `shots` training images per class, tested on `num_test` others.
    'linear_probe': {'dataset': 'demo_single_objects', 'attribute': 'shape', 'shots': 10,
                     'num_test': 400, 'l2': 1e-2, 'seed': 4322,
                     'metrics': CLASSIFICATION_METRICS},
    # Retrieval under image corruptions and caption perturbations at severities 1..5, plus the
    # compositionality check (true caption vs two attributes swapped).
    'robustness': {'dataset': 'demo_validation', 'num_scenes': 200, 'seed': 1234,
                   'metrics': ('recall@1', 'recall@5'), 'corruptions': CORRUPTIONS,
                   'text_perturbations': TEXT_PERTURBATIONS, 'severities': (1, 2, 3, 4, 5)},
    # The LLM embedder's i2t, t2i and composed (image + edit -> edited image) retrieval with
    # task instructions, at every Matryoshka dimension (mmjax.eval.llm_retrieval). On ingested
    # records or a TFDS split (the same dataset fields as 'retrieval'): i2t and t2i only.
    'llm_retrieval': {'dataset': 'demo_validation', 'num_scenes': 1000, 'seed': 1234,
                      'num_composed': 500, 'path': '', 'tfds_name': '', 'split': 'validation',
                      'max_examples': 5000, 'image_key': 'image', 'captions_key': 'captions',
                      'metrics': RETRIEVAL_METRICS},
    # Audio-text models (model.kind='audio_text', mmjax.eval.audio): a2t / t2a retrieval on
    # num_clips synthetic validation clips with distinct captions, or on the first max_examples
    # clips of ingested audio records (dataset='records', path=...).
    'audio_retrieval': {'dataset': 'synthetic', 'num_clips': 500, 'seed': 1234, 'max_events': 2,
                        'path': '', 'max_examples': 5000, 'metrics': RETRIEVAL_METRICS},
    # Zero-shot classification of one-event synthetic clips by `attribute` (kind | pitch |
    # length); class prompts are the captions of every one-event clip of the class.
    'audio_zero_shot': {'dataset': 'synthetic', 'attribute': 'kind', 'num_clips': 300,
                        'seed': 4321, 'metrics': CLASSIFICATION_METRICS},
    # k-means (one cluster per class) on the embeddings of one-object demo scenes labelled by
    # `attribute`, as images or their captions (`modality`); NMI, ARI, AMI (mmjax.eval.clustering).
    'clustering': {'dataset': 'demo_single_objects', 'attribute': 'shape', 'modality': 'image',
                   'num_images': 400, 'seed': 4323, 'n_init': 10, 'metrics': CLUSTERING_METRICS},
    # MMEB-style grounding: image + referring expression -> the object's region crop among the
    # scene's other objects and `num_distractors` crops of other scenes; hit@1
    # (mmjax.eval.grounding). crop: 'zoom' (the object's grid cell) | 'isolate' (re-rendered alone).
    'grounding': {'dataset': 'demo_validation', 'num_scenes': 300, 'seed': 4324,
                  'num_distractors': 0, 'crop': 'zoom'},
    # The LLM embedder's MMEB-style suite on the demo scenes: classification, VQA-as-retrieval,
    # retrieval and grounding meta-tasks, hit@1 each (mmjax.eval.mmeb).
    'mmeb': {'dataset': 'demo_validation', 'num_scenes': 200, 'seed': 4325,
             'tasks': MMEB_TASKS, 'num_distractors': 0},
    # Two-stage retrieval (mmjax.eval.rerank, docs/objectives.md): the embeddings' exact top-k,
    # re-scored by the ITM head (needs config.model.itm); R@1 with and without re-ranking, on
    # all queries and on the near-duplicate pairs, the ITM's compositionality, and the cost.
    'rerank': {'dataset': 'demo_validation', 'num_scenes': 1000, 'seed': 1234, 'k': 10},
}
DATASETS = {'retrieval': ('demo_validation', 'records', 'tfds'), 'robustness': ('demo_validation',),
            'audio_retrieval': ('synthetic', 'records'), 'audio_zero_shot': ('synthetic',),
            'clustering': ('demo_single_objects',), 'grounding': ('demo_validation',),
            'mmeb': ('demo_validation',),
            'rerank': ('demo_validation',),
            'llm_retrieval': ('demo_validation', 'records', 'tfds'),
            'zero_shot': ('demo_single_objects',), 'linear_probe': ('demo_single_objects',)}
ATTRIBUTES = ('shape', 'colour')
AUDIO_ATTRIBUTES = ('kind', 'pitch', 'length')
# The name of the evaluator built from the config.eval fields (the model kind's retrieval on the
# demo validation scenes); config.evals cannot use it.
DEMO = 'demo'
HELD_OUT_DATASETS = ('records', 'tfds')  # An evaluator on these is a held-out split of real data.
INDEX_FIELDS = ('index_num_leaves', 'index_num_leaves_to_search', 'index_reorder')


def index_overrides(spec: dict[str, Any]) -> dict[str, int]:
  """The ScaNN parameters a retrieval spec sets (non-zero index_* fields), for
  `ScannIndex.build(overrides=...)`."""
  return {key[len('index_'):]: spec[key] for key in INDEX_FIELDS if spec.get(key)}


class SpecError(ValueError):
  """A `config.evals.<name>` entry that cannot run (turned into a ConfigError by validate)."""


def spec(type_: str, **fields) -> ml_collections.ConfigDict:
  """A complete spec of `type_` (every field present, so `--config.evals.X.field=` works)."""
  if type_ not in DEFAULTS:
    raise SpecError(f'Unknown evaluator type {type_!r}; known: {", ".join(DEFAULTS)}.')
  d = {**COMMON, 'type': type_, **DEFAULTS[type_]}
  unknown = set(fields) - set(d)
  if unknown:
    raise SpecError(f'Unknown fields {sorted(unknown)} for an evaluator of type {type_!r}; '
                    f'known: {sorted(d)}.')
  d.update(fields)
  return ml_collections.ConfigDict(d)


def resolved(entry) -> dict[str, Any]:
  """The entry with defaults filled in and every field checked; raises SpecError."""
  entry = dict(entry)
  type_ = entry.get('type')
  if type_ not in DEFAULTS:
    raise SpecError(f'type={type_!r} is not one of {", ".join(map(repr, DEFAULTS))}.')
  out = {**COMMON, **DEFAULTS[type_]}
  for key, value in entry.items():
    if key not in out:
      raise SpecError(f'unknown field {key}={value!r} for type {type_!r}; known: '
                      f'{", ".join(sorted(out))}.')
    ref = out[key]
    if isinstance(ref, tuple):
      if not isinstance(value, (tuple, list)):
        raise SpecError(f'{key}={value!r} must be a list/tuple.')
      value = tuple(value)
    elif isinstance(ref, float):
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f'{key}={value!r} must be a number.')
    elif not isinstance(value, type(ref)) or isinstance(value, bool) != isinstance(ref, bool):
      raise SpecError(f'{key}={value!r} has type {type(value).__name__}, expected '
                      f'{type(ref).__name__}.')
    out[key] = value
  _check_values(out)
  return out


def _check_values(s: dict[str, Any]) -> None:

  if s['every_steps'] < 0:
    raise SpecError(f'every_steps={s["every_steps"]} must be >= 0 (0: config.eval.every_steps).')
  if s['dataset'] not in DATASETS[s['type']]:
    raise SpecError(f'dataset={s["dataset"]!r} is not one of {DATASETS[s["type"]]} for type '
                    f'{s["type"]!r}.')
  if s['dataset'] == 'records' and not s['path']:
    raise SpecError("dataset='records' needs path= (the `python -m mmjax.data.prepare --out` "
                    'directory).')
  if s['dataset'] == 'tfds' and not s['tfds_name']:
    raise SpecError("dataset='tfds' needs tfds_name=.")
  for key in ('num_scenes', 'num_images', 'num_test', 'shots', 'index_min_corpus',
              'max_examples', 'num_composed', 'num_clips', 'max_events', 'k'):
    if key in s and s[key] < 1:
      raise SpecError(f'{key}={s[key]} must be >= 1.')
  for key in INDEX_FIELDS:
    if key in s and s[key] < 0:
      raise SpecError(f'{key}={s[key]} must be >= 0 (0: derived from the corpus size).')
  if s['type'] == 'rerank':
    return
  if s['type'] in ('retrieval', 'robustness', 'llm_retrieval', 'audio_retrieval'):
    try:
      metrics_lib.parse(s['metrics'])
    except ValueError as e:
      raise SpecError(f'metrics={s["metrics"]!r}: {e}') from e
  elif s['type'] in ('grounding', 'mmeb'):
    _check_grounding(s)
  elif s['type'] == 'clustering':
    _check_clustering(s)
  else:
    bad = [m for m in s['metrics'] if m not in CLASSIFICATION_METRICS]
    if bad:
      raise SpecError(f'metrics {bad} are not among {CLASSIFICATION_METRICS}.')
    allowed = AUDIO_ATTRIBUTES if s['type'] == 'audio_zero_shot' else ATTRIBUTES
    if s['attribute'] not in allowed:
      raise SpecError(f'attribute={s["attribute"]!r} is not one of {allowed}.')
  if s['type'] == 'zero_shot' and any('{}' not in t for t in s['templates']):
    raise SpecError(f'templates={s["templates"]!r}: each must hold "{{}}" for the class name.')
  if s['type'] == 'linear_probe' and s['l2'] < 0:
    raise SpecError(f'l2={s["l2"]} must be >= 0.')
  if s['type'] == 'robustness':
    for key, allowed in (('corruptions', CORRUPTIONS), ('text_perturbations', TEXT_PERTURBATIONS)):
      bad = [x for x in s[key] if x not in allowed]
      if bad:
        raise SpecError(f'{key}: unknown {bad}; known: {allowed}.')
    if not s['severities'] or any(not 1 <= v <= 5 for v in s['severities']):
      raise SpecError(f'severities={s["severities"]!r} must be a non-empty subset of 1..5.')


def _check_clustering(s: dict[str, Any]) -> None:
  bad = [m for m in s['metrics'] if m not in CLUSTERING_METRICS]
  if bad or not s['metrics']:
    raise SpecError(f'metrics={s["metrics"]!r}: each must be one of {CLUSTERING_METRICS}.')
  if s['attribute'] not in ATTRIBUTES:
    raise SpecError(f'attribute={s["attribute"]!r} is not one of {ATTRIBUTES}.')
  if s['modality'] not in CLUSTERING_MODALITIES:
    raise SpecError(f'modality={s["modality"]!r} is not one of {CLUSTERING_MODALITIES}.')
  if s['n_init'] < 1:
    raise SpecError(f'n_init={s["n_init"]} must be >= 1.')


def _check_grounding(s: dict[str, Any]) -> None:
  if s['num_distractors'] < 0:
    raise SpecError(f'num_distractors={s["num_distractors"]} must be >= 0.')
  if s['type'] == 'grounding' and s['crop'] not in GROUNDING_CROPS:
    raise SpecError(f'crop={s["crop"]!r} is not one of {GROUNDING_CROPS}.')
  if s['type'] == 'mmeb':
    bad = [t for t in s['tasks'] if t not in MMEB_TASKS]
    if bad or not s['tasks']:
      raise SpecError(f'tasks={s["tasks"]!r}: a non-empty subset of {MMEB_TASKS}.')


def validate(config) -> None:
  """Checks every `config.evals.<name>`; raises SpecError naming the entry."""
  evals = config.get('evals', None) or {}
  for name in evals.keys():
    if name == DEMO:
      raise SpecError(f'config.evals.{DEMO}: the name {DEMO!r} is the evaluator built from '
                      'config.eval (the demo validation scenes); choose another name.')
    if not name.isidentifier():
      raise SpecError(f'config.evals.{name}: evaluator names must be identifiers.')
    entry = evals[name]
    if not isinstance(entry, (dict, ml_collections.ConfigDict)):
      raise SpecError(f'config.evals.{name}={entry!r} must be a group of fields (use '
                      'mmjax.eval.specs.spec(type, ...)).')
    try:
      spec_ = resolved(entry)
    except SpecError as e:
      raise SpecError(f'config.evals.{name}: {e}') from e
    kind = config.model.get('kind', 'two_tower')
    if spec_['type'] == 'mmeb' and kind != 'llm_embedder':
      raise SpecError(f"config.evals.{name}: type 'mmeb' is the LLM embedder's suite "
                      f"(model.kind='llm_embedder'), this run's model.kind is {kind!r}; a dual "
                      "encoder has 'grounding', 'zero_shot' and 'retrieval'.")


def source_names(config) -> list[str]:
  """The kinds ('demo', 'records', 'tfds') of the run's training sources."""
  data = config.data
  return [dict(m).get('name', 'demo') for m in data.mixture] or [data.name]


def trains_on_demo(config) -> bool:
  """Whether every training source of the run is the demo scenes."""
  return all(n == 'demo' for n in source_names(config))


def held_out_names(config) -> list[str]:
  """The config.evals entries that evaluate retrieval on a held-out split of real data
  (dataset 'records' or 'tfds'), sorted."""
  evals = config.get('evals', None) or {}
  return sorted(n for n in evals.keys() if evals[n].get('dataset') in HELD_OUT_DATASETS
                and evals[n].get('type') in ('retrieval', 'llm_retrieval', 'audio_retrieval'))


def available_names(config) -> list[str]:
  """What config.eval.primary may name: 'demo' and every config.evals entry."""
  return [DEMO] + sorted((config.get('evals', None) or {}).keys())


def primary_name(config) -> str:
  """The evaluator whose results are the headline (the printed table, eval.json's top-level
  keys, the chance level): config.eval.primary, or when that is '' the demo scenes if the run
  trains on the demo, else its one held-out evaluator on records/TFDS (the demo scenes when it
  has none). Raises SpecError for an unknown name or an ambiguous choice."""
  name = config.eval.get('primary', '')
  available = available_names(config)
  if name:
    if name not in available:
      raise SpecError(f'config.eval.primary={name!r} is not an evaluator of this run; available: '
                      f'{", ".join(map(repr, available))} ({DEMO!r}: the demo validation scenes '
                      'of config.eval; the others: config.evals.<name>).')
    return name
  if trains_on_demo(config):
    return DEMO
  held = held_out_names(config)
  if len(held) > 1:
    raise SpecError(f'config.eval.primary is empty and the run has several held-out evaluators '
                    f'({", ".join(map(repr, held))}); set config.eval.primary to the one whose '
                    'results are the headline.')
  return held[0] if held else DEMO
