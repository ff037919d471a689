"""Grain input pipelines: random-access sources -> global seeded shuffle -> per-process shard ->
transforms -> weighted mixture -> batches of this process's rows.

The order of examples is a pure function of (seed, step): each source's shuffle is global (the
same permutation in every process), each process then takes every `process_count`-th element, so
the union of all processes' batch k is the same set of examples whatever the number of processes.
Mixtures interleave the per-source streams deterministically in proportion to their weights
(`grain.MapDataset.mix`); with `config.data.sub_batches = k` each batch is instead k
single-source sub-batches (harder in-batch negatives). The iterator's state goes into every
checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.

Batch columns (B = batch_size / process_count rows, S = image size, L = max_len, K =
num_hard_negatives): see `batch_spec`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import grain
import numpy as np
from absl import flags

from mmjax.data import augment, demo, sources as sources_lib, teacher_embed, transforms
from mmjax.data.tokenizer import TextEncoder
from mmjax.types import check_batch_divides

log = logging.getLogger(__name__)

# Columns that stay on the host; the train step reads all the others: the pair itself, 'group'
# (masks duplicates out of the loss), 'weight' (scales each example's terms: click
# inverse-propensity weights, 1 elsewhere), and the hard negatives 'neg_*' (losses.contrastive).
HOST_COLUMNS = ('source',)


def batch_spec(config, *, text_pairs: bool | None = None
               ) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{column: (shape, dtype)} of one global batch (divide B by the process count for local).
  `text_pairs`: whether the sources hold text-text pairs (None: look at them)."""
  if text_pairs is None:
    text_pairs = is_text_pairs(config)
  b, s = config.batch_size, config.model.image.image_size
  L, k = config.model.text.max_len, config.data.num_hard_negatives
  spec = {'tokens': ((b, L), np.int32), 'mask': ((b, L), np.int32),
          'group': ((b,), np.int32), 'weight': ((b,), np.float32), 'source': ((b,), np.int32)}
  if text_pairs or caption_query(config):
    spec |= {'query_tokens': ((b, L), np.int32), 'query_mask': ((b, L), np.int32)}
  if not text_pairs:
    spec['image'] = ((b, s, s, 3), np.uint8)
  if k:
    spec |= {'neg_tokens': ((b, k, L), np.int32), 'neg_mask': ((b, k, L), np.int32),
             'neg_text_valid': ((b, k), np.int32)}
    if not text_pairs:
      spec |= {'neg_image': ((b, k, s, s, 3), np.uint8), 'neg_image_valid': ((b, k), np.int32)}
  return spec


def distills_from_data(config) -> bool:
  """Whether the run distils from teacher embeddings precomputed into the data."""
  return teacher_embed.distills(config) and config.distill.source == 'data'


def caption_query(config) -> bool:
  """Image-text batches also carry 'query_tokens': another caption of the same image (the
  positives of the 'text_text' task)."""
  return 'text_text' in dict(config.multitask.tasks)


def train_columns(config, *, text_pairs: bool | None = None) -> tuple[str, ...]:
  """The batch columns the train step reads."""
  return tuple(k for k in batch_spec(config, text_pairs=text_pairs) if k not in HOST_COLUMNS)


def _text_pairs(srcs) -> bool:
  kinds = {sources_lib.is_text_pairs(s) for s in srcs}
  if len(kinds) > 1:
    raise ValueError('config.data.mixture mixes image-text and text-text sources; their batches '
                     'have different columns. Train them in separate runs or towers.')
  return kinds.pop()


def is_text_pairs(config) -> bool:
  """Whether the run's sources hold text-text pairs (query, text) rather than image-text."""
  return _text_pairs(make_sources(config)[1])


def link_duplicates(local: dict[str, np.ndarray], process_index: int,
                    gather: Callable[[Any], Any] | None = None) -> dict[str, np.ndarray]:
  """This process's batch with `group` computed over the *global* batch's duplicate keys.

  `gather(tree)` returns every process's copy of `tree` stacked on a new leading axis, in
  process order (default `multihost_utils.process_allgather`: 24 bytes per row). Rows of
  different processes that share a group id, an image or a caption are then linked, as they are
  within one process. A batch without the key columns (one process: grouped in the pipeline) is
  returned as is.
  """
  if not all(k in local for k in transforms.KEY_COLUMNS):
    return local
  if gather is None:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    gather = multihost_utils.process_allgather
  # Hashes are 31-bit (-1: none), so int32 carries them through JAX's default dtypes.
  keys = gather({k: local[k].astype(np.int32) for k in transforms.KEY_COLUMNS})
  keys = {k: np.asarray(v, np.int64) for k, v in keys.items()}
  num_processes, rows = keys['caption_key'].shape[:2]
  groups = transforms.assign_groups({k: v.reshape(-1) for k, v in keys.items()})['group']
  out = {k: v for k, v in local.items() if k not in transforms.KEY_COLUMNS}
  out['group'] = groups.reshape(num_processes, rows)[process_index]
  return out


def make_sources(config) -> tuple[list[sources_lib.SourceSpec], list[Any]]:
  specs = sources_lib.specs_from_config(config.data)
  srcs = [sources_lib.make(s, num_demo_examples=config.data.num_train_examples,
                           image_size=config.model.image.image_size, seed=config.seed,
                           num_negatives=config.data.num_hard_negatives)
          for s in specs]
  return specs, srcs


def caption_corpus(config, limit: int = 50_000):
  """Captions to train the run's tokenizer on: the demo corpus, or the configured sources'."""
  specs, srcs = make_sources(config)
  if all(s.name == 'demo' for s in specs):
    return demo.caption_corpus(num_scenes=2000, seed=config.seed)
  return sources_lib.caption_corpus(srcs, limit)


