"""Distillation (mmjax.losses.distill) and multi-task weighting (mmjax.losses.multitask) against
plain NumPy references, with their gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.losses import distill, multitask


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


RNG = np.random.default_rng(0)
N = 6
S_IMG, S_TXT = unit(RNG.normal(size=(N, 8))), unit(RNG.normal(size=(N, 8)))
T_IMG, T_TXT = unit(RNG.normal(size=(N, 12))), unit(RNG.normal(size=(N, 12)))


def np_kl_rows(t_logits, s_logits):
  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  t, s = log_softmax(t_logits), log_softmax(s_logits)
  return np.mean(np.sum(np.exp(t) * (t - s), -1))


@pytest.mark.parametrize('symmetric', [True, False])
def test_similarity_kl_matches_numpy(symmetric):
  got = distill.similarity_kl(S_IMG, S_TXT, T_IMG, T_TXT, student_temperature=10.0,
                              teacher_temperature=50.0, symmetric=symmetric)
  s, t = 10.0 * S_IMG @ S_TXT.T, 50.0 * T_IMG @ T_TXT.T
  want = np_kl_rows(t, s)
  if symmetric:
    want = 0.5 * (want + np_kl_rows(t.T, s.T))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_similarity_kl_is_zero_for_identical_distributions_and_has_no_teacher_gradient():
  kl = distill.similarity_kl(S_IMG, S_TXT, S_IMG, S_TXT, student_temperature=5.0,
                             teacher_temperature=5.0)
  np.testing.assert_allclose(kl, 0.0, atol=1e-6)
  g_teacher = jax.grad(lambda t: distill.similarity_kl(
      S_IMG, S_TXT, t, T_TXT, student_temperature=5.0, teacher_temperature=5.0))(T_IMG)
  assert float(jnp.abs(g_teacher).max()) == 0.0
  g_student = jax.grad(lambda s: distill.similarity_kl(
      s, S_TXT, T_IMG, T_TXT, student_temperature=5.0, teacher_temperature=5.0))(S_IMG)
  assert float(jnp.abs(g_student).max()) > 0.0


def test_embedding_regression():
  a, b = RNG.normal(size=(N, 4)), RNG.normal(size=(N, 4))
  cos = np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(distill.embedding_regression(a, b), np.mean(1 - cos), rtol=1e-5)
  np.testing.assert_allclose(distill.embedding_regression(a, b, 'mse'),
                             np.mean(np.sum((a - b) ** 2, -1)), rtol=1e-5)
  with pytest.raises(ValueError, match='equal shapes'):
    distill.embedding_regression(S_IMG, T_IMG)
  with pytest.raises(ValueError, match="Unknown regression kind 'l1'"):
    distill.embedding_regression(a, b, 'l1')


def test_distillation_loss_weights_and_metrics():
  cfg = distill.DistillConfig(kl_weight=0.5, regression_weight=2.0, teacher_temperature=20.0)
  student, teacher = (S_IMG, S_TXT), (unit(S_IMG + 0.3), unit(S_TXT - 0.2))
  total, m = distill.distillation_loss(student, teacher, cfg, temperature=10.0)
  kl = distill.similarity_kl(*student, *teacher, student_temperature=10.0,
                             teacher_temperature=20.0)
  reg = 0.5 * (distill.embedding_regression(S_IMG, teacher[0])
               + distill.embedding_regression(S_TXT, teacher[1]))
  np.testing.assert_allclose(m['distill/kl'], kl, rtol=1e-6)
  np.testing.assert_allclose(m['distill/regression'], reg, rtol=1e-6)
  np.testing.assert_allclose(total, 0.5 * kl + 2.0 * reg, rtol=1e-6)
  only_kl, m = distill.distillation_loss(student, (T_IMG, T_TXT), distill.DistillConfig(),
                                         temperature=10.0)
  assert 'distill/regression' not in m  # Weight 0: not computed (dimensions differ here).
  with pytest.raises(ValueError, match='student temperature'):
    distill.distillation_loss(student, teacher, distill.DistillConfig())


LOSSES = {'itc': jnp.float32(2.0), 'ttc': jnp.float32(0.5), 'distill': jnp.float32(0.1)}


def test_static_weights():
  total, m = multitask.combine(LOSSES, 'static', weights={'itc': 1.0, 'ttc': 0.5, 'distill': 3})
  np.testing.assert_allclose(total, 2.0 + 0.25 + 0.3, rtol=1e-6)
  assert m['weight/ttc'] == 0.5 and m['loss/itc'] == 2.0
  total, _ = multitask.combine(LOSSES)  # No weights: all 1.
  np.testing.assert_allclose(total, 2.6, rtol=1e-6)
  with pytest.raises(ValueError, match=r"No weight for losses \['distill'\]"):
    multitask.static_weights(LOSSES, {'itc': 1.0, 'ttc': 1.0})


def test_uncertainty_weighting_value_gradient_and_optimum():
  s = {'itc': 0.3, 'ttc': -0.2, 'distill': 1.0}
  total, m = multitask.combine(LOSSES, 'uncertainty', log_vars=s)
  want = sum(0.5 * (np.exp(-s[k]) * float(LOSSES[k]) + s[k]) for k in LOSSES)
  np.testing.assert_allclose(total, want, rtol=1e-6)
  np.testing.assert_allclose(m['weight/itc'], 0.5 * np.exp(-0.3), rtol=1e-6)
  # d/ds_k = 0.5 * (1 - exp(-s_k) L_k): zero at s_k = log L_k, where the weight is 1 / (2 L_k).
  g = jax.grad(lambda lv: multitask.uncertainty_weighting(LOSSES, lv)[0])(
      multitask.init_log_vars(LOSSES))
  for k in LOSSES:
    np.testing.assert_allclose(g[k], 0.5 * (1 - float(LOSSES[k])), rtol=1e-6)
  opt = {k: jnp.log(v) for k, v in LOSSES.items()}
  g = jax.grad(lambda lv: multitask.uncertainty_weighting(LOSSES, lv)[0])(opt)
  assert max(abs(float(v)) for v in g.values()) < 1e-6


def test_uncertainty_module_and_errors():
  mod = multitask.UncertaintyWeights(('itc', 'ttc', 'distill'))
  params = mod.init(jax.random.key(0), LOSSES)
  assert set(params['params']) == {'log_var_itc', 'log_var_ttc', 'log_var_distill'}
  total, m = mod.apply(params, LOSSES)
  np.testing.assert_allclose(total, 0.5 * 2.6, rtol=1e-6)
  assert set(m) == {'loss/total', *(f'loss/{k}' for k in LOSSES), *(f'weight/{k}' for k in LOSSES)}
  with pytest.raises(ValueError, match='needs log_vars'):
    multitask.combine(LOSSES, 'uncertainty')
  with pytest.raises(ValueError, match="Unknown multi-task weighting 'max'"):
    multitask.combine(LOSSES, 'max')
