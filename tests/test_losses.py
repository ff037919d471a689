"""Contrastive losses (mmjax.losses) against an independent float64 NumPy reference.

The reference values are written from the formulas, and the reference gradients are derived by
hand (not by autodiff), so a sign, normalisation or axis mistake in either the loss or its
gradient shows up.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax import losses
from mmjax.losses import contrastive

RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------
# NumPy reference (float64).


def _log_sigmoid(x):
  # log sigmoid(x) = -log(1 + exp(-x)), stable for both signs.
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return np.exp(_log_sigmoid(x))


def _labels(n):
  y = -np.ones((n, n))
  np.fill_diagonal(y, 1.0)
  return y


def np_sigmoid_loss(zi, zt, t, b):
  """-1/n * sum_ij log sigmoid(y_ij (t <zi_i, zt_j> + b))."""
  n = zi.shape[0]
  total = 0.0
  for i in range(n):
    for j in range(n):
      y = 1.0 if i == j else -1.0
      total += _log_sigmoid(y * (t * float(np.dot(zi[i], zt[j])) + b))
  return -total / n


def np_sigmoid_grads(zi, zt, t, b):
  """dL/dlogit_ij = -y_ij sigmoid(-y_ij logit_ij) / n; chain rule through logit = t S + b."""
  n = zi.shape[0]
  s = zi @ zt.T
  y = _labels(n)
  g = -y * _sigmoid(-y * (t * s + b)) / n
  return {'zimg': t * g @ zt, 'ztxt': t * g.T @ zi, 't': np.sum(g * s), 'b': np.sum(g)}


def _log_softmax_rows(x):
  m = x.max(axis=1, keepdims=True)
  return x - m - np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))


def np_softmax_loss(zi, zt, t):
  """Mean of the row-wise (image->text) and column-wise (text->image) cross-entropies."""
  logits = t * (zi @ zt.T)
  n = logits.shape[0]
  i2t = -np.mean([_log_softmax_rows(logits)[i, i] for i in range(n)])
  t2i = -np.mean([_log_softmax_rows(logits.T)[j, j] for j in range(n)])
  return 0.5 * (i2t + t2i)


def np_softmax_grads(zi, zt, t):
  """dL/dlogits = ((P_row - I) + (P_col - I)) / (2n), P_row/P_col softmax over rows/columns."""
  s = zi @ zt.T
  logits = t * s
  n = s.shape[0]
  p_row = np.exp(_log_softmax_rows(logits))
  p_col = np.exp(_log_softmax_rows(logits.T)).T
  g = ((p_row - np.eye(n)) + (p_col - np.eye(n))) / (2 * n)
  return {'zimg': t * g @ zt, 'ztxt': t * g.T @ zi, 't': np.sum(g * s), 'b': 0.0}


# ---------------------------------------------------------------------------------------------
# Inputs.


def _unit_rows(rng, n, d):
  x = rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _inputs(n, d=6, seed=0):
  rng = np.random.default_rng(seed + 100 * n)
  zi, zt = _unit_rows(rng, n, d), _unit_rows(rng, n, d)
  # Make the diagonal pairs somewhat aligned so the loss is not degenerate.
  zt = zt + 0.8 * zi
  zt = (zt / np.linalg.norm(zt, axis=1, keepdims=True)).astype(np.float32)
  return zi, zt


# One jitted value-and-grad per loss (t and b are traced), so each n compiles once, at XLA's
# lowest optimisation level (much faster CPU compiles of these tiny graphs).
_FAST_COMPILE = {'xla_backend_optimization_level': 0, 'xla_cpu_use_fusion_emitters': False}
_VALUE_AND_GRAD = {fn: jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)),
                               compiler_options=_FAST_COMPILE)
                   for fn in (contrastive.sigmoid_loss, contrastive.softmax_loss)}


def _jax_value_and_grads(fn, zi, zt, t, b):
  value, grads = _VALUE_AND_GRAD[fn](jnp.asarray(zi), jnp.asarray(zt), jnp.float32(t),
                                     jnp.float32(b))
  return float(value), dict(zip(('zimg', 'ztxt', 't', 'b'), map(np.asarray, grads)))


NS = (1, 2, 3, 8)
SIGMOID_PARAMS = ((10.0, -10.0), (1.0, 0.0), (3.7, 2.5), (0.5, -1.3))
SOFTMAX_TEMPS = (1.0, 1 / 0.07, 4.2)


# ---------------------------------------------------------------------------------------------
# Sigmoid (SigLIP).


@pytest.mark.parametrize('n', NS)
@pytest.mark.parametrize('t,b', SIGMOID_PARAMS)
def test_sigmoid_loss_value_matches_reference(n, t, b):
  zi, zt = _inputs(n)
  got, _ = _jax_value_and_grads(contrastive.sigmoid_loss, zi, zt, t, b)
  want = np_sigmoid_loss(zi.astype(np.float64), zt.astype(np.float64), t, b)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('n', NS)
@pytest.mark.parametrize('t,b', SIGMOID_PARAMS)
def test_sigmoid_loss_grads_match_analytic(n, t, b):
  zi, zt = _inputs(n, seed=1)
  _, got = _jax_value_and_grads(contrastive.sigmoid_loss, zi, zt, t, b)
  want = np_sigmoid_grads(zi.astype(np.float64), zt.astype(np.float64), t, b)
  for k in ('zimg', 'ztxt', 't', 'b'):
    np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_sigmoid_reference_grads_agree_with_finite_differences():
  """Guards the hand-derived reference itself (central differences in float64)."""
  zi, zt = _inputs(3, seed=2)
  zi, zt = zi.astype(np.float64), zt.astype(np.float64)
  t, b, eps = 2.3, -0.7, 1e-6
  want = np_sigmoid_grads(zi, zt, t, b)
  fd_t = (np_sigmoid_loss(zi, zt, t + eps, b) - np_sigmoid_loss(zi, zt, t - eps, b)) / (2 * eps)
  fd_b = (np_sigmoid_loss(zi, zt, t, b + eps) - np_sigmoid_loss(zi, zt, t, b - eps)) / (2 * eps)
  d = np.zeros_like(zi)
  d[1, 2] = eps
  fd_zi = (np_sigmoid_loss(zi + d, zt, t, b) - np_sigmoid_loss(zi - d, zt, t, b)) / (2 * eps)
  fd_zt = (np_sigmoid_loss(zi, zt + d, t, b) - np_sigmoid_loss(zi, zt - d, t, b)) / (2 * eps)
  np.testing.assert_allclose([want['t'], want['b'], want['zimg'][1, 2], want['ztxt'][1, 2]],
                             [fd_t, fd_b, fd_zi, fd_zt], rtol=1e-6, atol=1e-8)


def test_sigmoid_loss_is_normalised_by_n_not_n_squared():
  # Orthogonal embeddings, t=1, b=0: every logit is 0 except the diagonal (1).
  n = 3
  z = np.eye(6, dtype=np.float32)[:n]
  got, _ = _jax_value_and_grads(contrastive.sigmoid_loss, z, z, 1.0, 0.0)
  want = (n * np.log1p(np.exp(-1.0)) + n * (n - 1) * np.log(2.0)) / n
  np.testing.assert_allclose(got, want, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Softmax (CLIP / InfoNCE).


@pytest.mark.parametrize('n', NS)
@pytest.mark.parametrize('t', SOFTMAX_TEMPS)
def test_softmax_loss_value_matches_reference(n, t):
  zi, zt = _inputs(n, seed=3)
  got, _ = _jax_value_and_grads(contrastive.softmax_loss, zi, zt, t, 0.0)
  want = np_softmax_loss(zi.astype(np.float64), zt.astype(np.float64), t)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('n', NS)
@pytest.mark.parametrize('t', SOFTMAX_TEMPS)
def test_softmax_loss_grads_match_analytic(n, t):
  zi, zt = _inputs(n, seed=4)
  _, got = _jax_value_and_grads(contrastive.softmax_loss, zi, zt, t, 0.3)
  want = np_softmax_grads(zi.astype(np.float64), zt.astype(np.float64), t)
  for k in ('zimg', 'ztxt', 't', 'b'):
    np.testing.assert_allclose(got[k], want[k], rtol=RTOL, atol=ATOL, err_msg=k)


def test_softmax_loss_ignores_bias_and_accepts_none():
  zi, zt = _inputs(3, seed=8)
  want = np_softmax_loss(zi.astype(np.float64), zt.astype(np.float64), 2.0)
  for bias in (None, jnp.float32(0.0), jnp.float32(-7.0)):
    got = float(contrastive.softmax_loss(zi, zt, jnp.float32(2.0), bias))
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_softmax_reference_grads_agree_with_finite_differences():
  zi, zt = _inputs(4, seed=5)
  zi, zt = zi.astype(np.float64), zt.astype(np.float64)
  t, eps = 3.1, 1e-6
  want = np_softmax_grads(zi, zt, t)
  fd_t = (np_softmax_loss(zi, zt, t + eps) - np_softmax_loss(zi, zt, t - eps)) / (2 * eps)
  d = np.zeros_like(zi)
  d[2, 0] = eps
  fd_zi = (np_softmax_loss(zi + d, zt, t) - np_softmax_loss(zi - d, zt, t)) / (2 * eps)
  fd_zt = (np_softmax_loss(zi, zt + d, t) - np_softmax_loss(zi, zt - d, t)) / (2 * eps)
  np.testing.assert_allclose([want['t'], want['zimg'][2, 0], want['ztxt'][2, 0]],
                             [fd_t, fd_zi, fd_zt], rtol=1e-6, atol=1e-8)


def test_softmax_loss_is_asymmetric_in_rows_and_columns():
  """Both directions enter: a matrix whose rows and columns differ gives the average of two CEs."""
  logits = np.array([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [3.0, 0.0, 0.5]])
  # Scores given directly via zimg = [logits, 0], ztxt = [I, 0], t = 1.
  zi = np.zeros((3, 6), np.float32)
  zi[:, :3] = logits
  zt = np.eye(6, dtype=np.float32)[:3]
  got, _ = _jax_value_and_grads(contrastive.softmax_loss, zi, zt, 1.0, 0.0)
  i2t = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(3)])
  t2i = -np.mean([logits[j, j] - np.log(np.exp(logits[:, j]).sum()) for j in range(3)])
  assert abs(i2t - t2i) > 0.1
  np.testing.assert_allclose(got, 0.5 * (i2t + t2i), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize('kind,t,b', [('sigmoid', 100.0, -50.0), ('softmax', 100.0, 0.0)])
def test_aligned_separated_embeddings_give_small_loss(kind, t, b):
  n = 3
  z = np.eye(6, dtype=np.float32)[:n]  # Orthonormal rows: perfectly aligned and separated.
  loss_fn = losses.get(kind)
  aligned, _ = _jax_value_and_grads(loss_fn, z, z, t, b)
  assert 0.0 <= aligned < 1e-6
  shuffled, _ = _jax_value_and_grads(loss_fn, z, np.roll(z, 1, axis=0), t, b)
  assert shuffled > 10.0  # Every positive pair mismatched: a large loss.


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
@pytest.mark.parametrize('n', [3, 8])
def test_permuting_both_sides_leaves_loss_unchanged(kind, n):
  zi, zt = _inputs(n, seed=6)
  perm = np.random.default_rng(n).permutation(n)
  while n > 1 and np.all(perm == np.arange(n)):
    perm = np.random.default_rng(n + 1).permutation(n)
  loss_fn = losses.get(kind)
  loss = lambda a, c: _jax_value_and_grads(loss_fn, a, c, 5.0, -2.0)[0]  # noqa: E731
  base = loss(zi, zt)
  np.testing.assert_allclose(loss(zi[perm], zt[perm]), base, rtol=1e-6)
  # Permuting only one side breaks the pairing and changes the loss.
  assert abs(loss(zi[perm], zt) - base) > 1e-3


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
def test_bfloat16_inputs_are_computed_in_float32(kind):
  zi, zt = _inputs(4, seed=7)
  loss_fn = losses.get(kind)
  out = jax.eval_shape(loss_fn, jnp.asarray(zi, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16),
                       jnp.float32(2.0), jnp.float32(-1.0))
  assert out.shape == () and out.dtype == jnp.float32


def test_get_rejects_unknown_loss():
  assert losses.get('sigmoid') is contrastive.sigmoid_loss
  assert losses.get('softmax') is contrastive.softmax_loss
  with pytest.raises(ValueError, match='hinge'):
    losses.get('hinge')


# ---------------------------------------------------------------------------------------------
# Duplicate groups and example weights, against loops written from the definitions.


def np_sigmoid_loss_masked(zi, zt, t, b, groups, weights):
  """Pairs i != j of one group are skipped; image i's row is scaled by weights[i]."""
  n, total = zi.shape[0], 0.0
  for i in range(n):
    for j in range(n):
      if i != j and groups[i] == groups[j]:
        continue
      y = 1.0 if i == j else -1.0
      total += weights[i] * _log_sigmoid(y * (t * float(np.dot(zi[i], zt[j])) + b))
  return -total / np.sum(weights)


