"""Large-batch training on 8 devices equals the single-device full-batch computation.

For both losses, every mesh layout (data, data+fsdp, data+tensor) and GradCache on or off (with
dropout on), the loss and the gradient of every parameter (towers, temperature, bias) match one
device computing the whole batch with the dense loss.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import config as config_lib
from mmjax.losses import contrastive, distributed
from mmjax.models import TwoTower
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import step as step_lib

PAIR_FIELDS = ('image', 'tokens', 'mask')

B = 32  # 4 pairs per device on 8 devices; micro-batches of 2 or 1.
RTOL = 1e-5


def _config(kind):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.loss.kind = kind
  c.model.text.max_len = 8
  c.model.image.dropout = 0.1
  c.model.text.dropout = 0.1
  c.model.image.pool = 'map'  # Exercise every parameterised part of the towers.
  return c


def _batch(cfg) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(0)
  s, L = cfg.model.image.image_size, cfg.model.text.max_len
  lengths = rs.randint(2, L + 1, size=B)
  return {'image': rs.randint(0, 256, (B, s, s, 3)).astype(np.uint8),
          'tokens': rs.randint(1, cfg.model.text.vocab_size, (B, L)).astype(np.int32),
          'mask': (np.arange(L)[None] < lengths[:, None]).astype(np.int32)}


def _mesh(shape):
  cfg = config_lib.base_config().mesh
  cfg.data, cfg.fsdp, cfg.tensor = shape
  n = int(np.prod(shape))
  return mesh_lib.make_mesh(cfg, jax.devices()[:n])


def _loss_and_grads(config, model, params, batch, mesh, micro_batches, impl,
                    fields=PAIR_FIELDS, roles=('image', 'text')):
  """(loss, grads) of `batch` on `mesh`, parameters laid out by the config's logical rules."""
  rules = mesh_lib.rules(config)
  objective = step_lib.Contrastive(distributed.make_loss(config.loss.kind, impl, mesh), *roles)
  opts = step_lib.StepOptions(objective, micro_batches,
                              distributed.num_batch_shards(mesh))
  with mesh_lib.activate(mesh, rules):
    boxed = jax.eval_shape(model.init, {'params': jax.random.key(0)},
                           *(jnp.asarray(batch[k][:1]) for k in fields))['params']
    shardings = mesh_lib.logical_shardings(boxed, mesh, rules)
    params = jax.device_put(params, shardings)
    batch = jax.device_put(batch, mesh_lib.batch_sharding(mesh))
    fn = jax.jit(lambda p, b, r: step_lib.loss_and_grads(model.apply, p, b, r, opts)[:2])
    loss, grads = fn(params, batch, jax.random.key(7))
  return float(loss), jax.device_get(grads)


@functools.lru_cache(maxsize=None)
def _case(kind):
  """(config, model, params, batch, reference (loss, grads) on one device) for a loss kind."""
  config = _config(kind)
  model = TwoTower(config_lib.model_config(config))
  batch = _batch(config)
  params = jax.jit(model.init)({'params': jax.random.key(0)},
                               *(batch[k][:1] for k in PAIR_FIELDS))['params']
  params = jax.device_get(nn.unbox(params))
  ref = _loss_and_grads(config, model, params, batch, _mesh((1, 1, 1)), 1, 'dense')
  return config, model, params, batch, ref


def _assert_close(got, ref):
  loss, grads = got
  ref_loss, ref_grads = ref
  np.testing.assert_allclose(loss, ref_loss, rtol=RTOL)
  flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
  flat_got = jax.tree.leaves(grads)
  assert len(flat_got) == len(flat_ref)
  overall = max(float(np.max(np.abs(r))) for _, r in flat_ref)
  for (path, r), g in zip(flat_ref, flat_got):
    # Relative to the leaf's own scale; a leaf whose exact gradient is 0 (attention key biases:
    # softmax ignores a constant shift) is held to 1e-2 of the largest gradient instead.
    scale = max(float(np.max(np.abs(r))), 1e-2 * overall)
    err = float(np.max(np.abs(np.asarray(g) - r))) / scale
    assert err <= RTOL, f'{jax.tree_util.keystr(path)}: relative error {err:.2e}'


SLOW = pytest.mark.slow


