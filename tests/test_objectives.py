"""Distillation and multi-task objectives through the train step (mmjax.losses.objectives):
exact under GradCache, static weights = the weighted sum, learned uncertainty weights get
gradients and move, and the live teacher gives the same columns as the precomputed one."""

from __future__ import annotations

import functools
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax import config as config_lib
from mmjax.cli import teacher_embed
from mmjax.data import demo, pipeline, tokenizer as tokenizer_lib
from mmjax.losses import distill, objectives
from mmjax.models import TwoTower
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import step as step_lib, teacher as teacher_lib

from test_hf import FIXTURES

B = 8


def _config(weighting='static', kind='both'):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.batch_size = B
  c.model.text.max_len = 8
  c.model.image.dropout = c.model.text.dropout = 0.1  # GradCache must replay the same masks.
  c.data.num_train_examples = 64
  c.distill.kind = kind
  c.distill.teacher, c.distill.embeddings = 'hf:x', 'x'
  c.multitask.tasks = (('contrastive', 1.0), ('text_text', 0.5), ('distill', 2.0))
  c.multitask.weighting = weighting
  config_lib.validate(c)
  return c


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batch(c):
  rs = np.random.RandomState(0)
  s, L, d = c.model.image.image_size, c.model.text.max_len, c.model.embed_dim
  tokens = lambda: rs.randint(1, c.model.text.vocab_size, (B, L)).astype(np.int32)
  mask = (np.arange(L)[None] < rs.randint(2, L + 1, size=B)[:, None]).astype(np.int32)
  return {'image': rs.randint(0, 256, (B, s, s, 3)).astype(np.uint8), 'tokens': tokens(),
          'mask': mask, 'query_tokens': tokens(), 'query_mask': mask[::-1].copy(),
          'teacher_image': _unit(rs.normal(size=(B, d))).astype(np.float32),
          'teacher_text': _unit(rs.normal(size=(B, d))).astype(np.float32)}


@functools.lru_cache(maxsize=None)
def _run(weighting, micro_batches, devices=1):
  """(loss, grads, metrics, params) of the multi-task objective through `loss_and_grads`."""
  c = _config(weighting)
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data = devices
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:devices])
  model = TwoTower(config_lib.model_config(c))
  batch = _batch(c)
  params = jax.device_get(nn.unbox(model.init(  # Eager: faster than compiling init.

      {'params': jax.random.key(0)}, batch['image'][:1], batch['tokens'][:1],
      batch['mask'][:1])['params']))
  opts = step_lib.StepOptions(step_lib.make_objective(c, mesh), micro_batches, devices)
  with mesh_lib.activate(mesh, mesh_lib.rules(c)):
    fn = jax.jit(lambda p, b, r: step_lib.loss_and_grads(model.apply, p, b, r, opts))
    loss, grads, _, _, metrics = fn(params, jax.device_put(batch, mesh_lib.batch_sharding(mesh)),
                                    jax.random.key(3))
  return float(loss), jax.device_get(grads), jax.device_get(metrics), params


@pytest.mark.slow  # 30 s; GradCache over extra roles: test_llm_embedder
def test_distill_multitask_gradcache_equals_plain_backprop():
  """Uncertainty weighting over contrastive + text_text + distill (KL and regression): loss,
  metrics and every gradient (towers, temperature, bias, log-variances) with 2 GradCache
  micro-batches equal plain backprop."""
  loss, grads, metrics, _ = _run('uncertainty', 1)
  loss2, grads2, metrics2, _ = _run('uncertainty', 2)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  for k in metrics:
    np.testing.assert_allclose(metrics2[k], metrics[k], rtol=1e-5, atol=1e-7, err_msg=k)
  flat, flat2 = (jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads, grads2))
  top = max(float(np.abs(g).max()) for _, g in flat)
  for (path, g), (_, g2) in zip(flat, flat2):
    scale = max(float(np.abs(g).max()), 1e-2 * top)
    assert float(np.abs(g2 - g).max()) <= 1e-5 * scale, jax.tree_util.keystr(path)
  assert {'distill/kl', 'distill/regression', 'loss/contrastive', 'loss/text_text',
          'loss/distill', 'weight/contrastive', 'weight/text_text', 'weight/distill',
          'loss/total'} <= set(metrics)


