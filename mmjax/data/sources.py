"""Random-access sources, each yielding the same element layout to the transforms.

Every source returns, for index i, a dict:
  image       encoded bytes | uint8 [H, W, 3] | None (text-text pairs)
  query       str | None      the query of a text-text pair
  captions    list[str]       >= 1
  group       str             '' when none
  weight      float
  neg_images  list[bytes | uint8 array]
  neg_texts   list[str]

Sources: `records` (ingested ArrayRecord shards, `mmjax.data.prepare`), `tfds` (any TFDS dataset
prepared as ArrayRecord, through `tfds.data_source`, features picked by a config mapping) and
`demo` (the procedural scenes). All are picklable, so Grain worker processes can hold them.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any, Sequence

import grain
import numpy as np

from mmjax.data import demo, records

KINDS = ('demo', 'records', 'tfds')
METADATA = 'metadata.json'


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """One source of `config.data` (or one entry of `config.data.mixture`)."""
  name: str = 'demo'  # One of KINDS.
  path: str = ''  # records: the `prepare --out` directory; tfds: the data_dir ('' = default).
  tfds_name: str = ''  # tfds: dataset name, e.g. 'coco_captions' or 'my_set:1.0.0'.
  split: str = 'train'  # tfds split (slicing like 'train[:90%]' allowed).
  # tfds: element feature -> path in the TFDS example ('/' separated; '' = absent).
  image_key: str = 'image'
  captions_key: str = 'captions'
  group_key: str = ''
  keep: str = ''  # records: a `mmjax.data.filter` keep file (indices), '' = every example.
  # records: a `mmjax.data.mine_negatives` file of mined negatives; demo: comma-separated scene
  # attributes ('shape', 'colour', 'size', 'position'): rendered one-attribute hard negatives.
  negatives: str = ''
  weight: float = 1.0  # Mixture weight (relative).
  # Sampling temperature of this source in a mixture (0: config.data.mixture_temperature); see
  # `mixture_weights`.
  temperature: float = 0.0

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'SourceSpec':
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f'Unknown source field(s) {sorted(unknown)} in {d}.')
    return cls(**d)


def _element(image=None, query=None, captions=(), group='', weight=1.0, neg_images=(),
             neg_texts=(), segments=None) -> dict[str, Any]:
  out = {'image': image, 'query': query, 'captions': list(captions), 'group': group,
         'weight': float(weight), 'neg_images': list(neg_images), 'neg_texts': list(neg_texts)}
  if segments is not None:  # Interleaved documents (mmjax.data.convert documents).
    out['segments'] = segments
  return out


class RecordSource(grain.sources.RandomAccessDataSource):
  """An ingested dataset; optionally only the kept indices, optionally with mined negatives."""

  def __init__(self, path: str | pathlib.Path, keep: str = '', negatives: str = ''):
    self.path = pathlib.Path(path)
    meta_file = self.path / METADATA
    if not meta_file.is_file():
      raise FileNotFoundError(f'{meta_file} not found: is {self.path} the --out directory of a '
                              'finished `python -m mmjax.data.prepare`?')
    self.metadata = json.loads(meta_file.read_text())
    if self.metadata.get('format') != records.FORMAT:
      raise ValueError(f'{meta_file} has format {self.metadata.get("format")!r}, expected '
                       f'{records.FORMAT!r}.')
    self._source = grain.sources.ArrayRecordDataSource(
        [str(self.path / s) for s in self.metadata['shards'] if s])
    self.keep = np.load(self._file(keep)) if keep else None
    self.negatives = np.load(self._file(negatives)) if negatives else None
    if self.negatives is not None and len(self.negatives) != len(self._source):
      raise ValueError(f'{negatives} has {len(self.negatives)} rows for {len(self._source)} '
                       'examples: mined for another dataset?')

  def _file(self, name: str) -> pathlib.Path:
    path = pathlib.Path(name) if pathlib.Path(name).is_absolute() else self.path / name
    if not path.is_file():
      raise FileNotFoundError(f'{path} not found.')
    return path

  def __len__(self) -> int:
    return len(self.keep) if self.keep is not None else len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    i = int(self.keep[index]) if self.keep is not None else int(index)
    ex = records.decode(self._source[i])
    neg_images, neg_texts = ex['neg_images'], ex['neg_texts']
    if self.negatives is not None:  # Mined negatives: other examples of this dataset.
      mined = [records.decode(self._source[int(j)]) for j in self.negatives[i] if j >= 0]
      neg_images = neg_images + [m['image'] for m in mined if 'image' in m]
      neg_texts = neg_texts + [m['captions'][0] for m in mined]
    return _element(ex.get('image'), ex.get('query'), ex['captions'], ex['group'], ex['weight'],
                    neg_images, neg_texts, ex.get('segments'))

  def __repr__(self) -> str:
    return f'RecordSource({self.path}, {len(self)} examples)'


def _lookup(example: Any, key: str, full: str = '') -> Any:
  """Feature at '/'-separated `key`; flat names holding '/' ('image/id') win over nesting."""
  full = full or key
  if isinstance(example, dict):
    if key in example:
      return example[key]
    parts = key.split('/')
    for i in range(len(parts) - 1, 0, -1):
      head = '/'.join(parts[:i])
      if head in example:
        return _lookup(example[head], '/'.join(parts[i:]), full)
  raise KeyError(f'TFDS feature {full!r} not found; set the source\'s *_key fields to paths of '
                 'the dataset\'s features.')


def _texts(value: Any) -> list[str]:
  if isinstance(value, (str, bytes)):
    value = [value]
  return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(value).reshape(-1)]


class TfdsSource(grain.sources.RandomAccessDataSource):
  """A TFDS dataset (prepared in ArrayRecord format) through `tfds.data_source`, no TensorFlow."""

  def __init__(self, spec: SourceSpec):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    self.spec = spec
    self._source = tfds.data_source(spec.tfds_name, split=spec.split,
                                    data_dir=spec.path or None, download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._source[int(index)]
    s = self.spec
    group = _texts(_lookup(ex, s.group_key))[0] if s.group_key else ''
    return _element(image=np.asarray(_lookup(ex, s.image_key), np.uint8),
                    captions=_texts(_lookup(ex, s.captions_key)), group=group)


class DemoSource(grain.sources.RandomAccessDataSource):
  """The procedural demo scenes in the common element layout; with `negatives` (attributes),
  each example carries `num_negatives` rendered scenes that differ from it in one of them."""

  def __init__(self, num_examples: int, image_size: int, seed: int, negatives: str = '',
               num_negatives: int = 0):
    self._scenes = demo.DemoScenes(split='train', num_examples=num_examples,
                                   image_size=image_size, seed=seed)
    self.attributes = demo.negative_attributes(negatives)
    self.num_negatives = num_negatives if self.attributes else 0
    self.image_size, self.seed = image_size, seed

  def __len__(self) -> int:
    return len(self._scenes)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self._scenes[int(index)]
    if not self.num_negatives:
      return _element(image=ex['image'], captions=ex['captions'])
    rng = np.random.default_rng([0x6E6567, self.seed, int(index)])  # "neg": its own stream
    images, texts = demo.hard_negatives(self._scenes.scene(int(index)), self.attributes,
                                        self.num_negatives, self.image_size, rng)
    return _element(image=ex['image'], captions=ex['captions'], neg_images=images,
                    neg_texts=texts)


def make(spec: SourceSpec, *, num_demo_examples: int, image_size: int, seed: int,
         num_negatives: int = 0):
  if spec.name == 'demo':
    return DemoSource(num_demo_examples, image_size, seed, spec.negatives, num_negatives)
  if spec.name == 'records':
    if not spec.path:
      raise ValueError("A 'records' source needs path= (the `prepare --out` directory).")
    return RecordSource(spec.path, spec.keep, spec.negatives)
  if spec.name == 'tfds':
    if not spec.tfds_name:
      raise ValueError("A 'tfds' source needs tfds_name=.")
    return TfdsSource(spec)
  raise ValueError(f'Unknown data source {spec.name!r}; expected one of {KINDS}.')


def is_text_pairs(source) -> bool:
  """Whether a source holds text-text pairs (its first element has a query, no image)."""
  return len(source) > 0 and source[0]['query'] is not None


def specs_from_config(data_cfg) -> list[SourceSpec]:
  """The sources of `config.data`: its mixture entries, or the single source it names."""
  if data_cfg.mixture:
    return [SourceSpec.from_dict(dict(m)) for m in data_cfg.mixture]
  return [SourceSpec(name=data_cfg.name, path=data_cfg.path, tfds_name=data_cfg.tfds_name,
                     split=data_cfg.split, image_key=data_cfg.image_key,
                     captions_key=data_cfg.captions_key, group_key=data_cfg.group_key,
                     keep=data_cfg.keep, negatives=data_cfg.negatives)]


def mixture_weights(specs: Sequence[SourceSpec], sizes: Sequence[int],
                    default_temperature: float = 0.0) -> list[float]:
  """The sampling probability of each source of a mixture.

  Temperature 0 (the default everywhere) keeps the configured weights as the proportions, p_i
  = w_i / sum w, whatever the sources' sizes. With temperatures T_i > 0 (each source's own
  `temperature`, or `default_temperature`), p_i is proportional to (w_i n_i)^(1 / T_i) for a
  source of n_i examples: T = 1 samples in proportion to (weighted) size, a larger T flattens
  the mixture toward uniform so small sources/tasks are seen more often (the temperature
  sampling of multilingual and multi-task training, e.g. mT5's T = 3.3), and a per-source T
  flattens or sharpens one source alone. Temperatures must all be 0 or all be > 0.
  """
  temps = [s.temperature or default_temperature for s in specs]
  if len(sizes) != len(specs):
    raise ValueError(f'{len(specs)} sources but {len(sizes)} sizes.')
  if any(t < 0 for t in temps) or (any(temps) and not all(temps)):
    raise ValueError(f'Mixture temperatures {temps} must all be 0 (the weights as proportions) '
                     'or all be > 0 (set config.data.mixture_temperature or every source\'s).')
  if not any(temps):
    raw = np.asarray([s.weight for s in specs], np.float64)
  else:
    logs = np.asarray([np.log(s.weight * n) / t for s, n, t in zip(specs, sizes, temps)])
    raw = np.exp(logs - logs.max())  # In logs: (w n)^(1/T) overflows for large n and small T.
  return [float(x) for x in raw / raw.sum()]


def caption_corpus(sources: Sequence[Any], limit: int = 50_000) -> list[str]:
  """Up to `limit` captions (and queries) spread over the sources, to train a tokenizer on."""
  out: list[str] = []
  per = max(1, limit // max(1, len(sources)))
  for src in sources:
    step = max(1, len(src) // per)
    for i in range(0, len(src), step):
      ex = src[i]
      out += ex['captions'] + ([ex['query']] if ex['query'] else [])
  return out
