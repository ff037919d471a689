r"""Input pipeline throughput vs the train step's consumption.

  python bench/input_pipeline.py --config=configs/demo.py [--workers=0,1,2] [--batches=30] \
      [--steps=5] [--note="..."] [--noappend]

For each worker count, the real training pipeline (`pipeline.make_train_dataset`, with
`config.data.num_workers` set) is iterated for `--batches` batches after a warmup of
`--warmup_batches` (worker start-up and the first batches are not timed); pairs/s = rows / wall
time. The train step of the same config is then compiled through the training loop's own
`setup`/`compile_step` and timed on real pipeline batches (median of `--steps` after
`--warmup_steps`), giving the pairs/s it consumes. The pipeline is not the bottleneck when its
pairs/s exceed the step's. Any `--config.data.*` override (e.g. a records source) applies.
A result block is appended to BENCHMARKS.md (provenance as in bench/train_step.py).
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))

# Reuses train_step's flags (--config, --steps, --warmup_steps, --append, --note,
# --benchmarks_file) and provenance helpers.
import train_step as tsb  # noqa: E402  pylint: disable=wrong-import-position

# pylint: disable=g-import-not-at-top,wrong-import-position
import os  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mmjax import config as config_lib  # noqa: E402
from mmjax.data import pipeline  # noqa: E402
from mmjax.parallel import mesh as mesh_lib  # noqa: E402
from mmjax.train import loop  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain worker counts to measure.')
flags.DEFINE_integer('batches', 30, 'Timed batches per worker count.')
flags.DEFINE_integer('warmup_batches', 3, 'Batches read (and not timed) before timing.')
flags.DEFINE_bool('time_step', True, 'Also compile and time the train step on pipeline batches.')


def pipeline_rate(config, encoder, workers: int) -> tuple[float, float, float]:
  """(pairs/s, seconds to the first batch, CPU seconds of this process per batch) of the
  training pipeline with `workers` workers. With 0 workers every read thread is in this process,
  so the CPU time is the pipeline's whole cost, and much steadier than wall time on a busy
  machine; with workers it is only the consumer's share."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.num_workers = workers
  t0 = time.perf_counter()
  it = iter(pipeline.make_train_dataset(config, encoder))
  next(it)
  first = time.perf_counter() - t0
  for _ in range(FLAGS.warmup_batches - 1):
    next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(FLAGS.batches):
    next(it)
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  del it  # Stops the worker processes.
  return FLAGS.batches * config.batch_size / dt, first, cpu / FLAGS.batches


def step_rate(config) -> tuple[float, float]:
  """(pairs/s, median step seconds) of the compiled train step on real pipeline batches."""
  with tempfile.TemporaryDirectory() as workdir:
    run = loop.setup(config, workdir)
    state, rng, _ = loop.init_or_restore(run, None)
    columns = pipeline.train_columns(config)
    compiled = loop.compile_step(run, state, rng, columns)
    it = iter(pipeline.make_train_dataset(config, run.encoder))
    batches = [mesh_lib.global_batch({k: b[k] for k in columns}, run.mesh)
               for b in (next(it) for _ in range(2))]
    times = []
    for i in range(FLAGS.warmup_steps + FLAGS.steps):
      t0 = time.perf_counter()
      state, metrics = compiled(state, batches[i % 2], rng)
      jax.block_until_ready((state, metrics))
      if i >= FLAGS.warmup_steps:
        times.append(time.perf_counter() - t0)
    run.checkpointer.close()
    step_s = float(np.median(times))
    return config.batch_size / step_s, step_s


def main(argv):
  config = FLAGS.config
  config_lib.validate(config)
  workers = [int(w) for w in FLAGS.workers]
  with tempfile.TemporaryDirectory() as tmp:
    encoder = loop.setup(config, tmp).encoder
  load_before = tsb._loadavg()  # pylint: disable=protected-access
  rates = {w: pipeline_rate(config, encoder, w) for w in workers}
  consume, step_s = step_rate(config) if FLAGS.time_step else (None, None)
  load_after = tsb._loadavg()  # pylint: disable=protected-access
  rows = [('config', ' '.join([tsb.config_name()] + tsb.config_overrides(sys.argv))),
          ('batch', f'{config.batch_size} pairs, data.name={config.data.name}, '
                    f'mixture={len(config.data.mixture)} sources')]
  for w, (rate, first, cpu) in rates.items():
    rows.append((f'pipeline, {w} workers', f'{rate:.0f} pairs/s ({FLAGS.batches} batches; first '
                                           f'batch after {first:.1f} s; {cpu:.3f} CPU s per '
                                           f'batch in this process)'))
  if consume is not None:
    rows.append(('train step consumes', f'{consume:.1f} pairs/s (median step {step_s:.3f} s, '
                                        f'{FLAGS.steps} steps after {FLAGS.warmup_steps} warmup)'))
    best = max(r for r, _, _ in rates.values())
    rows.append(('headroom', f'best pipeline / step = {best / consume:.1f}x '
                             f'({"not" if best > consume else "IS"} the bottleneck)'))
  rows.append(('load average', f'{load_before} -> {load_after} on {os.cpu_count()} cores'))
  text = tsb.table(rows)
  print(text)
  if FLAGS.append:
    tsb.append_result(f'input_pipeline: {tsb.config_name()}',
                      [f'- note: {FLAGS.note}'] if FLAGS.note else [],
                      ['| metric | value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in rows])


if __name__ == '__main__':
  app.run(main)
