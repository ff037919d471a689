"""Distillation losses: a student dual encoder learns from a teacher's embeddings.

Pure functions of L2-normalised embeddings (the teacher's precomputed into the batch, or from a
frozen teacher model run in the step under `jax.lax.stop_gradient`). Two signals, combined with
configurable weights by `distillation_loss`:

- similarity KL: the teacher's in-batch similarity distributions (each image over all texts, and
  each text over all images) are targets for the student's: KL(teacher || student), as in
  CLIP-KD / TinyCLIP. The towers' dimensions may differ: only the [n, n] similarities are compared.
- embedding regression: the student's embeddings regress onto the teacher's ('cosine': 1 - cos,
  'mse': squared error); the dimensions must match (project the student first if they do not).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


def _kl_rows(teacher_logits: jax.Array, student_logits: jax.Array) -> jax.Array:
  """Mean over rows of KL(softmax(teacher_row) || softmax(student_row))."""
  t = jax.nn.log_softmax(teacher_logits, axis=-1)
  s = jax.nn.log_softmax(student_logits, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def similarity_kl(student_a: jax.Array, student_b: jax.Array, teacher_a: jax.Array,
                  teacher_b: jax.Array, *, student_temperature: jax.Array | float,
                  teacher_temperature: jax.Array | float, symmetric: bool = True,
                  exclude_self: bool = False) -> jax.Array:
  """KL between teacher and student similarity distributions over the batch.

  Rows: each a_i over all b_j (image->text); with `symmetric`, also each b_j over all a_i, and
  the two are averaged. Temperatures multiply the cosine similarities (as the model's exp(t')).
  The teacher side carries no gradient. `exclude_self` leaves the diagonal out of every row
  (a == b: text-text relations, where each row's own entry would dominate).
  """
  f32 = jnp.float32
  s = student_temperature * (student_a.astype(f32) @ student_b.astype(f32).T)
  t = jax.lax.stop_gradient(teacher_temperature * (teacher_a.astype(f32) @ teacher_b.astype(f32).T))
  if exclude_self:  # A large finite logit, not -inf: exp() is 0 and 0 * (t - s) stays 0.
    eye = jnp.eye(s.shape[0], s.shape[1], dtype=bool)
    s, t = jnp.where(eye, -1e9, s), jnp.where(eye, -1e9, t)
  kl = _kl_rows(t, s)
  return 0.5 * (kl + _kl_rows(t.T, s.T)) if symmetric else kl


def embedding_regression(student: jax.Array, teacher: jax.Array, kind: str = 'cosine') -> jax.Array:
  """'cosine': mean(1 - cos(student_i, teacher_i)); 'mse': mean over rows of |s_i - t_i|^2."""
  if student.shape != teacher.shape:
    raise ValueError(f'Embedding regression needs equal shapes, got student {student.shape} and '
                     f'teacher {teacher.shape}; project the student to the teacher dimension.')
  s, t = student.astype(jnp.float32), jax.lax.stop_gradient(teacher.astype(jnp.float32))
  if kind == 'cosine':
    cos = jnp.sum(s * t, -1) * jax.lax.rsqrt(jnp.sum(s * s, -1) * jnp.sum(t * t, -1) + 1e-12)
    return jnp.mean(1.0 - cos)
  if kind == 'mse':
    return jnp.mean(jnp.sum((s - t) ** 2, axis=-1))
  raise ValueError(f"Unknown regression kind {kind!r}; use 'cosine' or 'mse'.")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Weights of the two signals (0 turns one off) and the teacher's temperature.

  `student_temperature` None uses the temperature the student model learns (passed to
  `distillation_loss`); a number fixes it.
  """

  kl_weight: float = 1.0
  regression_weight: float = 0.0
  regression: str = 'cosine'
  teacher_temperature: float = 100.0
  student_temperature: float | None = None
  symmetric: bool = True


def distillation_loss(student: tuple[jax.Array, jax.Array], teacher: tuple[jax.Array, jax.Array],
                      cfg: DistillConfig, temperature: jax.Array | float | None = None
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(weighted loss, metrics) from student (zimg, ztxt) and teacher (zimg, ztxt) embeddings.

  Metrics: 'distill/kl', 'distill/regression' (each unweighted) and 'distill/loss'.
  """
  (s_img, s_txt), (t_img, t_txt) = student, teacher
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  if cfg.kl_weight:
    st = cfg.student_temperature if cfg.student_temperature is not None else temperature
    if st is None:
      raise ValueError('distillation_loss: pass the student temperature or set '
                       'DistillConfig.student_temperature.')
    kl = similarity_kl(s_img, s_txt, t_img, t_txt, student_temperature=st,
                       teacher_temperature=cfg.teacher_temperature, symmetric=cfg.symmetric)
    metrics['distill/kl'] = kl
    total = total + cfg.kl_weight * kl
  if cfg.regression_weight:
    reg = 0.5 * (embedding_regression(s_img, t_img, cfg.regression)
                 + embedding_regression(s_txt, t_txt, cfg.regression))
    metrics['distill/regression'] = reg
    total = total + cfg.regression_weight * reg
  metrics['distill/loss'] = total
  return total, metrics
