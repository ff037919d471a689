r"""What each encoder rematerialisation policy costs and saves on the bench-tiny train step.

  python bench/remat.py [--config=configs/bench_tiny.py] [--policies=none,nothing_saveable,...] \
      [--time_rounds=0] [--steps=3] [--noappend] [--note="..."]

Part 1 (deterministic, no step is run): for each policy (`model.image.remat` +
`model.text.remat` with `remat_policy`; 'none' is no remat) the train step is lowered on
abstract arrays and compiled; XLA's memory analysis (temp bytes: activations kept for the
backward pass and scratch), its FLOP count, and op counts of the optimised HLO (fusions,
transposes, copies) are recorded. These do not depend on the machine's load.

Part 2 (--time_rounds=N > 0): N interleaved rounds (policy A, B, C, A, B, C, ...) of
`bench/train_step.py` in fresh child processes: median step time and the child's peak RSS.
Only the ratios between policies of one run mean anything on a loaded machine.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import statistics
import sys

BENCH = pathlib.Path(__file__).resolve().parent
REPO = BENCH.parent
for p in (str(BENCH), str(REPO)):
  if p not in sys.path:
    sys.path.insert(0, p)

import children  # noqa: E402
import jax  # noqa: E402

from mmjax import config as config_lib  # noqa: E402
from mmjax.models import TwoTower  # noqa: E402
from mmjax.parallel import mesh as mesh_lib  # noqa: E402
from mmjax.train import loop, optim, state as state_lib, step as step_lib  # noqa: E402
from mmjax.types import ENCODER_REMAT_POLICIES  # noqa: E402

DEFAULT_POLICIES = ('none',) + ENCODER_REMAT_POLICIES


def overrides(policy: str) -> list[str]:
  if policy == 'none':
    return []
  return [f'--config.model.{t}.{k}={v}' for t in ('image', 'text')
          for k, v in (('remat', True), ('remat_policy', policy))]


def compiled_stats(config) -> dict:
  """Lowers and compiles the train step on abstract state and batch (nothing is allocated)."""
  mesh, rules = mesh_lib.make_mesh(config.mesh), mesh_lib.rules(config)
  model = TwoTower(config_lib.model_config(config))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  abstract, shardings = state_lib.state_layout(model, tx, mesh, rules, jax.random.key(0))
  cfg = config_lib.model_config(config)
  b, s, L = config.batch_size, cfg.image.image_size, cfg.text.max_len
  batch_sh = mesh_lib.batch_sharding(mesh)
  batch = {'image': jax.ShapeDtypeStruct((b, s, s, 3), 'uint8', sharding=batch_sh),
           'tokens': jax.ShapeDtypeStruct((b, L), 'int32', sharding=batch_sh),
           'mask': jax.ShapeDtypeStruct((b, L), 'int32', sharding=batch_sh)}
  repl = mesh_lib.replicated(mesh)
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  jitted = step_lib.jit_train_step(shardings, batch_sh, repl, step_lib.make_options(config, mesh))
  with mesh_lib.activate(mesh, rules):
    compiled = jitted.lower(abstract, batch, key).compile()
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  ops = collections.Counter(re.findall(r'= \S+ (fusion|transpose|copy|dot|convolution)\(', hlo))
  return {'temp_mib': mem.temp_size_in_bytes / 2**20, 'args_mib': mem.argument_size_in_bytes / 2**20,
          'flops': loop.step_flops(compiled), **{f'n_{k}': ops.get(k, 0) for k in
                                                 ('fusion', 'transpose', 'copy', 'dot')}}


def apply_overrides(config, args: list[str]):
  for o in args:
    key, value = o[len('--config.'):].split('=', 1)
    *parents, leaf = key.split('.')
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value if isinstance(node[leaf], str) else (value == 'True' if isinstance(
        node[leaf], bool) else type(node[leaf])(value))
  return config


def timed_round(args, policy: str) -> dict:
  cmd = [sys.executable, str(BENCH / 'train_step.py'), f'--config={args.config}', '--noappend',
         f'--steps={args.steps}', '--warmup_steps=1', '--matmul_runs=1', '--matmul_n=512',
         *overrides(policy), *args.arg]
  res = children.run(cmd).check()
  m = re.search(r'step time\s+median ([\d.]+) s', res.text)
  return {'median': float(m[1]), 'maxrss': res.maxrss_bytes}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--policies', default=','.join(DEFAULT_POLICIES))
  parser.add_argument('--arg', action='append', default=[], help='Extra --config.X=Y override.')
  parser.add_argument('--time_rounds', type=int, default=0)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--noappend', dest='append', action='store_false', help=argparse.SUPPRESS)
  parser.add_argument('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'))
  parser.add_argument('--note', default='')
  args = parser.parse_args(argv)
  policies = args.policies.split(',')
  for p in policies:
    if p not in DEFAULT_POLICIES:
      parser.error(f'--policies: {p!r} is not one of {", ".join(DEFAULT_POLICIES)}.')
  stats = {}
  for p in policies:
    config = apply_overrides(config_lib.load_config_file(args.config), overrides(p) + args.arg)
    config_lib.validate(config)
    stats[p] = compiled_stats(config)
    print(p, stats[p], flush=True)
  load_before = children.loadavg()
  times = {p: [] for p in policies}
  for _ in range(args.time_rounds):
    for p in policies:
      times[p].append(timed_round(args, p))
      print(p, times[p][-1], flush=True)
  base = stats[policies[0]]
  rows = ['| policy | XLA temp | vs first | step FLOPs (XLA) | vs first | fusions / transposes / '
          'copies / dots | median step (rounds) | peak RSS |', '|---|---|---|---|---|---|---|---|']
  for p in policies:
    s, t = stats[p], times[p]
    timing = (f"{statistics.median(r['median'] for r in t):.3f} s ({len(t)})" if t else 'n/a')
    rss = f"{max(r['maxrss'] for r in t) / 1e9:.2f} GB" if t else 'n/a'
    rows.append(f"| {p} | {s['temp_mib']:.0f} MiB | {s['temp_mib'] / base['temp_mib']:.2f}x | "
                f"{s['flops'] / 1e12:.3f} T | {s['flops'] / base['flops']:.2f}x | {s['n_fusion']} / "
                f"{s['n_transpose']} / {s['n_copy']} / {s['n_dot']} | {timing} | {rss} |")
  lines = [f'- command: `python bench/remat.py {" ".join(sys.argv[1:])}`',
           f'- config: `{args.config}` {" ".join(args.arg)}; remat on both towers\' blocks',
           f'- load average during the timed rounds: {load_before} -> {children.loadavg()}'
           if args.time_rounds else '- no timed rounds (memory and FLOPs only: deterministic)',
           *([f'- note: {args.note}'] if args.note else []), '', *rows]
  print('\n'.join(lines))
  if args.append:
    children.append_block(pathlib.Path(args.benchmarks_file),
                          'remat: encoder rematerialisation policies', lines)
  return {'stats': stats, 'times': times}


if __name__ == '__main__':
  main()
