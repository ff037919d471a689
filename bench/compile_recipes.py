r"""Compiles shipped recipes for their TPU topologies on this CPU and records the compiled figures.

  python bench/compile_recipes.py [--recipes=tiny@v5e:2x2,demo@v5e:4x4] [--noappend]

Needs the `tpu` extra (libtpu). Each recipe (`configs/<name>.py`) goes through
`mmjax.train.aot.compile_for_topology`, the function behind `--mode=compile`, so these are the
figures `python -m mmjax.main --mode=compile` prints: per-chip memory against HBM, FLOPs per
step, the collectives of the compiled program and the roofline step-time ESTIMATE. With --append
(the default) a block is appended to BENCHMARKS.md; the JSON reports stay in --workdir.
"""

from __future__ import annotations

import datetime
import importlib
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from mmjax.train import aot  # noqa: E402
from provenance import cpu_model, git_revision  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('recipes', ['tiny@v5e:2x2'],
                  'config_name@topology pairs (configs/<config_name>.py).')
flags.DEFINE_string('workdir', '/tmp/mmjax_compile_recipes', 'Where the JSON reports go.')
flags.DEFINE_bool('append', True, 'Append a result block to BENCHMARKS.md.')
flags.DEFINE_string('benchmarks_file', str(REPO / 'BENCHMARKS.md'), 'Where --append writes.')
flags.DEFINE_string('note', '', 'Free text stored with the result.')


def _row(name: str, topology: str, report: dict, seconds: float) -> str:
  p = report['programs']['train_step']
  mem, coll, roof = p['memory'], p['collectives'], p['roofline']
  ops = ', '.join(f'{op} {v["count"]} ({aot.human_bytes(v["bytes"])})'
                  for op, v in coll.items() if v['count'])
  embed = max(q['memory']['total'] for n, q in report['programs'].items() if n != 'train_step')
  return (f'| {name} | {topology} | {report["batch_size"]:,} | {aot.human_bytes(mem["total"])} / '
          f'{mem["hbm"] / 2**30:.0f} GiB (args {aot.human_bytes(mem["arguments"])}, temp '
          f'{aot.human_bytes(mem["temporaries"])}) | {aot.human_bytes(embed)} | '
          f'{aot.human_flops(p["flops"])} | {ops or "none"} | '
          f'{aot.human_seconds(roof["step_s"])} ({roof["bound"]}) | {seconds:.0f} s |')


def main(argv) -> None:
  del argv
  rows = []
  for item in FLAGS.recipes:
    name, _, topology = item.partition('@')
    config = importlib.import_module(f'configs.{name}').get_config()
    workdir = pathlib.Path(FLAGS.workdir) / name
    t0 = time.perf_counter()
    report = aot.compile_for_topology(config, workdir, topology, check_fit=False)
    rows.append(_row(name, topology, report, time.perf_counter() - t0))
  import libtpu  # pylint: disable=import-outside-toplevel  (only for its version)
  now = datetime.datetime.now(datetime.timezone.utc)
  block = '\n'.join([
      f'\n### compile_recipes — {now:%Y-%m-%d %H:%M} UTC',
      '',
      f'commit `{git_revision()}`, compiled on {cpu_model()} (CPU only, no TPU), jax '
      f'{jax.__version__}, libtpu {getattr(libtpu, "__version__", "?")}. Per chip, train step '
      'unless noted; step time is the roofline ESTIMATE of mmjax.train.aot (max of compute, '
      'HBM, ICI time; not a measurement). ' + FLAGS.note,
      '',
      '| recipe | topology | global batch | train step memory / HBM | embed step memory | '
      'FLOPs / step / chip | collectives per step | est. step time | compile time |',
      '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
      *rows, ''])
  print(block)
  if FLAGS.append:
    with open(FLAGS.benchmarks_file, 'a', encoding='utf-8') as f:
      f.write(block)


if __name__ == '__main__':
  app.run(main)
