"""Image-text matching (ITM): hard negatives drawn from the contrastive similarities, and the
binary matching loss on positives and negatives (ALBEF, Li et al. 2021; BLIP).

For each image i a negative text j is drawn with probability softmax_j(t * <zimg_i, ztxt_j>) over
the whole global batch, leaving out j = i and every j of the same duplicate `group` as i (the
same image or caption twice in a batch is no negative); likewise a negative image for each text.
The draw is a Gumbel-max: argmax_j (t s_ij + g_ij) with g_ij ~ Gumbel(0, 1) drawn from
fold_in(key, i) for the global row i, so the sample of a row does not depend on how the batch is
split over devices: `make_sampler(mesh)` gives the same indices on 8 shards as on one
(tests/test_matching.py). On a sharded batch each device gathers the other tower's embeddings
and groups ([B, d], what the all_gather InfoNCE loss gathers anyway) and samples its own rows:
O(b * B) similarities per device, never [B, B].

The similarities carry no gradient (the sampler only picks pairs); the temperature is the
contrastive loss's.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from mmjax.losses import distributed

Sampler = Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


def negative_mask(rows: jax.Array, n: int, groups_rows: jax.Array | None,
                  groups_all: jax.Array | None) -> jax.Array:
  """[r, n]: True where column j may be row i's negative (not itself, not a duplicate)."""
  keep = rows[:, None] != jnp.arange(n)[None, :]
  if groups_rows is not None:
    keep &= groups_rows[:, None] != groups_all[None, :]
  return keep


def sample_rows(logits: jax.Array, keep: jax.Array, rows: jax.Array,
                key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index [r], valid [r]): a Gumbel-max draw ∝ softmax(logits) over each row's allowed
  columns; row `rows[i]`'s noise comes from fold_in(key, rows[i]). A row with no allowed column
  gets index 0 and valid False."""
  n = logits.shape[1]
  noise = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(key, r), (n,)))(rows)
  scores = jnp.where(keep, logits.astype(jnp.float32) + noise, -jnp.inf)
  return jnp.argmax(scores, axis=1).astype(jnp.int32), jnp.any(keep, axis=1)


def _both_directions(zimg_rows, ztxt_rows, zimg_all, ztxt_all, t, rows, g_rows, g_all, key):
  n = zimg_all.shape[0]
  keep = negative_mask(rows, n, g_rows, g_all)
  t = lax.stop_gradient(t).astype(jnp.float32)
  sim_i2t = lax.stop_gradient(zimg_rows.astype(jnp.float32) @ ztxt_all.astype(jnp.float32).T)
  sim_t2i = lax.stop_gradient(ztxt_rows.astype(jnp.float32) @ zimg_all.astype(jnp.float32).T)
  neg_text, valid_text = sample_rows(t * sim_i2t, keep, rows, jax.random.fold_in(key, 0))
  neg_image, valid_image = sample_rows(t * sim_t2i, keep, rows, jax.random.fold_in(key, 1))
  return neg_text, valid_text, neg_image, valid_image


def sample_negatives(zimg: jax.Array, ztxt: jax.Array, t: jax.Array, key: jax.Array,
                     groups: jax.Array | None = None):
  """(negative text of each image [B], its validity, negative image of each text [B], its
  validity) on the global batch (the single-device form)."""
  rows = jnp.arange(zimg.shape[0], dtype=jnp.int32)
  return _both_directions(zimg, ztxt, zimg, ztxt, t, rows, groups, groups, key)


def make_sampler(mesh: Mesh | None = None) -> Sampler:
  """`sample_negatives` spanning the mesh's batch shards (the dense form on one shard)."""
  if mesh is None or distributed.num_batch_shards(mesh) == 1:
    return sample_negatives
  axes = distributed.batch_axes(mesh)
  spec = P(axes)

  def local(zimg, ztxt, t, key, groups):
    rows = lax.axis_index(axes) * zimg.shape[0] + jnp.arange(zimg.shape[0], dtype=jnp.int32)
    gather = lambda x: lax.all_gather(x, axes, tiled=True)  # noqa: E731
    g_all = None if groups is None else gather(groups)
    return _both_directions(zimg, ztxt, gather(zimg), gather(ztxt), t, rows, groups, g_all, key)

  def sampler(zimg, ztxt, t, key, groups=None):
    extra = {} if groups is None else {'groups': groups}
    fn = jax.shard_map(lambda zi, zt, t, k, e: local(zi, zt, t, k, e.get('groups')), mesh=mesh,
                       in_specs=(spec, spec, P(), P(), {k: spec for k in extra}),
                       out_specs=(spec,) * 4)
    return fn(zimg, ztxt, t, key, extra)

  return sampler


def itm_pairs(n: int, neg_text: jax.Array, valid_text: jax.Array, neg_image: jax.Array,
              valid_image: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The 3n scored pairs: (text row, image row, label, weight) for the n positives (i, i), the
  n (negative text, image i) and the n (text i, negative image)."""
  i = jnp.arange(n, dtype=jnp.int32)
  text = jnp.concatenate([i, neg_text, i])
  image = jnp.concatenate([i, i, neg_image])
  labels = jnp.concatenate([jnp.ones(n), jnp.zeros(2 * n)]).astype(jnp.float32)
  weights = jnp.concatenate([jnp.ones(n), valid_text, valid_image]).astype(jnp.float32)
  return text, image, labels, weights


def itm_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean binary cross-entropy of the match logits; metrics itm/accuracy (the share of
  pairs on the right side of 0) and itm/positive_prob."""
  nll = jnp.where(labels > 0, -jax.nn.log_sigmoid(logits), -jax.nn.log_sigmoid(-logits))
  norm = jnp.maximum(jnp.sum(weights), 1.0)
  correct = ((logits > 0) == (labels > 0)).astype(jnp.float32)
  pos = labels > 0
  metrics = {'itm/accuracy': lax.stop_gradient(jnp.sum(correct * weights) / norm),
             'itm/positive_prob': lax.stop_gradient(
                 jnp.sum(jnp.where(pos, jax.nn.sigmoid(logits), 0.0)) / jnp.sum(pos))}
  return jnp.sum(nll * weights) / norm, metrics
