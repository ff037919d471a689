r"""Drift reports: has traffic moved away from the reference, or does version B differ from A?

  python -m mmjax.deploy.drift --reference=REF --current=CUR --out=DIR \
      [--mode=traffic|versions] [--alpha=0.01] [--max_items=2000] [--permutations=500] [--seed=0]

REF and CUR are `.npy` files of vectors [N, d], `.npz` files (`vectors` or `embeddings`, optional
`ids`) or embedding-store directories (a backfilled store version, `load_store`). Two modes:

- `traffic`: reference traffic vs current traffic, two independent samples of one vector space;
- `versions`: version A (`--reference`) vs version B (`--current`) embeddings of the same items,
  aligned by id (by position when a file has no ids). The top-k neighbour overlap is measured on
  a probe set; the distribution tests are paired (within-item swaps).

Three statistics are permutation tests that share one set of permutations: the centroid shift,
MMD^2 (RBF kernel, median-heuristic bandwidth) and the nearest-neighbour-distance shift. Each
alarms when its p-value is below `alpha / number of tests` (Bonferroni) and its effect size
reaches a floor (`--min_*`; the defaults keep a float16 round trip of the vectors quiet), so on
identically distributed sets the whole report alarms at most `alpha` of the time. The
per-dimension PSI summary and the neighbour overlap alarm on fixed thresholds (rules of thumb;
the PSI's i.i.d. noise floor is reported). Writes DIR/drift.json and DIR/drift.png
(docs/deploy.md, "Drift reports").

Exit codes: 0 no threshold crossed; 1 bad input or flags (the message names the file or flag);
2 drift (at least one threshold crossed; `alarms` in drift.json lists which).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from mmjax.deploy import drift_plot
from mmjax.deploy.drift_io import (  # noqa: F401  (the inputs, re-exported)
    MIN_ITEMS, Embeddings, align, load_embeddings, load_store)
from mmjax.deploy.two_sample import (  # noqa: F401  (the statistics, re-exported)
    normalize, permutation_masks, p_value, centroid_test, pairwise_sq_dists, median_bandwidth,
    mmd2_from_kernel, mmd_test, nearest_distance, nn_distance_test, psi_per_dimension,
    psi_summary, knn_overlap)

MODES = ('traffic', 'versions')
EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2
REPORT_JSON, REPORT_PNG = 'drift.json', 'drift.png'
PLANTS = ('mean', 'noise', 'rotation')

__all__ = [  # This module's names and those it re-exports from drift_io and two_sample.
    'MODES', 'EXIT_OK', 'EXIT_ERROR', 'EXIT_DRIFT', 'REPORT_JSON', 'REPORT_PNG', 'PLANTS',
    'Thresholds', 'Settings', 'DriftResult', 'compare', 'format_report', 'write', 'plant', 'main',
    'MIN_ITEMS', 'Embeddings', 'align', 'load_embeddings', 'load_store',
    'normalize', 'permutation_masks', 'p_value', 'centroid_test', 'pairwise_sq_dists',
    'median_bandwidth', 'mmd2_from_kernel', 'mmd_test', 'nearest_distance', 'nn_distance_test',
    'psi_per_dimension', 'psi_summary', 'knn_overlap']


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """When a statistic alarms (the CLI flags of the same names)."""
  alpha: float = 0.01  # False-alarm rate of the permutation tests together (Bonferroni).
  min_centroid_shift: float = 0.01  # Floor on the debiased centroid shift / reference spread.
  min_mmd2: float = 1e-6  # Floor on MMD^2 (kernel values are in [0, 1]).
  min_nn_shift: float = 0.01  # Floor on |mean NN distance of current / of reference - 1|.
  psi_threshold: float = 0.25  # A dimension has shifted when its PSI exceeds this.
  max_psi_share: float = 0.25  # Alarm when more than this share of dimensions has shifted.
  min_knn_overlap: float = 0.9  # versions: alarm when the mean top-k overlap is below this.


@dataclasses.dataclass(frozen=True)
class Settings:
  """How much work a report does; every random choice comes from `seed`."""
  max_items: int = 2000  # Per set (versions: aligned items); a seeded subsample beyond it.
  permutations: int = 500
  probe_size: int = 500  # versions: probes of the neighbour overlap.
  k: int = 10  # versions: neighbours per probe.
  psi_bins: int = 10  # Quantile bins of the reference, per dimension.
  same_space: bool = True  # versions: False skips the tests that compare vectors across A and B.
  seed: int = 0


@dataclasses.dataclass
class DriftResult:
  """`report` is what drift.json holds; `curves` the arrays behind the PNG's panels."""
  report: dict[str, Any]
  curves: dict[str, np.ndarray]

  @property
  def alarm(self) -> bool:
    return bool(self.report['alarms'])

  @property
  def exit_code(self) -> int:
    return EXIT_DRIFT if self.alarm else EXIT_OK


