"""End-to-end runs of the tiny config: train, evaluate, checkpoint, resume, export."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import mmjax
from mmjax.train import checkpoint as ckpt_lib
from mmjax.train import compile_cache, loop
from test_health import assert_report_png

REPO = pathlib.Path(__file__).resolve().parents[1]


def run_cli(workdir, *overrides, mode='train', devices=8, check=True, popen=False, **kwargs):
  """`python -m mmjax.main` in a fresh process (the tiny config)."""
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'mmjax.main', '--config=configs/tiny.py', f'--workdir={workdir}',
         f'--mode={mode}', *overrides]
  if popen:
    return subprocess.Popen(cmd, cwd=REPO, env=env, **kwargs)
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f'{cmd} failed ({proc.returncode}):\n{proc.stderr[-4000:]}')
  return proc


def saved_params(workdir, step) -> dict[str, np.ndarray]:
  """The params of checkpoint `step`, as flat {path: array} on the host."""
  mngr = ocp.CheckpointManager(pathlib.Path(workdir).absolute() / 'checkpoints',
                               item_names=('state', 'data', 'meta'))
  meta = mngr.item_metadata(step)['state']
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), meta)
  tree = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  mngr.close()
  flat = jax.tree_util.tree_flatten_with_path(tree['state']['params'])[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def assert_same_params(a: dict, b: dict):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """One 4-step run of the tiny config (checkpoints at 2 and 4), shared by several tests."""
  from configs import tiny  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp('trained')
  config = tiny.get_config()
  config.compilation_cache = 'workdir'  # test_resume_in_fresh_process_is_exact reuses it.
  config.compilation_cache_min_compile_s = 0.0
  result = loop.train_and_evaluate(config, workdir)
  return config, workdir, result


def test_train_writes_metrics_eval_and_checkpoints(trained):
  _, workdir, result = trained
  assert result['step'] == 4
  for key in ('i2t/recall@1', 'i2t/recall@5', 'i2t/recall@10', 'i2t/mrr', 't2i/recall@1',
              't2i/recall@5', 't2i/recall@10', 't2i/mrr'):
    assert 0.0 <= result[key] <= 1.0, key
  on_disk = json.loads((workdir / 'eval.json').read_text())
  assert on_disk['i2t/recall@1'] == result['i2t/recall@1']
  assert on_disk['primary'] == 'demo' and on_disk['num_eval_pairs'] == 64
  assert on_disk['demo/i2t/recall@1'] == on_disk['i2t/recall@1']
  assert on_disk['chance/i2t/recall@1'] == on_disk['chance/t2i/recall@1'] == 1 / 64
  lines = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [l for l in lines if 'train/loss' in l]
  assert [l['step'] for l in train] == [2, 4]
  assert all(np.isfinite(l['train/loss']) and l['train/pairs_per_sec'] > 0 for l in train)
  assert any('eval/i2t/recall@1' in l for l in lines)
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [2, 4]
  assert (workdir / 'tokenizer.json').exists() and (workdir / 'config.json').exists()


def test_train_logs_health_and_writes_the_report(trained):
  """The tiny run's health metrics are in range, and its report.png / report.json are written."""
  config, workdir, _ = trained
  train = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()
           if 'train/loss' in l]
  rows = min(config.batch_size, config.health.rows)
  for row in train:
    for role in ('image', 'text'):
      assert 1.0 <= row[f'train/health/{role}/effective_rank'] <= min(rows, config.model.embed_dim)
      assert -4.0 <= row[f'train/health/{role}/uniformity'] <= 0.0
    assert 0.0 <= row['train/health/alignment'] <= 4.0 and row['train/health/cos_std'] > 0
  rep = json.loads((workdir / 'report.json').read_text())
  assert rep['last_step'] == 4 and rep['batch_size'] == 16 and rep['loss_kind'] == 'sigmoid'
  assert [s for s, _ in rep['series']['train/health/text/effective_rank']] == [2, 4]
  assert rep['series']['eval/i2t/recall@1'][-1][0] == 4
  assert_report_png(workdir / 'report.png')