def _combo(kind, shape, micro_batches, default=False):
  return pytest.param(kind, shape, micro_batches, marks=() if default else SLOW,
                      id=f'{kind}-{"x".join(map(str, shape))}-micro{micro_batches}')


# The default run covers the ring on a data x fsdp mesh with GradCache (the all-gather path is
# checked against dense, with gradients, below); `make test-slow` runs every mesh kind with and
# without GradCache (several micro-batch counts) for both losses.
@pytest.mark.parametrize('kind,shape,micro_batches', [
    _combo('sigmoid', (4, 2, 1), 4, default=True),
    _combo('softmax', (4, 1, 2), 2),
    *[_combo(k, s, m) for k in ('sigmoid', 'softmax')
      for s, m in [((8, 1, 1), 1), ((8, 1, 1), 2), ((8, 1, 1), 4), ((4, 2, 1), 1), ((4, 1, 2), 1),
                   ((1, 1, 1), 4)]],
    _combo('sigmoid', (4, 1, 2), 2), _combo('softmax', (4, 2, 1), 4),
])
def test_sharded_loss_and_grads_equal_single_device(kind, shape, micro_batches):
  config, model, params, batch, ref = _case(kind)
  impl = 'dense' if shape == (1, 1, 1) else 'auto'
  _assert_close(_loss_and_grads(config, model, params, batch, _mesh(shape), micro_batches, impl),
                ref)


AUDIO_FIELDS = ('audio', 'audio_len', 'tokens', 'mask')


@functools.lru_cache(maxsize=None)
def _audio_case():
  """The audio-text model with dropout and SpecAugment on, clips of random lengths."""
  from configs import audio_tiny  # pylint: disable=import-outside-toplevel
  from mmjax import kinds  # pylint: disable=import-outside-toplevel
  config = audio_tiny.get_config()
  config.model.text.max_len = 8
  config.model.audio.max_seconds = 0.5
  config.model.audio.dropout = config.model.text.dropout = 0.1
  config.model.audio.pool = 'map'
  kind = kinds.get(config)
  model = kind.model(kind.model_config(config))
  rs = np.random.RandomState(0)
  s = kind.model_config(config).audio.max_samples
  lengths = rs.randint(s // 4, s + 1, size=B).astype(np.int32)
  batch = {'audio': (rs.normal(size=(B, s)) * (np.arange(s)[None] < lengths[:, None]) * 0.3
                     ).astype(np.float32), 'audio_len': lengths,
           **{k: v for k, v in _batch(_config('softmax')).items() if k != 'image'}}
  params = jax.jit(model.init)({'params': jax.random.key(0)},
                               *(batch[k][:1] for k in AUDIO_FIELDS))['params']
  params = jax.device_get(nn.unbox(params))
  ref = _loss_and_grads(config, model, params, batch, _mesh((1, 1, 1)), 1, 'dense',
                        AUDIO_FIELDS, ('audio', 'text'))
  return config, model, params, batch, ref


@pytest.mark.parametrize('shape,micro_batches', [((4, 2, 1), 2),
                                                 pytest.param((1, 1, 1), 4, marks=SLOW)])
def test_audio_tower_sharded_and_gradcache_equal_single_device(shape, micro_batches):
  """The audio-text model (SpecAugment masks and dropout drawn per row) gives the full-batch
  loss and gradients on 8 devices with GradCache, and on one device with GradCache."""
  config, model, params, batch, ref = _audio_case()
  impl = 'dense' if shape == (1, 1, 1) else 'auto'
  _assert_close(_loss_and_grads(config, model, params, batch, _mesh(shape), micro_batches, impl,
                                AUDIO_FIELDS, ('audio', 'text')), ref)


def test_dropout_is_on_in_these_tests():
  """Equality above would also hold with dropout off: check it is on and changes the loss."""
  config, _, params, batch, ref = _case('sigmoid')
  config = _config('sigmoid')
  config.model.image.dropout = config.model.text.dropout = 0.0
  model0 = TwoTower(config_lib.model_config(config))
  loss0, _ = _loss_and_grads(config, model0, params, batch, _mesh((1, 1, 1)), 1, 'dense')
  assert abs(loss0 - ref[0]) > 1e-3


@pytest.mark.parametrize('kind,impl', [('sigmoid', 'ring'), ('sigmoid', 'all_gather'),
                                       ('softmax', 'all_gather')])
def test_distributed_losses_with_duplicate_groups_and_weights(kind, impl):
  rs = np.random.RandomState(1)
  zi = rs.normal(size=(B, 16)).astype(np.float32)
  zt = rs.normal(size=(B, 16)).astype(np.float32)
  zi /= np.linalg.norm(zi, axis=1, keepdims=True)
  zt /= np.linalg.norm(zt, axis=1, keepdims=True)
  groups = rs.randint(0, 12, size=B).astype(np.int32)  # Plenty of duplicates.
  weights = rs.uniform(0.2, 2.0, size=B).astype(np.float32)  # e.g. click propensity weights
  t, b = np.float32(4.0), np.float32(-2.0)
  mesh = _mesh((4, 2, 1))
  fn = distributed.make_loss(kind, impl, mesh)
  dense = contrastive.get(kind)
  argnums = (0, 1, 2, 3)
  with mesh_lib.activate(mesh, ()):
    sh = mesh_lib.batch_sharding(mesh)
    g_sh, w_sh = jax.device_put(groups, sh), jax.device_put(weights, sh)
    got = jax.jit(jax.value_and_grad(lambda *a: fn(*a, g_sh, w_sh), argnums))(
        jax.device_put(zi, sh), jax.device_put(zt, sh), t, b)
  want = jax.value_and_grad(lambda *a: dense(*a, groups, weights), argnums)(zi, zt, t, b)
  no_mask = dense(zi, zt, t, b)
  assert abs(float(want[0]) - float(no_mask)) > 1e-3  # The mask matters here.
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=RTOL)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL,
                               atol=RTOL * float(np.max(np.abs(w))))


