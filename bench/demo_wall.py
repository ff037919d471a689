r"""`make demo`'s end-to-end wall time, split into install, start-up, compile, train and eval.

  python bench/demo_wall.py [--install] [--config=configs/demo.py] [--arg=--config.X=Y ...] \
      [--noappend] [--note="..."]

install (with --install): a fresh venv in a temporary directory and what `make install` puts in it
(`uv pip install -r requirements/runtime.lock`, then `-e .`), timed; uv's package cache is
whatever this machine has (say so when you quote it). Without --install the demo runs on this
interpreter and install is not measured.

Then `python -m mmjax.main --config=... --workdir=TMP` in a child process with an empty
compilation cache (a first run), its log lines timestamped as they arrive:
- start-up: process start to the start of the train step's compilation (imports, config,
  tokenizer, data pipeline, parameter init);
- compile: the train step's compile time (its own log line);
- train: the rest up to the process end, less the evaluations;
- eval: the sum of the 'Evaluated at step N in X s' lines (embedding, scoring, their compiles).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))

import children  # noqa: E402

REPO = children.REPO


def install(venv: pathlib.Path) -> tuple[float, str]:
  """(seconds, python) of a fresh venv with the runtime lock and mmjax installed."""
  t0 = time.perf_counter()
  children.run([sys.executable, '-m', 'venv', str(venv)]).check()
  py = str(venv / 'bin' / 'python')
  uv = str(pathlib.Path(sys.executable).parent / 'uv')
  uv_cmd = [uv] if pathlib.Path(uv).exists() else [py, '-m', 'uv']
  if not pathlib.Path(uv).exists():
    children.run([py, '-m', 'pip', 'install', '-q', 'uv']).check()
  children.run(uv_cmd + ['pip', 'install', '-q', '--python', py, '-r',
                         str(REPO / 'requirements' / 'runtime.lock')]).check()
  children.run(uv_cmd + ['pip', 'install', '-q', '--python', py, '--no-deps', '-e',
                         str(REPO)]).check()
  return time.perf_counter() - t0, py


def split(res: children.Result) -> dict:
  """Start-up / compile / train / eval seconds from the run's timestamped log lines."""
  compiled_at = res.first('Train step compiled in')
  m = re.search(r'Train step compiled in ([\d.]+) s', res.text)
  if compiled_at is None or m is None:
    raise RuntimeError(f'no compile line in the run:\n{res.text[-3000:]}')
  compile_s = float(m[1])
  eval_s = sum(float(x) for x in re.findall(r'Evaluated at step \d+ in ([\d.]+) s', res.text))
  return {'startup': compiled_at - compile_s, 'compile': compile_s,
          'train': res.wall_s - compiled_at - eval_s, 'eval': eval_s, 'total_run': res.wall_s}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--install', action='store_true', help='Time a fresh install too.')
  parser.add_argument('--config', default='configs/demo.py')
  parser.add_argument('--arg', action='append', default=[], help='Extra mmjax.main argument.')
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--noappend', dest='append', action='store_false', help=argparse.SUPPRESS)
  parser.add_argument('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'))
  parser.add_argument('--note', default='')
  parser.add_argument('--echo', action='store_true')
  args = parser.parse_args(argv)
  load_before = children.loadavg()
  with tempfile.TemporaryDirectory() as tmp:
    install_s, py = install(pathlib.Path(tmp) / 'venv') if args.install else (None, sys.executable)
    cmd = [py, '-m', 'mmjax.main', f'--config={args.config}', f'--workdir={tmp}/run',
           f'--config.compilation_cache={tmp}/cache', *args.arg]
    times = split(children.run(cmd, echo=args.echo).check())
  total = times['total_run'] + (install_s or 0.0)
  rows = ['| phase | wall | share |', '|---|---|---|']
  phases = ([('install', install_s)] if install_s is not None else []) + [
      (k, times[k]) for k in ('startup', 'compile', 'train', 'eval')]
  rows += [f'| {k} | {v:.1f} s | {100 * v / total:.0f}% |' for k, v in phases]
  rows.append(f'| **total** | {total:.1f} s | |')
  lines = [f'- command: `python bench/demo_wall.py {" ".join(sys.argv[1:])}`',
           f'- config: `{args.config}` {" ".join(args.arg)}; first run (empty compilation '
           f'cache){"; install into a fresh venv from the local uv cache" if args.install else ""}',
           f'- load average (1/5/15 min): {load_before} before, {children.loadavg()} after',
           *([f'- note: {args.note}'] if args.note else []), '', *rows]
  print('\n'.join(lines))
  if args.append:
    children.append_block(pathlib.Path(args.benchmarks_file), 'demo wall time by phase', lines)
  return times | {'install': install_s}


if __name__ == '__main__':
  main()
