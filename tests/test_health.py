"""Training health: the embedding statistics against NumPy, the plateau / collapse detector on
synthetic histories, and the training report written from a metrics.jsonl."""

from __future__ import annotations

import json
import logging
import math
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mmjax import config as config_lib
from mmjax.losses import contrastive
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import health, report, step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_uniformity(x, t=2.0):
  n = len(x)
  d2 = [np.sum((x[i] - x[j]) ** 2) for i in range(n) for j in range(i + 1, n)]
  return math.log(np.mean(np.exp(-t * np.asarray(d2, np.float64))))


def np_effective_rank(x):
  s = np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)
  p = s / s.sum()
  p = p[p > 0]
  return math.exp(-np.sum(p * np.log(p)))


@pytest.fixture
def pair():
  rng = np.random.default_rng(0)
  x = unit(rng.normal(size=(24, 16))).astype(np.float32)
  y = unit(x + 0.5 * rng.normal(size=x.shape)).astype(np.float32)
  return x, y


def test_statistics_match_numpy(pair):
  x, y = pair
  np.testing.assert_allclose(health.alignment(x, y), np.mean(np.sum((x - y) ** 2, -1)),
                             rtol=1e-5)
  np.testing.assert_allclose(health.uniformity(x), np_uniformity(x), rtol=1e-4)
  np.testing.assert_allclose(health.effective_rank(x), np_effective_rank(x), rtol=1e-3)
  c = x @ y.T
  stats = health.cosine_stats(3.0 * x, y)  # Cosines: the scale of a row does not matter.
  np.testing.assert_allclose(stats['cos_pos'], np.mean(np.diag(c)), rtol=1e-5)
  np.testing.assert_allclose(stats['cos_neg'], (c.sum() - np.trace(c)) / (24 * 23), rtol=1e-4)
  np.testing.assert_allclose(stats['cos_std'], np.std(c), rtol=1e-4)


def test_statistics_at_the_extremes():
  one_point = np.tile(unit(np.ones((1, 8))), (10, 1)).astype(np.float32)
  assert abs(float(health.uniformity(one_point))) < 1e-5
  np.testing.assert_allclose(health.effective_rank(one_point), 1.0, rtol=1e-3)
  basis = np.eye(6, 8, dtype=np.float32)  # 6 orthonormal rows: 6 equal singular values.
  np.testing.assert_allclose(health.effective_rank(basis), 6.0, rtol=1e-4)
  # Orthogonal unit vectors are all sqrt(2) apart: log exp(-2 * 2) = -4.
  np.testing.assert_allclose(health.uniformity(basis), -4.0, rtol=1e-5)
  np.testing.assert_allclose(health.cosine_stats(basis, basis)['cos_pos'], 1.0, rtol=1e-6)


def test_embedding_metrics_sharded_and_subsampled(pair):
  x, y = pair
  from configs import base  # pylint: disable=import-outside-toplevel
  sh = mesh_lib.batch_sharding(mesh_lib.make_mesh(base.get_config().mesh))  # 8 test devices.
  embs = {'image': jax.device_put(x, sh), 'text': jax.device_put(y, sh),
          'neg_text': jnp.zeros((24, 2, 16))}
  m = jax.jit(lambda e: health.embedding_metrics(e, rows=16))(embs)
  assert set(m) == {f'health/{k}' for k in (
      'alignment', 'cos_pos', 'cos_neg', 'cos_std', 'image/uniformity', 'image/effective_rank',
      'text/uniformity', 'text/effective_rank')}
  np.testing.assert_allclose(m['health/image/uniformity'], np_uniformity(x[:16]), rtol=1e-4)
  np.testing.assert_allclose(m['health/text/effective_rank'], np_effective_rank(y[:16]),
                             rtol=1e-3)
  m = jax.jit(lambda e: health.embedding_metrics(e, rows=8))(embs)  # Rows 0, 3, 6, ...: all shards.
  np.testing.assert_allclose(m['health/alignment'], np.mean(np.sum((x[::3] - y[::3]) ** 2, -1)),
                             rtol=1e-5)
  np.testing.assert_allclose(m['health/image/effective_rank'], np_effective_rank(x[::3]),
                             rtol=1e-3)
  llm = health.embedding_metrics({'query': x, 'candidate': y}, 8)
  assert 'health/candidate/effective_rank' in llm
  assert health.embedding_metrics({'text': y}, 8) == {}


