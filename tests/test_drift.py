"""Drift reports (mmjax.deploy.drift): the statistics against plain NumPy, planted shifts on 10% of
the items are detected, identically distributed splits do not alarm, inputs and the CLI."""

from __future__ import annotations

import json
import re
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mmjax.deploy import drift

REPO = pathlib.Path(__file__).resolve().parents[1]
# 1000 items per set: the p-values reach 1/301 < alpha / 3 = 0.0033 with 300 permutations.
SETTINGS = drift.Settings(max_items=1000, permutations=300)


def clustered(n: int, d: int, rng: np.random.Generator, clusters: int = 16) -> np.ndarray:
  """Unit vectors from anisotropic Gaussian clusters: embedding-like, not isotropic."""
  centres = drift.normalize(rng.normal(size=(clusters, d)))
  scales = 0.35 * np.exp(-np.arange(d) / (d / 4))
  labels = rng.integers(clusters, size=n)
  return drift.normalize(centres[labels] + rng.normal(size=(n, d)) * scales).astype(np.float32)


def emb(v, name='x', ids=None):
  return drift.Embeddings(np.asarray(v, np.float32), ids, name)


@pytest.fixture(scope='module')
def population():
  return clustered(4000, 32, np.random.default_rng(123))


def test_mmd2_matches_the_unbiased_formula():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3)) + 0.3
  kernel = np.exp(-drift.pairwise_sq_dists(np.concatenate([x, y]), np.concatenate([x, y])) / 2)
  k = lambda a, b: np.exp(-np.sum((a[:, None] - b[None]) ** 2, -1) / 2)  # noqa: E731
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  want = ((kxx.sum() - np.trace(kxx)) / 42 + (kyy.sum() - np.trace(kyy)) / 20 - 2 * kxy.mean())
  masks = drift.permutation_masks(7, 5, 4, False, rng)
  got = drift.mmd2_from_kernel(kernel, masks)
  np.testing.assert_allclose(got[0], want, rtol=1e-10)
  np.testing.assert_allclose(masks.sum(0), 7)  # Every relabelling keeps the set sizes.
  # Paired: x_i and y_i are one item; its own cross term is left out.
  y = x + 0.1 * rng.normal(size=x.shape)
  z = np.concatenate([x, y])
  kernel = np.exp(-drift.pairwise_sq_dists(z, z) / 2)
  kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
  off = ~np.eye(7, dtype=bool)
  want = (kxx[off].sum() + kyy[off].sum() - kxy[off].sum() - kxy.T[off].sum()) / 42
  masks = drift.permutation_masks(7, 7, 6, True, rng)
  np.testing.assert_allclose(drift.mmd2_from_kernel(kernel, masks, True)[0], want, rtol=1e-10)
  np.testing.assert_array_equal(masks[:7, 1:] + masks[7:, 1:], 1)  # Swaps within items only.


def test_psi_against_hand_computed_values():
  ref = np.repeat(np.arange(4.0), 25)[:, None]  # 4 equally filled bins.
  assert drift.psi_per_dimension(ref, ref, bins=4)[0] == pytest.approx(0.0)
  cur = np.repeat([0.0, 1.0, 2.0, 3.0], [10, 40, 25, 25])[:, None]
  want = (0.1 - 0.25) * np.log(0.1 / 0.25) + (0.4 - 0.25) * np.log(0.4 / 0.25)
  assert drift.psi_per_dimension(ref, cur, bins=4)[0] == pytest.approx(want)


def test_centroid_shift_and_neighbour_overlap_basics(population):
  x = population[:500]
  rng = np.random.default_rng(0)
  masks = drift.permutation_masks(500, 500, 50, False, rng)
  shifted = x + 0.2 * np.eye(32, dtype=np.float32)[0]
  stats, _ = drift.centroid_test(x, shifted, masks, False)
  assert stats['l2'] == pytest.approx(0.2, rel=1e-5)
  assert stats['relative'] == pytest.approx(0.2 / stats['reference_spread'], rel=1e-5)
  overlap, per_probe = drift.knn_overlap(x, x, 100, 10, rng)
  assert overlap['mean'] == 1.0 and per_probe.shape == (100,)
  q, _ = np.linalg.qr(rng.normal(size=(32, 32)))  # A rotation keeps every neighbour.
  assert drift.knn_overlap(x, x @ q, 100, 10, rng)[0]['mean'] == pytest.approx(1.0)


@pytest.mark.parametrize('seed', range(5))
def test_no_alarm_on_an_iid_split(population, seed):
  order = np.random.default_rng(seed).permutation(len(population))
  ref, cur = population[order[:1000]], population[order[1000:2000]]
  result = drift.compare(emb(ref), emb(cur), settings=SETTINGS)
  assert result.report['alarms'] == [], drift.format_report(result.report)
  assert result.exit_code == drift.EXIT_OK
  assert result.report['settings']['alpha_per_test'] == pytest.approx(0.01 / 3)


@pytest.mark.parametrize('kind,strength,expect', [
    ('mean', 1.0, 'mmd'), ('noise', 1.0, 'nn_distance'), ('rotation', 1.0, 'nn_distance')])
