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

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Distill:
  """The distillation term as an objective (embs, t, b, batch) -> (loss, metrics)."""

  kind: str = 'kl'
  temperature: float = 20.0

  def __call__(self, embs, t, b, batch):
    del t, b
    return distill_term(embs, batch, kind=self.kind, temperature=self.temperature)


@dataclasses.dataclass(frozen=True)
class MultiTask:
  """Several objective terms combined by static weights or learned uncertainty weighting.

  With 'uncertainty' the log-variances come from the embeddings dict ('task_log_vars' [B, T],
  every row the same: TwoTower's 'multitask' params, see `TwoTower.embed_batch`); their row
  mean is used, so their gradient is exact under GradCache too. Metrics: every term's own
  metrics, 'loss/<task>', 'weight/<task>' and 'loss/total'.
  """

  terms: tuple[tuple[str, Objective], ...]
  weights: tuple[tuple[str, float], ...]
  uncertainty: bool = False

  def __call__(self, embs, t, b, batch):
    losses, metrics = {}, {}
    for name, term in self.terms:
      losses[name], m = term(embs, t, b, batch)
      metrics.update(m)
    if self.uncertainty:
      s = jnp.mean(embs['task_log_vars'].astype(jnp.float32), axis=0)
      log_vars = {name: s[i] for i, (name, _) in enumerate(self.weights)}
      loss, m = multitask.uncertainty_weighting(losses, log_vars)
    else:
      loss, m = multitask.static_weights(losses, dict(self.weights))
    return loss, {**metrics, **m}


def make_objective(config, contrastive: Callable[[str, str], Objective]) -> Objective:
  """The run's objective: the contrastive loss alone (`contrastive(query, candidate)`, the
  step's), or `MultiTask` over config.multitask.tasks / contrastive + distill.weight x distill.
  """
  from mmjax.train import step  # pylint: disable=import-outside-toplevel  # step imports us

  weights = tasks(config)
  roles = step.contrastive_roles(config)
  if weights == {'contrastive': 1.0} and config.multitask.weighting == 'static':
    return contrastive(*roles)
  build = {'contrastive': lambda: contrastive(*roles),
           'text_text': lambda: contrastive('query', 'text'),
           'distill': lambda: Distill(config.distill.kind, float(config.distill.temperature))}
  return MultiTask(tuple((name, build[name]()) for name in weights), tuple(weights.items()),
                   config.multitask.weighting == 'uncertainty')