def sigmoid_objective(e, t, b, batch):
  del batch
  return contrastive.sigmoid_loss(e['image'], e['text'], t, b), {}


def health_config(rows=16, log_every=5, total_steps=12):
  from configs import base  # pylint: disable=import-outside-toplevel
  c = base.get_config()
  c.health.rows, c.log_every_steps, c.total_steps = rows, log_every, total_steps
  return c


def test_instrumented_objective_keeps_loss_and_gradients(pair):
  x, y = pair
  wrapped = health.instrument(sigmoid_objective, health_config())
  assert health.instrument(sigmoid_objective, health_config(rows=0)) is sigmoid_objective
  embs, t, b = {'image': jnp.asarray(x), 'text': jnp.asarray(y)}, jnp.float32(10.), jnp.float32(-5.)

  def grad(f):
    return jax.grad(lambda e, t, b: f(e, t, b, {})[0], argnums=(0, 1, 2))(embs, t, b)

  for a, c in zip(jax.tree.leaves(grad(sigmoid_objective)), jax.tree.leaves(grad(wrapped))):
    np.testing.assert_array_equal(a, c)
  loss, metrics = wrapped(embs, t, b, {})
  assert float(loss) == float(sigmoid_objective(embs, t, b, {})[0])
  np.testing.assert_allclose(metrics['health/image/uniformity'], np_uniformity(x[:16]), rtol=1e-4)


def test_statistics_only_on_the_loops_log_steps(pair):
  """Bound to the step, they are computed after steps 5, 10 and the last (12), NaN otherwise."""
  x, y = pair
  opts = step_lib.StepOptions(health.instrument(sigmoid_objective, health_config()))
  assert health.at_step(step_lib.StepOptions(sigmoid_objective), 3).objective is sigmoid_objective
  embs = {'image': jnp.asarray(x), 'text': jnp.asarray(y)}

  @jax.jit
  def run(step):
    loss, m = health.at_step(opts, step).objective(embs, 10.0, -5.0, {})
    return loss, m['health/alignment']

  computed = []
  for step in range(12):  # state.step before the update; the loop logs step + 1.
    loss, align = run(jnp.int32(step))
    assert np.isfinite(loss)
    computed.append(bool(np.isfinite(align)))
  assert [s + 1 for s in range(12) if computed[s]] == [5, 10, 12]
  host = [{'loss': 1.0, 'health/alignment': np.nan}, {'loss': 2.0, 'health/alignment': 0.5}]
  assert health.logged_values(host) == {'train/health/alignment': 0.5}


@pytest.mark.parametrize('batch', [2, 16, 128, 32768])
def test_collapse_loss_is_the_real_loss_at_collapse(batch):
  z = unit(np.ones((batch, 4))).astype(np.float32)  # Every image and text the same point.
  bias = -math.log(batch - 1)  # The bias that minimises the all-alike sigmoid loss.
  if batch <= 128:
    sig = contrastive.sigmoid_loss(jnp.asarray(z), jnp.asarray(z), jnp.float32(1.0),
                                   jnp.float32(bias - 1.0))
    np.testing.assert_allclose(sig, health.collapse_loss('sigmoid', batch), rtol=1e-5)
    soft = contrastive.softmax_loss(jnp.asarray(z), jnp.asarray(z), jnp.float32(10.0))
    np.testing.assert_allclose(soft, health.collapse_loss('softmax', batch), rtol=1e-5)
  grid = np.linspace(-15, 5, 200001)  # The minimum over a fine grid of common logits.
  brute = np.min(np.logaddexp(0, -grid) + (batch - 1) * np.logaddexp(0, grid))
  np.testing.assert_allclose(health.collapse_loss('sigmoid', batch), brute, rtol=1e-6)
  if batch >= 128:
    assert abs(health.collapse_loss('sigmoid', batch) - (math.log(batch) + 1)) < 0.01


