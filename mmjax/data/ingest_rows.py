"""One manifest row -> one record and its index entry (`mmjax.data.prepare` writes them into
shards): captions and queries checked and normalised, images read through
`mmjax.data.ingest_images` (header pixel limit, downscaling), hard negatives, documents. A row
that cannot be ingested raises `Skip` with the reason that goes into report.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any

from mmjax.data import audio_io, ingest_images, ingest_workers, records


@dataclasses.dataclass(frozen=True)
class Options:
  """What an ingestion writes (the flags of `python -m mmjax.data.prepare`)."""

  out: pathlib.Path
  name: str = 'data'
  examples_per_shard: int = 1000
  # Stored images: longest side in pixels (larger ones are downscaled); 0 keeps every original.
  max_image_size: int = ingest_images.DEFAULT_MAX_IMAGE_SIZE
  max_caption_chars: int = 2000
  max_negatives: int = 16
  max_pixels: int = ingest_images.DEFAULT_MAX_PIXELS  # Header W*H above this: skipped; 0: none.
  max_pixels_in_flight: int = 2 * ingest_images.DEFAULT_MAX_PIXELS  # All workers' decodes.
  skip_rows: frozenset[int] = frozenset()  # Rows that killed a worker before (--skip_killed).
  audio: audio_io.AudioLimits = audio_io.AudioLimits()  # Rows with an `audio` file.


Skip = ingest_images.Skip


def _read_image(path: str, opts: Options, ctx: ingest_workers.WorkerContext | None = None
                ) -> tuple[bytes, Any, dict[str, Any]]:
  return ingest_images.read_image(path, opts.max_pixels, opts.max_image_size,
                                  ctx.hold if ctx else ingest_images.no_budget)


def _texts(value: Any, field: str, opts: Options) -> list[str]:
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list):
    raise Skip(f'bad {field}: expected a string or a list of strings, got {type(value).__name__}')
  out = []
  for text in value:
    if not isinstance(text, str):
      raise Skip(f'bad {field}: {text!r} is not a string')
    text = records.normalise_caption(text)
    if '\ufffd' in text:
      raise Skip(f'bad {field}: not valid UTF-8: {text[:80]!r}')
    if text:
      out.append(text[:opts.max_caption_chars])
  return out


def make_example(row: dict[str, Any], index: int, opts: Options,
                 ctx: ingest_workers.WorkerContext | None = None) -> tuple[dict[str, Any], dict]:
  """(record, index entry) of one manifest row; raises Skip with the reason."""
  if 'segments' in row:
    return _document(row, index, opts, ctx)
  captions = _texts(row.get('captions', row.get('caption', row.get('text', []))), 'captions', opts)
  if not captions:
    raise Skip('bad captions: no non-empty caption')
  ex: dict[str, Any] = {'id': str(row.get('id', index)), 'captions': captions}
  entry: dict[str, Any] = {'id': ex['id'], 'captions': [records.caption_key(c) for c in captions]}
  if 'image' in row:
    if not isinstance(row['image'], str):
      raise Skip(f'bad image field: {row["image"]!r}')
    data, pixels, info = _read_image(row['image'], opts, ctx)
    ex['image'] = data
    entry['sha256'] = hashlib.sha256(pixels.tobytes()).hexdigest()
    entry['dhash'] = records.dhash(pixels)
    if 'stored_size' in info:  # Downscaled (or re-encoded) at ingestion.
      entry['original_size'] = info['size']
  elif 'audio' in row:
    if not isinstance(row['audio'], str):
      raise Skip(f'bad audio field: {row["audio"]!r}')
    ex['audio'], info = audio_io.read_audio(row['audio'], opts.audio)
    entry['audio_sha256'] = hashlib.sha256(ex['audio']).hexdigest()
    entry['seconds'] = info['seconds']
  elif 'query' in row:
    query = _texts(row['query'], 'query', opts)
    if len(query) != 1:
      raise Skip('bad query: expected one non-empty string')
    ex['query'] = query[0]
    entry['query'] = records.caption_key(query[0])
  else:
    raise Skip('row has none of `image`, `audio`, `query`')
  try:
    for key, cast in (('label', int), ('group', str), ('weight', float)):
      if key in row:
        ex[key] = cast(row[key])
  except (TypeError, ValueError) as e:
    raise Skip(f'bad {key}: {row[key]!r} ({e})') from e
  if 'weight' in ex and not ex['weight'] >= 0:
    raise Skip(f'bad weight: {ex["weight"]} (must be >= 0)')
  entry['group'] = ex.get('group', '')
  negs = []
  for path in (row.get('neg_images') or [])[:opts.max_negatives]:
    try:
      negs.append(_read_image(path, opts, ctx)[0])
    except Skip:  # A bad negative only loses that negative.
      entry['bad_negatives'] = entry.get('bad_negatives', 0) + 1
  if negs:
    ex['neg_images'] = negs
  if row.get('neg_texts'):
    ex['neg_texts'] = _texts(row['neg_texts'], 'neg_texts', opts)[:opts.max_negatives]
  return ex, entry


def _document(row: dict[str, Any], index: int, opts: Options,
              ctx: ingest_workers.WorkerContext | None) -> tuple[dict[str, Any], dict]:
  """An interleaved document: its segments in order, images as encoded bytes."""
  segments, texts = [], []
  if not isinstance(row['segments'], list):
    raise Skip('bad segments: expected a list')
  for seg in row['segments']:
    if isinstance(seg, dict) and isinstance(seg.get('image'), str):
      segments.append({'image': _read_image(seg['image'], opts, ctx)[0]})
    elif isinstance(seg, dict) and 'text' in seg:
      text = _texts(seg['text'], 'segment text', opts)
      if text:
        segments.append({'text': text[0]})
        texts.append(text[0])
    else:
      raise Skip(f'bad segment: {str(seg)[:80]!r}')
  if not texts:
    raise Skip('bad segments: no text segment')
  ex = {'id': str(row.get('id', index)), 'segments': segments, 'captions': texts}
  return ex, {'id': ex['id'], 'captions': [records.caption_key(t) for t in texts],
              'num_images': len(segments) - len(texts), 'group': ''}