def _concat(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """[k, B/k, ...] single-source sub-batches -> [B, ...]."""
  return {name: x.reshape((-1,) + x.shape[2:]) for name, x in batch.items()}


def _source_stream(config, i: int, spec, src, *, encoder: TextEncoder | None,
                   text_pairs: bool, teacher_encoder: TextEncoder | None,
                   transform: Callable[[int], grain.transforms.RandomMap] | None
                   ) -> grain.MapDataset:
  """Source `i` as an endless stream of transformed elements: seeded by (seed, i), globally
  shuffled anew every epoch (`make_train_dataset`)."""
  data = config.data
  if len(src) == 0:
    raise ValueError(f'Data source {i} ({spec.name} {spec.path or spec.tfds_name}) is empty.')
  if distills_from_data(config):  # Precomputed teacher embeddings ride along as columns.
    src = teacher_embed.TeacherEmbeddings(src, teacher_embed.path(config.distill.embeddings, i))
  ds = grain.MapDataset.source(src).seed(int(np.random.SeedSequence([config.seed, i])
                                             .generate_state(1)[0]))
  ds = ds.shuffle().repeat(None)  # A new permutation every epoch.
  # Transforms are lazy and seeded by the global index, so they are the same in every process
  # whatever the process count; only the rows this process keeps below are computed.
  ds = ds.random_map(transform(i) if transform is not None else transforms.Preprocess(
      encoder, view=augment.view(data, config.model.image.image_size),
      augment=augment.from_config(data), caption_sampling=data.caption_sampling,
      num_negatives=data.num_hard_negatives, source_index=i, text_pairs=text_pairs,
      teacher_encoder=teacher_encoder, caption_query=caption_query(config) and not text_pairs,
      decode_cache_mb=data.decode_cache_mb))
  return ds


def _mix_and_batch(streams, weights, data, local_batch: int, read, process_index: int,
                   process_count: int) -> grain.IterDataset:
  """This process's batches of the weighted mix of `streams`: k single-source sub-batches per
  batch when data.sub_batches = k, else rows of all sources interleaved."""
  sub = data.sub_batches
  if sub:
    parts = [transforms.SkipCorrupt(ds[process_index::process_count].to_iter_dataset(read),
                                    data.max_skip_fraction)
             .batch(local_batch // sub, drop_remainder=True) for ds in streams]
    it = grain.IterDataset.mix(parts, weights) if len(parts) > 1 else parts[0]
    it = it.batch(sub, drop_remainder=True).map(_concat)
  else:
    # Mix first, then shard: the processes' batch k together hold the one-process batch k.
    ds = grain.MapDataset.mix(streams, weights) if len(streams) > 1 else streams[0]
    ds = ds[process_index::process_count]
    it = transforms.SkipCorrupt(ds.to_iter_dataset(read), data.max_skip_fraction)
    it = it.batch(local_batch, drop_remainder=True)
  return it


def make_train_dataset(config, encoder: TextEncoder | None, *, process_index: int = 0,
                       process_count: int = 1, teacher_encoder: TextEncoder | None = None,
                       text_pairs: bool | None = None,
                       transform: Callable[[int], grain.transforms.RandomMap] | None = None
                       ) -> grain.IterDataset:
  """Infinite iterator dataset of this process's dual-encoder batches (batch_size /
  process_count rows); the LLM embedder's are `mmjax.data.llm_tasks.make_train_dataset`.

  `teacher_encoder`: a live distillation teacher's tokenizer (adds 'teacher_tokens'/'_mask').
  `text_pairs`: the run's data contract (None: look at the sources). `transform(i)`: the
  per-element transform of source i instead of `transforms.Preprocess` (the LLM embedder's
  tasks on records/TFDS); it must give 'ok' and the `transforms.KEY_COLUMNS` like Preprocess."""
  check_batch_divides(config.batch_size, process_count)
  local_batch = config.batch_size // process_count
  data = config.data
  sub = data.sub_batches
  if sub and local_batch % sub:
    raise ValueError(f'config.data.sub_batches={sub} does not divide the {local_batch} rows per '
                     'process.')
  specs, srcs = make_sources(config)
  text_pairs = _text_pairs(srcs) if text_pairs is None else text_pairs
  read = grain.ReadOptions(num_threads=data.read_threads, prefetch_buffer_size=2 * local_batch)
  streams = [_source_stream(config, i, spec, src, encoder=encoder, text_pairs=text_pairs,
                            teacher_encoder=teacher_encoder, transform=transform)
             for i, (spec, src) in enumerate(zip(specs, srcs))]
  weights = sources_lib.mixture_weights(specs, [len(src) for src in srcs],
                                        data.mixture_temperature)
  if len(specs) > 1:
    log.info('Mixture sampling proportions: %s.', ', '.join(
        f'{s.name} {s.path or s.tfds_name} {w:.4f}'.replace('  ', ' ') for s, w in
        zip(specs, weights)))
  it = _mix_and_batch(streams, weights, data, local_batch, read, process_index, process_count)
  if process_count == 1:
    it = it.map(transforms.assign_groups)
  # With several processes the duplicate keys stay in the batch: `link_duplicates` groups them
  # over every process's rows before the step.
  return prefetch(it, data)


def prefetch(it: grain.IterDataset, data) -> grain.IterDataset:
  """`it` read by `data.num_workers` Grain worker processes (0: in this process)."""
  if data.num_workers > 0:
    # Grain's worker processes read absl flags; outside `absl.app` (notebooks, tests) nothing
    # parsed them yet.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data.num_workers, per_worker_buffer_size=data.worker_buffer_size))
  return it