def test_static_weights_reproduce_the_weighted_sum():
  c = _config('static')
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  objective = step_lib.make_objective(c, mesh)
  rs = np.random.RandomState(2)
  embs = {r: jnp.asarray(_unit(rs.normal(size=(B, 32))), jnp.float32)
          for r in ('image', 'text', 'query')}
  batch = {k: jnp.asarray(v) for k, v in _batch(c).items()}
  with mesh_lib.activate(mesh, ()):
    loss, m = jax.jit(objective)(embs, jnp.float32(10.0), jnp.float32(-10.0), batch)
  np.testing.assert_allclose(
      loss, m['loss/contrastive'] + 0.5 * m['loss/text_text'] + 2.0 * m['loss/distill'],
      rtol=1e-6)
  np.testing.assert_allclose(m['loss/distill'], m['distill/kl'] + m['distill/regression'],
                             rtol=1e-6)
  assert (float(m['weight/text_text']), float(m['weight/distill'])) == (0.5, 2.0)
  # A single contrastive task is the step's own objective, unwrapped.
  c.multitask.tasks = ()
  assert isinstance(step_lib.make_objective(c, mesh), step_lib.Contrastive)


def test_uncertainty_weights_start_at_the_static_ones_get_gradients_and_move():
  loss, grads, m, params = _run('uncertainty', 1)
  for task, w in (('contrastive', 1.0), ('text_text', 0.5), ('distill', 2.0)):
    np.testing.assert_allclose(m[f'weight/{task}'], w, rtol=1e-6)  # 0.5 exp(-s0) = w.
  s = params['multitask']
  g = grads['multitask']
  for task in ('contrastive', 'text_text', 'distill'):  # d/ds = 0.5 (1 - exp(-s) L).
    want = 0.5 * (1 - np.exp(-s[f'log_var_{task}']) * m[f'loss/{task}'])
    np.testing.assert_allclose(g[f'log_var_{task}'], want, rtol=1e-4)
  tx = optax.sgd(0.1)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = optax.apply_updates(params, updates)['multitask']
  assert all(abs(float(moved[k] - s[k])) > 1e-4 for k in s)


def test_text_teacher_kl_leaves_the_diagonal_out():
  """A text-only teacher: KL over text-text similarities without each row's own entry."""
  rs = np.random.RandomState(1)
  z, zt = _unit(rs.normal(size=(5, 4))), _unit(rs.normal(size=(5, 6)))
  loss, m = objectives.distill_term({'text': z}, {'teacher_text': zt}, kind='kl', temperature=5.0)
  off = ~np.eye(5, dtype=bool)

  def log_softmax_rows(x):
    x = np.where(off, x, -np.inf)
    x = x - x.max(-1, keepdims=True)
    return np.where(off, x - np.log(np.exp(x).sum(-1, keepdims=True)), 0.0)

  t, s = log_softmax_rows(5.0 * zt @ zt.T), log_softmax_rows(5.0 * z @ z.T)
  want = np.mean(np.sum(np.where(off, np.exp(t) * (t - s), 0.0), -1))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(m['distill/kl'], want, rtol=1e-5)
  with pytest.raises(ValueError, match="regression needs equal dimensions, the student's text "
                     'embeddings are 4-d and the teacher'):
    objectives.distill_term({'text': z}, {'teacher_text': zt}, kind='regression', temperature=1.)
  np.testing.assert_allclose(distill.similarity_kl(z, z, z, z, student_temperature=3.0,
                                                   teacher_temperature=3.0, exclude_self=True),
                             0.0, atol=1e-6)


