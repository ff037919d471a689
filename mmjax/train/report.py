r"""The training report: `report.png` and `report.json` next to `eval.json`, from metrics.jsonl.

Every training run writes it at its end; regenerate it (e.g. for a run still going, or one from
an older mmjax) with

  python -m mmjax.train.report --workdir=runs/demo

Panels: loss (with the collapse value and the stretches spent on it), learning rate, temperature
and bias, gradient norm, the eval metrics logged during training, alignment / uniformity,
effective rank and the cross-tower cosines (`mmjax.train.health`). report.json holds the same
series (thinned to at most MAX_POINTS points each), the run's last values and the health
findings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Any

import numpy as np

from mmjax.train import health

log = logging.getLogger(__name__)

REPORT_PNG, REPORT_JSON = 'report.png', 'report.json'
MAX_POINTS = 500
H = 'train/' + health.PREFIX
# Eval metrics drawn: retrieval R@1 / R@10 and classification top-1 of every evaluator.
EVAL_KEYS = re.compile(r'^eval/(.+/)?(recall@1|recall@10|top1)$')
MAX_EVAL_LINES = 10


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, float]]:
  """metrics.jsonl as one row per step (train and eval rows of a step merged), by step. A resumed
  run logs some steps again: the newest values win. A torn last line (a killed run) is skipped."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    raise FileNotFoundError(f'No metrics.jsonl in {workdir}: is it a training workdir?')
  by_step: dict[int, dict[str, float]] = {}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      log.warning('%s line %d is not JSON (a torn write?); skipped.', path, n)
      continue
    by_step.setdefault(int(row['step']), {}).update(row)
  return [by_step[s] for s in sorted(by_step)]


def run_info(workdir: str | pathlib.Path) -> dict[str, Any]:
  """Batch size, loss kind and health settings from the run's config.json (older runs lack
  config.health: the defaults)."""
  path = pathlib.Path(workdir) / 'config.json'
  config = json.loads(path.read_text()) if path.exists() else {}
  fields = {f.name for f in dataclasses.fields(health.Settings)}
  settings = health.Settings(**{k: v for k, v in config.get('health', {}).items() if k in fields})
  return {'batch_size': config.get('batch_size'),
          'loss_kind': config.get('loss', {}).get('kind'), 'settings': settings}


def _thin(points: list[list[float]]) -> list[list[float]]:
  """At most MAX_POINTS evenly spaced points, the first and last kept."""
  if len(points) <= MAX_POINTS:
    return points
  return [points[i] for i in np.unique(np.linspace(0, len(points) - 1, MAX_POINTS).round()
                                       .astype(int))]


def _plotted(key: str) -> bool:
  return (key.startswith(('train/loss', H)) or bool(EVAL_KEYS.match(key))
          or key in ('train/learning_rate', 'train/temperature', 'train/bias', 'train/grad_norm'))


def build(workdir: str | pathlib.Path) -> dict[str, Any]:
  """The report's content (what report.json holds and report.png draws)."""
  rows = read_metrics(workdir)
  info = run_info(workdir)
  keys = sorted({k for r in rows for k in r if _plotted(k)})
  series = {k: _thin([[r['step'], r[k]] for r in rows if k in r]) for k in keys}
  out: dict[str, Any] = {'last_step': rows[-1]['step'] if rows else None,
                         'batch_size': info['batch_size'], 'loss_kind': info['loss_kind'],
                         'collapse_loss': None, 'findings': [], 'ongoing': [],
                         'last': {k: v[-1][1] for k, v in series.items()}, 'series': series}
  if info['batch_size'] and info['loss_kind'] in ('sigmoid', 'softmax'):
    out['collapse_loss'] = health.collapse_loss(info['loss_kind'], info['batch_size'])
    found = health.episodes(rows, loss_kind=info['loss_kind'], batch_size=info['batch_size'],
                            settings=info['settings'])
    train_steps = [r['step'] for r in rows if 'train/loss' in r]
    out['findings'] = [dataclasses.asdict(f) for f in found]
    out['ongoing'] = [f.kind for f in found if train_steps and f.until == train_steps[-1]]
  return out


def _short(key: str) -> str:
  return key.removeprefix(H).removeprefix('train/').removeprefix('eval/')


def _draw(ax, series: dict[str, list], keys: list[str]) -> bool:
  """Lines of `keys` on `ax` ('no data logged' when there are none); whether any was drawn."""
  drawn = False
  for k in keys:
    if series.get(k):
      x, y = zip(*series[k])
      ax.plot(x, y, label=_short(k), marker='.' if len(x) < 30 else None)
      drawn = True
  if drawn:
    ax.legend(fontsize=7)
  else:
    ax.text(0.5, 0.5, 'no data logged', ha='center', va='center', transform=ax.transAxes)
  return drawn


