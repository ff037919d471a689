r"""Noise handling measured on/off: deliberately noisy image-caption data, and what each remedy
(exact-duplicate removal, a score filter, the robust loss) buys back in retrieval.

Run:
  python bench/noise.py --n=6000 --noise=0.3 --dup=0.2 --steps=300 --root=runs/noise_bench

The data are demo scenes (configs/demo.py's model and recipe). A fraction `--noise` of the pairs
get the captions of another random scene (mislabelled pairs), and `--dup` x n exact copies of
random pairs are appended (duplicates). The same scenes are also ingested clean. Every run trains
through the CLI (`python -m mmjax.main`) for the same number of steps and batch size on a
`records` source; retrieval is the demo validation set (1000 pairs), as in the demo.

| run | data | remedy |
|---|---|---|
| clean | clean scenes | none (the upper bound) |
| noisy | noisy + duplicates | none |
| dedup | noisy + duplicates | `mmjax.data.filter --dedupe_images --dedupe_captions` keep file |
| robust_loss | noisy + duplicates | `--config.loss.drop_noisy_fraction=<noise>` |
| score_filter | noisy + duplicates | dedup, then keep the best-scored 1 - noise, scored by the *noisy* run's model (`mine_negatives --scores_out`, "an earlier checkpoint") |

The filter's precision (the share of dropped pairs that really were mislabelled or duplicated) is
reported too. Results are appended to BENCHMARKS.md with date, commit and machine.
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

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmjax.data import demo, prepare  # noqa: E402  pylint: disable=wrong-import-position
from provenance import cpu_model, git_revision  # noqa: E402  pylint: disable=wrong-import-position

METRICS = ('i2t/recall@1', 't2i/recall@1', 'i2t/recall@10', 't2i/recall@10')
RUNS = ('clean', 'noisy', 'dedup', 'robust_loss', 'score_filter')


def make_data(root: pathlib.Path, n: int, noise: float, dup: float, seed: int) -> dict:
  """Ingests the clean and the noisy dataset; returns which noisy rows are corrupted."""
  scenes = demo.DemoScenes(split='train', num_examples=n, image_size=32, seed=seed)
  images = root / 'images'
  images.mkdir(parents=True, exist_ok=True)
  rows = []
  for i in range(n):
    ex = scenes[i]
    path = images / f'{i}.png'
    if not path.exists():
      Image.fromarray(ex['image']).save(path)
    rows.append({'id': str(i), 'image': str(path), 'captions': list(ex['captions'])})
  rng = np.random.default_rng(seed)
  mislabelled = rng.permutation(n)[:int(noise * n)]
  noisy = [dict(r) for r in rows]
  for i in mislabelled:  # Another scene's captions (never its own).
    j = int((i + rng.integers(1, n)) % n)
    noisy[i]['captions'] = rows[j]['captions']
  copies = rng.integers(0, n, size=int(dup * n))
  noisy += [dict(noisy[int(c)], id=f'{c}_copy{k}') for k, c in enumerate(copies)]
  for name, data in (('clean', rows), ('noisy', noisy)):
    out = root / name
    if not (out / 'metadata.json').exists():
      prepare.prepare(data, [], prepare.Options(out=out), progress=False)
  bad = np.zeros(len(noisy), bool)
  bad[mislabelled] = True
  bad[n:] = True  # The appended copies.
  return {'bad': bad, 'mislabelled': int(len(mislabelled)), 'copies': int(len(copies))}


EXTRA: list[str] = []  # --override flags, passed to every run.


def overrides(steps: int, batch: int, data: pathlib.Path, keep: str = '') -> list[str]:
  out = [*EXTRA, f'--config.total_steps={steps}', f'--config.batch_size={batch}',
         f'--config.eval.every_steps={steps}', f'--config.checkpoint.every_steps={steps}',
         '--config.log_every_steps=20', '--config.data.name=records',
         f'--config.data.path={data}']
  return out + ([f'--config.data.keep={keep}'] if keep else [])


def run(cmd: list[str]) -> float:
  t0 = time.perf_counter()
  subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, 'PYTHONPATH': str(REPO)})
  return time.perf_counter() - t0


def train(workdir: pathlib.Path, extra: list[str]) -> float:
  if (workdir / 'eval.json').exists():
    return float('nan')  # Already trained (rerun with a fresh --root to retrain).
  return run([sys.executable, '-m', 'mmjax.main', '--config=configs/demo.py',
              f'--workdir={workdir}', *extra])


def keep_file(data: pathlib.Path, name: str, extra: list[str]) -> dict:
  run([sys.executable, '-m', 'mmjax.data.filter', f'--data={data}', f'--out={name}', *extra])
  return json.loads((data / name).with_suffix('.json').read_text())


def precision(data: pathlib.Path, name: str, bad: np.ndarray) -> float:
  kept = np.zeros(len(bad), bool)
  kept[np.load(data / name)] = True
  dropped = ~kept
  return float(bad[dropped].mean()) if dropped.any() else float('nan')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--n', type=int, default=6000)
  p.add_argument('--noise', type=float, default=0.3)
  p.add_argument('--dup', type=float, default=0.2)
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--root', default='runs/noise_bench')
  p.add_argument('--note', default='')
  p.add_argument('--noappend', action='store_true')
  p.add_argument('--override', action='append', default=[],
                 help='A config override for every run, e.g. --override=--config.seed=1.')
  args = p.parse_args()
  EXTRA.extend(args.override)
  root = pathlib.Path(args.root).absolute()
  info = make_data(root / 'data', args.n, args.noise, args.dup, args.seed)
  clean, noisy = root / 'data' / 'clean', root / 'data' / 'noisy'
  walls, notes = {}, {}

  walls['clean'] = train(root / 'clean', overrides(args.steps, args.batch, clean))
  walls['noisy'] = train(root / 'noisy', overrides(args.steps, args.batch, noisy))
  dedup = keep_file(noisy, 'keep_dedup.npy', ['--dedupe_images', '--dedupe_captions'])
  notes['dedup'] = (f'dropped {len(info["bad"]) - dedup["kept"]}, precision '
                    f'{precision(noisy, "keep_dedup.npy", info["bad"]):.3f}')
  walls['dedup'] = train(root / 'dedup', overrides(args.steps, args.batch, noisy,
                                                   'keep_dedup.npy'))
  walls['robust_loss'] = train(root / 'robust_loss',
                               overrides(args.steps, args.batch, noisy) +
                               [f'--config.loss.drop_noisy_fraction={args.noise}'])
  if not (root / 'noisy' / 'export' / 'model.json').exists():
    run([sys.executable, '-m', 'mmjax.main', '--config=configs/demo.py', '--mode=export',
         f'--workdir={root / "noisy"}', *overrides(args.steps, args.batch, noisy)])
  run([sys.executable, '-m', 'mmjax.data.mine_negatives', f'--data={noisy}',
       f'--model={root / "noisy"}', '--k=1', '--out=mined_unused.npy',
       '--scores_out=scores_noisy_model.npy'])
  scored = keep_file(noisy, 'keep_score.npy',
                     ['--dedupe_images', '--dedupe_captions',
                      f'--scores={noisy / "scores_noisy_model.npy"}',
                      f'--keep_fraction={1 - args.noise}'])
  notes['score_filter'] = (f'dropped {len(info["bad"]) - scored["kept"]}, precision '
                           f'{precision(noisy, "keep_score.npy", info["bad"]):.3f}')
  walls['score_filter'] = train(root / 'score_filter',
                                overrides(args.steps, args.batch, noisy, 'keep_score.npy'))

  ev = {name: json.loads((root / name / 'eval.json').read_text()) for name in RUNS}
  lines = [f'## noise: remedies for mislabelled and duplicated pairs, on/off '
           f'({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC)', '',
           f'- commit: `{git_revision()}`',
           f'- machine: {cpu_model()} ({os.cpu_count()} cores), '
           f'load average {os.getloadavg()[0]:.1f} at the end',
           f'- data: {args.n} demo scenes; {info["mislabelled"]} ({args.noise:.0%}) get another '
           f'scene\'s captions; {info["copies"]} exact copies appended '
           f'({int(info["bad"].sum())} noisy of {len(info["bad"])} pairs)',
           f'- budget: configs/demo.py {" ".join(args.override)}, {args.steps} steps x batch '
           f'{args.batch} for every run; '
           'eval: 1000 demo validation pairs (chance R@1 0.001)']
  if args.note:
    lines.append(f'- note: {args.note}')
  lines += ['', '| run | ' + ' | '.join(METRICS) + ' | wall (s) | filter |',
            '|---|' + '---|' * (len(METRICS) + 2)]
  for name in RUNS:
    cells = ' | '.join(f'{ev[name][m]:.4f}' for m in METRICS)
    lines.append(f'| {name} | {cells} | {walls.get(name, float("nan")):.0f} | '
                 f'{notes.get(name, "")} |')
  block = '\n'.join(lines) + '\n'
  print(block)
  if not args.noappend:
    with open(REPO / 'BENCHMARKS.md', 'a') as f:
      f.write('\n' + block)


if __name__ == '__main__':
  main()