def history(losses, **columns):
  """Train log rows every 10 steps: the given losses, healthy statistics unless overridden."""
  rows = []
  for i, loss in enumerate(losses):
    row = {'step': 10 * (i + 1), 'train/loss': loss, 'train/health/cos_std': 0.2,
           'train/health/cos_pos': 0.5, 'train/health/cos_neg': 0.1}
    for role in ('image', 'text'):
      row[f'train/health/{role}/effective_rank'] = 20.0
      row[f'train/health/{role}/uniformity'] = -3.0
    for k, v in columns.items():
      row[k] = v[i] if isinstance(v, list) else v
    rows.append(row)
  return rows


B = 128
COLLAPSE = health.collapse_loss('sigmoid', B)


def kinds(rows, **kw):
  return [f.kind for f in health.diagnose(rows, loss_kind='sigmoid', batch_size=B, **kw)]


def test_healthy_history_has_no_findings():
  rows = history(list(np.linspace(10.0, 2.0, 20)))
  rows.insert(5, {'step': 50, 'eval/i2t/recall@1': 0.2})  # Eval rows are skipped.
  assert kinds(rows) == []
  assert health.episodes(rows, loss_kind='sigmoid', batch_size=B) == []


def test_plateau_found_after_patience_and_not_before():
  rows = history([10.0, 7.0] + [COLLAPSE * f for f in (1.02, 0.99, 0.97, 1.0, 0.98, 0.96)])
  found = health.diagnose(rows, loss_kind='sigmoid', batch_size=B)
  assert [f.kind for f in found] == ['plateau']
  assert (found[0].since, found[0].until) == (30, 80)
  assert 'collapse value 5.8' in found[0].message and 'B=128' in found[0].message
  assert kinds(rows[:6]) == []  # Only 4 rows on the plateau: under patience 5.
  assert kinds(rows, settings=health.Settings(patience=7)) == []


def test_leaving_the_plateau_ends_the_episode():
  rows = history([COLLAPSE] * 6 + [4.5, 3.9, 3.1])
  assert kinds(rows) == []
  [ep] = health.episodes(rows, loss_kind='sigmoid', batch_size=B)
  assert (ep.kind, ep.since, ep.until) == ('plateau', 10, 60)


def test_infonce_plateau_is_ln_b_and_multitask_uses_the_contrastive_term():
  rows = history([math.log(B) * 1.01] * 6)
  assert [f.kind for f in health.diagnose(rows, loss_kind='softmax', batch_size=B)] == ['plateau']
  assert kinds(rows) == []  # ln B is 17% under the sigmoid collapse value.
  multi = history([9.0] * 6, **{'train/loss/contrastive': COLLAPSE})
  assert kinds(multi) == ['plateau']


def test_collapsed_tower_and_alike_cosines():
  rank = [20.0, 15.0, 5.0, 1.4, 1.1, 1.05, 1.02, 1.01, 1.0]
  rows = history(list(np.linspace(9.0, 3.0, 9)), **{'train/health/image/effective_rank': rank})
  [f] = health.diagnose(rows, loss_kind='sigmoid', batch_size=B)
  assert (f.kind, f.since) == ('collapse/image', 40) and 'effective rank 1.00' in f.message
  unif = history([3.0] * 6, **{'train/health/text/uniformity': -0.02})
  assert kinds(unif) == ['collapse/text']
  alike = history([3.0] * 6, **{'train/health/cos_std': 0.004})
  assert kinds(alike) == ['cosines_alike']
  assert kinds(history([3.0] * 6, **{'train/health/cos_std': 0.004}),
               settings=health.Settings(min_cosine_std=0.001)) == []


def test_monitor_warns_once_per_episode(caplog):
  mon = health.Monitor('sigmoid', B, health.Settings(patience=3))
  losses = [COLLAPSE] * 5 + [3.0] * 2 + [COLLAPSE] * 3
  new = []
  with caplog.at_level(logging.INFO, logger='mmjax.train.health'):
    for row in history(losses):
      new.append([f.kind for f in mon.observe(row['step'], row)])
  assert new == [[], [], ['plateau'], [], [], [], [], [], [], ['plateau']]
  warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 2 and 'since step 10' in warnings[0].getMessage()
  assert any('plateau no longer holds' in r.getMessage() for r in caplog.records)
  assert health.Monitor('sigmoid', B, health.Settings(), enabled=False).observe(10, {}) == []
  printed, mon = [], health.Monitor('sigmoid', B, health.Settings(patience=2))
  for row in history([COLLAPSE] * 2 + [3.0]):  # echo: the loop passes its progress bar's write.
    mon.observe(row['step'], row, echo=printed.append)
  assert printed[0].startswith('WARNING: Training health at step 20 (since step 10): the sigmoid')
  assert printed[1:] == ['Training health at step 30: plateau no longer holds.']


