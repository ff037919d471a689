"""ITM (hard-negative sampling + matching loss) and captioning (CoCa) objectives: the sampler
never picks a positive or a duplicate, follows the softmax (chi-square), spans the global batch
identically on 8 devices; the captioning loss and its gradients match a NumPy loop; and the
step with both terms is exact under GradCache and across 8 devices (mmjax.losses.heads)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mmjax import config as config_lib
from mmjax.losses import captioning, matching
from mmjax.models import TwoTower
import mmjax.models.fusion as fusion
from mmjax.parallel import mesh as mesh_lib
from mmjax.train import step as step_lib
from mmjax.types import ConfigError

B = 16


def _mesh(devices):
  cfg = config_lib.base_config().mesh
  cfg.data = devices
  return mesh_lib.make_mesh(cfg, jax.devices()[:devices])


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _embs(n=B, d=8, seed=0):
  rs = np.random.RandomState(seed)
  return (_unit(rs.normal(size=(n, d))).astype(np.float32),
          _unit(rs.normal(size=(n, d))).astype(np.float32))


def test_sampler_never_picks_the_positive_or_a_duplicate():
  zimg, ztxt = _embs()
  zimg[3] = ztxt[3] * 0 + zimg[3]
  groups = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 8, 9, 9, 10, 11], np.int32)
  sample = jax.jit(matching.sample_negatives)
  for seed in range(50):
    nt, vt, ni, vi = jax.device_get(sample(zimg, ztxt, jnp.float32(20.0), jax.random.key(seed),
                                           groups))
    assert vt.all() and vi.all()
    rows = np.arange(B)
    for idx in (nt, ni):
      assert (idx != rows).all()
      assert (groups[idx] != groups).all()
  # A row whose every column is a duplicate has no valid negative.
  _, vt, _, vi = sample(zimg[:2], ztxt[:2], jnp.float32(1.0), jax.random.key(0),
                        np.zeros(2, np.int32))
  assert not np.any(vt) and not np.any(vi)


def test_sampler_distribution_matches_the_softmax():
  zimg, ztxt = _embs(n=6, seed=1)
  t, draws = 5.0, 4000
  groups = np.array([0, 1, 2, 2, 3, 4], np.int32)
  keys = jax.random.split(jax.random.key(7), draws)
  nt, _, ni, _ = jax.jit(jax.vmap(matching.sample_negatives, in_axes=(None, None, None, 0, None)))(
      zimg, ztxt, jnp.float32(t), keys, groups)
  for row in range(6):
    for idx, sim in ((nt, zimg @ ztxt.T), (ni, ztxt @ zimg.T)):
      allowed = (np.arange(6) != row) & (groups != groups[row])
      logits = np.where(allowed, t * sim[row].astype(np.float64), -np.inf)
      p = np.exp(logits - logits.max())
      p /= p.sum()
      counts = np.bincount(np.asarray(idx[:, row]), minlength=6)
      assert counts[~allowed].sum() == 0
      _, pvalue = stats.chisquare(counts[allowed], draws * p[allowed])
      assert pvalue > 1e-3, (row, counts, draws * p)


def test_global_batch_sampling_on_8_devices_equals_one_device():
  zimg, ztxt = _embs(n=32)
  groups = (np.arange(32) // 3).astype(np.int32)
  key = jax.random.key(3)
  one = jax.jit(matching.sample_negatives)(zimg, ztxt, jnp.float32(10.0), key, groups)
  mesh = _mesh(8)
  sharding = mesh_lib.batch_sharding(mesh)
  put = lambda x: jax.device_put(x, sharding)  # noqa: E731
  eight = jax.jit(matching.make_sampler(mesh))(put(zimg), put(ztxt), jnp.float32(10.0), key,
                                               put(groups))
  for a, b in zip(one, eight):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Negatives come from other devices' shards too (the sampling spans the global batch).
  assert np.any(np.asarray(eight[0]) // 4 != np.arange(32) // 4)


def _caption_reference(logits, tokens, mask):
  """NumPy loop: mean over valid tokens of -log softmax(logits)[token]."""
  total, count = 0.0, 0
  for i in range(tokens.shape[0]):
    for t in range(tokens.shape[1]):
      if mask[i, t]:
        row = logits[i, t].astype(np.float64)
        total += np.log(np.exp(row - row.max()).sum()) + row.max() - row[tokens[i, t]]
        count += 1
  return total / count


def test_caption_loss_and_gradient_match_a_numpy_loop():
  rs = np.random.RandomState(0)
  logits = rs.normal(size=(3, 5, 7)).astype(np.float32)
  tokens = rs.randint(0, 7, (3, 5)).astype(np.int32)
  mask = (np.arange(5)[None] < np.array([5, 2, 3])[:, None]).astype(np.int32)
  loss, _ = captioning.caption_loss(logits, tokens, mask)
  np.testing.assert_allclose(float(loss), _caption_reference(logits, tokens, mask), rtol=1e-5)
  grad = jax.grad(lambda x: captioning.caption_loss(x, tokens, mask)[0])(logits)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = (p - np.eye(7)[tokens]) * mask[..., None] / mask.sum()
  np.testing.assert_allclose(np.asarray(grad), ref, atol=1e-6)


def test_caption_decoder_is_causal_and_greedy_decodes_its_argmax():
  dec = fusion.CaptionDecoder(vocab_size=11, max_len=6, width=16, depth=1, num_heads=2)
  rs = np.random.RandomState(0)
  img = rs.normal(size=(2, 4, 8)).astype(np.float32)
  tokens = rs.randint(0, 11, (2, 6)).astype(np.int32)
  params = dec.init(jax.random.key(0), tokens, img)
  logits = dec.apply(params, tokens, img)
  changed = tokens.copy()
  changed[:, 3:] = (changed[:, 3:] + 1) % 11  # Later tokens do not change earlier logits.
  np.testing.assert_allclose(dec.apply(params, changed, img)[:, :4], logits[:, :4], atol=1e-5)
  out = np.asarray(jax.jit(lambda i: fusion.greedy(lambda t: dec.apply(params, t, i), 2, 6))(img))
  np.testing.assert_array_equal(np.asarray(dec.apply(params, out, img)).argmax(-1), out)


def _config(itm=1.0, caption=0.5):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  c.batch_size = B
  c.model.text.max_len = 8
  c.model.image.dropout = c.model.text.dropout = 0.1  # GradCache must replay the same masks.
  c.data.num_train_examples = 64
  c.model.itm.depth, c.loss.itm_weight = (1, itm) if itm else (0, 0.0)
  c.model.caption.depth, c.loss.caption_weight = (1, caption) if caption else (0, 0.0)
  config_lib.validate(c)
  return c


def _batch(c):
  rs = np.random.RandomState(0)
  s, L = c.model.image.image_size, c.model.text.max_len
  mask = (np.arange(L)[None] < rs.randint(2, L + 1, size=B)[:, None]).astype(np.int32)
  return {'image': rs.randint(0, 256, (B, s, s, 3)).astype(np.uint8),
          'tokens': rs.randint(1, c.model.text.vocab_size, (B, L)).astype(np.int32) * mask,
          'mask': mask, 'group': (np.arange(B) // 2).astype(np.int32)}


@functools.lru_cache(maxsize=None)
def _run(itm, caption, micro_batches, devices=1):
  c = _config(itm, caption)
  mesh = _mesh(devices)
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
  np.testing.assert_allclose(a[0], b[0], rtol=2e-5)
  for k in ('loss/itm', 'loss/caption', 'loss/base'):
    if k in a[2]:
      np.testing.assert_allclose(a[2][k], b[2][k], rtol=2e-5, atol=1e-6)
  flat_a = jax.tree_util.tree_leaves_with_path(a[1])
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b[1]))
  for path, g in flat_a:
    np.testing.assert_allclose(g, flat_b[path], rtol=2e-4, atol=2e-6,
                               err_msg=jax.tree_util.keystr(path))


# The default suite runs the combined case (both heads, and for 8 devices with GradCache too);
# each head alone runs in `make test-slow` (suite budget: ~20 s per compiled pair).
SLOW = pytest.mark.slow


@pytest.mark.parametrize('itm,caption', [pytest.param(1.0, 0.0, marks=SLOW),
                                         pytest.param(0.0, 0.5, marks=SLOW), (1.0, 0.5)])
def test_gradcache_equals_plain_backprop(itm, caption):
  plain, cached = _run(itm, caption, 1), _run(itm, caption, 4)
  _assert_same(plain, cached)
  # The heads and the towers get gradient from the new terms.
  head = 'itm' if itm else 'captioner'
  assert np.abs(jax.tree_util.tree_leaves(plain[1][head])[0]).sum() > 0
  assert ('loss/itm' in plain[2]) == bool(itm) and ('loss/caption' in plain[2]) == bool(caption)


@pytest.mark.parametrize('itm,caption,micro_batches', [
    pytest.param(1.0, 0.0, 1, marks=SLOW), pytest.param(0.0, 0.5, 1, marks=SLOW),
    pytest.param(1.0, 0.5, 1, marks=SLOW), (1.0, 0.5, 2)])
def test_8_devices_equal_one_device(itm, caption, micro_batches):
  _assert_same(_run(itm, caption, 1), _run(itm, caption, micro_batches, devices=8))


def test_the_total_is_the_weighted_sum_of_the_terms():
  loss, _, m = _run(1.0, 0.5, 1)
  np.testing.assert_allclose(loss, m['loss/base'] + m['loss/itm'] + 0.5 * m['loss/caption'],
                             rtol=1e-6)
  assert 0.0 <= m['itm/accuracy'] <= 1.0


@pytest.mark.parametrize('key,value,match', [
    ('loss.itm_weight', 1.0, 'model.itm.depth=0'),
    ('model.caption.depth', 2, 'caption_weight'),
    ('loss.caption_weight', -1.0, 'must be >= 0'),
])
def test_bad_head_fields_name_key_and_value(key, value, match):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  c = tiny.get_config()
  *path, field = key.split('.')
  node = c
  for part in path:
    node = node[part]
  node[field] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(c)


def test_itm_pairs_and_loss_match_numpy():
  nt, ni = np.array([2, 0, 1]), np.array([1, 2, 0])
  text, image, labels, weights = matching.itm_pairs(3, nt, np.array([1, 1, 0]), ni,
                                                    np.array([1, 0, 1]))
  np.testing.assert_array_equal(text, [0, 1, 2, 2, 0, 1, 0, 1, 2])
  np.testing.assert_array_equal(image, [0, 1, 2, 0, 1, 2, 1, 2, 0])
  np.testing.assert_array_equal(labels, [1, 1, 1, 0, 0, 0, 0, 0, 0])
  logits = np.linspace(-2, 2, 9).astype(np.float32)
  loss, m = matching.itm_loss(logits, labels, weights)
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  nll = np.where(labels > 0, -np.log(p), -np.log(1 - p))
  w = np.asarray(weights)
  np.testing.assert_allclose(float(loss), (nll * w).sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(m['itm/accuracy']),
                             (((logits > 0) == (labels > 0)) * w).sum() / w.sum(), rtol=1e-6)
