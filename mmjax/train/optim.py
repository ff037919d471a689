"""Optimizer and learning-rate schedule from `config.optimizer`."""

from __future__ import annotations

import jax
import optax


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine decay (to end_lr_ratio * peak) or constant."""
  peak, warmup = opt_cfg.learning_rate, opt_cfg.warmup_steps
  if opt_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * opt_cfg.end_lr_ratio)
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])


def decay_mask(params):
  """Weight decay on matrices and embeddings only, not on biases, norms or the logit scale/bias.

  Decided by rank and name: attention q/k/v biases are 2-D ([heads, head_dim]) but are biases.
  """
  def decay(path, p):
    name = getattr(path[-1], 'key', getattr(path[-1], 'name', None)) if path else None
    return p.ndim >= 2 and name != 'bias'
  return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = make_schedule(opt_cfg, total_steps)
  parts = []
  if opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  parts.append(optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                           weight_decay=opt_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
