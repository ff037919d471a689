"""Objectives: pure functions (embeddings, temperature, bias, batch) -> (loss, metrics).

The train step differentiates an objective w.r.t. the model's whole embeddings dict (roles
'image', 'text', 'query', 'neg_*'; the LLM embedder's 'query', 'candidate', 'neg_candidate'), so
every combination here is exact under GradCache without code of its own.

- `Contrastive`: the contrastive loss between a query role and a candidate role, with hard
  negatives and the robust-loss drop.
- `Distill`: KL between the teacher's and the student's in-batch similarity distributions over
  the run's pair of roles ((image, text); (query, text) for text-text pairs; (text, text) without
  the diagonal when the teacher only has a text tower), and/or cosine regression of every role
  the teacher has onto its embedding. The batch's `teacher_*` columns hold the teacher's
  embeddings (precomputed into the data, or computed by the live teacher before the step).
- `MultiTask`: several terms combined by static weights, learned uncertainty weighting or
  per-step gradient-norm / loss-ratio balancing, optionally logging each term's gradient norm.
- `Matryoshka`: an objective averaged over nested prefix dimensions (MRL).

Which objective a run trains is decided by its model kind (`mmjax.kinds`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from jax import lax

from mmjax.losses import contrastive, distill, multitask
from mmjax.losses.contrastive import l2_normalize
from mmjax.types import Batch, Embeddings

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


@dataclasses.dataclass(frozen=True)
class Distill:
  """The distillation term as an objective (embs, t, bias, batch) -> (loss, metrics)."""

  kind: str = 'kl'
  temperature: float = 20.0

  def __call__(self, embs, t, bias, batch):
    del t, bias
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
  balance: str = ''  # '' | 'gradnorm' | 'loss_ratio' (multitask.balanced_weights).
  log_grad_norms: bool = False  # Metrics 'grad_norm/<task>' and 'grad_share/<task>'.

  def grad_norms(self, embs, t, bias, batch) -> dict[str, jax.Array]:
    """||dL_k / dz|| of every term k w.r.t. the towers' output embeddings z (every role but the
    uncertainty log-variances), over the whole global batch: exact under GradCache, whose
    objective sees the whole batch too."""
    z = {k: lax.stop_gradient(v) for k, v in embs.items() if k != 'task_log_vars'}
    rest = {k: v for k, v in embs.items() if k not in z}
    out = {}
    for name, term in self.terms:
      g = jax.grad(lambda e, term=term: term({**rest, **e}, lax.stop_gradient(t),
                                             lax.stop_gradient(bias), batch)[0])(z)
      out[name] = multitask.tree_norm(g)
    return out

  def __call__(self, embs, t, bias, batch):
    losses, metrics = {}, {}
    for name, term in self.terms:
      losses[name], m = term(embs, t, bias, batch)
      metrics.update(m)
    norms = (self.grad_norms(embs, t, bias, batch)
             if self.log_grad_norms or self.balance == 'gradnorm' else None)
    if self.uncertainty:
      s = jnp.mean(embs['task_log_vars'].astype(jnp.float32), axis=0)
      log_vars = {name: s[i] for i, (name, _) in enumerate(self.weights)}
      loss, m = multitask.uncertainty_weighting(losses, log_vars)
    elif self.balance:
      loss, m = multitask.balanced(self.balance, losses, dict(self.weights), norms)
    else:
      loss, m = multitask.static_weights(losses, dict(self.weights))
    if norms is not None:
      weights = {name: m[f'weight/{name}'] for name in losses}
      m.update({f'grad_norm/{k}': v for k, v in norms.items()})
      m.update({f'grad_share/{k}': v for k, v in multitask.grad_shares(norms, weights).items()})
    return loss, {**metrics, **m}


@dataclasses.dataclass(frozen=True)
class Contrastive:
  """The contrastive objective between a query role and a candidate role of the embeddings.

  Hard negatives come as the role `neg_<candidate>` [B, K, d] (negatives for each query row) and
  `neg_<query>` (negatives for each candidate row), each with the batch column
  `neg_<role>_valid` [B, K]; see `contrastive` for how each loss uses them.
  """

  loss_fn: Callable[..., jax.Array]
  query: str = 'image'
  candidate: str = 'text'
  drop_noisy_fraction: float = 0.0  # Robust loss: share of each batch left out.

  def weights(self, zq, zc, batch: Batch):
    """The loss's per-example weights: the batch's `weight` column, robust-loss drops applied."""
    if not self.drop_noisy_fraction:
      return batch.get('weight')
    return contrastive.drop_noisy_pairs(zq, zc, self.drop_noisy_fraction, batch.get('weight'))

  def hard_negatives(self, embs: Embeddings, batch: Batch) -> dict[str, jax.Array]:
    hard = {}
    for direction, own, neg in (('q2c', self.query, self.candidate),
                                ('c2q', self.candidate, self.query)):
      if f'neg_{neg}' in embs:
        z = embs[own].astype(jnp.float32)
        hard[f'{direction}_sim'] = jnp.einsum('bd,bkd->bk', z, embs[f'neg_{neg}'].astype(z.dtype))
        hard[f'{direction}_valid'] = batch[f'neg_{neg}_valid'].astype(bool)
    return hard

  def __call__(self, embs: Embeddings, temperature: jax.Array, bias: jax.Array, batch: Batch):
    zq, zc = embs[self.query], embs[self.candidate]
    loss = self.loss_fn(zq, zc, temperature, bias, batch.get('group'), self.weights(zq, zc, batch),
                        self.hard_negatives(embs, batch) or None)
    return loss, {}


def truncate(embs: Mapping[str, jax.Array], dim: int) -> dict[str, jax.Array]:
  """Matryoshka: the first `dim` coordinates of every role's embeddings, re-normalised."""
  return {k: l2_normalize(v[..., :dim]) for k, v in embs.items()}


@dataclasses.dataclass(frozen=True)
class Matryoshka:
  """The mean of `objective` over the nested dimensions `dims` (MRL, Kusupati et al. 2022):
  every prefix is trained jointly. Metrics gain 'loss/dim<d>' per dimension."""

  objective: Callable
  dims: tuple[int, ...]

  def __call__(self, embs, t, bias, batch):
    losses, metrics = [], {}
    for d in self.dims:
      loss, m = self.objective(truncate(embs, d), t, bias, batch)
      losses.append(loss)
      metrics[f'loss/dim{d}'] = loss
    return sum(losses) / len(losses), {**m, **metrics}  # `m`: the full dimension's metrics.


def matryoshka_objective(objective: Callable, dims: tuple[int, ...]) -> Callable:
  """`objective` averaged over `dims` (the objective itself when there is one dimension)."""
  return Matryoshka(objective, tuple(dims)) if len(dims) > 1 else objective
