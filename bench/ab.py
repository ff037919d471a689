r"""Interleaved A/B of the train step: two sets of overrides, A, B, A, B ... in fresh processes.

  python bench/ab.py --b=--config.cpu_memory_scheduler=True [--a=...] [--rounds=3] [--steps=3] \
      [--config=configs/bench_tiny.py] [--noappend] [--note="..."]

Each round runs `bench/train_step.py` with A's then B's overrides (repeat --a / --b for several),
each in a fresh child process; reported: each side's median step over the rounds' medians, its
min, the child's peak RSS (`os.wait4`), XLA's temp bytes, and B/A ratios. On a loaded machine
only the ratio of one interleaved run means anything; the temp bytes do not depend on load.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import sys

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))

import children  # noqa: E402

REPO = children.REPO


def one(args, overrides: list[str]) -> dict:
  cmd = [sys.executable, str(BENCH / 'train_step.py'), f'--config={args.config}', '--noappend',
         f'--steps={args.steps}', f'--warmup_steps={args.warmup_steps}', '--matmul_runs=1',
         '--matmul_n=512', *overrides]
  res = children.run(cmd).check()
  m = re.search(r'step time\s+median ([\d.]+) s \(min ([\d.]+)', res.text)
  t = re.search(r'temp ([\d.]+) MiB', res.text)
  return {'median': float(m[1]), 'min': float(m[2]), 'maxrss': res.maxrss_bytes,
          'temp_mib': float(t[1]) if t else float('nan')}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--a', action='append', default=[])
  parser.add_argument('--b', action='append', default=[])
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--warmup_steps', type=int, default=1)
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--noappend', dest='append', action='store_false', help=argparse.SUPPRESS)
  parser.add_argument('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'))
  parser.add_argument('--note', default='')
  args = parser.parse_args(argv)
  load_before = children.loadavg()
  runs = {'A': [], 'B': []}
  for r in range(args.rounds):
    for side, ov in (('A', args.a), ('B', args.b)):
      runs[side].append(one(args, ov))
      print(f'round {r} {side}: {runs[side][-1]}', flush=True)
  s = {k: {'median': statistics.median(x['median'] for x in v), 'min': min(x['min'] for x in v),
           'maxrss': max(x['maxrss'] for x in v), 'temp_mib': v[0]['temp_mib'],
           'rounds': [x['median'] for x in v]} for k, v in runs.items()}
  rows = ['| side | overrides | median step | min step | peak RSS (child) | XLA temp | round medians |',
          '|---|---|---|---|---|---|---|']
  for k, ov in (('A', args.a), ('B', args.b)):
    v = s[k]
    rows.append(f"| {k} | `{' '.join(ov) or '(defaults)'}` | {v['median']:.3f} s | {v['min']:.3f} s "
                f"| {v['maxrss'] / 1e9:.2f} GB | {v['temp_mib']:.0f} MiB | "
                f"{', '.join(f'{t:.3f}' for t in v['rounds'])} |")
  a, b = s['A'], s['B']
  lines = [f'- command: `python bench/ab.py {" ".join(sys.argv[1:])}`',
           f'- config: `{args.config}`; {args.rounds} interleaved rounds (A, B, ...), '
           f'{args.steps} timed steps after {args.warmup_steps} warm-up per run',
           f'- load average (1/5/15 min): {load_before} before, {children.loadavg()} after',
           *([f'- note: {args.note}'] if args.note else []), '', *rows, '',
           f"- B / A: step time {b['median'] / a['median']:.3f}x (median), "
           f"{b['min'] / a['min']:.3f}x (min); peak RSS {b['maxrss'] / a['maxrss']:.3f}x; "
           f"XLA temp {b['temp_mib'] / a['temp_mib']:.3f}x"]
  print('\n'.join(lines))
  if args.append:
    children.append_block(pathlib.Path(args.benchmarks_file), 'A/B: train step', lines)
  return s


if __name__ == '__main__':
  main()
