"""The audio-text input pipeline (model.kind='audio_text'): clips and captions -> fixed-shape
batches, with the dual encoder's ordering guarantees (a global seeded shuffle, then every
`process_count`-th element, so the order is a pure function of (seed, step)) and its bad-data
handling (an undecodable clip is dropped and counted by `transforms.SkipCorrupt`).

Sources (`config.data.audio.source`): 'synthetic' (`mmjax.data.audio_demo`, rendered on the fly)
or 'records' (clips ingested by `python -m mmjax.data.prepare --audio_dir=...`).

Batch columns (B rows, S = model.audio max_samples, L = model.text.max_len):
  audio float32 [B, S] (zero-padded), audio_len int32 [B] (valid samples), tokens / mask int32
  [B, L], group int32 [B] (rows sharing a caption or clip are not each other's negatives),
  weight float32 [B], source int32 [B] (host only).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import grain
import numpy as np

from mmjax.data import audio_demo, audio_io, pipeline, records, transforms
from mmjax.data.tokenizer import TextEncoder
from mmjax.types import AudioConfig, check_batch_divides

SOURCES = ('synthetic', 'records')


def batch_spec(config) -> dict[str, tuple[tuple[int, ...], Any]]:
  b, L = config.batch_size, config.model.text.max_len
  s = audio_config(config).max_samples
  return {'audio': ((b, s), np.float32), 'audio_len': ((b,), np.int32),
          'tokens': ((b, L), np.int32), 'mask': ((b, L), np.int32), 'group': ((b,), np.int32),
          'weight': ((b,), np.float32), 'source': ((b,), np.int32)}


def audio_config(config) -> AudioConfig:
  fields = {k: tuple(v) if isinstance(v, list) else v
            for k, v in config.model.audio.to_dict().items()}
  return AudioConfig(**fields)


class AudioRecordSource(grain.sources.RandomAccessDataSource):
  """Ingested audio-caption records: {'audio': FLAC bytes, 'captions': [...], 'group': str}."""

  def __init__(self, path: str | pathlib.Path):
    self.path = pathlib.Path(path)
    meta_file = self.path / 'metadata.json'
    if not meta_file.is_file():
      raise FileNotFoundError(f'{meta_file} not found: is {self.path} the --out directory of a '
                              'finished `python -m mmjax.data.prepare --audio_dir=...`?')
    meta = json.loads(meta_file.read_text())
    if meta.get('format') != records.FORMAT:
      raise ValueError(f'{meta_file} has format {meta.get("format")!r}, expected '
                       f'{records.FORMAT!r}.')
    if not meta.get('num_audio'):
      raise ValueError(f'{self.path} holds no audio clips (metadata num_audio=0): ingest audio '
                       'with `python -m mmjax.data.prepare --audio_dir=...`.')
    self._source = grain.sources.ArrayRecordDataSource(
        [str(self.path / s) for s in meta['shards'] if s])

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = records.decode(self._source[int(index)])
    return {'audio': ex.get('audio'), 'captions': ex['captions'], 'group': ex['group'],
            'id': ex['id']}


def make_source(config, split: str = 'train', num: int | None = None):
  a = config.data.audio
  if a.source == 'records':
    return AudioRecordSource(a.path)
  return audio_demo.AudioScenes(split, num or a.num_train_clips,
                                config.model.audio.sample_rate, config.seed, a.max_events)


def load_clip(audio: Any, sample_rate: int) -> np.ndarray:
  """float32 mono samples at `sample_rate` of stored bytes or an array already at that rate."""
  if isinstance(audio, (bytes, bytearray)):
    return audio_io.decode(bytes(audio), sample_rate)[0]
  return np.asarray(audio, np.float32)


class AudioPreprocess(grain.transforms.RandomMap):
  """One element -> the row of `batch_spec` (plus the duplicate keys of `assign_groups`)."""

  def __init__(self, encoder: TextEncoder, cfg: AudioConfig, random_crop: bool = True,
               source_index: int = 0):
    self.encoder, self.cfg = encoder, cfg
    self.random_crop, self.source_index = random_crop, source_index

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    captions = element['captions']
    caption = records.normalise_caption(captions[int(rng.integers(len(captions)))])
    try:
      clip = load_clip(element['audio'], self.cfg.sample_rate)
    except Exception:  # pylint: disable=broad-except  # libsndfile raises several types
      return {'ok': False}
    wave, n = audio_io.fit(clip, self.cfg.max_samples, rng if self.random_crop else None)
    tokens, mask = self.encoder.encode_one(caption)
    group = element.get('group', '')
    raw = element['audio'] if isinstance(element['audio'], bytes) else wave.tobytes()
    return {'audio': wave, 'audio_len': np.int32(n), 'tokens': tokens, 'mask': mask,
            'weight': np.float32(1.0), 'source': np.int32(self.source_index), 'ok': True,
            'group_key': np.int64(records.hash31('g:' + group) if group else -1),
            'caption_key': np.int64(records.hash31('c:' + records.caption_key(caption))),
            'image_key': np.int64(records.hash31(b'a:' + raw))}


def make_train_dataset(config, encoder: TextEncoder, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """Infinite iterator of this process's audio-text batches (batch_size / process_count rows)."""
  check_batch_divides(config.batch_size, process_count)
  local_batch = config.batch_size // process_count
  src = make_source(config)
  if len(src) == 0:
    raise ValueError(f'The audio source ({config.data.audio.source} {config.data.audio.path}) '
                     'is empty.')
  seed = int(np.random.SeedSequence([config.seed, 0]).generate_state(1)[0])
  ds = grain.MapDataset.source(src).seed(seed).shuffle().repeat(None)
  ds = ds.random_map(AudioPreprocess(encoder, audio_config(config),
                                     config.data.audio.random_crop))
  ds = ds[process_index::process_count]
  read = grain.ReadOptions(num_threads=config.data.read_threads,
                           prefetch_buffer_size=2 * local_batch)
  it = transforms.SkipCorrupt(ds.to_iter_dataset(read), config.data.max_skip_fraction)
  it = it.batch(local_batch, drop_remainder=True)
  if process_count == 1:
    it = it.map(transforms.assign_groups)
  return pipeline.prefetch(it, config.data)


def caption_corpus(config, limit: int = 50_000) -> list[str]:
  """Texts the run's tokenizer is trained on: the synthetic grammar, or the records' captions."""
  if config.data.audio.source == 'synthetic':
    return audio_demo.caption_corpus(num=2000, seed=config.seed)
  src = make_source(config)
  return [c for i in range(min(limit, len(src))) for c in src[i]['captions']]