def np_softmax_loss_masked(zi, zt, t, groups, weights):
  """Duplicates leave the softmax denominators; example i's two cross-entropies get weights[i]."""
  n, logits = zi.shape[0], t * (zi @ zt.T)
  total = 0.0
  for i in range(n):
    keep = [j for j in range(n) if j == i or groups[j] != groups[i]]
    row, col = logits[i, keep], logits[keep, i]
    total += weights[i] * ((np.log(np.sum(np.exp(row))) - logits[i, i]) +
                           (np.log(np.sum(np.exp(col))) - logits[i, i]))
  return 0.5 * total / np.sum(weights)


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
def test_duplicate_groups_and_weights_match_reference(kind):
  zi, zt = _inputs(10, seed=3)
  t, b = 3.0, -1.5
  groups = np.array([0, 1, 1, 2, 3, 3, 3, 4, 5, 6])
  weights = np.random.default_rng(0).uniform(0.2, 2.0, size=10)
  fn = losses.get(kind)
  got = float(fn(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.float32(t),
                 jnp.float32(b), jnp.asarray(groups), jnp.asarray(weights, jnp.float32)))
  if kind == 'sigmoid':
    want = np_sigmoid_loss_masked(zi, zt, t, b, groups, weights)
  else:
    want = np_softmax_loss_masked(zi, zt, t, groups, weights)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  unmasked = float(fn(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32),
                      jnp.float32(t), jnp.float32(b)))
  assert abs(got - unmasked) > 1e-3
  # Unit weights and all-distinct groups are the plain loss.
  plain = float(fn(jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.float32(t),
                   jnp.float32(b), jnp.arange(10), jnp.ones(10, jnp.float32)))
  np.testing.assert_allclose(plain, unmasked, rtol=1e-6)


