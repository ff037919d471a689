"""Objective terms beyond the contrastive loss: distillation and multi-task weighting.

Every term is a pure function of the step's embeddings dict (roles 'image', 'text', 'query'),
the logit parameters and the batch (whose `teacher_*` columns hold the teacher's embeddings,
precomputed into the data or computed by the live teacher before the step), so GradCache
differentiates them exactly like the contrastive loss.

- distillation (`distill_term`): KL between the teacher's and the student's in-batch similarity
  distributions over the run's pair of roles ((image, text); (query, text) for text-text pairs;
  (text, text) without the diagonal when the teacher only has a text tower), and/or cosine
  regression of every role the teacher has onto its embedding.
- multi-task (`make_objective`): the tasks of config.multitask.tasks ('contrastive', 'text_text',
  'distill'), combined by static weights or learned uncertainty weighting
  (`mmjax.losses.multitask`); every loss and its weight is a metric.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from mmjax.losses import distill, multitask

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
TEACHER = {'image': 'teacher_image', 'text': 'teacher_text', 'query': 'teacher_query'}


def kl_roles(embs: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[str, str]:
  """The pair of roles the similarity KL compares."""
  for a in ('image', 'query'):
    if a in embs and TEACHER[a] in batch:
      return a, 'text'
  return 'text', 'text'


def distill_term(embs: Mapping[str, jax.Array], batch: Mapping[str, jax.Array], *, kind: str,
                 temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, metrics) of the student's embeddings against the batch's teacher columns."""
  if TEACHER['text'] not in batch:
    raise ValueError('Distillation needs the teacher_text column (config.distill.source: '
                     "'data' reads it from the teacher_embed files, 'live' computes it).")
  metrics, total = {}, jnp.zeros((), jnp.float32)
  if kind in ('kl', 'both'):
    a, b = kl_roles(embs, batch)
    kl = distill.similarity_kl(embs[a], embs[b], batch[TEACHER[a]], batch[TEACHER[b]],
                               student_temperature=temperature,
                               teacher_temperature=temperature, exclude_self=a == b)
    metrics['distill/kl'] = kl
    total = total + kl
  if kind in ('regression', 'both'):
    roles = [r for r in ('image', 'text', 'query') if r in embs and TEACHER[r] in batch]
    for r in roles:
      if embs[r].shape[-1] != batch[TEACHER[r]].shape[-1]:
        raise ValueError(f"config.distill.kind={kind!r}: regression needs equal dimensions, the "
                         f"student's {r} embeddings are {embs[r].shape[-1]}-d and the teacher's "
                         f"{batch[TEACHER[r]].shape[-1]}-d (set config.model.embed_dim, or use "
                         "kind='kl').")
    reg = sum(distill.embedding_regression(embs[r], batch[TEACHER[r]]) for r in roles) / len(roles)
    metrics['distill/regression'] = reg
    total = total + reg
  return total, metrics


def tasks(config) -> dict[str, float]:
  """{task: weight} of the run: config.multitask.tasks, else contrastive (+ distill)."""
  if config.multitask.tasks:
    return {name: float(w) for name, w in config.multitask.tasks}
  out = {'contrastive': 1.0}
  if config.distill.weight:
    out['distill'] = float(config.distill.weight)
  return out


def initial_log_vars(weights: Mapping[str, float]) -> dict[str, float]:
  """Uncertainty weighting starts at the static weights: 0.5 exp(-s) = w, s = -log(2 w)."""
  return {k: -float(jnp.log(2.0 * w)) for k, w in weights.items()}


def make_objective(config, contrastive: Callable[[tuple[str, str]], Objective],
                   roles: tuple[str, str]) -> Objective | None:
  """The run's objective(embs, t, b, batch[, log_vars]) -> (loss, metrics), or None when the run
  has a single contrastive task (the step's default objective is then used as it is).

  `contrastive(roles)` builds the run's contrastive loss between two roles (the step's own).
  """
  weights = tasks(config)
  if set(weights) == {'contrastive'} and config.multitask.weighting == 'static' and weights[
      'contrastive'] == 1.0:
    return None
  terms = {}
  if 'contrastive' in weights:
    terms['contrastive'] = contrastive(roles)
  if 'text_text' in weights:
    terms['text_text'] = contrastive(('query', 'text'))
  if 'distill' in weights:
    kind, temperature = config.distill.kind, float(config.distill.temperature)
    terms['distill'] = lambda embs, t, b, batch: distill_term(embs, batch, kind=kind,
                                                              temperature=temperature)
  uncertainty = config.multitask.weighting == 'uncertainty'

  def objective(embs, t, b, batch, log_vars=None):
    losses, metrics = {}, {}
    for name, term in terms.items():
      losses[name], m = term(embs, t, b, batch)
      metrics.update({k: v for k, v in m.items() if k != 'loss'})
    if uncertainty:
      loss, m = multitask.uncertainty_weighting(losses, log_vars)
    else:
      loss, m = multitask.static_weights(losses, weights)
    return loss, {**metrics, **m}

  return objective
