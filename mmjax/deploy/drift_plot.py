"""The drift report's figure (`mmjax.deploy.drift.write` -> drift.png): the permutation nulls,
nearest-neighbour distance histograms, PSI per dimension, a 2-D projection of both sets and, for
two versions, the neighbour-overlap histogram."""

from __future__ import annotations

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

  rep, cv, st = result.report, result.curves, result.report['stats']
  panels = []

  def null_panel(name, key, value):
    def draw(ax):
      ax.hist(cv[key], bins=40, color='0.6', label='permutation null')
      ax.axvline(value, color='r' if st[name]['alarm'] else 'g', label='observed')
      ax.legend(fontsize=7)
      ax.set_xlabel(f'p = {st[name]["p_value"]:.3g}', fontsize=8)
    return draw

  if 'mmd' in st:
    panels.append(('MMD^2 vs permutation null', null_panel('mmd', 'mmd_null', st['mmd']['mmd2'])))
    panels.append(('centroid shift^2 vs permutation null', null_panel(
        'centroid', 'centroid_null', st['centroid']['l2'] ** 2)))

    def nn(ax):
      hi = float(max(cv['nn_reference'].max(), cv['nn_current'].max()))
      b = np.linspace(0, hi, 40)
      ax.hist(cv['nn_reference'], bins=b, alpha=0.5, density=True, label='reference (held out)')
      ax.hist(cv['nn_current'], bins=b, alpha=0.5, density=True, label='current')
      ax.legend(fontsize=7)
      ax.set_xlabel('cosine distance to nearest reference vector', fontsize=8)
    panels.append(('nearest-neighbour distance', nn))

    def psi(ax):
      v = np.sort(cv['psi'])[::-1]
      ax.bar(np.arange(len(v)), v, width=1.0, color='0.4')
      ax.axhline(rep['thresholds']['psi_threshold'], color='r', ls='--', label='threshold')
      ax.axhline(st['psi']['noise_floor'], color='g', ls=':', label='i.i.d. noise floor')
      ax.legend(fontsize=7)
      ax.set_xlabel('dimensions, sorted', fontsize=8)
    panels.append(('per-dimension PSI', psi))

    def pca(ax):
      ax.scatter(*cv['pca_reference'].T, s=3, alpha=0.4, label='reference')
      ax.scatter(*cv['pca_current'].T, s=3, alpha=0.4, label='current')
      ax.legend(fontsize=7, markerscale=3)
    panels.append(("reference's first two principal axes", pca))
  if 'knn_overlap' in st:
    def overlap(ax):
      k = st['knn_overlap']['k']
      ax.hist(cv['knn_overlap'], bins=(np.arange(k + 2) - 0.5) / k, color='0.4')
      ax.axvline(rep['thresholds']['min_knn_overlap'], color='r', ls='--', label='threshold')
      ax.axvline(st['knn_overlap']['mean'], color='b', label='mean')
      ax.legend(fontsize=7)
      ax.set_xlabel(f'top-{st["knn_overlap"]["k"]} overlap per probe', fontsize=8)
    panels.append(('neighbour overlap, version A vs B', overlap))

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
