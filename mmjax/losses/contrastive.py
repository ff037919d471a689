"""Contrastive losses as pure functions of L2-normalised embeddings and the logit scale/bias.

These are the single-device (or fully gathered) forms: they build the whole [n, n] logits
matrix. `mmjax.losses.distributed` computes the same values over a batch sharded across devices
without it; the unit tests check both, value and gradient, against a plain NumPy reference.

`groups` (optional, int [n]): pairs i != j with groups[i] == groups[j] are duplicates (the same
image or caption twice in a batch); they are left out of the loss instead of being pushed apart
as negatives.

`weights` (optional, float [n]): example i's own terms (its image's row; for InfoNCE also its
text's row) are scaled by weights[i], and the loss is normalised by sum(weights) instead of n.
Click logs use them for inverse-propensity weighting (mmjax.data.convert).

`hard` (optional): per-row hard negatives (DPR / VLM2Vec style), a dict with
  'q2c_sim' [n, K], 'q2c_valid' bool [n, K]: similarities of query (image) i to its K hard-negative
      candidates (texts), and which of them exist;
  'c2q_sim', 'c2q_valid': the same for candidate (text) i against its hard-negative queries.
Either pair may be absent. Each negative belongs to its own row only: for the sigmoid loss it adds
one negative term to row i (normalised like the in-batch terms); for InfoNCE it joins row i's
softmax denominator in that direction. Because they are row-local, the sharded implementations
handle them without any extra communication.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """Unit rows in f32 (the towers' outputs, and Matryoshka's truncated prefixes)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def duplicate_mask(groups_a: jax.Array | None, groups_b: jax.Array | None,
                   positives: jax.Array) -> jax.Array | None:
  """True where (i, j) takes part in the loss: a positive, or a pair from different groups."""
  if groups_a is None:
    return None
  return positives | (groups_a[:, None] != groups_b[None, :])



def hard_negative_logits(hard: dict | None, direction: str, t: jax.Array,
                         bias: jax.Array | float = 0.0) -> jax.Array | None:
  """t * sim + bias of one direction's hard negatives ('q2c' or 'c2q'), -inf where absent."""
  if not hard or f'{direction}_sim' not in hard:
    return None
  logits = t * hard[f'{direction}_sim'].astype(jnp.float32) + bias
  return jnp.where(hard[f'{direction}_valid'], logits, -jnp.inf)


def sigmoid_hard_nll(hard: dict | None, t: jax.Array, bias: jax.Array) -> jax.Array | None:
  """Per-row sum of the hard negatives' sigmoid NLL, softplus(t * sim + bias), both directions."""
  total = None
  for direction in ('q2c', 'c2q'):
    logits = hard_negative_logits(hard, direction, t, bias)
    if logits is not None:
      nll = jnp.sum(jnp.where(jnp.isfinite(logits), jax.nn.softplus(logits), 0.0), axis=1)
      total = nll if total is None else total + nll
  return total


def row_cross_entropy(logits: jax.Array, positives: jax.Array, keep: jax.Array | None,
                      extra: jax.Array | None) -> jax.Array:
  """Per-row -log softmax at the positive, over the row's logits (duplicates left out) and its
  own `extra` [n, K] hard-negative logits."""
  if keep is not None:
    logits = jnp.where(keep, logits, -jnp.inf)
  if extra is not None:
    logits = jnp.concatenate([logits, extra], axis=1)
    positives = jnp.pad(positives, ((0, 0), (0, extra.shape[1])))
  return -jnp.sum(jnp.where(positives, jax.nn.log_softmax(logits, axis=1), 0.0), axis=1)


def sigmoid_loss(zq: jax.Array, zc: jax.Array, temperature: jax.Array, bias: jax.Array,
                 groups: jax.Array | None = None, weights: jax.Array | None = None,
                 hard: dict | None = None) -> jax.Array:
  """SigLIP: every (query, candidate) pair (image, text for the dual encoder) is an independent
  binary classification.

  loss = -1/n * sum_ij log sigmoid(y_ij * (t * <zq_i, zc_j> + bias)), y_ij = +1 iff i == j.
  Normalised by the number of queries n, as in the SigLIP paper.
  """
  zq, zc = zq.astype(jnp.float32), zc.astype(jnp.float32)
  n = zq.shape[0]
  logits = temperature * (zq @ zc.T) + bias
  eye = jnp.eye(n, dtype=bool)
  nll = -jax.nn.log_sigmoid(jnp.where(eye, logits, -logits))
  keep = duplicate_mask(groups, groups, eye)
  if keep is not None:
    nll = jnp.where(keep, nll, 0.0)
  nll = jnp.sum(nll, axis=1)
  extra = sigmoid_hard_nll(hard, temperature, bias)
  if extra is not None:
    nll = nll + extra
  if weights is None:
    return jnp.sum(nll) / n
  return jnp.sum(nll * weights) / jnp.sum(weights)


def softmax_loss(zq: jax.Array, zc: jax.Array, temperature: jax.Array,
                 bias: jax.Array | None = None, groups: jax.Array | None = None,
                 weights: jax.Array | None = None, hard: dict | None = None) -> jax.Array:
  """Symmetric InfoNCE (CLIP): mean of the query->candidate and candidate->query cross-entropies
  (image->text and text->image for the dual encoder)."""
  del bias
  zq, zc = zq.astype(jnp.float32), zc.astype(jnp.float32)
  logits = temperature * (zq @ zc.T)
  eye = jnp.eye(zq.shape[0], dtype=bool)
  keep = duplicate_mask(groups, groups, eye)
  q2c = row_cross_entropy(logits, eye, keep, hard_negative_logits(hard, 'q2c', temperature))
  c2q = row_cross_entropy(logits.T, eye, None if keep is None else keep.T,
                          hard_negative_logits(hard, 'c2q', temperature))
  if weights is None:
    return 0.5 * (jnp.mean(q2c) + jnp.mean(c2q))
  return 0.5 * jnp.sum(weights * (q2c + c2q)) / jnp.sum(weights)


def drop_noisy_pairs(zq: jax.Array, zc: jax.Array, fraction: float,
                     weights: jax.Array | None = None) -> jax.Array:
  """Robust-loss weights: the `fraction` of the batch whose positive pair agrees least is dropped.

  Ranked by the positive similarity <zq_i, zc_i>. For the sigmoid loss that is exactly the
  pairs with the highest positive-pair loss (-log sigmoid(t s_ii + bias) falls as s_ii rises); for
  InfoNCE it is the same ranking without the normaliser. Returns float [n] weights (the given
  `weights`, or ones, with the dropped rows zeroed). The selection carries no gradient.
  """
  n = zq.shape[0]
  weights = jnp.ones((n,), jnp.float32) if weights is None else weights.astype(jnp.float32)
  k = int(fraction * n)
  if k == 0:
    return weights
  sim = jax.lax.stop_gradient(jnp.sum(zq.astype(jnp.float32) * zc.astype(jnp.float32), -1))
  dropped = jnp.zeros((n,), bool).at[jnp.argsort(sim)[:k]].set(True)
  return jnp.where(dropped, 0.0, weights)


LOSSES = {'sigmoid': sigmoid_loss, 'softmax': softmax_loss}


def get(name: str):
  if name not in LOSSES:
    raise ValueError(f'Unknown loss {name!r}; available: {", ".join(LOSSES)}.')
  return LOSSES[name]
