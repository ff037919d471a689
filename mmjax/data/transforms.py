"""Per-element transforms and the per-batch `group` column.

`Preprocess` (seeded per element, so a caption is re-sampled every epoch and a resumed run draws
the same one): decode, resize (`mmjax.data.images`), augmentation (`mmjax.data.augment`),
caption sampling, normalisation and tokenisation with truncation. A corrupt image does not
raise: the element is marked and `SkipCorrupt` drops it, counting, and fails the run with a
clear message once the skipped fraction passes `max_skip_fraction`.

`assign_groups` turns each row's duplicate keys into one int32 `group` column: rows that share a
group id, a normalised caption or an image are in one group (transitively), every other row gets
its own value. Values are stable hashes, not positions, so equal keys in different processes'
shards of a global batch get equal values too.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from mmjax.data import images, records
from mmjax.data.augment import Augment
from mmjax.data.images import View
from mmjax.data.tokenizer import TextEncoder

KEY_COLUMNS = ('group_key', 'caption_key', 'image_key')


class CorruptDataError(RuntimeError):
  """Too many elements of the input could not be decoded."""


class Preprocess(grain.transforms.RandomMap):
  """Common element layout -> fixed-shape arrays (see `pipeline.batch_spec`).

  `view`: the deterministic resize (used whenever `augment` does not crop); `augment`: None for
  none; `caption_sampling`: 'random' (any of an element's captions, re-drawn every epoch) or
  'first'. A flipped element's texts (caption, second caption, hard-negative texts) have
  left and right swapped, and its hard-negative images flip with it."""

  def __init__(self, encoder: TextEncoder, *, view: View, augment: Augment | None = None,
               caption_sampling: str = 'random', num_negatives: int = 0, source_index: int = 0,
               text_pairs: bool = False, teacher_encoder: TextEncoder | None = None,
               caption_query: bool = False, decode_cache_mb: int = 0):
    self.encoder, self.view, self.augment = encoder, view, augment
    # Decoded stored images, kept per process (`config.data.decode_cache_mb`).
    self.decoded = images.DecodeCache(decode_cache_mb * 2**20, view.background)
    self.caption_sampling = caption_sampling
    self.num_negatives, self.source_index, self.text_pairs = num_negatives, source_index, text_pairs
    # Distillation with a live teacher: its own tokens of the same texts ('teacher_tokens').
    self.teacher_encoder = teacher_encoder
    self.caption_query = caption_query  # 'query_tokens': another caption of the same image.

  def _image(self, image: Any, rng: np.random.Generator, flip: bool) -> np.ndarray:
    decoded = self.decoded.get(image)  # RGB on the view's background: both paths take it as is.
    if self.augment is None:
      return images.load(decoded, self.view)
    return self.augment.image(decoded, self.view, rng, flip)

  def _text(self, text: str, flip: bool) -> str:
    text = records.normalise_caption(text)
    return self.augment.swap(text) if flip else text

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    captions = element['captions']
    which = int(rng.integers(len(captions))) if self.caption_sampling == 'random' else 0
    other = None
    if self.caption_query and not self.text_pairs:  # Drawn after `which`: its draw is unchanged.
      other = (which + 1 + int(rng.integers(max(1, len(captions) - 1)))) % len(captions)
    flip = (self.augment is not None and not self.text_pairs and self.augment.draw_flip(rng))
    caption = self._text(captions[which], flip)
    tokens, mask = self.encoder.encode_one(caption)
    out: dict[str, Any] = {
        'tokens': tokens, 'mask': mask, 'weight': np.float32(element['weight']),
        'source': np.int32(self.source_index), 'ok': True,
        'group_key': np.int64(records.hash31('g:' + element['group']) if element['group'] else -1),
        'caption_key': np.int64(records.hash31('c:' + records.caption_key(caption))),
    }
    if self.text_pairs:
      out['query_tokens'], out['query_mask'] = self.encoder.encode_one(
          records.normalise_caption(element['query']))
      out['image_key'] = np.int64(records.hash31('q:' + records.caption_key(element['query'])))
    else:
      if other is not None:
        out['query_tokens'], out['query_mask'] = self.encoder.encode_one(
            self._text(captions[other], flip))
      try:
        out['image'] = self._image(element['image'], rng, flip)
      except Exception:  # pylint: disable=broad-except  # PIL raises many types on bad files
        return {'ok': False}
      # The stored image, not the augmented crop: two copies stay duplicates under augmentation.
      raw = element['image']
      raw = raw if isinstance(raw, (bytes, bytearray)) else np.ascontiguousarray(raw).tobytes()
      out['image_key'] = np.int64(records.hash31(b'i:' + raw))
    if self.num_negatives:
      out.update(self._negatives(element, rng, flip))
    out.update(self._teacher(element, which, caption))
    return out

  def _teacher(self, element: dict[str, Any], which: int, caption: str) -> dict[str, Any]:
    """Distillation columns: precomputed teacher embeddings (`TeacherEmbeddings` sources; the
    row of the sampled caption, embedded un-flipped) or the live teacher's tokens."""
    out = {}
    if 'teacher_text' in element:
      out['teacher_text'] = np.asarray(element['teacher_text'][which], np.float32)
    for name in ('teacher_image', 'teacher_query'):
      if name in element:
        out[name] = np.asarray(element[name], np.float32)
    if self.teacher_encoder is not None:
      out['teacher_tokens'], out['teacher_mask'] = self.teacher_encoder.encode_one(caption)
      if self.text_pairs:
        out['teacher_query_tokens'], out['teacher_query_mask'] = self.teacher_encoder.encode_one(
            records.normalise_caption(element['query']))
    return out

  def _negatives(self, element: dict[str, Any], rng, flip: bool) -> dict[str, np.ndarray]:
    k, s, L = self.num_negatives, self.view.size, self.encoder.max_len
    texts = [self._text(t, flip) if flip else t for t in element['neg_texts'][:k]]
    ids, mask = self.encoder(texts) if texts else (np.zeros((0, L), np.int32),) * 2
    out = {'neg_tokens': np.zeros((k, L), np.int32), 'neg_mask': np.zeros((k, L), np.int32),
           'neg_text_valid': np.zeros((k,), np.int32)}
    out['neg_tokens'][:len(texts)], out['neg_mask'][:len(texts)] = ids, mask
    out['neg_text_valid'][:len(texts)] = 1
    if not self.text_pairs:
      out['neg_image'] = np.zeros((k, s, s, 3), np.uint8)
      out['neg_image_valid'] = np.zeros((k,), np.int32)
      n = 0
      for image in element['neg_images']:
        if n == k:
          break
        try:
          out['neg_image'][n] = self._image(image, rng, flip)
        except Exception:  # pylint: disable=broad-except  # a bad negative is just left out
          continue
        out['neg_image_valid'][n] = 1
        n += 1
    return out


class _SkipCorruptIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, max_fraction: float, min_seen: int):
    super().__init__(parent)
    self.max_fraction, self.min_seen = max_fraction, min_seen
    self.seen = self.skipped = 0

  def __next__(self):
    while True:
      element = next(self._parent)
      self.seen += 1
      if element['ok']:
        element.pop('ok')
        return element
      self.skipped += 1
      if self.seen >= self.min_seen and self.skipped > self.max_fraction * self.seen:
        raise CorruptDataError(
            f'{self.skipped} of {self.seen} images read so far could not be decoded '
            f'({self.skipped / self.seen:.1%} > config.data.max_skip_fraction='
            f'{self.max_fraction}). Check the data (run `python -m mmjax.data.prepare`, which '
            'reports each bad file) or raise the threshold.')

  def get_state(self):
    return {'parent': self._parent.get_state(), 'seen': self.seen, 'skipped': self.skipped}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self.seen, self.skipped = state['seen'], state['skipped']


class SkipCorrupt(grain.IterDataset):
  """Drops elements `Preprocess` could not decode; fails past `max_fraction` of those seen."""

  def __init__(self, parent: grain.IterDataset, max_fraction: float, min_seen: int = 100):
    super().__init__(parent)
    self.max_fraction, self.min_seen = max_fraction, min_seen

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipCorruptIterator(self._parent.__iter__(), self.max_fraction, self.min_seen)


def assign_groups(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Replaces the key columns with `group` int32 [B] (connected components over equal keys)."""
  b = len(batch['caption_key'])
  parent = list(range(b))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  for name in KEY_COLUMNS:
    first: dict[int, int] = {}
    for i, key in enumerate(batch[name].tolist()):
      if key < 0:
        continue
      if key in first:
        parent[find(i)] = find(first[key])
      else:
        first[key] = i
  # A component's value: the smallest caption hash in it (the same in every process).
  value: dict[int, int] = {}
  for i, key in enumerate(batch['caption_key'].tolist()):
    r = find(i)
    value[r] = min(value.get(r, key), key)
  out = {k: v for k, v in batch.items() if k not in KEY_COLUMNS}
  out['group'] = np.array([value[find(i)] for i in range(b)], np.int32)
  return out