def test_settings_from_config_names_a_bad_key():
  from configs import base  # pylint: disable=import-outside-toplevel
  c = base.get_config()
  assert health.Settings.from_config(c) == health.Settings()
  c.health.plateau_tolerance = 1.5
  with pytest.raises(config_lib.ConfigError, match=r'config\.health\.plateau_tolerance=1\.5'):
    health.Settings.from_config(c)


def write_run(workdir, rows, **config):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text(json.dumps(
      {'batch_size': B, 'loss': {'kind': 'sigmoid'}, 'health': {'patience': 3}, **config}))
  with (workdir / 'metrics.jsonl').open('w') as f:
    for row in rows:
      f.write(json.dumps(row) + '\n')


PANELS = ['Loss', 'Learning rate', 'Temperature / bias', 'Gradient norm', 'Eval during training',
          'Alignment / uniformity (Wang & Isola)', 'Effective rank', 'Cross-tower cosines']


def assert_report_png(path):
  with Image.open(path) as im:
    assert im.format == 'PNG' and im.size[0] > 600 and im.size[1] > 600
    assert im.info['Panels'].split('; ') == PANELS
    im.load()
    assert np.asarray(im.convert('L')).std() > 10  # Drawn, not blank.


def test_report_from_metrics_jsonl(tmp_path):
  rows = history([COLLAPSE] * 4 + [4.0, 3.0],
                 **{'train/learning_rate': 1e-3, 'train/temperature': 10.0, 'train/bias': -10.0,
                    'train/grad_norm': 1.0})
  rows += [{'step': 60, 'eval/i2t/recall@1': 0.1, 'eval/zs/top1': 0.3, 'eval/i2t/mrr': 0.2}]
  # A resumed run logged steps 50 and 60 again (the newest values win) and was killed mid-line.
  again = [dict(r, **{'train/loss': r['train/loss'] - 0.5}) for r in rows[4:6]]
  write_run(tmp_path, rows + again)
  with (tmp_path / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 70, "train/lo')
  json_path, png_path = report.write(tmp_path)
  rep = json.loads(json_path.read_text())
  assert rep['last_step'] == 60 and rep['collapse_loss'] == pytest.approx(COLLAPSE)
  assert rep['series']['train/loss'][-2:] == [[50, 3.5], [60, 2.5]]
  assert rep['series']['eval/zs/top1'] == [[60, 0.3]] and 'eval/i2t/mrr' not in rep['series']
  assert [(f['kind'], f['since'], f['until']) for f in rep['findings']] == [('plateau', 10, 40)]
  assert rep['ongoing'] == [] and rep['last']['train/health/image/effective_rank'] == 20.0
  assert_report_png(png_path)


def test_report_thins_long_series(tmp_path):
  write_run(tmp_path, history(list(np.linspace(9.0, 1.0, 1200))))
  rep = report.build(tmp_path)
  loss = rep['series']['train/loss']
  assert len(loss) == report.MAX_POINTS and loss[0][0] == 10 and loss[-1][0] == 12000


def test_report_failure_is_logged_not_raised(tmp_path, caplog):
  with caplog.at_level(logging.ERROR, logger='mmjax.train.report'):
    assert report.write_safely(tmp_path / 'missing') is False
  assert 'could not be written' in caplog.text and 'No metrics.jsonl' in caplog.text


def test_report_cli(tmp_path):
  write_run(tmp_path, history([COLLAPSE] * 4))
  proc = subprocess.run([sys.executable, '-m', 'mmjax.train.report', f'--workdir={tmp_path}'],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'report.png' in proc.stdout and 'plateau' in proc.stdout
  assert_report_png(tmp_path / 'report.png')
