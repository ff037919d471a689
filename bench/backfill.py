r"""Backfill throughput (mmjax.deploy.backfill): items/s and the device-busy fraction.

  python bench/backfill.py [--n=2000] [--modality=image] [--batch_size=256] [--shard_size=1024] \
      [--workers=1,4] [--export=runs/demo/export] [--note="..."] [--noappend]

The demo model (configs/demo.py's towers; random parameters unless --export names a trained
params export) is exported for serving, compiled once (not timed), then `--n` demo validation
scenes are backfilled into a fresh store for each `--workers` setting. Reported per setting: wall
time, items/s and the device-busy fraction (the share of the wall time spent in the embedding
calls, transfers included). The reference is the embedding alone on the same items, already
decoded: the items/s a perfect input side would reach. On a CPU-only machine the "device" is the
same cores the decoding threads use, so the two compete; the load average is recorded with it.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO, REPO / 'bench'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import train_step as tsb  # noqa: E402  (provenance helpers; --append, --note, --benchmarks_file)
from mmjax import embedder as embedder_lib, kinds  # noqa: E402
from mmjax.data import demo, tokenizer as tokenizer_lib  # noqa: E402
from mmjax.deploy import backfill, export, serving  # noqa: E402

flags.DEFINE_integer('n', 2000, 'Demo validation scenes backfilled.')
flags.DEFINE_enum('modality', 'image', ['image', 'text'], 'What is embedded.')
flags.DEFINE_integer('batch_size', 256, 'Embedding batch.')
flags.DEFINE_integer('shard_size', 1024, 'Items per shard.')
flags.DEFINE_list('workers', ['1', '4'], 'Decoding threads, one run each.')
flags.DEFINE_string('export', '', 'A trained params export (default: random demo towers).')
FLAGS = flags.FLAGS


def demo_export(directory: pathlib.Path) -> pathlib.Path:
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  config = demo_config.get_config()
  kind = kinds.get(config)
  model_config = kind.model_config(config)
  model = kind.model(model_config)
  params = nn.unbox(model.init(jax.random.key(0), *model.init_inputs())['params'])
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=2000),
                                      vocab_size=model_config.text.vocab_size)
  encoder = tokenizer_lib.TextEncoder(tok, model_config.text.max_len)
  return embedder_lib.export(directory / 'export', model_config, params, encoder.to_str())


def main(argv):
  del argv
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='bench_backfill_'))
  try:
    params_dir = pathlib.Path(FLAGS.export) if FLAGS.export else demo_export(tmp / 'model')
    served = export.export_serving(params_dir, tmp / 'serving', name='bench')
    model = serving.load(served, batch_size=FLAGS.batch_size, devices=jax.local_devices())
    size = model.spec['image_size']
    scenes = demo.DemoScenes('validation', FLAGS.n, image_size=size)
    if FLAGS.modality == 'image':
      inputs = np.stack([scenes[i]['image'] for i in range(FLAGS.n)])
    else:
      inputs = [scenes[i]['captions'][0] for i in range(FLAGS.n)]
    model.embed(FLAGS.modality, inputs[:FLAGS.batch_size])  # Compile (not timed).
    t0 = time.perf_counter()
    model.embed(FLAGS.modality, inputs)
    embed_only = FLAGS.n / (time.perf_counter() - t0)
    rows = [('embedding only (decoded inputs)', f'{embed_only:.1f} items/s', '1.00', '')]
    for workers in map(int, FLAGS.workers):
      load_before = tsb._loadavg()  # pylint: disable=protected-access
      report = backfill.backfill(model, f'demo:{FLAGS.n}', tmp / f'store{workers}',
                                 modality=FLAGS.modality, shard_size=FLAGS.shard_size,
                                 batch_size=FLAGS.batch_size, workers=workers, progress=False)
      rows.append((f'backfill, {workers} decoding thread(s)',
                   f'{report["items_per_second"]:.1f} items/s',
                   f'{report["device_busy_fraction"]:.2f}',
                   f'{load_before} / {tsb._loadavg()}'))  # pylint: disable=protected-access
      print(rows[-1])
    body = ['| run | throughput | device-busy fraction | load avg before / after |',
            '|---|---|---|---|', *[f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows]]
    print('\n'.join(body))
    if FLAGS.append:
      tsb.append_result(
          f'backfill: {FLAGS.modality}, {FLAGS.n} demo scenes, batch {FLAGS.batch_size}',
          [f'- model: {"demo towers, random init" if not FLAGS.export else FLAGS.export}; '
           f'devices {jax.local_device_count()}; os.cpu_count() {os.cpu_count()}',
           *([f'- note: {FLAGS.note}'] if FLAGS.note else [])], body)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
  app.run(main)