def test_planted_shift_on_10_percent_is_detected(population, kind, strength, expect):
  rng = np.random.default_rng(7)
  cur, mask = drift.plant(population[1000:2000], kind, 0.1, strength, rng)
  assert mask.sum() == 100
  np.testing.assert_allclose(np.linalg.norm(cur, axis=1), 1.0, atol=1e-5)
  result = drift.compare(emb(population[:1000]), emb(cur), settings=SETTINGS)
  assert expect in result.report['alarms'], drift.format_report(result.report)
  assert result.exit_code == drift.EXIT_DRIFT


def test_versions_mode(population):
  a = population[:1000]
  ids = np.array([f'item{i}' for i in range(1000)])
  order = np.random.default_rng(0).permutation(1000)  # B lists the items in another order.
  ref = emb(a, 'A', ids)
  # float16 storage of the same vectors: a real but negligible difference, no alarm.
  quiet = drift.compare(ref, emb(a[order].astype(np.float16), 'B', ids[order]), 'versions',
                        settings=SETTINGS)
  assert quiet.report['alarms'] == [], drift.format_report(quiet.report)
  assert quiet.report['stats']['knn_overlap']['mean'] > 0.97
  # 10% of the items re-embedded wrongly (noise): the neighbour overlap falls.
  bad, _ = drift.plant(a, 'noise', 0.1, 1.0, np.random.default_rng(1))
  loud = drift.compare(ref, emb(bad[order], 'B', ids[order]), 'versions', settings=SETTINGS)
  assert {'knn_overlap', 'nn_distance'} <= set(loud.report['alarms'])
  # Another vector space (here a rotation): only the space-free overlap is measured.
  q, _ = np.linalg.qr(np.random.default_rng(2).normal(size=(32, 32)))
  other = drift.compare(ref, emb((a @ q)[order], 'B', ids[order]), 'versions',
                        settings=drift.Settings(max_items=1000, permutations=300,
                                                same_space=False))
  assert other.report['alarms'] == [] and 'mmd' in other.report['skipped']
  # Items on one side only are counted, the rest aligned.
  part = drift.compare(ref, emb(a[:800], 'B', ids[:800]), 'versions', settings=SETTINGS)
  assert part.report['alignment'] == {'aligned': 800, 'only_reference': 200, 'only_current': 0}


def test_loaders_and_their_errors(tmp_path, population):
  v = population[:100]
  np.save(tmp_path / 'plain.npy', v)
  assert drift.load_embeddings(tmp_path / 'plain.npy').ids is None
  np.savez(tmp_path / 'with_ids.npz', vectors=v, ids=np.arange(100))
  np.testing.assert_array_equal(drift.load_embeddings(tmp_path / 'with_ids.npz').ids,
                                np.arange(100))
  bad = v.copy()
  bad[3, 0] = np.nan
  np.save(tmp_path / 'nan.npy', bad)
  np.save(tmp_path / 'flat.npy', v[:, 0])
  np.save(tmp_path / 'few.npy', v[:5])
  (tmp_path / 'empty_dir').mkdir()
  cases = {'nan.npy': 'NaN or inf (first at row 3)', 'flat.npy': 'expected numeric vectors',
           'few.npy': 'at least 20', 'empty_dir': 'holds 0 model versions',
           'missing.npy': 'no such file', 'plain.npy.txt': 'expected .npy, .npz'}
  (tmp_path / 'plain.npy.txt').write_text('x')
  for name, message in cases.items():
    with pytest.raises(ValueError, match=re.escape(message)) as e:
      drift.load_embeddings(tmp_path / name)
    assert name in str(e.value)
  with pytest.raises(ValueError, match='dimension 32 and .* 16'):
    drift.compare(emb(v), emb(v[:, :16]))
  with pytest.raises(ValueError, match='share 0 ids'):
    drift.compare(emb(v, 'a', np.arange(100)), emb(v, 'b', np.arange(100) + 100), 'versions')
  with pytest.raises(ValueError, match='at least 300 permutations'):
    drift.compare(emb(v), emb(v), settings=drift.Settings(permutations=100))


def test_cli_writes_the_report_and_exits_with_its_code(tmp_path, population):
  np.save(tmp_path / 'ref.npy', population[:400])
  cur, _ = drift.plant(population[400:800], 'mean', 0.3, 1.0, np.random.default_rng(0))
  np.save(tmp_path / 'cur.npy', cur)
  cmd = [sys.executable, '-m', 'mmjax.deploy.drift', f'--reference={tmp_path / "ref.npy"}',
         f'--out={tmp_path / "out"}', '--permutations=300']
  proc = subprocess.run([*cmd, f'--current={tmp_path / "cur.npy"}'], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == drift.EXIT_DRIFT, proc.stdout + proc.stderr
  assert 'Alarms: centroid, mmd' in proc.stdout
  report = json.loads((tmp_path / 'out' / 'drift.json').read_text())
  assert report['exit_code'] == 2 and 'mmd' in report['alarms']
  from PIL import Image  # pylint: disable=import-outside-toplevel
  png = Image.open(tmp_path / 'out' / 'drift.png')
  assert 'MMD^2 vs permutation null' in png.info['Panels']
  proc = subprocess.run([*cmd, f'--current={tmp_path / "nope.npy"}'], cwd=REPO,
                        capture_output=True, text=True, check=False)
  assert proc.returncode == drift.EXIT_ERROR and 'nope.npy: no such file' in proc.stderr
