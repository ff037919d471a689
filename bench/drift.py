r"""False-alarm rate and detection power of the drift report (mmjax.deploy.drift) over seeds.

  python bench/drift.py [--seeds=20] [--n=1000] [--dim=64] [--fraction=0.1] [--cases=iid]
      [--noappend]

Every case runs `drift.compare` with its default thresholds and settings (alpha 0.01 over the
three permutation tests, 500 permutations) once per seed, each seed drawing new sets, a new
corruption and new permutations; a case's rate is the share of seeds whose report alarmed.

- synthetic: unit vectors from 16 anisotropic Gaussian clusters in `--dim` dimensions; reference
  and current are `--n` vectors each. `iid` draws both from the same clusters (the false-alarm
  rate); the planted cases corrupt `--fraction` of the current items with `drift.plant` (mean
  shift / noise of the given size in units of the set's spread, rotation by the given angle).
  `versions` cases: version B = A stored as float16 or int8 (no alarm wanted), or A with
  `--fraction` of its items re-embedded as noise (an alarm wanted).
- digits (scikit-learn's 1,797 8x8 digits, the test extra; raw pixels are the vectors): a random
  half against the other half (`iid`), and the same with `--fraction` of the current images
  corrupted in pixel space: Gaussian pixel noise (std 4 of 16 grey levels) or the top three rows
  blanked.
- demo model (with `--demo_run=WORKDIR` of a trained `configs/demo.py` run): image embeddings of
  `--demo_scenes` demo validation scenes, halves against each other (`iid`), and with
  `--fraction` of the current images under a robustness corruption (Gaussian noise, blur,
  brightness; severity 3 of `mmjax.eval.robustness`), embedded by the trained model.

Appends a block to BENCHMARKS.md (commit, machine, load average) unless --noappend.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import pathlib
import sys
import time

import numpy as np

from provenance import REPO, cpu_model, git_revision

sys.path.insert(0, str(REPO))
from mmjax.deploy import drift  # noqa: E402  pylint: disable=wrong-import-position

TESTS = ('centroid', 'mmd', 'nn_distance')
# The report's own seed (permutations, subsamples) is kept apart from the seed that draws a case's
# sets, so that the two random streams never coincide (the blocks of 2026-12-02 01:19-01:53 ran
# with the same seed for both).
TEST_SEED_OFFSET = 1_000_000


def clustered(n: int, d: int, rng: np.random.Generator, clusters: int = 16) -> np.ndarray:
  centres = drift.normalize(rng.normal(size=(clusters, d)))
  scales = 0.35 * np.exp(-np.arange(d) / (d / 4))
  labels = rng.integers(clusters, size=n)
  return drift.normalize(centres[labels] + rng.normal(size=(n, d)) * scales).astype(np.float32)


def int8_round_trip(v: np.ndarray) -> np.ndarray:
  scale = np.abs(v).max(1, keepdims=True) / 127
  return (np.round(v / scale).astype(np.int8) * scale).astype(np.float32)


def synthetic_cases(args):
  """name -> (expect_alarm, make(seed) -> (reference, current, mode))."""
  def traffic(kind=None, strength=0.0):
    def make(seed):
      rng = np.random.default_rng(seed)
      z = clustered(2 * args.n, args.dim, rng)
      cur = z[args.n:] if kind is None else drift.plant(z[args.n:], kind, args.fraction,
                                                        strength, rng)[0]
      return z[:args.n], cur, 'traffic'
    return make

  def versions(store):
    def make(seed):
      rng = np.random.default_rng(seed)
      a = clustered(args.n, args.dim, rng)
      b = {'float16': lambda: a.astype(np.float16).astype(np.float32),
           'int8': lambda: int8_round_trip(a),
           'noise': lambda: drift.plant(a, 'noise', args.fraction, 1.0, rng)[0]}[store]()
      return a, b, 'versions'
    return make

  pct = f'{args.fraction:.0%}'
  cases = {'iid split': (False, traffic())}
  for kind, strengths in (('mean', (0.5, 1.0)), ('noise', (0.5, 1.0)), ('rotation', (0.5, 1.0))):
    for s in strengths:
      unit = 'rad' if kind == 'rotation' else 'x spread'
      cases[f'{kind} {s} {unit} on {pct}'] = (True, traffic(kind, s))
  cases['versions: B = float16(A)'] = (False, versions('float16'))
  cases['versions: B = int8(A)'] = (False, versions('int8'))
  cases[f'versions: {pct} of B re-embedded as noise'] = (True, versions('noise'))
  return cases


def digits_cases(args):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  images = load_digits().images.astype(np.float32)  # [1797, 8, 8], grey levels 0..16

  def make_case(corrupt):
    def make(seed):
      rng = np.random.default_rng(seed)
      order = rng.permutation(len(images))
      half = len(images) // 2
      ref, cur = images[order[:half]], images[order[half:]].copy()
      if corrupt:
        idx = rng.choice(len(cur), int(round(args.fraction * len(cur))), replace=False)
        cur[idx] = corrupt(cur[idx], rng)
      return ref.reshape(len(ref), -1), cur.reshape(len(cur), -1), 'traffic'
    return make

  def noise(x, rng):
    return np.clip(x + rng.normal(0, 4, size=x.shape), 0, 16)

  def blank_top(x, rng):
    del rng
    x[:, :3] = 0
    return x

  pct = f'{args.fraction:.0%}'
  return {'digits: iid halves': (False, make_case(None)),
          f'digits: pixel noise (std 4/16) on {pct}': (True, make_case(noise)),
          f'digits: top 3 rows blanked on {pct}': (True, make_case(blank_top))}


def demo_model_cases(args):
  """Image embeddings of demo validation scenes by a trained demo run (`--demo_run`), clean and
  under three of the robustness corruptions (severity 3), embedded once; each seed splits the
  scenes in two halves and swaps `--fraction` of the current half for their corrupted version."""
  # pylint: disable=import-outside-toplevel
  import json
  import shutil
  import tempfile

  from configs import demo as demo_config
  from mmjax.data import demo
  from mmjax.eval.robustness import corrupt_image
  from mmjax.parallel import mesh as mesh_lib
  from mmjax.train import loop

  config = demo_config.get_config()
  config.seed = json.loads((pathlib.Path(args.demo_run) / 'config.json').read_text())['seed']
  with tempfile.TemporaryDirectory() as tmp:  # Loading a run may write into its workdir.
    workdir = shutil.copytree(args.demo_run, pathlib.Path(tmp) / 'run')
    run, state, _ = loop.load_for_inference(config, workdir)
    run.checkpointer.close()
  embedder = loop.make_embedder(run, state.params)
  images = demo.make_eval_set(num_scenes=args.demo_scenes, image_size=config.model.image.image_size,
                              seed=4321, near_duplicate_fraction=0.0)['images']
  corruptions = ('gaussian_noise', 'blur', 'brightness')
  with mesh_lib.activate(run.mesh, run.axis_rules):
    clean = embedder.embed_images(images)
    bad = {c: embedder.embed_images(np.stack([
        corrupt_image(im, c, 3, np.random.default_rng([i, j])) for j, im in enumerate(images)]))
           for i, c in enumerate(corruptions)}

  def make_case(corruption):
    def make(seed):
      rng = np.random.default_rng(seed)
      order = rng.permutation(len(images))
      ref, cur = order[:len(order) // 2], order[len(order) // 2:]
      vectors = clean[cur].copy()
      if corruption:
        idx = rng.choice(len(cur), int(round(args.fraction * len(cur))), replace=False)
        vectors[idx] = bad[corruption][cur[idx]]
      return clean[ref], vectors, 'traffic'
    return make

  pct = f'{args.fraction:.0%}'
  cases = {'demo model: iid halves': (False, make_case(None))}
  for c in corruptions:
    cos = float(np.mean(np.sum(clean * bad[c], axis=1)))  # How far the corruption moves a vector.
    cases[f'demo model: {c} (severity 3; clean-corrupted cosine {cos:.3f}) on {pct}'] = (
        True, make_case(c))
  return cases


def run_case(make, seeds):
  alarms, fired, walls, pvals = 0, collections.Counter(), [], collections.defaultdict(list)
  for seed in range(seeds):
    ref, cur, mode = make(seed)
    t0 = time.perf_counter()
    result = drift.compare(drift.Embeddings(ref, None, 'reference'),
                           drift.Embeddings(cur, None, 'current'), mode,
                           settings=drift.Settings(seed=TEST_SEED_OFFSET + seed))
    walls.append(time.perf_counter() - t0)
    alarms += result.alarm
    fired.update(result.report['alarms'])
    for t in TESTS:
      if t in result.report['stats']:
        pvals[t].append(result.report['stats'][t]['p_value'])
  return alarms, fired, float(np.median(walls)), pvals


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--seeds', type=int, default=20)
  p.add_argument('--n', type=int, default=1000, help='Vectors per synthetic set.')
  p.add_argument('--dim', type=int, default=64)
  p.add_argument('--fraction', type=float, default=0.1, help='Share of items corrupted.')
  p.add_argument('--no_digits', action='store_true')
  p.add_argument('--demo_run', default='', help='A trained demo workdir (python -m mmjax.main '
                 '--config=configs/demo.py): adds the demo-model cases.')
  p.add_argument('--demo_scenes', type=int, default=2000, help='Validation scenes it embeds.')
  p.add_argument('--cases', default='', help='Only the cases whose name contains this.')
  p.add_argument('--noappend', action='store_true')
  args = p.parse_args()

  start = datetime.datetime.now(datetime.timezone.utc)
  load_start = os.getloadavg()[0]
  cases = synthetic_cases(args)
  if not args.no_digits:
    cases.update(digits_cases(args))
  if args.demo_run:
    cases.update(demo_model_cases(args))
  cases = {k: v for k, v in cases.items() if args.cases in k}
  rows, iid_p = [], collections.defaultdict(list)
  for name, (expect, make) in cases.items():
    alarms, fired, wall, pvals = run_case(make, args.seeds)
    if 'iid' in name:  # Identically distributed by construction (float16/int8 copies are not).
      for t, v in pvals.items():
        iid_p[t].extend(v)
    which = ', '.join(f'{t} {c}' for t, c in fired.most_common()) or '-'
    rate = f'{alarms}/{args.seeds}'
    rows.append(f'| {name} | {"alarm" if expect else "none"} | '
                f'{rate if expect else "-"} | {"-" if expect else rate} | {which} | {wall:.2f} |')
    print(rows[-1], flush=True)
  load_end = os.getloadavg()[0]
  calib = '; '.join(
      f'{t}: {np.mean(np.array(v) < 0.05):.3f} below 0.05, {np.mean(np.array(v) < 0.01):.3f} '
      f'below 0.01 (of {len(v)})' for t, v in iid_p.items())
  flags = [f'--seeds={args.seeds}', f'--fraction={args.fraction}']
  data = []
  if any(not k.startswith(('digits', 'demo')) for k in cases):
    flags += [f'--n={args.n}', f'--dim={args.dim}']
    data.append(f'synthetic: {args.n} vs {args.n} unit vectors in {args.dim} dimensions')
  if any(k.startswith('digits') for k in cases):
    data.append('digits: 898 vs 899 raw 64-pixel vectors')
  if args.demo_run:
    flags += [f'--demo_run={args.demo_run}', f'--demo_scenes={args.demo_scenes}']
    data.append(f'demo model: {args.demo_scenes // 2} vs {args.demo_scenes // 2} image embeddings')
  if args.no_digits:
    flags.append('--no_digits')
  if args.cases:
    flags.append(f'--cases="{args.cases}"')
  command = 'python bench/drift.py ' + ' '.join(flags)
  lines = [
      f'## drift: false-alarm rate and detection power over {args.seeds} seeds '
      f'({start:%Y-%m-%d %H:%M} UTC)', '',
      f'- commit: `{git_revision()}`',
      f'- machine: {cpu_model()} ({os.cpu_count()} cores), shared with other sessions; load '
      f'average {load_start:.1f} at the start, {load_end:.1f} at the end',
      f'- command: `{command}`; default thresholds and settings (alpha 0.01 over three '
      'permutation tests, 500 permutations, max_items 2000); ' + '; '.join(data),
      f'- p-values of the i.i.d. cases (calibration; ~0.05 and ~0.01 expected): {calib}',
      '',
      '| case | wanted | detected (power) | false alarms | tests that fired (seeds) | '
      'median s / report |',
      '|---|---|---|---|---|---|',
      *rows, '']
  text = '\n'.join(lines)
  print(text)
  if not args.noappend:
    with open(REPO / 'BENCHMARKS.md', 'a', encoding='utf-8') as f:
      f.write('\n' + text)


if __name__ == '__main__':
  main()