def test_drop_noisy_pairs_leaves_out_the_least_agreeing_pairs():
  rng = np.random.default_rng(5)
  zi = _unit_rows(rng, 8, 6)
  zt = zi.copy()
  zt[[2, 5]] = _unit_rows(rng, 2, 6)  # Two mislabelled pairs: image and caption disagree.
  w = np.asarray(contrastive.drop_noisy_pairs(jnp.asarray(zi), jnp.asarray(zt), 0.25))
  np.testing.assert_array_equal(np.where(w == 0)[0], [2, 5])
  assert np.all(w[w != 0] == 1.0)
  base = jnp.full((8,), 2.0).at[0].set(0.5)  # Existing (e.g. click) weights are kept.
  w2 = np.asarray(contrastive.drop_noisy_pairs(jnp.asarray(zi), jnp.asarray(zt), 0.25, base))
  np.testing.assert_array_equal(w2, np.where(w == 0, 0.0, np.asarray(base)))
  assert np.all(np.asarray(contrastive.drop_noisy_pairs(zi, zt, 0.1)) == 1.0)  # 0.1 * 8 < 1
  # The robust loss is the loss of the kept pairs' rows, and smaller than the plain one.
  args = (jnp.asarray(zi), jnp.asarray(zt), jnp.float32(5.0), jnp.float32(-2.0))
  robust = float(contrastive.sigmoid_loss(*args, weights=jnp.asarray(w)))
  np.testing.assert_allclose(robust, np_sigmoid_loss_masked(zi, zt, 5.0, -2.0, np.arange(8), w),
                             rtol=1e-5)
  assert robust < float(contrastive.sigmoid_loss(*args))