def test_ring_memory_is_per_block():
  """Compiled temp memory of the ring loss (fwd+bwd) stays ~b x b while all_gather is b x B."""
  mesh = _mesh((8, 1, 1))
  n, d = 8192, 64
  spec = jax.ShapeDtypeStruct((n, d), jnp.float32, sharding=mesh_lib.batch_sharding(mesh))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=mesh_lib.replicated(mesh))
  temp = {}
  for impl in ('ring', 'all_gather'):
    fn = distributed.make_loss('sigmoid', impl, mesh)
    with mesh_lib.activate(mesh, ()):
      compiled = jax.jit(jax.grad(fn, argnums=(0, 1, 2, 3))).lower(spec, spec, scalar,
                                                                   scalar).compile()
    temp[impl] = compiled.memory_analysis().temp_size_in_bytes
  b = n // 8
  assert temp['ring'] < 8 * b * b * 4  # a few [b, b] blocks
  assert temp['all_gather'] > b * n * 4  # at least one [b, B] block
  assert temp['all_gather'] > 3 * temp['ring']


@pytest.mark.slow  # 22 s; the drop itself: tests/test_losses.py
def test_robust_loss_drop_is_the_same_with_gradcache_and_across_devices():
  """loss.drop_noisy_fraction ranks the whole global batch, whatever the split."""
  config, model, params, batch, ref = _case('sigmoid')
  config = config.copy_and_resolve_references()
  config.loss.drop_noisy_fraction = 0.25

  def run(shape, micro_batches):
    mesh = _mesh(shape)
    rules = mesh_lib.rules(config)
    objective = step_lib.Contrastive(distributed.make_loss('sigmoid', 'auto', mesh),
                                     drop_noisy_fraction=0.25)
    opts = step_lib.StepOptions(objective, micro_batches, distributed.num_batch_shards(mesh))
    with mesh_lib.activate(mesh, rules):
      fn = jax.jit(lambda p, b, r: step_lib.loss_and_grads(model.apply, p, b, r, opts)[:2])
      loss, grads = fn(params, jax.device_put(batch, mesh_lib.batch_sharding(mesh)),
                       jax.random.key(7))
    return float(loss), jax.device_get(grads)

  plain = run((1, 1, 1), 1)
  assert abs(plain[0] - ref[0]) > 1e-3  # Dropping a quarter of the pairs changes the loss.
  _assert_close(run((8, 1, 1), 2), plain)


