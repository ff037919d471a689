"""Balancing the multi-task losses (mmjax.losses.multitask): per-term gradient norms on the shared
embeddings, GradNorm-style and loss-ratio weights (against direct computations, exact under
GradCache and across 8 simulated devices), and temperature sampling of the data mixture."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.data import sources
from mmjax.losses import multitask
from mmjax.models import TwoTower
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import step as step_lib

from test_objectives import B, _batch, _config, _unit

TASKS = {'contrastive': 1.0, 'text_text': 0.5, 'distill': 2.0}


def test_balanced_weights_put_weighted_values_in_the_static_proportions():
  values = {'a': jnp.float32(4.0), 'b': jnp.float32(0.5), 'c': jnp.float32(2.0)}
  base = {'a': 1.0, 'b': 0.5, 'c': 2.0}
  w = multitask.balanced_weights('gradnorm', values, base)
  mean = (4.0 + 0.25 + 4.0) / 3.5
  for k in values:  # w_k v_k = w0_k * (sum w0 v / sum w0)
    np.testing.assert_allclose(w[k] * values[k], base[k] * mean, rtol=1e-6)
  total, m = multitask.balanced('loss_ratio', values, base)
  np.testing.assert_allclose(total, sum(base[k] * values[k] for k in values), rtol=1e-6)
  assert jax.grad(lambda v: multitask.balanced('loss_ratio', {'a': v, 'b': v}, base)[0])(
      jnp.float32(3.0)) == pytest.approx(1.5)  # The weights (1, 0.5) are held constant.
  with pytest.raises(ValueError, match="'gradnorm' needs each term's gradient norm"):
    multitask.balanced('gradnorm', values, base)
  with pytest.raises(ValueError, match="Unknown balancing 'max'"):
    multitask.balanced_weights('max', values, base)


def _objective(weighting, log=False):
  c = _config(weighting)
  c.multitask.log_grad_norms = log
  mesh = mesh_lib.make_mesh(c.mesh, jax.devices()[:1])
  return c, step_lib.make_objective(c, mesh), mesh


def _inputs(c):
  rs = np.random.RandomState(2)
  embs = {r: jnp.asarray(_unit(rs.normal(size=(B, 32))), jnp.float32)
          for r in ('image', 'text', 'query')}
  return embs, {k: jnp.asarray(v) for k, v in _batch(c).items()}


@pytest.mark.parametrize('weighting', ['static', 'gradnorm', 'loss_ratio'])
def test_term_gradient_norms_and_balanced_gradients_match_direct_computation(weighting):
  """grad_norm/<task> is ||dL_task/dz|| of the term alone; the objective's gradient is
  sum_k w_k dL_k/dz with the logged weights held constant."""
  c, objective, mesh = _objective(weighting, log=True)
  embs, batch = _inputs(c)
  t, b = jnp.float32(10.0), jnp.float32(-10.0)
  with mesh_lib.activate(mesh, ()):
    (loss, m), g = jax.jit(jax.value_and_grad(objective, has_aux=True))(embs, t, b, batch)
    per_term = {}
    for name, term in objective.terms:
      per_term[name] = jax.jit(jax.grad(lambda e, term=term: term(e, t, b, batch)[0]))(embs)
  want = {}
  for name in TASKS:
    norm = np.sqrt(sum(float(np.sum(np.square(x))) for x in per_term[name].values()))
    np.testing.assert_allclose(m[f'grad_norm/{name}'], norm, rtol=1e-5, err_msg=name)
    want[name] = float(m[f'weight/{name}'])
  for role in embs:
    np.testing.assert_allclose(g[role], sum(want[k] * per_term[k][role] for k in TASKS),
                               rtol=1e-4, atol=1e-6, err_msg=role)
  shares = [float(m[f'grad_share/{k}']) for k in TASKS]
  np.testing.assert_allclose(sum(shares), 1.0, rtol=1e-6)
  if weighting == 'gradnorm':  # Weighted norms in the static proportions 1 : 0.5 : 2.
    np.testing.assert_allclose(shares, np.array([1.0, 0.5, 2.0]) / 3.5, rtol=1e-5)
  if weighting == 'loss_ratio':
    weighted = [want[k] * float(m[f'loss/{k}']) / TASKS[k] for k in TASKS]
    np.testing.assert_allclose(weighted, weighted[0], rtol=1e-5)
  if weighting == 'static':
    assert want == TASKS


@functools.lru_cache(maxsize=None)
def _run(weighting, micro_batches, devices=1):
  """(loss, grads, metrics) of the multi-task objective through `loss_and_grads`."""
  c = _config(weighting)
  c.multitask.log_grad_norms = True
  mesh_cfg = config_lib.base_config().mesh
  mesh_cfg.data = devices
  mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:devices])
  model = TwoTower(config_lib.model_config(c))
  batch = _batch(c)
  params = jax.device_get(nn.unbox(model.init(
      {'params': jax.random.key(0)}, batch['image'][:1], batch['tokens'][:1],
      batch['mask'][:1])['params']))
  opts = step_lib.StepOptions(step_lib.make_objective(c, mesh), micro_batches, devices)
  with mesh_lib.activate(mesh, mesh_lib.rules(c)):
    fn = jax.jit(lambda p, b, r: step_lib.loss_and_grads(model.apply, p, b, r, opts))
    loss, grads, _, _, metrics = fn(params, jax.device_put(batch, mesh_lib.batch_sharding(mesh)),
                                    jax.random.key(3))
  return float(loss), jax.device_get(grads), jax.device_get(metrics)


def _assert_same(a, b):
  (loss, grads, metrics), (loss2, grads2, metrics2) = a, b
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  assert set(metrics) == set(metrics2)
  for k in metrics:
    np.testing.assert_allclose(metrics2[k], metrics[k], rtol=1e-4, atol=1e-6, err_msg=k)
  flat, flat2 = (jax.tree_util.tree_flatten_with_path(g)[0] for g in (grads, grads2))
  top = max(float(np.abs(g).max()) for _, g in flat)
  for (path, g), (_, g2) in zip(flat, flat2):
    scale = max(float(np.abs(g).max()), 1e-2 * top)
    assert float(np.abs(g2 - g).max()) <= 2e-5 * scale, jax.tree_util.keystr(path)


@pytest.mark.parametrize('weighting', [  # 3 compiled steps each (~33 s on 2 quiet cores):
    # `make test-slow` (the suite budget); the weights' values are tested above in the default.
    pytest.param('gradnorm', marks=pytest.mark.slow),
    pytest.param('loss_ratio', marks=pytest.mark.slow)])
def test_balanced_step_is_exact_under_gradcache_and_across_8_devices(weighting):
  """Loss, every metric (weights, per-term gradient norms and shares) and every gradient: 2
  GradCache micro-batches == plain backprop == the batch split over 8 simulated devices."""
  one = _run(weighting, 1)
  assert {f'grad_norm/{k}' for k in TASKS} <= set(one[2])
  _assert_same(one, _run(weighting, 2))
  _assert_same(one, _run(weighting, 1, 8))


def test_mixture_weights_temperature():
  specs = [sources.SourceSpec(weight=1.0), sources.SourceSpec(weight=1.0)]
  assert sources.mixture_weights(specs, [800, 200]) == [0.5, 0.5]  # T = 0: the weights.
  np.testing.assert_allclose(sources.mixture_weights(specs, [800, 200], 1.0), [0.8, 0.2])
  np.testing.assert_allclose(sources.mixture_weights(specs, [800, 200], 2.0), [2 / 3, 1 / 3])
  np.testing.assert_allclose(sources.mixture_weights(specs, [800, 200], 1e6), [0.5, 0.5],
                             atol=1e-5)
  own = [sources.SourceSpec(temperature=2.0), sources.SourceSpec(weight=4.0)]  # 2 and default 1.
  np.testing.assert_allclose(sources.mixture_weights(own, [900, 200], 1.0),
                             np.array([30.0, 800.0]) / 830)
  big = [sources.SourceSpec(), sources.SourceSpec()]
  assert np.isfinite(sources.mixture_weights(big, [10**9, 10**8], 0.01)).all()
  with pytest.raises(ValueError, match=r'temperatures \[2.0, 0.0\] must all be 0'):
    sources.mixture_weights(own, [900, 200])


@pytest.mark.parametrize('key,value,match', [
    ('multitask.weighting', 'gradnorm', "weighting='gradnorm' needs config.multitask.tasks"),
    ('data.mixture_temperature', -1.0, 'mixture_temperature=-1.0 must be >= 0'),
    ('data.mixture', (dict(name='demo', temperature=-2.0),), r'mixture\[0\].temperature=-2.0'),
    ('data.mixture', (dict(name='demo', temperature=2.0), dict(name='demo')),
     r'temperatures \[2.0, 0.0\]'),
])
def test_bad_balancing_fields_are_named(key, value, match):
  c = _config()
  c.multitask.tasks = ()
  block, field = key.split('.')
  c[block][field] = value
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(c)