# ---------------------------------------------------------------------------------------------
# The report.


def _subsample(n: int, cap: int, rng: np.random.Generator) -> np.ndarray:
  return np.sort(rng.choice(n, cap, replace=False)) if n > cap else np.arange(n)


def _describe(e: Embeddings, used: int) -> dict[str, Any]:
  return {'source': e.source, 'items': int(len(e.vectors)), 'used': int(used),
          'dim': int(e.vectors.shape[1]), 'model_version': e.model_version}


def compare(reference: Embeddings, current: Embeddings, mode: str = 'traffic',
            thresholds: Thresholds = Thresholds(), settings: Settings = Settings()) -> DriftResult:
  """The drift report of `current` against `reference` (module docstring)."""
  _check_arguments(mode, thresholds, settings)
  rng = np.random.default_rng(settings.seed)
  paired = mode == 'versions'
  report: dict[str, Any] = {'mode': mode}
  x, y, shared = _samples(reference, current, paired, settings, rng, report)
  report['reference'], report['current'] = _describe(reference, len(x)), _describe(current, len(y))
  stats: dict[str, dict[str, Any]] = {}
  curves: dict[str, np.ndarray] = {}
  skipped: dict[str, str] = {}
  tests = ('centroid', 'mmd', 'nn_distance')
  if shared:
    masks = permutation_masks(len(x), len(y), settings.permutations, paired, rng)
    stats['centroid'], curves['centroid_null'] = centroid_test(x, y, masks, paired)
    stats['mmd'], curves['mmd_null'] = mmd_test(x, y, masks, paired, rng)
    stats['nn_distance'], nn_curves = nn_distance_test(x, y, paired, settings.permutations, rng)
    curves.update(nn_curves)
    stats['psi'], curves['psi'] = psi_summary(x, y, settings.psi_bins, thresholds.psi_threshold)
    if paired:
      cos = np.sum(normalize(x) * normalize(y), axis=1)
      stats['self_cosine'] = {'mean': float(cos.mean()), 'p5': float(np.quantile(cos, 0.05)),
                              'min': float(cos.min())}
  else:
    dx, dy = reference.vectors.shape[1], current.vectors.shape[1]
    why = (f'dimensions differ ({dx} vs {dy})' if dx != dy else 'same_space=False')
    skipped = {t: why for t in (*tests, 'psi', 'self_cosine')}
    tests = ()
  if paired:
    stats['knn_overlap'], curves['knn_overlap'] = knn_overlap(x, y, settings.probe_size,
                                                              settings.k, rng)
  per_test = _decide(stats, tests, thresholds, settings)
  report['alarms'] = [name for name, s in stats.items() if s.get('alarm')]
  report['exit_code'] = EXIT_DRIFT if report['alarms'] else EXIT_OK
  report['stats'] = stats
  report['skipped'] = skipped
  report['settings'] = {**dataclasses.asdict(settings), 'tests': list(tests),
                        'alpha_per_test': per_test}
  report['thresholds'] = dataclasses.asdict(thresholds)
  curves['pca_reference'], curves['pca_current'] = drift_plot.pca2(x, y if shared else None)
  return DriftResult(report, curves)


def _check_arguments(mode: str, thresholds: Thresholds, settings: Settings) -> None:
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}: expected one of {MODES}.')
  if settings.max_items < MIN_ITEMS or settings.permutations < 1 or settings.psi_bins < 2:
    raise ValueError(f'max_items >= {MIN_ITEMS}, permutations >= 1 and psi_bins >= 2 are '
                     f'needed; got {settings}.')
  if not 0 < thresholds.alpha < 1:
    raise ValueError(f'alpha={thresholds.alpha}: expected a value in (0, 1).')


