"""The train state, created directly in its sharded layout."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import optax
from flax.training import train_state
from jax.sharding import Mesh

from mmjax.parallel import mesh as mesh_lib


TrainState = train_state.TrainState


def _params_fn(model: nn.Module):
  def init(rng):
    return model.init({'params': rng}, *model.init_inputs())['params']
  return init


def _init_fn(model: nn.Module, tx: optax.GradientTransformation):
  def init(rng):
    return TrainState.create(apply_fn=model.apply, params=_params_fn(model)(rng), tx=tx)
  return init


def _layout(init, mesh: Mesh, axis_rules, rng: jax.Array) -> tuple[Any, Any]:
  """(abstract tree, shardings) of `init(rng)` without allocating anything.

  Shapes and logical axis names come from `jax.eval_shape`; the rules map them to mesh axes.
  """
  with mesh_lib.activate(mesh, axis_rules):
    boxed = jax.eval_shape(init, rng)
    shardings = mesh_lib.logical_shardings(boxed, mesh, axis_rules)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.unbox(boxed), shardings)
  return abstract, shardings


def state_layout(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, axis_rules,
                 rng: jax.Array) -> tuple[TrainState, Any]:
  """(abstract train state, shardings): the training restore target."""
  return _layout(_init_fn(model, tx), mesh, axis_rules, rng)


def params_layout(model: nn.Module, mesh: Mesh, axis_rules, rng: jax.Array) -> tuple[Any, Any]:
  """(abstract params, shardings): the restore target of evaluation and export (no optimizer)."""
  return _layout(_params_fn(model), mesh, axis_rules, rng)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh,
                       axis_rules, rng: jax.Array) -> tuple[TrainState, Any]:
  """Initialises params and optimizer state already sharded (never whole on one device)."""
  _, shardings = state_layout(model, tx, mesh, axis_rules, rng)
  init = _init_fn(model, tx)
  with mesh_lib.activate(mesh, axis_rules):
    state = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)(rng)
  return state, shardings


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def abstract_key(mesh: Mesh) -> jax.ShapeDtypeStruct:
  """The shape, dtype and (replicated) sharding of the run's base PRNG key."""
  key = jax.random.key(0)
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=mesh_lib.replicated(mesh))
