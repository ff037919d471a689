"""Grain input pipelines: random-access source -> global seeded shuffle -> per-process shard ->
transforms -> batches of this process's rows.

The order of examples is a pure function of (seed, step): the shuffle is global (the same
permutation in every process), each process then takes every `process_count`-th element, so the
union of all processes' batch k is the same set of examples whatever the number of processes.
The iterator's state goes into every checkpoint, so a resumed run sees exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import grain
from absl import flags
import numpy as np

from mmjax.data import demo
from mmjax.data.tokenizer import TextEncoder


class SampleCaptionAndEncode(grain.transforms.RandomMap):
  """Picks one of the example's captions (seeded per element) and tokenizes it."""

  def __init__(self, encoder: TextEncoder):
    self.encoder = encoder

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    captions = element['captions']
    caption = captions[int(rng.integers(len(captions)))]
    tokens, mask = self.encoder.encode_one(caption)
    return {'image': element['image'], 'tokens': tokens, 'mask': mask}


def make_source(config) -> Any:
  """The training source named by `config.data.name`."""
  if config.data.name == 'demo':
    return demo.DemoScenes(split='train', num_examples=config.data.num_train_examples,
                           image_size=config.model.image.image_size, seed=config.seed)
  raise ValueError(f'Unknown config.data.name={config.data.name!r}.')


def make_train_dataset(config, encoder: TextEncoder, *, process_index: int = 0,
                       process_count: int = 1) -> grain.IterDataset:
  """Infinite iterator dataset of this process's batches (batch_size / process_count rows)."""
  if config.batch_size % process_count:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible by the '
                     f'{process_count} processes.')
  local_batch = config.batch_size // process_count
  ds = grain.MapDataset.source(make_source(config)).seed(config.seed)
  ds = ds.shuffle().repeat(None)  # A new permutation every epoch.
  # Seeded by the global position (lazily, before the per-process slice), so every example gets
  # the same caption whatever the number of processes.
  ds = ds.random_map(SampleCaptionAndEncode(encoder))
  ds = ds[process_index::process_count]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.data.read_threads,
                                            prefetch_buffer_size=2 * local_batch))
  it = it.batch(local_batch, drop_remainder=True)
  if config.data.num_workers > 0:
    # Grain's worker processes read absl flags; outside `absl.app` (notebooks, tests) nothing
    # parsed them yet.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.num_workers,
        per_worker_buffer_size=config.data.worker_buffer_size))
  return it
