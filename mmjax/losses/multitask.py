"""Combining several losses in one step: static weights or learned uncertainty weighting.

A step computes a dict of scalar losses, e.g. {'itc': image-text contrastive, 'ttc':
text-text contrastive, 'distill': distillation}, and `combine` turns it into the loss to
differentiate plus metrics that log every loss and the weight it entered with
('loss/<name>', 'weight/<name>').

Uncertainty weighting (Kendall, Gal & Cipolla, 2018) learns one log-variance s_k per task:
  total = sum_k 0.5 * (exp(-s_k) * L_k + s_k),
so a task's weight 0.5 * exp(-s_k) falls as its loss stays high, and the + s_k term keeps the
weights from collapsing to 0. The s_k are ordinary trainable parameters (`UncertaintyWeights`
or `init_log_vars` for a plain dict).
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Losses = Mapping[str, jax.Array]


def static_weights(losses: Losses, weights: Mapping[str, float]) -> tuple[jax.Array, dict]:
  """sum_k w_k * L_k; every loss needs a weight (a missing one is an error, not a silent 1)."""
  missing = sorted(set(losses) - set(weights))
  if missing:
    raise ValueError(f'No weight for losses {missing}; weights given for {sorted(weights)}.')
  terms = {k: jnp.asarray(weights[k], jnp.float32) for k in losses}
  return _weighted(losses, terms, jnp.zeros((), jnp.float32))


def uncertainty_weighting(losses: Losses, log_vars: Mapping[str, jax.Array]
                          ) -> tuple[jax.Array, dict]:
  """sum_k 0.5 * (exp(-s_k) * L_k + s_k) with learned s_k = log sigma_k^2."""
  missing = sorted(set(losses) - set(log_vars))
  if missing:
    raise ValueError(f'No log-variance for losses {missing}; have {sorted(log_vars)}.')
  s = {k: jnp.asarray(log_vars[k], jnp.float32) for k in losses}
  weights = {k: 0.5 * jnp.exp(-s[k]) for k in losses}
  reg = sum(0.5 * s[k] for k in losses)
  return _weighted(losses, weights, reg)


def _weighted(losses: Losses, weights: Mapping[str, jax.Array], extra: jax.Array):
  total = extra + sum(weights[k] * losses[k].astype(jnp.float32) for k in losses)
  metrics = {'loss/total': total}
  for k in losses:
    metrics[f'loss/{k}'] = losses[k]
    metrics[f'weight/{k}'] = weights[k]
  return total, metrics


def combine(losses: Losses, kind: str = 'static', *, weights: Mapping[str, float] | None = None,
            log_vars: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
  """`static_weights` (kind 'static') or `uncertainty_weighting` (kind 'uncertainty')."""
  if kind == 'static':
    return static_weights(losses, weights if weights is not None else {k: 1.0 for k in losses})
  if kind == 'uncertainty':
    if log_vars is None:
      raise ValueError("combine(kind='uncertainty') needs log_vars (trainable parameters).")
    return uncertainty_weighting(losses, log_vars)
  raise ValueError(f"Unknown multi-task weighting {kind!r}; use 'static' or 'uncertainty'.")


def init_log_vars(names, value: float = 0.0) -> dict[str, jax.Array]:
  """Initial log-variances (s_k = 0: every task starts at weight 0.5)."""
  return {k: jnp.full((), value, jnp.float32) for k in names}


class UncertaintyWeights(nn.Module):
  """The learned log-variances as a Flax module: `params['log_var_<name>']`.

  `init_value`: one start value for all, or one per name. Created in `setup`, so a parent that
  touches `log_vars` in its own setup owns them from `init` on (TwoTower's 'multitask').
  """

  names: tuple[str, ...]
  init_value: float | tuple[float, ...] = 0.0

  def setup(self):
    init = self.init_value
    init = init if isinstance(init, (tuple, list)) else (init,) * len(self.names)
    self.log_vars = {k: self.param(f'log_var_{k}', nn.initializers.constant(v), (), jnp.float32)
                     for k, v in zip(self.names, init)}

  def __call__(self, losses: Losses) -> tuple[jax.Array, dict]:
    return uncertainty_weighting(losses, self.log_vars)
