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

from mmjax import kinds
from mmjax.kinds.base import DataContract
from mmjax.losses import distributed
from mmjax.losses.objectives import Contrastive  # noqa: F401  (re-exported: the step's objective)
from mmjax.train import health
from mmjax.train.state import TrainState
from mmjax.types import BATCH_AXES, Batch, Embeddings


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
  return lax.with_sharding_constraint(x, P(None, BATCH_AXES))


def _from_micro(x: jax.Array, num_shards: int) -> jax.Array:
  """The inverse of `_to_micro`: [M, B / M, ...] -> [B, ...] in the original row order."""
  m, rest = x.shape[0], x.shape[2:]
  x = x.reshape((m, num_shards, x.shape[1] // num_shards) + rest).swapaxes(0, 1)
  return lax.with_sharding_constraint(x.reshape((-1,) + rest), P(BATCH_AXES))


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
  (temperature, bias), logit_vjp = jax.vjp(lambda p: _logit_params(apply_fn, p), params)
  (loss, metrics), (dembs, dtemperature, dbias) = jax.value_and_grad(
      opts.objective, argnums=(0, 1, 2), has_aux=True)(embs, temperature, bias, batch)

  def accumulate(grads, xs):
    mb, g = xs
    _, vjp = jax.vjp(lambda p: _embed(apply_fn, p, mb, rng), params)
    return jax.tree.map(jnp.add, grads, vjp(g)[0]), None

  grads, _ = lax.scan(accumulate, logit_vjp((dtemperature, dbias))[0],
                      (micro, jax.tree.map(lambda x: _to_micro(x, n, k), dembs)))
  return loss, grads, temperature, bias, metrics


def loss_and_grads(apply_fn, params, batch: Batch, rng: jax.Array, opts: StepOptions):
  """(loss, grads, temperature, bias, metrics) of a global batch; `rng` seeds dropout."""
  if opts.micro_batches > 1:
    return gradcache_loss_and_grads(apply_fn, params, batch, rng, opts)

  def compute_loss(p):
    embs = _embed(apply_fn, p, _with_rows(batch), rng)
    temperature, bias = _logit_params(apply_fn, p)
    loss, metrics = opts.objective(embs, temperature, bias, batch)
    return loss, (temperature, bias, metrics)

  (loss, (temperature, bias, metrics)), grads = jax.value_and_grad(compute_loss,
                                                                   has_aux=True)(params)
  return loss, grads, temperature, bias, metrics


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               opts: StepOptions) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on a global batch (the columns of `pipeline.train_columns`).

  `rng` is the run's base key; the step key is fold_in(rng, step), so dropout is a pure function
  of (seed, step, example row) and a resumed run draws exactly the same masks.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  opts = health.at_step(opts, state.step)  # Embedding statistics on the loop's log steps only.
  loss, grads, temperature, bias, aux = loss_and_grads(state.apply_fn, state.params, batch,
                                                       step_rng, opts)
  new_state = state.apply_gradients(grads=grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'temperature': temperature,
             'bias': bias, **aux}
  return new_state, metrics


def contrastive_roles(config, contract: DataContract | None = None) -> tuple[str, str]:
  """(query role, candidate role) of the run's contrastive loss: text-text pairs train
  ('query', 'text'), image-text pairs ('image', 'text'), the LLM embedder ('query',
  'candidate')."""
  return (contract or kinds.contract(config)).roles


def make_objective(config, mesh, contract: DataContract | None = None):
  """The run's objective, as its model kind builds it (`mmjax.kinds`): the contrastive loss
  between the contract's two roles, spanning the mesh (with hard negatives when the batch has
  them, and the robust-loss drop); distillation / multi-task terms; Matryoshka averaging."""
  loss_fn = distributed.make_loss(config.loss.kind, config.loss.impl, mesh)
  return kinds.get(config).objective(config, loss_fn, contract or kinds.contract(config))


def make_options(config, mesh, contract: DataContract | None = None) -> StepOptions:
  """The step's static options from the run config, the mesh and the data contract (the
  objective's metrics gain the train/health/... statistics of the embeddings,
  `health.instrument`)."""
  objective = health.instrument(make_objective(config, mesh, contract), config)
  return StepOptions(objective=objective, micro_batches=config.micro_batches,
                     num_shards=distributed.num_batch_shards(mesh))


def jit_train_step(state_shardings, batch_sharding, replicated, opts: StepOptions):
  """`train_step` jitted once: state in and out with its shardings, donated."""
  return jax.jit(functools.partial(train_step, opts=opts),
                 in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