@pytest.fixture(scope='module')
def bert_teacher(tmp_path_factory):
  """The tiny BERT fixture with a WordPiece tokenizer: a text-only 'hf:' teacher."""
  d = tmp_path_factory.mktemp('teacher')
  shutil.copytree(FIXTURES / 'bert', d, dirs_exist_ok=True)
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=200, seed=0), 99)
  (d / 'tokenizer.json').write_text(tok.to_str())
  return f'hf:{d}'


def test_live_teacher_equals_teacher_embeddings_in_the_data(bert_teacher, tmp_path):
  """The same teacher precomputed into the data (teacher_embed -> TeacherEmbeddings ->
  Preprocess picks the sampled caption's row) and run live on the batch's teacher tokens."""
  c = _config()
  c.multitask.tasks = ()
  c.distill.weight, c.distill.teacher = 1.0, bert_teacher
  c.distill.embeddings = str(tmp_path / 'emb')
  c.model.text.max_len = 16
  teacher_embed.write(c, c.distill.embeddings, batch_size=32)
  encoder = tokenizer_lib.TextEncoder(
      tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=200, seed=0), 256), 16)
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  data = teacher_lib.for_run(c, mesh, text_pairs=False)
  assert data.host_columns == ('teacher_text',) and data.step_spec == {
      'teacher_text': ((B, 32), np.float32)}
  from_data = next(iter(pipeline.make_train_dataset(c, encoder)))
  c.distill.source = 'live'
  live = teacher_lib.for_run(c, mesh, text_pairs=False)
  batch = next(iter(pipeline.make_train_dataset(c, encoder, teacher_encoder=live.encoder)))
  np.testing.assert_array_equal(batch['tokens'], from_data['tokens'])  # The same captions.
  columns = pipeline.train_columns(c) + live.host_columns
  out = live(jax.device_put({k: batch[k] for k in columns}, mesh_lib.batch_sharding(mesh)))
  assert 'teacher_tokens' not in out and out['teacher_text'].shape == (B, 32)
  np.testing.assert_allclose(np.asarray(out['teacher_text']), from_data['teacher_text'],
                             atol=1e-5)
  # A file written for other data is refused.
  c.data.num_train_examples = 65
  c.distill.source = 'data'
  with pytest.raises(ValueError, match='rerun `python -m mmjax.data.teacher_embed`'):
    next(iter(pipeline.make_train_dataset(c, encoder)))


@pytest.mark.parametrize('key,value,match', [
    ('distill.kind', 'l2', "config.distill.kind='l2' is not one of"),
    ('distill.source', 'cache', "config.distill.source='cache' is not one of"),
    ('distill.temperature', 0.0, r'config.distill.temperature=0.0 must be > 0'),
    ('multitask.tasks', (('contrastive', 1.0), ('ttc', 1.0)), r"entry \('ttc', 1.0\) must be"),
    ('multitask.tasks', (('distill', 1.0),) * 2, "lists 'distill' twice"),
    ('multitask.weighting', 'max', "config.multitask.weighting='max' is not one of"),
])
def test_bad_distill_and_multitask_fields_name_key_and_value(key, value, match):
  c = _config()
  block, field = key.split('.')
  c[block][field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)


def test_distillation_needs_a_teacher_and_one_weight():
  c = _config()
  c.distill.weight = 1.0
  with pytest.raises(config_lib.ConfigError, match="distill.weight=1.0 and config.multitask.tasks"):
    config_lib.validate(c)
  c.multitask.tasks, c.distill.teacher = (), ''
  with pytest.raises(config_lib.ConfigError, match='config.distill.teacher is empty'):
    config_lib.validate(c)
  c.distill.teacher, c.distill.embeddings = 'hf:x', ''
  with pytest.raises(config_lib.ConfigError, match='config.distill.embeddings is empty'):
    config_lib.validate(c)
  c.distill.source = 'live'
  config_lib.validate(c)