@pytest.mark.slow  # 20 s; every default training test checks a finite loss
def test_loss_decreases_over_a_short_run(tmp_path, tiny_config):
  tiny_config.total_steps = 30
  tiny_config.log_every_steps = 10
  tiny_config.checkpoint.every_steps = 30
  tiny_config.eval.every_steps = 30
  tiny_config.optimizer.learning_rate = 3e-3
  loop.train_and_evaluate(tiny_config, tmp_path)
  losses = [json.loads(l)['train/loss'] for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()
            if 'train/loss' in l]
  assert losses[-1] < losses[0] * 0.8, losses


def test_resume_in_fresh_process_is_exact(trained, tmp_path):
  """2N steps straight == N steps, a new process, N more: identical parameters."""
  _, workdir, _ = trained
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'checkpoints' / '4')  # As if killed right after saving step 2.
  (resumed / 'eval.json').unlink()
  cached = compile_cache.entries(resumed / compile_cache.WORKDIR_SUBDIR)
  # The first run filled WORKDIR/jax_cache (reuse: tests/test_compile_cache.py).
  assert any(p.name.startswith('jit_train_step-') for p in cached), [p.name for p in cached]
  run_cli(resumed, '--config.compilation_cache=workdir')
  # Served from the copied cache (mmjax.train.compile_cache.enable keeps the directory out of the
  # cache keys on CPU): a miss would have written a second train step.
  steps = [p.name for p in compile_cache.entries(resumed / compile_cache.WORKDIR_SUBDIR)
           if p.name.startswith('jit_train_step-')]
  assert steps == [p.name for p in cached if p.name.startswith('jit_train_step-')]
  assert json.loads((resumed / 'eval.json').read_text())['step'] == 4
  assert_same_params(saved_params(workdir, 4), saved_params(resumed, 4))


@pytest.mark.slow  # ~110 s; test_resume_in_fresh_process_is_exact covers resume by default.
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path):
  """A run killed with SIGKILL mid-training, restarted, ends where an uninterrupted run ends."""
  steps = ['--config.total_steps=40', '--config.checkpoint.every_steps=5',
           '--config.log_every_steps=5', '--config.eval.every_steps=40']
  straight = tmp_path / 'straight'
  run_cli(straight, *steps)
  killed = tmp_path / 'killed'
  proc = run_cli(killed, *steps, popen=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (killed / 'checkpoints' / '5').exists():
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'eval.json').exists(), 'the run finished before it could be killed'
  run_cli(killed, *steps)
  assert_same_params(saved_params(straight, 40), saved_params(killed, 40))


