"""Contrastive losses as pure functions of L2-normalised embeddings and the logit scale/bias.

These are the single-device (or fully gathered) forms; the unit tests check them, value and
gradient, against a plain NumPy reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sigmoid_loss(zimg: jax.Array, ztxt: jax.Array, temperature: jax.Array,
                 bias: jax.Array) -> jax.Array:
  """SigLIP: every (image, text) pair is an independent binary classification.

  loss = -1/n * sum_ij log sigmoid(y_ij * (t * <zimg_i, ztxt_j> + b)), y_ij = +1 iff i == j.
  Normalised by the number of images n, as in the SigLIP paper.
  """
  zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  n = zimg.shape[0]
  logits = temperature * (zimg @ ztxt.T) + bias
  labels = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.sum(jax.nn.log_sigmoid(labels * logits)) / n


def softmax_loss(zimg: jax.Array, ztxt: jax.Array, temperature: jax.Array,
                 bias: jax.Array | None = None) -> jax.Array:
  """Symmetric InfoNCE (CLIP): mean of image->text and text->image cross-entropies."""
  del bias
  zimg, ztxt = zimg.astype(jnp.float32), ztxt.astype(jnp.float32)
  logits = temperature * (zimg @ ztxt.T)
  i2t = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
  t2i = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
  return 0.5 * (i2t + t2i)


LOSSES = {'sigmoid': sigmoid_loss, 'softmax': softmax_loss}


def get(name: str):
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; available: {", ".join(LOSSES)}.')
  return LOSSES[name]
