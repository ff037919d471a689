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

from mmjax.losses import contrastive, distributed
from mmjax.train.state import TrainState

Batch = dict[str, jax.Array]
PAIR_FIELDS = ('image', 'tokens', 'mask')


@dataclasses.dataclass(frozen=True)
class StepOptions:
  """The static choices of the step (hashable: part of the jit cache key)."""

  loss_fn: Callable[..., jax.Array]
  micro_batches: int = 1  # GradCache micro-batches per device (1: plain backprop).
  num_shards: int = 1  # Devices the batch is split over (data x fsdp).
  drop_noisy_fraction: float = 0.0  # Robust loss: share of each batch left out (see below).

  def weights(self, zimg, ztxt, batch: Batch):
    """The loss's per-example weights: the batch's `weight` column, robust-loss drops applied."""
    if not self.drop_noisy_fraction:
      return batch.get('weight')
    return contrastive.drop_noisy_pairs(zimg, ztxt, self.drop_noisy_fraction, batch.get('weight'))


def _embed(apply_fn, params, micro: Batch, rng: jax.Array):
  return apply_fn({'params': params}, *(micro[k] for k in PAIR_FIELDS), train=True,
                  rows=micro['rows'], rngs={'dropout': rng}, method='embed_pairs')


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


def gradcache_loss_and_grads(apply_fn, params, batch: Batch, rng: jax.Array, opts: StepOptions):
  """Exact GradCache (Gao et al. 2021) on a batch split into `opts.micro_batches` per device.

  1. Embed every micro-batch without keeping activations.
  2. The loss of the whole batch (across devices), and its gradient w.r.t. the embeddings and
     the temperature/bias.
  3. Re-embed each micro-batch with the same dropout masks (rows seed them; see layers.Dropout)
     and pull its slice of the embedding gradient back to the parameters (VJP), accumulating.
  The temperature/bias gradient comes from step 2 only, so it is counted once.
  """
  n, k = opts.num_shards, opts.micro_batches
  batch = {**batch, 'rows': jnp.arange(batch['image'].shape[0], dtype=jnp.int32)}
  micro = {f: _to_micro(batch[f], n, k) for f in (*PAIR_FIELDS, 'rows')}

  _, (zimg, ztxt) = lax.scan(lambda c, mb: (c, _embed(apply_fn, params, mb, rng)), None, micro)
  zimg, ztxt = _from_micro(zimg, n), _from_micro(ztxt, n)
  (t, b), logit_vjp = jax.vjp(lambda p: apply_fn({'params': p}, method='logit_params'), params)
  loss, (dzimg, dztxt, dt, db) = jax.value_and_grad(opts.loss_fn, argnums=(0, 1, 2, 3))(
      zimg, ztxt, t, b, batch.get('group'), opts.weights(zimg, ztxt, batch))

  def accumulate(grads, xs):
    mb, gi, gt = xs
    _, vjp = jax.vjp(lambda p: _embed(apply_fn, p, mb, rng), params)
    return jax.tree.map(jnp.add, grads, vjp((gi, gt))[0]), None

  grads, _ = lax.scan(accumulate, logit_vjp((dt, db))[0],
                      (micro, _to_micro(dzimg, n, k), _to_micro(dztxt, n, k)))
  return loss, grads, t, b


def loss_and_grads(apply_fn, params, batch: Batch, rng: jax.Array, opts: StepOptions):
  """(loss, grads, temperature, bias) of a global batch; `rng` seeds dropout."""
  if opts.micro_batches > 1:
    return gradcache_loss_and_grads(apply_fn, params, batch, rng, opts)

  def compute_loss(p):
    zimg, ztxt, t, b = apply_fn({'params': p}, *(batch[k] for k in PAIR_FIELDS), train=True,
                                rngs={'dropout': rng})
    loss = opts.loss_fn(zimg, ztxt, t, b, batch.get('group'), opts.weights(zimg, ztxt, batch))
    return loss, (t, b)

  (loss, (t, b)), grads = jax.value_and_grad(compute_loss, has_aux=True)(params)
  return loss, grads, t, b


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *,
               opts: StepOptions) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on a global batch {'image', 'tokens', 'mask'[, 'group', 'weight']}.

  `rng` is the run's base key; the step key is fold_in(rng, step), so dropout is a pure function
  of (seed, step, example row) and a resumed run draws exactly the same masks.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  loss, grads, t, b = loss_and_grads(state.apply_fn, state.params, batch, step_rng, opts)
  new_state = state.apply_gradients(grads=grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'temperature': t, 'bias': b}
  return new_state, metrics


def make_options(config, mesh) -> StepOptions:
  """The step's static options from the run config and the mesh."""
  return StepOptions(
      loss_fn=distributed.make_loss(config.loss.kind, config.loss.impl, mesh),
      micro_batches=config.micro_batches,
      num_shards=distributed.num_batch_shards(mesh),
      drop_noisy_fraction=config.loss.drop_noisy_fraction)


def jit_train_step(state_shardings, batch_sharding, replicated, opts: StepOptions):
  """`train_step` jitted once: state in and out with its shardings, donated."""
  return jax.jit(functools.partial(train_step, opts=opts),
                 in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