def test_truncated_latest_checkpoint_falls_back_and_is_kept(trained, tmp_path):
  _, workdir, _ = trained
  wd = tmp_path / 'wd'
  shutil.copytree(workdir, wd)
  # Truncate the newest checkpoint's array data (as an interrupted copy or a full disk would).
  for f in [p for p in (wd / 'checkpoints' / '4' / 'state').rglob('*') if p.parent.name == 'd']:
    data = f.read_bytes()
    f.write_bytes(data[:len(data) // 2])
  # The copied WORKDIR/jax_cache serves the evaluation and checkpoint programs (the train step of
  # 6 steps is another program: its learning-rate schedule).
  proc = run_cli(wd, '--config.total_steps=6', '--config.compilation_cache=workdir')
  assert 'unreadable' in proc.stderr and 'step 4' in proc.stderr
  kept = list((wd / 'checkpoints_corrupt').iterdir())
  assert len(kept) == 1 and kept[0].name.startswith('4-')
  assert json.loads((wd / 'eval.json').read_text())['step'] == 6
  assert (wd / 'checkpoints' / '6').exists()


def test_checkpoint_of_another_model_is_refused_and_untouched(trained, tmp_path):
  _, workdir, _ = trained
  wd = tmp_path / 'wd'
  shutil.copytree(workdir, wd)
  before = sorted((p.relative_to(wd), p.stat().st_size) for p in wd.rglob('*') if p.is_file())
  proc = run_cli(wd, '--config.model.image.width=64', '--config.total_steps=6', check=False)
  assert proc.returncode != 0
  assert 'different model' in proc.stderr and 'model.image.width: checkpoint 32 vs config 64' in proc.stderr
  after = sorted((p.relative_to(wd), p.stat().st_size) for p in wd.rglob('*') if p.is_file())
  assert before == after


def test_compare_meta_names_param_differences():
  a = {'model': {'x': 1}, 'param_shapes': {'img/k': [2, 3]}}
  b = {'model': {'x': 1}, 'param_shapes': {'img/k': [2, 4], 'txt/k': [1]}}
  diffs = ckpt_lib.compare_meta(a, b)
  assert diffs == ['param img/k: checkpoint [2, 3] vs model [2, 4]',
                   'param txt/k: checkpoint None vs model [1]']


def test_export_and_load_embedder_match_training_embeddings(trained, tmp_path):
  config, workdir, result = trained
  wd = tmp_path / 'wd'
  shutil.copytree(workdir, wd)
  run_cli(wd, mode='export', devices=1)
  assert (wd / 'export' / 'model.json').exists() and (wd / 'export' / 'tokenizer.json').exists()
  emb = mmjax.load_embedder(wd / 'export', batch_size=8)
  evaluator = loop.make_evaluator(config)
  zimg = emb.embed_images(evaluator.images[:11])
  ztxt = emb.embed_texts(evaluator.captions[:11])
  assert zimg.shape == (11, config.model.embed_dim) and ztxt.shape == zimg.shape
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=1), 1.0, atol=1e-5)
  # The exported model reproduces the evaluation of the training run.
  metrics = evaluator(emb)
  for k in ('i2t/recall@1', 't2i/recall@1', 'i2t/mrr', 't2i/mrr'):
    assert metrics[k] == pytest.approx(result[k], abs=1e-6), k
  with pytest.raises(ValueError, match='Expected images'):
    emb.embed_images(np.zeros((2, 8, 8, 3), np.uint8))


def test_mode_eval_rewrites_eval_json(trained, tmp_path):
  _, workdir, result = trained
  wd = tmp_path / 'wd'
  shutil.copytree(workdir, wd)
  (wd / 'eval.json').unlink()
  proc = run_cli(wd, mode='eval', devices=2)
  assert 'recall@1' in proc.stdout
  again = json.loads((wd / 'eval.json').read_text())
  assert again['step'] == 4
  assert again['i2t/recall@1'] == pytest.approx(result['i2t/recall@1'], abs=1e-6)


def test_load_for_inference_restores_the_params_without_an_optimizer(trained, monkeypatch):
  """--mode=eval / export and the robustness report restore the params alone (Orbax partial
  restore): no optimizer or optimizer state is built, and the params equal the checkpoint's."""
  config, workdir, _ = trained

  def refuse(*args, **kwargs):
    raise AssertionError('load_for_inference built the optimizer (state)')

  monkeypatch.setattr(loop.optim, 'make_optimizer', refuse)
  monkeypatch.setattr(loop.state_lib, 'state_layout', refuse)
  run, state, step = loop.load_for_inference(config, workdir)
  run.checkpointer.close()
  assert step == 4 and not hasattr(run, 'tx') and not hasattr(state, 'opt_state')
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
  assert_same_params({jax.tree_util.keystr(p): np.asarray(v) for p, v in flat},
                     saved_params(workdir, 4))
  layout = jax.tree.leaves(run.abstract_params)
  assert [a.sharding for a in jax.tree.leaves(state.params)] == [a.sharding for a in layout]


def test_load_embedder_refuses_non_export(tmp_path):
  with pytest.raises(FileNotFoundError, match='not an mmjax export'):
    mmjax.load_embedder(tmp_path)