def _hard_negatives(rs, n, k=3):
  return {'q2c_sim': rs.uniform(-1, 1, (n, k)).astype(np.float32),
          'q2c_valid': rs.uniform(size=(n, k)) < 0.6,
          'c2q_sim': rs.uniform(-1, 1, (n, k)).astype(np.float32),
          'c2q_valid': rs.uniform(size=(n, k)) < 0.6}


@pytest.mark.parametrize('kind,impl', [('sigmoid', 'ring'), ('sigmoid', 'all_gather'),
                                       ('softmax', 'all_gather')])
def test_distributed_losses_with_hard_negatives(kind, impl):
  """Per-row hard negatives (with duplicates and weights) sharded == dense, value and grads."""
  rs = np.random.RandomState(2)
  zi, zt = (rs.normal(size=(B, 16)).astype(np.float32) for _ in range(2))
  zi /= np.linalg.norm(zi, axis=1, keepdims=True)
  zt /= np.linalg.norm(zt, axis=1, keepdims=True)
  groups = rs.randint(0, 20, size=B).astype(np.int32)
  weights = rs.uniform(0.2, 2.0, size=B).astype(np.float32)
  hard = _hard_negatives(rs, B)
  t, b = np.float32(4.0), np.float32(-2.0)
  mesh = _mesh((4, 2, 1))
  fn, dense = distributed.make_loss(kind, impl, mesh), contrastive.get(kind)
  sims = {k: v for k, v in hard.items() if k.endswith('sim')}
  valid = {k: v for k, v in hard.items() if k.endswith('valid')}
  argnums = (0, 1, 2, 3, 4)
  with mesh_lib.activate(mesh, ()):
    sh = mesh_lib.batch_sharding(mesh)
    put = lambda x: jax.device_put(x, sh)  # noqa: E731
    g_sh, w_sh, v_sh = put(groups), put(weights), jax.tree.map(put, valid)
    got = jax.jit(jax.value_and_grad(
        lambda zi, zt, t, b, s: fn(zi, zt, t, b, g_sh, w_sh, s | v_sh), argnums))(
            put(zi), put(zt), t, b, jax.tree.map(put, sims))
  want = jax.value_and_grad(
      lambda zi, zt, t, b, s: dense(zi, zt, t, b, groups, weights, s | valid), argnums)(
          zi, zt, t, b, sims)
  assert abs(float(want[0]) - float(dense(zi, zt, t, b, groups, weights))) > 1e-3
  np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=RTOL)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=RTOL,
                               atol=RTOL * float(np.max(np.abs(w))))


@pytest.mark.parametrize('kind,shape,micro_batches', [
    _combo('sigmoid', (1, 1, 1), 2), _combo('sigmoid', (4, 2, 1), 2),
    _combo('softmax', (8, 1, 1), 2)])
def test_gradcache_with_hard_negative_columns_equals_single_device(kind, shape, micro_batches):
  """The model embeds `neg_tokens` / `neg_image` (roles neg_text / neg_image) and the step
  differentiates through them: sharded and/or with GradCache == one device plain backprop."""
  config, model, params, batch, _ = _case(kind)
  rs = np.random.RandomState(3)
  k, L = 2, config.model.text.max_len
  s = config.model.image.image_size
  batch = dict(batch,
               neg_tokens=rs.randint(1, config.model.text.vocab_size, (B, k, L)).astype(np.int32),
               neg_mask=np.ones((B, k, L), np.int32),
               neg_text_valid=(rs.uniform(size=(B, k)) < 0.7).astype(np.int32),
               neg_image=rs.randint(0, 256, (B, k, s, s, 3)).astype(np.uint8),
               neg_image_valid=(rs.uniform(size=(B, k)) < 0.7).astype(np.int32))
  ref = _loss_and_grads(config, model, params, batch, _mesh((1, 1, 1)), 1, 'dense')
  plain = _loss_and_grads(config, model, params, _batch(config), _mesh((1, 1, 1)), 1, 'dense')
  assert ref[0] > plain[0] + 1e-4  # The negatives are in the loss.
  impl = 'dense' if shape == (1, 1, 1) else 'auto'
  _assert_close(_loss_and_grads(config, model, params, batch, _mesh(shape), micro_batches, impl),
                ref)
