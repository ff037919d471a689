r"""GradCache: the largest global batch that fits a per-device memory cap, and its step-time cost.

  python bench/gradcache.py [--config=configs/demo.py] [--devices=8] [--memory_cap_mib=512] \
      [--micro_rows=16] [--max_batch=16384] [--time_batch=256] [--time_micro_batches=4] \
      [--steps=3] [--noappend]

1. Memory: for global batches 2x apart up to --max_batch, the real train step (mmjax.train.step,
   the step `mmjax.main` runs) is compiled (not run) twice on `--devices` simulated CPU devices:
   plain backprop, and GradCache with micro-batches of --micro_rows rows per device. XLA's
   memory_analysis gives the per-device bytes (arguments + outputs + temporaries). Reported: the
   largest batch whose step fits --memory_cap_mib, each way.
2. Time: at --time_batch the step is run plain and with --time_micro_batches micro-batches;
   the median of --steps warm steps each way gives GradCache's overhead (one extra forward pass:
   ~1.3x is expected for a transformer where backward ~ 2x forward).
"""

from __future__ import annotations

import time

import simulated_devices  # noqa: F401  (before jax: sets --devices)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import train_step as tsb  # noqa: E402  (--config and --append are defined there)
from mmjax import config as config_lib  # noqa: E402
from mmjax.models import TwoTower  # noqa: E402
from mmjax.parallel import mesh as mesh_lib  # noqa: E402
from mmjax.train import optim, state as state_lib, step as step_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('memory_cap_mib', 512, 'Per-device memory cap (MiB).')
flags.DEFINE_integer('micro_rows', 16, 'GradCache micro-batch rows per device.')
flags.DEFINE_integer('max_batch', 16384, 'Largest global batch tried.')
flags.DEFINE_integer('time_batch', 256, 'Global batch of the timing comparison.')
flags.DEFINE_integer('time_micro_batches', 4, 'Micro-batches per device in the timing run.')
flags.DEFINE_integer('timed_steps', 3, 'Timed steps per variant (median reported).')


class Bench:
  """The run's mesh, model, state and a step compiler for (batch, micro_batches)."""

  def __init__(self, config):
    self.config = config
    self.mesh = mesh_lib.make_mesh(config.mesh)
    self.rules = mesh_lib.rules(config)
    self.cfg = config_lib.model_config(config)
    self.model = TwoTower(self.cfg)
    tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
    self.state, self.shardings = state_lib.create_train_state(
        self.model, tx, self.mesh, self.rules, jax.random.key(0))
    self.rng = mesh_lib.replicate(jax.random.key(0), self.mesh)

  def batch(self, batch: int, seed: int = 0):
    return mesh_lib.global_batch(tsb.synthetic_batch(self.cfg, batch, seed), self.mesh)

  def compile(self, batch: int, micro_batches: int):
    config = self.config.copy_and_resolve_references()
    config.batch_size, config.micro_batches = batch, micro_batches
    sh = mesh_lib.batch_sharding(self.mesh)
    spec = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype, sharding=sh)
            for k, v in tsb.synthetic_batch(self.cfg, 1, 0).items()}
    jitted = step_lib.jit_train_step(self.shardings, sh, mesh_lib.replicated(self.mesh),
                                     step_lib.make_options(config, self.mesh))
    with mesh_lib.activate(self.mesh, self.rules):
      return jitted.lower(self.state, spec, self.rng).compile()


def per_device_mib(compiled) -> float:
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes) / 2**20


def median_step_time(bench: Bench, compiled, batch: int, steps: int) -> float:
  state = jax.tree.map(lambda x: x.copy(), bench.state)  # The step donates its input.
  data = bench.batch(batch)
  state, m = compiled(state, data, bench.rng)  # Warm-up.
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, data, bench.rng)
    jax.block_until_ready((state, m))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def main(argv):
  del argv
  bench = Bench(FLAGS.config)
  shards = mesh_lib.make_mesh(FLAGS.config.mesh).shape
  n_shards = shards['data'] * shards['fsdp']
  cap = FLAGS.memory_cap_mib
  rows, fits = [], {'plain': 0, 'gradcache': 0}
  batch = n_shards * FLAGS.micro_rows
  while batch <= FLAGS.max_batch:
    micro = batch // n_shards // FLAGS.micro_rows
    plain = per_device_mib(bench.compile(batch, 1))
    cached = per_device_mib(bench.compile(batch, micro)) if micro > 1 else plain
    rows.append((batch, micro, plain, cached))
    fits['plain'] = batch if plain <= cap else fits['plain']
    fits['gradcache'] = batch if cached <= cap else fits['gradcache']
    print(f'B={batch:>6}: plain {plain:8.1f} MiB, GradCache x{micro} {cached:8.1f} MiB per device',
          flush=True)
    batch *= 2

  tb, tm = FLAGS.time_batch, FLAGS.time_micro_batches
  t_plain = median_step_time(bench, bench.compile(tb, 1), tb, FLAGS.timed_steps)
  t_cached = median_step_time(bench, bench.compile(tb, tm), tb, FLAGS.timed_steps)
  lines = ['| global batch | micro-batches / device | plain MiB / device | GradCache MiB / device |',
           '|---|---|---|---|']
  lines += [f'| {b} | {m} | {p:.1f} | {c:.1f} |' for b, m, p, c in rows]
  summary = [
      f'- largest batch under {cap} MiB per device: plain **{fits["plain"]}**, GradCache '
      f'({FLAGS.micro_rows} rows per micro-batch per device) **{fits["gradcache"]}**'
      + ('' if fits['gradcache'] < FLAGS.max_batch else f' (or more: --max_batch={FLAGS.max_batch})'),
      f'- step time at batch {tb}: plain {t_plain:.3f} s, GradCache x{tm} {t_cached:.3f} s: '
      f'**{t_cached / t_plain:.2f}x** (median of {FLAGS.timed_steps})']
  print('\n'.join(lines + summary))
  if FLAGS.append:
    tsb.append_result(f'gradcache: {tsb.config_name()} on {n_shards} batch shards',
                      ['- memory: XLA memory analysis (arguments + outputs + temp - aliased, per '
                       'device), compiled only', *summary], lines)


if __name__ == '__main__':
  app.run(main)
