"""The train step: one pure function, jitted once with shardings and a donated state."""

from __future__ import annotations

from typing import Any

import jax
import optax

from mmjax import losses
from mmjax.train.state import TrainState

Batch = dict[str, jax.Array]


def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on a global batch {'image', 'tokens', 'mask'}.

  `rng` is the run's base key; the step key is fold_in(rng, step), so dropout is a pure function
  of (seed, step) and a resumed run draws exactly the same masks.
  """
  step_rng = jax.random.fold_in(rng, state.step)
  loss_fn = losses.get(state.loss_kind)

  def compute_loss(params):
    zimg, ztxt, t, b = state.apply_fn({'params': params}, batch['image'], batch['tokens'],
                                      batch['mask'], train=True, rngs={'dropout': step_rng})
    return loss_fn(zimg, ztxt, t, b), (t, b)

  (loss, (t, b)), grads = jax.value_and_grad(compute_loss, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads)
  metrics = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'temperature': t, 'bias': b}
  return new_state, metrics


def jit_train_step(state_shardings, batch_sharding, replicated):
  """`train_step` jitted once: state in and out with its shardings, donated."""
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