def _samples(reference: Embeddings, current: Embeddings, paired: bool, settings: Settings, rng,
             report: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, bool]:
  """(reference sample, current sample, whether they share one vector space). Versions mode
  pairs the items by id (the alignment goes into `report`); traffic mode samples each side."""
  dx, dy = reference.vectors.shape[1], current.vectors.shape[1]
  if paired:
    ia, ib, report['alignment'] = align(reference, current)
    keep = _subsample(len(ia), settings.max_items, rng)
    return reference.vectors[ia[keep]], current.vectors[ib[keep]], settings.same_space and dx == dy
  if dx != dy:
    raise ValueError(f'traffic mode compares one vector space, but {reference.source} has '
                     f'dimension {dx} and {current.source} {dy} (versions mode compares two).')
  x = reference.vectors[_subsample(len(reference.vectors), settings.max_items, rng)]
  y = current.vectors[_subsample(len(current.vectors), settings.max_items, rng)]
  return x, y, True


def _decide(stats: dict[str, dict[str, Any]], tests: tuple[str, ...], thresholds: Thresholds,
            settings: Settings) -> float:
  """Sets each statistic's `alarm` and `rule` (Bonferroni over the permutation tests); returns
  the per-test level."""
  per_test = thresholds.alpha / max(len(tests), 1)
  if tests and 1 / (settings.permutations + 1) > per_test:
    raise ValueError(f'permutations={settings.permutations} cannot give a p-value below '
                     f'alpha / {len(tests)} = {per_test:.4g}: use at least '
                     f'{int(np.ceil(1 / per_test))} permutations.')
  floors = {'centroid': ('debiased relative shift', thresholds.min_centroid_shift),
            'mmd': ('MMD^2', thresholds.min_mmd2),
            'nn_distance': ('|relative shift|', thresholds.min_nn_shift)}
  for name in tests:
    s = stats[name]
    what, floor = floors[name]
    s['alarm'] = bool(s['p_value'] < per_test and s['effect'] >= floor)
    s['rule'] = f'p_value < {per_test:.4g} and {what} >= {floor:g}'
  if 'psi' in stats:
    s = stats['psi']
    s['alarm'] = bool(s['share_over_threshold'] > thresholds.max_psi_share)
    s['rule'] = (f'share of dimensions with PSI > {thresholds.psi_threshold:g} is above '
                 f'{thresholds.max_psi_share:g}')
  if 'knn_overlap' in stats:
    s = stats['knn_overlap']
    s['alarm'] = bool(s['mean'] < thresholds.min_knn_overlap)
    s['rule'] = f'mean top-{s["k"]} overlap < {thresholds.min_knn_overlap:g}'
  return per_test


def format_report(report: dict[str, Any]) -> str:
  """A few lines for a terminal or a cron mail."""
  r, c = report['reference'], report['current']
  lines = [f'Drift report ({report["mode"]}): {c["source"]} ({c["used"]} of {c["items"]}) vs '
           f'{r["source"]} ({r["used"]} of {r["items"]})']
  show = {'centroid': ('debiased_relative', 'p_value'), 'mmd': ('mmd2', 'p_value'),
          'nn_distance': ('relative_shift', 'p_value'),
          'psi': ('mean', 'max', 'share_over_threshold'), 'self_cosine': ('mean', 'p5'),
          'knn_overlap': ('mean', 'p10')}
  for name, s in report['stats'].items():
    vals = ', '.join(f'{k}={s[k]:.4g}' for k in show.get(name, ()))
    flag = 'ALARM' if s.get('alarm') else ('ok' if 'alarm' in s else 'info')
    lines.append(f'  {name:<12} {flag:<6} {vals}')
  for name, why in report['skipped'].items():
    lines.append(f'  {name:<12} skipped ({why})')
  verdict = ', '.join(report['alarms']) if report['alarms'] else 'none'
  lines.append(f'Alarms: {verdict} (exit code {report["exit_code"]}).')
  return '\n'.join(lines)