# ---------------------------------------------------------------------------------------------
# Per-row hard negatives, against loops written from the definitions.


def np_loss_with_hard_negatives(kind, zi, zt, t, b, q2c, q2c_valid, c2q, c2q_valid):
  """Row i's own negatives: sigmoid adds -log sigmoid(-(t s + b)) per existing negative; InfoNCE
  puts t s into row i's softmax (q2c for image->text, c2q for text->image)."""
  n, logits = zi.shape[0], t * (zi @ zt.T)
  total = 0.0
  for i in range(n):
    if kind == 'sigmoid':
      for j in range(n):
        y = 1.0 if i == j else -1.0
        total -= _log_sigmoid(y * (logits[i, j] + b))
      for sims, valid in ((q2c, q2c_valid), (c2q, c2q_valid)):
        total -= sum(_log_sigmoid(-(t * s + b)) for s, v in zip(sims[i], valid[i]) if v)
    else:
      row = list(logits[i]) + [t * s for s, v in zip(q2c[i], q2c_valid[i]) if v]
      col = list(logits[:, i]) + [t * s for s, v in zip(c2q[i], c2q_valid[i]) if v]
      total += 0.5 * (np.log(np.sum(np.exp(row))) + np.log(np.sum(np.exp(col)))) - logits[i, i]
  return total / n


