r"""Cold vs warm start-to-first-step of `python -m mmjax.main` (the persistent compilation cache).

  python bench/startup.py [--config=configs/demo.py] [--rounds=2] [--arg=--config.X=Y ...] \
      [--noappend] [--note="..."]

Each round runs the same config twice, each time in a fresh child process and a fresh workdir:
*cold* with an empty compilation cache directory, then *warm* with the directory the cold run
filled (`--config.compilation_cache=DIR`: what a repeated run or a resumed one finds in the
default 'user' cache). Each child is stopped once it logs 'First step done'. Reported per run:
seconds from the process start to the state being ready ('Model: ...' line: after set-up, the
train step's compilation and the parameter init or restore), the train step's compile time (its
own log line) and to the first finished step; the cold / warm ratio. Before the first
round one untimed import of mmjax fills the OS file cache, so cold means "not compiled", not
"not read from disk". Appended to BENCHMARKS.md with the load average.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import statistics
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))

import children  # noqa: E402

REPO = children.REPO
FIRST_STEP = 'First step done'


def one_run(args, workdir: pathlib.Path, cache: pathlib.Path) -> dict:
  cmd = [sys.executable, '-m', 'mmjax.main', f'--config={args.config}', f'--workdir={workdir}',
         f'--config.compilation_cache={cache}', *args.arg]
  res = children.run(cmd, echo=args.echo, stop_at=FIRST_STEP, timeout_s=args.timeout_s)
  first = res.first(FIRST_STEP)
  if first is None:
    raise RuntimeError(f'{" ".join(cmd)} never logged {FIRST_STEP!r}:\n{res.text[-3000:]}')
  m = re.search(r'Train step compiled in ([\d.]+) s', res.text)
  return {'first_step_s': first, 'setup_s': res.first('Model: '),
          'compile_s': float(m[1]) if m else None,
          'cache_files': len(list(cache.glob('*-cache')))}


def fmt(r: dict) -> str:
  return (f"first step {r['first_step_s']:.1f} s (state ready at {r['setup_s']:.1f} s, train step "
          f"compile {r['compile_s']:.1f} s, {r['cache_files']} cached programs)")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--arg', action='append', default=[],
                      help='Extra mmjax.main argument, e.g. --config.batch_size=64.')
  parser.add_argument('--rounds', type=int, default=2)
  parser.add_argument('--timeout_s', type=float, default=900)
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--noappend', dest='append', action='store_false', help=argparse.SUPPRESS)
  parser.add_argument('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'))
  parser.add_argument('--note', default='')
  parser.add_argument('--echo', action='store_true')
  args = parser.parse_args(argv)
  children.run([sys.executable, '-c', 'import mmjax.train.loop']).check()  # OS file cache.
  load_before = children.loadavg()
  rows, ratios = [], []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      cache = pathlib.Path(tmp) / f'cache{r}'
      cold = one_run(args, pathlib.Path(tmp) / f'cold{r}', cache)
      warm = one_run(args, pathlib.Path(tmp) / f'warm{r}', cache)
      ratios.append(cold['first_step_s'] / warm['first_step_s'])
      rows += [f'| {r} | cold | {fmt(cold)} |', f'| {r} | warm | {fmt(warm)} |']
      print(rows[-2], rows[-1], sep='\n', flush=True)
  lines = [f'- command: `python bench/startup.py {" ".join(sys.argv[1:])}`',
           f'- config: `{args.config}` {" ".join(args.arg)}',
           f'- load average (1/5/15 min): {load_before} before, {children.loadavg()} after',
           *([f'- note: {args.note}'] if args.note else []),
           '', '| round | cache | start-to-first-step |', '|---|---|---|', *rows, '',
           f'- cold / warm start-to-first-step: {", ".join(f"{x:.2f}x" for x in ratios)} '
           f'(median {statistics.median(ratios):.2f}x)']
  print('\n'.join(lines))
  if args.append:
    children.append_block(pathlib.Path(args.benchmarks_file),
                          'startup: cold vs warm compilation cache', lines)
  return {'ratios': ratios}


if __name__ == '__main__':
  main()
