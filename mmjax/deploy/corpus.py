"""Corpora a backfill embeds: every item has an id, a content hash and its raw content.

`--data` specs:
  demo:N[:SPLIT[:SEED]]   the first N procedural demo scenes of SPLIT ('validation' by default),
                          rendered at the model's image size; the text is the first caption
  manifest:FILE           a JSONL or CSV manifest (mmjax.data.manifests): `id` (default: the
                          line number), `image` (a path, relative to the manifest) and `text`
                          (or the first of `captions`); FILE ending .jsonl/.json/.csv also works
  records:DIR             an ingested dataset (`python -m mmjax.data.prepare --out=DIR`); ids
                          are `records-INDEX`, the hash is the record's bytes'
  tfds:NAME[?k=v&...]     a TFDS dataset prepared as ArrayRecord (`tfds.data_source`), with any
                          `mmjax.data.sources.SourceSpec` field as k=v: split (default train),
                          path (the data_dir), image_key, captions_key; ids `tfds-INDEX`, the
                          hash is over the image bytes and captions

The content hash keys incremental backfills: an item whose id and hash are already in the store
is not embedded again. Hashes are cheap where the content is a pure function of its index
(demo scenes) and a SHA-256 of the stored bytes otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import urllib.parse
from typing import Any, Callable

import numpy as np

from mmjax.data import demo, manifests, records, sources

MODALITIES = ('image', 'text')


@dataclasses.dataclass
class Corpus:
  """`keys`: [(id, hash)] in corpus order; `load(i)`: the raw content of item i (encoded image
  bytes or a uint8 array for 'image', a str for 'text'); it may raise for a bad item."""

  spec: str
  keys: list[tuple[str, str]]
  load: Callable[[int], Any]

  def fingerprint(self) -> str:
    h = hashlib.sha256()
    for item_id, content_hash in self.keys:
      h.update(f'{item_id}\0{content_hash}\n'.encode())
    return h.hexdigest()[:16]


def _sha(data: bytes | str) -> str:
  return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:32]


def _demo(arg: str, modality: str, image_size: int) -> Corpus:
  parts = arg.split(':')
  try:
    n = int(parts[0])
    split = parts[1] if len(parts) > 1 and parts[1] else 'validation'
    seed = int(parts[2]) if len(parts) > 2 else 0
  except ValueError as e:
    raise ValueError(f'--data=demo:{arg}: expected demo:N[:SPLIT[:SEED]] ({e}).') from e
  scenes = demo.DemoScenes(split, n, image_size=image_size, seed=seed)
  keys = [(f'demo-{split}-{i:07d}', _sha(f'demo:{split}:{seed}:{image_size}:{modality}:{i}'))
          for i in range(n)]
  if modality == 'image':
    return Corpus(f'demo:{arg}', keys, lambda i: scenes[i]['image'])
  return Corpus(f'demo:{arg}', keys, lambda i: scenes[i]['captions'][0])


def _manifest(path: pathlib.Path, modality: str) -> Corpus:
  if not path.is_file():
    raise FileNotFoundError(f'--data: manifest {path} not found.')
  rows, problems = manifests.read_manifest(path)
  if problems:
    raise ValueError(f'--data: {path} has unparsable lines: {problems[:5]}.')
  keys, contents = [], []
  seen: set[str] = set()
  for row in rows:
    item_id = str(row.get('id', f'line-{row["_line"]}'))
    if item_id in seen:
      raise ValueError(f'--data: {path} line {row["_line"]}: duplicate id {item_id!r}.')
    seen.add(item_id)
    if modality == 'image':
      image = row.get('image')
      try:
        content_hash = _sha(pathlib.Path(image).read_bytes()) if image else 'missing'
      except OSError:
        content_hash = 'unreadable'
      contents.append(image)
    else:
      text = row.get('text', (row.get('captions') or [''])[0])
      content_hash = _sha(text if isinstance(text, str) else repr(text))
      contents.append(text)
    keys.append((item_id, content_hash))

  def load(i: int):
    value = contents[i]
    if modality == 'image':
      if not value:
        raise ValueError('no image path')
      return pathlib.Path(value).read_bytes()
    if not isinstance(value, str):
      raise ValueError(f'text is {type(value).__name__}, not a string')
    return value

  return Corpus(f'manifest:{path}', keys, load)


def _records(path: pathlib.Path, modality: str) -> Corpus:
  source = sources.RecordSource(path)
  raw = source._source  # pylint: disable=protected-access  (the encoded records, for hashing)
  keys = [(f'records-{i:09d}', _sha(raw[i])) for i in range(len(raw))]

  def load(i: int):
    ex = records.decode(raw[i])
    if modality == 'image':
      if ex.get('image') is None:
        raise ValueError('the record has no image')
      return ex['image']
    return (ex.get('captions') or [''])[0]

  return Corpus(f'records:{path}', keys, load)


def _tfds(arg: str, modality: str) -> Corpus:
  name, _, query = arg.partition('?')
  fields = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
  try:
    spec = sources.SourceSpec.from_dict({'name': 'tfds', 'tfds_name': name, **fields})
  except ValueError as e:
    raise ValueError(f'--data=tfds:{arg}: {e}') from e
  source = sources.TfdsSource(spec)

  def content(i: int):
    ex = source[i]
    return ex['image'] if modality == 'image' else (ex['captions'] or [''])[0]

  def digest(i: int) -> str:
    ex = source[i]
    return _sha(np.ascontiguousarray(ex['image']).tobytes() + repr(ex['captions']).encode())

  keys = [(f'tfds-{i:09d}', digest(i)) for i in range(len(source))]
  return Corpus(f'tfds:{arg}', keys, content)


def open_corpus(spec: str, *, modality: str, image_size: int) -> Corpus:
  """The corpus of a `--data` spec (see the module docstring)."""
  if modality not in MODALITIES:
    raise ValueError(f'--modality={modality!r} is not one of {MODALITIES}.')
  kind, _, arg = spec.partition(':')
  if kind == 'demo':
    return _demo(arg, modality, image_size)
  if kind == 'manifest':
    return _manifest(pathlib.Path(arg).absolute(), modality)
  if kind == 'records':
    return _records(pathlib.Path(arg).absolute(), modality)
  if kind == 'tfds':
    return _tfds(arg, modality)
  if pathlib.Path(spec).suffix.lower() in ('.jsonl', '.json', '.csv'):
    return _manifest(pathlib.Path(spec).absolute(), modality)
  raise ValueError(f'--data={spec!r}: expected demo:N[:SPLIT[:SEED]], manifest:FILE '
                   '(.jsonl/.csv), records:DIR or tfds:NAME[?split=...&path=...].')
