r"""Backfill a corpus into a versioned embedding store (mmjax.deploy.backfill).

  python -m mmjax.deploy.backfill --model=runs/demo/serving --data=demo:5000 --out=runs/store
  # multi-host: the same command on every process, with the jax.distributed settings of training
  python -m mmjax.deploy.backfill ... --coordinator_address=HOST:PORT --num_processes=N \
      --process_id=I
"""

from __future__ import annotations

import json
import sys

from absl import flags

from mmjax import cli, schema
from mmjax.deploy import backfill
from mmjax.parallel import distributed

flags.DEFINE_string('model', None, 'A serving export (python -m mmjax.deploy.export).')
flags.DEFINE_string('data', None, 'The corpus: demo:N[:SPLIT[:SEED]], manifest:FILE or '
                    'records:DIR (docs/deploy.md).')
flags.DEFINE_string('out', None, 'The store; the vectors go to OUT/<model version>/.')
flags.DEFINE_enum('modality', 'image', ['image', 'text'], 'What of each item is embedded.')
flags.DEFINE_integer('shard_size', 1024, 'Items per shard (the unit of commit and resume).')
flags.DEFINE_enum('dtype', 'float32', ['float32', 'float16', 'int8'],
                  'Stored vectors (int8 with a float32 scale per row).')
flags.DEFINE_integer('batch_size', 256, 'Embedding batch (rounded up to the local devices).')
flags.DEFINE_integer('workers', 4, 'Threads decoding and preprocessing items.')
flags.DEFINE_integer('max_pixels', backfill.MAX_PIXELS, 'Larger images are bad inputs.')
flags.DEFINE_integer('max_text_chars', backfill.MAX_TEXT_CHARS, 'Longer texts are bad inputs.')
flags.DEFINE_bool('progress', True, 'Show a progress bar (items/s, ETA).')
_DIST = schema.get_config().distributed
flags.DEFINE_string('coordinator_address', _DIST.coordinator_address,
                    'config.distributed.coordinator_address: "" (one process), HOST:PORT or auto.')
flags.DEFINE_integer('num_processes', _DIST.num_processes, 'config.distributed.num_processes.')
flags.DEFINE_integer('process_id', _DIST.process_id, 'config.distributed.process_id.')
flags.DEFINE_string('cpu_collectives', _DIST.cpu_collectives,
                    'config.distributed.cpu_collectives (CPU-only multi-process runs).')
flags.mark_flags_as_required(['model', 'data', 'out'])
FLAGS = flags.FLAGS


def main() -> None:
  dist = schema.get_config().distributed
  dist.coordinator_address, dist.num_processes = FLAGS.coordinator_address, FLAGS.num_processes
  dist.process_id, dist.cpu_collectives = FLAGS.process_id, FLAGS.cpu_collectives
  distributed.initialize(dist)  # Before anything touches a JAX backend, as in training.
  try:
    report = backfill.backfill(
        FLAGS.model, FLAGS.data, FLAGS.out, modality=FLAGS.modality, shard_size=FLAGS.shard_size,
        dtype=FLAGS.dtype, batch_size=FLAGS.batch_size, max_pixels=FLAGS.max_pixels,
        max_text_chars=FLAGS.max_text_chars, workers=FLAGS.workers, progress=FLAGS.progress)
  except (ValueError, FileNotFoundError) as e:  # StoreError, ServingExportError, a bad --data.
    sys.exit(f'Refused: {e}')
  bad = report.get('bad') or []
  if report.get('process', 0) == 0:
    print(json.dumps({k: v for k, v in report.items() if k != 'bad'}, sort_keys=True))
    print(f'{len(bad)} bad input(s) in the store' + (':' if bad else '.'))
    for entry in bad[:50]:
      print(f'  {entry["id"]}: {entry["reason"]}')
    if len(bad) > 50:
      print(f'  ... and {len(bad) - 50} more (all in the manifest).')


if __name__ == '__main__':
  cli.run(main)