def write(result: DriftResult, out_dir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """DIR/drift.json (written atomically) and DIR/drift.png."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  json_path, png_path = out_dir / REPORT_JSON, out_dir / REPORT_PNG
  tmp = json_path.with_suffix('.tmp')
  tmp.write_text(json.dumps(result.report, indent=1))
  tmp.replace(json_path)
  drift_plot.plot(result, png_path)
  return json_path, png_path


def plant(vectors: np.ndarray, kind: str, fraction: float, strength: float,
          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A known corruption of a `fraction` of the rows (for validating thresholds on one's own data):
  'mean' adds `strength` x the set's spread along one random direction, 'noise' adds isotropic
  Gaussian noise of norm ~ `strength` x spread, 'rotation' rotates the rows by `strength` radians
  in d/2 random planes. Rows of unit norm stay unit norm. Returns (vectors, corrupted mask)."""
  if kind not in PLANTS:
    raise ValueError(f'kind={kind!r}: expected one of {PLANTS}.')
  v = np.array(vectors, np.float32)
  n, d = v.shape
  mask = np.zeros(n, bool)
  mask[rng.choice(n, int(round(fraction * n)), replace=False)] = True
  spread = float(np.sqrt(np.mean(np.sum((v - v.mean(0)) ** 2, axis=1))))
  rows = v[mask]
  if kind == 'mean':
    u = normalize(rng.normal(size=(1, d)))[0]
    rows = rows + strength * spread * u
  elif kind == 'noise':
    rows = rows + rng.normal(size=rows.shape) * strength * spread / np.sqrt(d)
  else:
    basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
    c = rows @ basis
    h = d // 2 * 2
    a, b = c[:, 0:h:2].copy(), c[:, 1:h:2].copy()
    c[:, 0:h:2] = np.cos(strength) * a - np.sin(strength) * b
    c[:, 1:h:2] = np.sin(strength) * a + np.cos(strength) * b
    rows = c @ basis.T
  if np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-3):
    rows = normalize(rows)
  v[mask] = rows
  return v, mask


# ---------------------------------------------------------------------------------------------
# The command line.


def main(argv) -> None:
  import sys  # pylint: disable=import-outside-toplevel
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    thresholds = Thresholds(**{k: f[k].value for k in Thresholds.__dataclass_fields__})
    settings = Settings(**{k: f[k].value for k in Settings.__dataclass_fields__})
    result = compare(load_embeddings(f.reference), load_embeddings(f.current), f.mode,
                     thresholds, settings)
  except ValueError as e:
    sys.exit(f'drift: {e}')  # Exit code 1 (EXIT_ERROR).
  json_path, png_path = write(result, f.out)
  print(format_report(result.report))
  print(f'Wrote {json_path} and {png_path}.')
  sys.exit(result.exit_code)


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=ungrouped-imports

  flags.DEFINE_string('reference', None, 'Reference set (traffic) or version A (versions): '
                      '.npy, .npz or an embedding-store directory.')
  flags.DEFINE_string('current', None, 'Current set (traffic) or version B (versions).')
  flags.DEFINE_string('out', None, 'Output directory: drift.json and drift.png.')
  flags.DEFINE_enum('mode', 'traffic', MODES, 'traffic: two samples of one space; versions: '
                    'two versions of the same items, aligned by id.')
  _T, _S = Thresholds(), Settings()
  flags.DEFINE_float('alpha', _T.alpha, 'False-alarm rate of the permutation tests together.')
  flags.DEFINE_float('min_centroid_shift', _T.min_centroid_shift,
                     'Centroid alarm floor: debiased centroid shift / reference spread.')
  flags.DEFINE_float('min_mmd2', _T.min_mmd2, 'MMD alarm floor on MMD^2.')
  flags.DEFINE_float('min_nn_shift', _T.min_nn_shift,
                     'NN-distance alarm floor on |mean current / mean reference - 1|.')
  flags.DEFINE_float('psi_threshold', _T.psi_threshold, 'PSI above which a dimension has shifted.')
  flags.DEFINE_float('max_psi_share', _T.max_psi_share,
                     'PSI alarm when more than this share of dimensions has shifted.')
  flags.DEFINE_float('min_knn_overlap', _T.min_knn_overlap,
                     'versions: alarm when the mean top-k neighbour overlap is below this.')
  flags.DEFINE_integer('max_items', _S.max_items, 'Seeded subsample cap per set.')
  flags.DEFINE_integer('permutations', _S.permutations, 'Permutations of the tests.')
  flags.DEFINE_integer('probe_size', _S.probe_size, 'versions: probes of the neighbour overlap.')
  flags.DEFINE_integer('k', _S.k, 'versions: neighbours per probe.')
  flags.DEFINE_integer('psi_bins', _S.psi_bins, 'Reference quantile bins per dimension for PSI.')
  flags.DEFINE_bool('same_space', _S.same_space, 'versions: A and B share one vector space '
                    '(False: only the neighbour overlap, which needs none).')
  flags.DEFINE_integer('seed', _S.seed, 'Seed of every subsample and permutation.')
  flags.mark_flags_as_required(['reference', 'current', 'out'])
  app.run(main)
