"""Objective terms computed by heads on the towers' token outputs: ITM and captioning.

Their parameters are not the embeddings', so these terms take a `heads` argument beside the
embeddings: the train step's `Heads` (mmjax.train.step), which applies the model's
`match_logits` / `caption_logits` with the params being differentiated and gives the step's
sampling key. The towers' token outputs ride in the embeddings dict ('image_tokens',
'text_tokens'), so GradCache caches them like the pooled embeddings, differentiates this
objective w.r.t. them and the head parameters on the whole global batch at once, and pulls the
token gradients back through each micro-batch's towers: exact, however the batch is split
(docs/scaling.md, "GradCache with token heads").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from mmjax.losses import captioning, matching


@dataclasses.dataclass(frozen=True)
class Matching:
  """ITM on the positives and on negatives sampled from the in-batch similarities."""

  sampler: matching.Sampler = matching.sample_negatives
  query: str = 'image'
  candidate: str = 'text'

  def __call__(self, embs, t, batch, heads):
    n = embs[self.query].shape[0]
    sampled = self.sampler(embs[self.query], embs[self.candidate], t, heads.key,
                           batch.get('group'))
    text, image, labels, weights = matching.itm_pairs(n, *sampled)
    logits = heads.match(jnp.take(embs['text_tokens'], text, axis=0),
                         jnp.take(batch['mask'], text, axis=0),
                         jnp.take(embs['image_tokens'], image, axis=0))
    return matching.itm_loss(logits, labels, weights)


@dataclasses.dataclass(frozen=True)
class Captioning:
  """CoCa's captioning loss of the batch's captions given the image tokens."""

  def __call__(self, embs, t, batch, heads):
    del t
    logits = heads.caption(batch['tokens'], embs['image_tokens'])
    return captioning.caption_loss(logits, batch['tokens'], batch['mask'])


@dataclasses.dataclass(frozen=True)
class WithHeads:
  """`base` (the contrastive / multi-task objective) + sum of weight x term over `terms`.
  Metrics: base's, each term's, 'loss/base' and 'loss/<term>'."""

  base: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  terms: tuple[tuple[str, float, Any], ...]
  uses_heads: bool = True  # The step passes `heads=` (mmjax.train.step.loss_and_grads).

  def __call__(self, embs, t, bias, batch, heads=None):
    if heads is None:
      raise ValueError('The ITM / captioning objective needs the step\'s heads (heads=...); call '
                       'it through mmjax.train.step.loss_and_grads.')
    loss, metrics = self.base(embs, t, bias, batch)
    metrics = {**metrics, 'loss/base': loss}
    for name, weight, term in self.terms:
      value, m = term(embs, t, batch, heads)
      metrics.update(m)
      metrics[f'loss/{name}'] = value
      loss = loss + weight * value
    return loss, metrics
