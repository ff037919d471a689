"""The captioning (CoCa) loss: token-level cross-entropy of teacher-forced next-token logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def caption_loss(logits: jax.Array, tokens: jax.Array, mask: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean NLL over the batch's valid tokens (every caption token, EOS included, weighs the
  same, as in CoCa); metrics caption/accuracy (greedy next-token accuracy)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
  w = mask.astype(jnp.float32)
  norm = jnp.maximum(jnp.sum(w), 1.0)
  acc = jnp.sum((jnp.argmax(logits, -1) == tokens) * w) / norm
  return jnp.sum(nll * w) / norm, {'caption/accuracy': jax.lax.stop_gradient(acc)}
