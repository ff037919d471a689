"""Sequence poolers: [batch, length, width] (+ a key mask) -> [batch, width]."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def first_token(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  del mask
  return x[:, 0]


def mean_pool(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over the valid positions (all positions without a mask)."""
  if mask is None:
    return jnp.mean(x, axis=1)
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1)


def last_token(x: jax.Array, mask: jax.Array) -> jax.Array:
  """The last valid position of each row (the EOS token), for left or right padding alike."""
  length = mask.shape[1]
  # Index of the last True: length-1 minus the position of the first True in the reversed mask.
  last = length - 1 - jnp.argmax(mask[:, ::-1].astype(jnp.int32), axis=1)
  return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


def no_pool(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Every token (the LLM embedder reads the ViT's patch tokens)."""
  del mask
  return x


POOLERS = {'none': no_pool, 'first': first_token, 'cls': first_token, 'mean': mean_pool,
           'gap': mean_pool, 'last': last_token}