def panels(rep: dict[str, Any]) -> list[tuple[str, Any]]:
  """(title, draw(ax)) of every panel, in reading order."""
  s = rep['series']
  with_prefix = lambda p: [k for k in s if k.startswith(p)]  # noqa: E731
  roles = health.logged_roles([{k: 0 for k in s}])
  lines = lambda *keys: lambda ax: _draw(ax, s, list(keys))  # noqa: E731

  def loss(ax):
    _draw(ax, s, with_prefix('train/loss'))
    if rep['collapse_loss']:
      ax.axhline(rep['collapse_loss'], color='k', ls='--', lw=1,
                 label=f'collapse value {rep["collapse_loss"]:.2f}')
      for f in rep['findings']:
        if f['kind'] == 'plateau':
          ax.axvspan(f['since'], f['until'], color='tab:red', alpha=0.12)
      ax.legend(fontsize=7)

  def logit_params(ax):
    _draw(ax, s, ['train/temperature'])
    if s.get('train/bias'):
      twin = ax.twinx()
      x, y = zip(*s['train/bias'])
      twin.plot(x, y, color='tab:orange', label='bias')
      twin.set_ylabel('bias', fontsize=8)
      twin.legend(fontsize=7, loc='lower right')

  return [
      ('Loss', loss),
      ('Learning rate', lines('train/learning_rate')),
      ('Temperature / bias', logit_params),
      ('Gradient norm', lines('train/grad_norm')),
      ('Eval during training', lines(*sorted(k for k in s if EVAL_KEYS.match(k))[:MAX_EVAL_LINES])),
      ('Alignment / uniformity (Wang & Isola)',
       lines(H + 'alignment', *(f'{H}{r}/uniformity' for r in roles))),
      ('Effective rank', lines(*(f'{H}{r}/effective_rank' for r in roles))),
      ('Cross-tower cosines', lines(H + 'cos_pos', H + 'cos_neg', H + 'cos_std')),
  ]


def plot(rep: dict[str, Any], path: str | pathlib.Path, title: str = '') -> list[str]:
  """Draws `rep` into the PNG `path` (Agg, no display needed); returns the panel titles, which
  the PNG also carries in its 'Panels' text chunk."""
  # Deferred: matplotlib costs ~1 s to import, and only the end of a run needs it.
  # pylint: disable=import-outside-toplevel
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  spec = panels(rep)
  fig = Figure(figsize=(12, 3 * ((len(spec) + 1) // 2)))
  FigureCanvasAgg(fig)
  axes = fig.subplots((len(spec) + 1) // 2, 2, squeeze=False).ravel()
  for ax, (name, draw) in zip(axes, spec):
    ax.set_title(name, fontsize=10)
    ax.grid(alpha=0.3)
    draw(ax)
    ax.set_xlabel('step', fontsize=8)
  for ax in axes[len(spec):]:
    ax.set_axis_off()
  fig.subplots_adjust(left=0.06, right=0.94, top=0.93, bottom=0.04, hspace=0.45, wspace=0.25)
  ongoing = ', '.join(rep['ongoing']) or 'none'
  head = f'{title}: ' if title else ''
  fig.suptitle(f'{head}step {rep["last_step"]}, batch {rep["batch_size"]}, {rep["loss_kind"]} '
               f'loss; health warnings at the end: {ongoing}', fontsize=11)
  titles = [t for t, _ in spec]
  fig.savefig(path, dpi=80, metadata={'Title': f'mmjax training report {title}'.strip(),
                                      'Panels': '; '.join(titles)})
  return titles


def write(workdir: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
  """report.json and report.png of the run in `workdir`."""
  workdir = pathlib.Path(workdir)
  rep = build(workdir)
  json_path, png_path = workdir / REPORT_JSON, workdir / REPORT_PNG
  tmp = json_path.with_suffix('.tmp')
  tmp.write_text(json.dumps(rep, indent=1))
  tmp.replace(json_path)
  plot(rep, png_path, title=workdir.name)
  return json_path, png_path


def write_safely(workdir: str | pathlib.Path) -> bool:
  """`write`, for the end of a run: a failure is logged, never raised, since the run it describes
  has finished and saved its results. Whether the report was written."""
  try:
    json_path, png_path = write(workdir)
  except Exception:  # pylint: disable=broad-exception-caught
    log.exception('The training report of %s could not be written (the run itself is fine; '
                  'retry with python -m mmjax.train.report --workdir=%s).', workdir, workdir)
    return False
  log.info('Training report: %s, %s.', png_path, json_path)
  return True


def main(argv) -> None:
  from absl import app, flags  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  json_path, png_path = write(flags.FLAGS.workdir)
  rep = json.loads(json_path.read_text())
  print(f'Wrote {png_path} and {json_path}.')
  for f in rep['findings']:
    print(f'  steps {f["since"]}-{f["until"]}: {f["kind"]}: {f["message"]}')


if __name__ == '__main__':
  from absl import app, flags  # pylint: disable=ungrouped-imports

  flags.DEFINE_string('workdir', None, 'Training workdir (holds metrics.jsonl and config.json).')
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
