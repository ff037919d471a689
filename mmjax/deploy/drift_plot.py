"""The drift report's figure (`mmjax.deploy.drift.write` -> drift.png): the permutation nulls,
nearest-neighbour distance histograms, PSI per dimension, a 2-D projection of both sets and, for
two versions, the neighbour-overlap histogram."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import numpy as np


def pca2(x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
  """Both sets projected on the reference's first two principal axes."""
  mu = x.mean(0)
  _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
  px = (x - mu) @ vt[:2].T
  return px, ((y - mu) @ vt[:2].T if y is not None else np.zeros((0, 2), np.float32))


def plot(result: Any, path: str | pathlib.Path) -> list[str]:
  """The PNG report (Agg, no display); returns its panel titles."""
  # Deferred: matplotlib costs ~1 s to import, and only the report file needs it.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  rep = result.report
  panels = _panels(rep, result.curves)
  cols = 3 if len(panels) > 2 else len(panels)
  rows = (len(panels) + cols - 1) // cols
  fig = Figure(figsize=(4.5 * cols, 3.4 * rows + 0.6))
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, cols, squeeze=False).ravel()
  for ax, (title, draw) in zip(axes, panels):
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    draw(ax)
  for ax in axes[len(panels):]:
    ax.set_axis_off()
  verdict = ('ALARM: ' + ', '.join(rep['alarms'])) if rep['alarms'] else 'no drift alarm'
  fig.suptitle(f'{rep["mode"]}: {rep["current"]["source"]} vs {rep["reference"]["source"]}: '
               f'{verdict}', fontsize=11)
  fig.tight_layout(rect=(0, 0, 1, 0.95))
  titles = [t for t, _ in panels]
  fig.savefig(path, dpi=80, metadata={'Title': 'mmjax drift report', 'Panels': '; '.join(titles)})
  return titles


def _panels(rep: dict[str, Any], cv: dict[str, np.ndarray]) -> list[tuple[str, Any]]:
  """(title, draw(ax)) of each panel the report's statistics call for."""
  st, panels = rep['stats'], []
  if 'mmd' in st:
    panels += [('MMD^2 vs permutation null',
                functools.partial(_null, cv['mmd_null'], st['mmd'], st['mmd']['mmd2'])),
               ('centroid shift^2 vs permutation null',
                functools.partial(_null, cv['centroid_null'], st['centroid'],
                                  st['centroid']['l2'] ** 2)),
               ('nearest-neighbour distance', functools.partial(_nn, cv)),
               ('per-dimension PSI', functools.partial(_psi, cv['psi'], rep, st['psi'])),
               ("reference's first two principal axes", functools.partial(_pca, cv))]
  if 'knn_overlap' in st:
    panels.append(('neighbour overlap, version A vs B',
                   functools.partial(_overlap, cv['knn_overlap'], rep, st['knn_overlap'])))
  return panels


def _null(null: np.ndarray, stat: dict[str, Any], value: float, ax) -> None:
  ax.hist(null, bins=40, color='0.6', label='permutation null')
  ax.axvline(value, color='r' if stat['alarm'] else 'g', label='observed')
  ax.legend(fontsize=7)
  ax.set_xlabel(f'p = {stat["p_value"]:.3g}', fontsize=8)


def _nn(cv: dict[str, np.ndarray], ax) -> None:
  hi = float(max(cv['nn_reference'].max(), cv['nn_current'].max()))
  b = np.linspace(0, hi, 40)
  ax.hist(cv['nn_reference'], bins=b, alpha=0.5, density=True, label='reference (held out)')
  ax.hist(cv['nn_current'], bins=b, alpha=0.5, density=True, label='current')
  ax.legend(fontsize=7)
  ax.set_xlabel('cosine distance to nearest reference vector', fontsize=8)


def _psi(psi: np.ndarray, rep: dict[str, Any], stat: dict[str, Any], ax) -> None:
  v = np.sort(psi)[::-1]
  ax.bar(np.arange(len(v)), v, width=1.0, color='0.4')
  ax.axhline(rep['thresholds']['psi_threshold'], color='r', ls='--', label='threshold')
  ax.axhline(stat['noise_floor'], color='g', ls=':', label='i.i.d. noise floor')
  ax.legend(fontsize=7)
  ax.set_xlabel('dimensions, sorted', fontsize=8)


def _pca(cv: dict[str, np.ndarray], ax) -> None:
  ax.scatter(*cv['pca_reference'].T, s=3, alpha=0.4, label='reference')
  ax.scatter(*cv['pca_current'].T, s=3, alpha=0.4, label='current')
  ax.legend(fontsize=7, markerscale=3)


def _overlap(overlap: np.ndarray, rep: dict[str, Any], stat: dict[str, Any], ax) -> None:
  k = stat['k']
  ax.hist(overlap, bins=(np.arange(k + 2) - 0.5) / k, color='0.4')
  ax.axvline(rep['thresholds']['min_knn_overlap'], color='r', ls='--', label='threshold')
  ax.axvline(stat['mean'], color='b', label='mean')
  ax.legend(fontsize=7)
  ax.set_xlabel(f'top-{k} overlap per probe', fontsize=8)
