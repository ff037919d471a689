"""The train step: one pure function, jitted once with shardings and a donated state.

The loss is computed across devices without the global logits matrix (`mmjax.losses.distributed`)
and, with `micro_batches > 1`, with exact GradCache: a batch larger than activation memory gives
the same loss and gradients as if it fitted.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from mmjax.data import pipeline
from mmjax.losses import contrastive, distributed
from mmjax.train import health, objectives
from mmjax.train.state import TrainState

Batch = dict[str, jax.Array]
Embeddings = dict[str, jax.Array]


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

  def __call__(self, embs: Embeddings, t: jax.Array, b: jax.Array, batch: Batch):
    zq, zc = embs[self.query], embs[self.candidate]
    loss = self.loss_fn(zq, zc, t, b, batch.get('group'), self.weights(zq, zc, batch),
                        self.hard_negatives(embs, batch) or None)
    return loss, {}


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static choices of the step (hashable: part of the jit cache key).

  `objective(embeddings, temperature, bias, batch) -> (loss, metrics)` is a pure function of the
  model's embeddings (a dict keyed by role, from the model's `embed_batch`), its logit params and
  the batch. GradCache differentiates it w.r.t. the whole embeddings dict, so every objective is
  exact with micro-batches.
  """

  objective: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  micro_batches: int = 1  # GradCache micro-batches per device (1: plain backprop).
  num_shards: int = 1  # Devices the batch is split over (data x fsdp).


def _embed(apply_fn, params, batch: Batch, rng: jax.Array) -> Embeddings:
  inputs = {k: v for k, v in batch.items() if k != 'rows'}
  return apply_fn({'params': params}, inputs, train=True, rows=batch['rows'],
                  rngs={'dropout': rng}, method='embed_batch')


def _logit_params(apply_fn, params):
  return apply_fn({'params': params}, method='logit_params')


def _to_micro(x: jax.Array, num_shards: int, micro_batches: int) -> jax.Array:
  """[B, ...] -> [M, B / M, ...]: micro-batch m holds rows m*u..(m+1)*u-1 of *every* device's
  b = B / D rows (u = b / M), so each micro-batch stays split over all devices, no data moves."""
  b = x.shape[0] // num_shards
  u = b // micro_batches
  x = x.reshape((num_shards, micro_batches, u) + x.shape[1:]).swapaxes(0, 1)
  x = x.reshape((micro_batches, num_shards * u) + x.shape[3:])
  return lax.with_sharding_constraint(x, P(None, distributed.BATCH_AXES))


