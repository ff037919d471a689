"""Combining several losses in one step: static weights, learned uncertainty weighting, or
per-step balancing by gradient norms (GradNorm-style) or loss ratios.

A step computes a dict of scalar losses, e.g. {'itc': image-text contrastive, 'ttc':
text-text contrastive, 'distill': distillation}, and `combine` turns it into the loss to
differentiate plus metrics that log every loss and the weight it entered with
('loss/<name>', 'weight/<name>').

Uncertainty weighting (Kendall, Gal & Cipolla, 2018) learns one log-variance s_k per task:
  total = sum_k 0.5 * (exp(-s_k) * L_k + s_k),
so a task's weight 0.5 * exp(-s_k) falls as its loss stays high, and the + s_k term keeps the
weights from collapsing to 0. The s_k are ordinary trainable parameters (`UncertaintyWeights`
or `init_log_vars` for a plain dict).

Balancing (`balanced_weights`) sets the weights afresh every step from quantities of the whole
global batch, treated as constants (no gradient flows through them), with the static weights
w0_k as the intended proportions:
- 'gradnorm': G_k = ||dL_k / dz||, the norm of term k's gradient w.r.t. the towers' output
  embeddings z (the representation every term shares); w_k = w0_k * Gbar / G_k with Gbar =
  sum_j w0_j G_j / sum_j w0_j, so every term's weighted gradient norm w_k G_k is w0_k * Gbar: in
  the proportions w0 and of the same total as with the static weights. This is GradNorm (Chen et
  al., 2018) with its asymmetry alpha = 0, solved in closed form each step instead of by a
  second optimiser, and measured at the shared representation (as MGDA-UB does, Sener & Koltun
  2018) rather than at the last shared layer's weights, which would cost one backward pass
  through the towers per term.
- 'loss_ratio': w_k = w0_k * Lbar / L_k with Lbar = sum_j w0_j L_j / sum_j w0_j: every weighted
  term w_k L_k is w0_k * Lbar, so a term whose loss is large in absolute units (a KL next to an
  InfoNCE) no longer dominates; the total keeps the static value.
"""

from __future__ import annotations

from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
  raise ValueError(f"Unknown multi-task weighting {kind!r}; use 'static' or 'uncertainty' "
                   f"('gradnorm' / 'loss_ratio': `balanced`).")


BALANCING = ('gradnorm', 'loss_ratio')


def balanced_weights(kind: str, values: Mapping[str, jax.Array], base: Mapping[str, float]
                     ) -> dict[str, jax.Array]:
  """w_k = w0_k * vbar / v_k (vbar = sum_j w0_j v_j / sum_j w0_j), held constant under
  differentiation; `values` are the terms' gradient norms ('gradnorm') or losses
  ('loss_ratio')."""
  if kind not in BALANCING:
    raise ValueError(f'Unknown balancing {kind!r}; use one of {BALANCING}.')
  v = {k: lax.stop_gradient(jnp.asarray(values[k], jnp.float32)) for k in values}
  w0 = {k: float(base[k]) for k in values}
  mean = sum(w0[k] * v[k] for k in v) / sum(w0.values())
  return {k: w0[k] * mean / jnp.maximum(v[k], 1e-12) for k in v}


def balanced(kind: str, losses: Losses, base: Mapping[str, float],
             grad_norms: Mapping[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
  """sum_k w_k L_k with `balanced_weights` (from `grad_norms` for 'gradnorm')."""
  missing = sorted(set(losses) - set(base))
  if missing:
    raise ValueError(f'No weight for losses {missing}; weights given for {sorted(base)}.')
  if kind == 'gradnorm' and grad_norms is None:
    raise ValueError("balancing 'gradnorm' needs each term's gradient norm (grad_norms).")
  values = grad_norms if kind == 'gradnorm' else losses
  return _weighted(losses, balanced_weights(kind, {k: values[k] for k in losses}, base),
                   jnp.zeros((), jnp.float32))


def tree_norm(tree) -> jax.Array:
  """The global L2 norm of a pytree of arrays (float32)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def grad_shares(grad_norms: Mapping[str, jax.Array], weights: Mapping[str, jax.Array]
                ) -> dict[str, jax.Array]:
  """Each term's share of the summed weighted gradient norms, w_k G_k / sum_j w_j G_j: which
  objective dominates the update (cancellation between terms is not counted)."""
  parts = {k: weights[k] * grad_norms[k] for k in grad_norms}
  total = jnp.maximum(sum(parts.values()), 1e-12)
  return {k: parts[k] / total for k in parts}


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