@pytest.mark.parametrize('kind', ['sigmoid', 'softmax'])
def test_hard_negatives_match_reference(kind):
  zi, zt = _inputs(6, seed=4)
  rng = np.random.default_rng(1)
  q2c, c2q = rng.uniform(-1, 1, (6, 3)), rng.uniform(-1, 1, (6, 3))
  q2c_valid, c2q_valid = rng.uniform(size=(6, 3)) < 0.6, rng.uniform(size=(6, 3)) < 0.6
  t, b = 4.0, -1.0
  hard = {'q2c_sim': jnp.asarray(q2c, jnp.float32), 'q2c_valid': jnp.asarray(q2c_valid),
          'c2q_sim': jnp.asarray(c2q, jnp.float32), 'c2q_valid': jnp.asarray(c2q_valid)}
  fn = losses.get(kind)
  args = (jnp.asarray(zi, jnp.float32), jnp.asarray(zt, jnp.float32), jnp.float32(t),
          jnp.float32(b))
  got = float(fn(*args, hard=hard))
  want = np_loss_with_hard_negatives(kind, zi, zt, t, b, q2c, q2c_valid, c2q, c2q_valid)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got > float(fn(*args)) + 1e-3  # Negatives only add to the loss.
  # No valid negative is no negative at all, and the absent entries get no gradient.
  none = {**hard, 'q2c_valid': jnp.zeros((6, 3), bool), 'c2q_valid': jnp.zeros((6, 3), bool)}
  np.testing.assert_allclose(float(fn(*args, hard=none)), float(fn(*args)), rtol=1e-6)
  valid = {k: v for k, v in hard.items() if k.endswith('valid')}
  grads = jax.grad(lambda sims: fn(*args, hard=sims | valid))(
      {k: v for k, v in hard.items() if k.endswith('sim')})
  for d in ('q2c', 'c2q'):
    g = np.asarray(grads[f'{d}_sim'])
    assert np.all(np.isfinite(g)) and np.all(g[~np.asarray(hard[f'{d}_valid'])] == 0)
    assert np.all(g[np.asarray(hard[f'{d}_valid'])] != 0)