def _from_micro(x: jax.Array, num_shards: int) -> jax.Array:
  """The inverse of `_to_micro`: [M, B / M, ...] -> [B, ...] in the original row order."""
  m, rest = x.shape[0], x.shape[2:]
  x = x.reshape((m, num_shards, x.shape[1] // num_shards) + rest).swapaxes(0, 1)
  return lax.with_sharding_constraint(x.reshape((-1,) + rest), P(distributed.BATCH_AXES))


def _with_rows(batch: Batch) -> Batch:
  """The batch plus its examples' global rows (they seed per-example dropout)."""
  n = next(iter(batch.values())).shape[0]
  return {**batch, 'rows': jnp.arange(n, dtype=jnp.int32)}


def gradcache_loss_and_grads(apply_fn, params, batch: Batch, rng: jax.Array, opts: StepOptions):
  """Exact GradCache (Gao et al. 2021) on a batch split into `opts.micro_batches` per device.

  1. Embed every micro-batch without keeping activations.
  2. The objective on the whole batch (across devices), and its gradient w.r.t. every embedding
     and the temperature/bias.
  3. Re-embed each micro-batch with the same dropout masks (rows seed them; see layers.Dropout)
     and pull its slice of the embedding gradient back to the parameters (VJP), accumulating.
  The temperature/bias gradient comes from step 2 only, so it is counted once.
  """
  n, k = opts.num_shards, opts.micro_batches
  batch = _with_rows(batch)
  micro = jax.tree.map(lambda x: _to_micro(x, n, k), batch)

  _, embs = lax.scan(lambda c, mb: (c, _embed(apply_fn, params, mb, rng)), None, micro)
  embs = jax.tree.map(lambda x: _from_micro(x, n), embs)
  (t, b), logit_vjp = jax.vjp(lambda p: _logit_params(apply_fn, p), params)
  (loss, metrics), (dembs, dt, db) = jax.value_and_grad(
      opts.objective, argnums=(0, 1, 2), has_aux=True)(embs, t, b, batch)

  def accumulate(grads, xs):
    mb, g = xs
    _, vjp = jax.vjp(lambda p: _embed(apply_fn, p, mb, rng), params)
    return jax.tree.map(jnp.add, grads, vjp(g)[0]), None

  grads, _ = lax.scan(accumulate, logit_vjp((dt, db))[0],
                      (micro, jax.tree.map(lambda x: _to_micro(x, n, k), dembs)))
  return loss, grads, t, b, metrics


def loss_and_grads(apply_fn, params, batch: Batch, rng: jax.Array, opts: StepOptions):
  """(loss, grads, temperature, bias, metrics) of a global batch; `rng` seeds dropout."""
  if opts.micro_batches > 1:
    return gradcache_loss_and_grads(apply_fn, params, batch, rng, opts)

  def compute_loss(p):
    embs = _embed(apply_fn, p, _with_rows(batch), rng)
    t, b = _logit_params(apply_fn, p)
    loss, metrics = opts.objective(embs, t, b, batch)
    return loss, (t, b, metrics)

  (loss, (t, b, metrics)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
  return loss, grads, t, b, metrics


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               opts: StepOptions) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on a global batch (the columns of `pipeline.train_columns`).

  `rng` is the run's base key; the step key is fold_in(rng, step), so dropout is a pure function
  of (seed, step, example row) and a resumed run draws exactly the same masks.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  opts = health.at_step(opts, state.step)  # Embedding statistics on the loop's log steps only.
  loss, grads, t, b, aux = loss_and_grads(state.apply_fn, state.params, batch, step_rng, opts)
  new_state = state.apply_gradients(grads=grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'temperature': t, 'bias': b,
             **aux}
  return new_state, metrics


def contrastive_roles(config) -> tuple[str, str]:
  """(query role, candidate role) of the run's contrastive loss: text-text pairs train
  ('query', 'text'), image-text pairs ('image', 'text')."""
  return ('query', 'text') if pipeline.is_text_pairs(config) else ('image', 'text')


def make_objective(config, mesh):
  """The run's objective: the contrastive loss between its two roles (with hard negatives when
  the batch has them, and the robust-loss drop); with config.distill / config.multitask, that
  and the other terms combined (`objectives.make_objective`). The LLM embedder's roles are
  'query' and 'candidate', its loss averaged over its Matryoshka dimensions."""
  loss_fn = distributed.make_loss(config.loss.kind, config.loss.impl, mesh)

  def contrastive(query: str, candidate: str) -> Contrastive:
    return Contrastive(loss_fn, query, candidate, config.loss.drop_noisy_fraction)

  if config.model.kind == 'llm_embedder':
    from mmjax.models import llm_embedder  # pylint: disable=import-outside-toplevel
    return llm_embedder.make_objective(config, contrastive('query', 'candidate'))
  return objectives.make_objective(config, contrastive)


def make_options(config, mesh) -> StepOptions:
  """The step's static options from the run config and the mesh (the objective's metrics gain
  the train/health/... statistics of the embeddings, `health.instrument`)."""
  objective = health.instrument(make_objective(config, mesh), config)
  return StepOptions(objective=objective, micro_batches=config.micro_batches,
                     num_shards=distributed.num_batch_shards(mesh))


def jit_train_step(state_shardings, batch_sharding, replicated, opts: StepOptions):
  """`train_step` jitted once: state in and out with its shardings, donated."""
  return jax.jit(functools.partial(train_step, opts=opts),
                 in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
