"""Optimizer and learning-rate schedule from `config.optimizer`."""

from __future__ import annotations

import functools
import re

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


def param_path(path) -> str:
  """'txt/encoder/block0/attn/query/kernel': what `frozen` and `lr_multipliers` match."""
  # Attribute keys are the '.value' of a LogicallyPartitioned box (the boxed abstract state).
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path
                  if not isinstance(k, jax.tree_util.GetAttrKey))


FROZEN = 'frozen'


def param_labels(params, frozen: str = '', multipliers=()):
  """Each parameter's optimizer group: 'frozen' (matches `frozen`), 'lr<i>' (first matching
  `multipliers` regex) or 'default'."""
  def label(path, _):
    name = param_path(path)
    if frozen and re.search(frozen, name):
      return FROZEN
    for i, (pattern, _) in enumerate(multipliers):
      if re.search(pattern, name):
        return f'lr{i}'
    return 'default'
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt_cfg, total_steps: int, frozen: str | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with clipping; `frozen` (default `opt_cfg.frozen`; the run adds its locked towers)
  parameters get no update and no optimizer state, `opt_cfg.lr_multipliers` scale the rate of
  matching subtrees (optax.multi_transform over per-parameter labels)."""
  schedule = make_schedule(opt_cfg, total_steps)
  frozen = opt_cfg.get('frozen', '') if frozen is None else frozen
  multipliers = tuple((str(p), float(m)) for p, m in opt_cfg.get('lr_multipliers', ()))

  def adamw(mult: float):
    lr = schedule if mult == 1.0 else (lambda step: mult * schedule(step))
    return optax.adamw(lr, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                       weight_decay=opt_cfg.weight_decay, mask=decay_mask)

  parts = []
  labels = functools.partial(param_labels, frozen=frozen, multipliers=multipliers)
  if frozen:
    # Frozen gradients are zeroed before clipping so they do not count in the global norm.
    parts.append(optax.masked(optax.set_to_zero(),
                              lambda p: jax.tree.map(lambda lab: lab == FROZEN, labels(p))))
  if opt_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip_norm))
  if frozen or multipliers:
    groups = {'default': adamw(1.0), FROZEN: optax.set_to_zero(),
              **{f'lr{i}': adamw(m) for i, (_, m) in enumerate(multipliers)}}
    parts.append(optax.multi_transform(groups, labels))
  else:
    parts.append(adamw(1.0))
  return optax.chain(*parts), schedule
