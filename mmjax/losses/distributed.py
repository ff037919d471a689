"""Contrastive losses over a batch sharded across devices, without the global logits matrix.

Each device holds b = B / D rows of both towers' embeddings (D = devices on the batch axes):
queries `zq` and their candidates `zc` (the dual encoder's images and texts).

- `ring` (sigmoid): candidate blocks travel around a ring of devices with `ppermute`; at each of
  the D - 1 hops a device adds the loss of its queries against the visiting block. The send of the
  next block is issued before the current block is used, so XLA can overlap the transfer with
  the [b, b] matmul. The backward pass (a custom VJP) runs the ring again: each visiting block
  carries its gradient accumulator with it, and a last hop brings every accumulator home. Per
  device the loss holds O(b^2 + b*d) memory, never O(B*b).
- `all_gather` (both losses): every device gathers the other tower ([B, d]) and computes the loss
  of its own rows ("local loss", open_clip's `local_loss=True`); autodiff turns the gather into
  a reduce-scatter, so gradients equal the full-batch ones. O(b*B) logits per device, which
  InfoNCE needs for its row/column normalisers anyway.
- `dense`: the single-device form on the global arrays; XLA decides the layout (the reference).

All three return the same value as `contrastive.sigmoid_loss` / `softmax_loss` on the whole batch,
and the same gradients for the embeddings, the temperature and the bias (tests/test_distributed).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from mmjax.losses import contrastive

BATCH_AXES = ('data', 'fsdp')
IMPLS = ('auto', 'dense', 'all_gather', 'ring')

LossFn = Callable[..., jax.Array]


def _vary(x: jax.Array, axis) -> jax.Array:
  """A device-invariant value (temperature, bias) typed as per-device, for use with shard data."""
  return lax.pcast(x, axis, to='varying')


def _sigmoid_block(zq, t, bias, zc, groups_q, groups_c, diagonal: bool, weights=None):
  """Summed sigmoid NLL of local queries vs one candidate block (positives on the diagonal iff
  local); `weights` [b] scale each query's row."""
  logits = t * (zq @ zc.T) + bias
  if diagonal:
    pos = jnp.eye(zq.shape[0], dtype=bool)
    nll = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
  else:
    pos = jnp.zeros(logits.shape, bool)
    nll = jax.nn.softplus(logits)  # -log sigmoid(-x)
  keep = contrastive.duplicate_mask(groups_q, groups_c, pos)
  if keep is not None:
    nll = jnp.where(keep, nll, 0.0)
  return jnp.sum(nll if weights is None else nll * weights[:, None])


def _sigmoid_block_grads(zq, t, bias, zc, groups_q, groups_c, diagonal: bool, g,
                         weights=None):
  """Gradients of g * _sigmoid_block w.r.t. (zq, zc, t, bias), written out so that only the
  [b, b] logits and their gradient are live (autodiff of the block keeps ~3x more)."""
  sim = zq @ zc.T
  logits = t * sim + bias
  # d/dx -log sigmoid(x) = sigmoid(x) - 1 (positives); d/dx softplus(x) = sigmoid(x) (negatives).
  dlogits = jax.nn.sigmoid(logits)
  pos = None
  if diagonal:
    pos = jnp.eye(zq.shape[0], dtype=bool)
    dlogits = dlogits - pos
  keep = contrastive.duplicate_mask(groups_q, groups_c,
                                    pos if pos is not None else jnp.zeros(sim.shape, bool))
  if keep is not None:
    dlogits = jnp.where(keep, dlogits, 0.0)
  dlogits = g * (dlogits if weights is None else dlogits * weights[:, None])
  return (t * (dlogits @ zc), t * (dlogits.T @ zq), jnp.sum(dlogits * sim),
          jnp.sum(dlogits))


def _ring_sigmoid_sum(axis, n_dev: int):
  """Per-device sum of the sigmoid NLL of its queries vs all candidates, blocks on a ring."""
  perm = [(j, (j - 1) % n_dev) for j in range(n_dev)]  # device i receives from i + 1

  def pass_on(tree):
    return jax.tree.map(lambda x: lax.ppermute(x, axis, perm), tree)

  @jax.custom_vjp
  def ring(zq, zc, t, bias, groups, weights):
    return _fwd(zq, zc, t, bias, groups, weights)[0]

  def _fwd(zq, zc, t, bias, groups, weights):
    def block_loss(block, diagonal):
      return _sigmoid_block(zq, t, bias, block[0], groups, block[1], diagonal, weights)

    local = (zc, groups)
    visiting = pass_on(local)
    total = block_loss(local, diagonal=True)

    def hop(_, carry):
      block, total = carry
      nxt = pass_on(block)  # in flight while this block is used
      return nxt, total + block_loss(block, diagonal=False)

    if n_dev > 2:
      visiting, total = lax.fori_loop(0, n_dev - 2, hop, (visiting, total))
    if n_dev > 1:
      total = total + block_loss(visiting, diagonal=False)
    return total, (zq, zc, t, bias, groups, weights)

  def _bwd(res, g):
    zq, zc, t, bias, groups, weights = res

    def block_grads(block, diagonal):
      zc_block, gc = block
      return _sigmoid_block_grads(zq, t, bias, zc_block, groups, gc, diagonal, g, weights)

    # Hop 0: the local block (it stays; its accumulator starts the ring).
    dzq, dzc_local, dt, dbias = block_grads((zc, groups), diagonal=True)
    if n_dev == 1:
      return dzq, dzc_local, dt, dbias, None, None
    # Each visiting block travels with its gradient accumulator; after D - 1 hops the last
    # visitor came from device i - 1, and one more hop sends every accumulator back home.
    visiting, acc = pass_on(((zc, groups), dzc_local))

    def hop(_, carry):
      block, acc, dzq, dt, dbias = carry
      nxt_block = pass_on(block)
      gq, gzc, gt_, gbias = block_grads(block, diagonal=False)
      return nxt_block, pass_on(acc + gzc), dzq + gq, dt + gt_, dbias + gbias

    if n_dev > 2:
      visiting, acc, dzq, dt, dbias = lax.fori_loop(0, n_dev - 2, hop,
                                                    (visiting, acc, dzq, dt, dbias))
    gq, gzc, gt_, gbias = block_grads(visiting, diagonal=False)
    dzc = pass_on(acc + gzc)
    return dzq + gq, dzc, dt + gt_, dbias + gbias, None, None

  ring.defvjp(_fwd, _bwd)
  return ring


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch is split over (those of size > 1 are what the ring spans)."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def resolve_impl(kind: str, impl: str, mesh: Mesh | None) -> str:
  """'auto' -> 'dense' on one batch shard, else 'ring' (sigmoid) or 'all_gather' (softmax)."""
  if impl not in IMPLS:
    raise ValueError(f'Unknown loss implementation {impl!r}; available: {", ".join(IMPLS)}.')
  if impl == 'ring' and kind != 'sigmoid':
    raise ValueError(f"loss.impl='ring' is for the sigmoid loss; loss.kind={kind!r} needs "
                     "'all_gather' (InfoNCE normalises over whole rows and columns).")
  if impl != 'auto':
    return impl
  if mesh is None or num_batch_shards(mesh) == 1:
    return 'dense'
  return 'ring' if kind == 'sigmoid' else 'all_gather'


def num_batch_shards(mesh: Mesh) -> int:
  n = 1
  for a in batch_axes(mesh):
    n *= mesh.shape[a]
  return n


def _shard_loss(kind: str, impl: str, axes, n_dev: int, zq, zc, t, bias, groups, weights, hard):
  """One device's share of the loss (inside `shard_map`), psum'ed to the global value: its query
  rows against the candidates on the ring (`ring`) or against all of them gathered
  (`all_gather`), plus its rows' hard negatives, which are row-local."""
  zq, zc = zq.astype(jnp.float32), zc.astype(jnp.float32)
  t, bias = _vary(t, axes), _vary(bias, axes)
  n = zq.shape[0] * n_dev
  # The normaliser: the number of examples, or their total weight.
  norm = n if weights is None else lax.psum(jnp.sum(weights), axes)
  row_w = (lambda x: x) if weights is None else (lambda x: x * weights)
  if kind == 'sigmoid':
    # Hard negatives are row-local: their terms need no communication.
    extra = contrastive.sigmoid_hard_nll(hard, t, bias)
    total = 0.0 if extra is None else jnp.sum(row_w(extra))
  if impl == 'ring':
    total = total + _ring_sigmoid_sum(axes, n_dev)(zq, zc, t, bias, groups, weights)
    return lax.psum(total, axes) / norm
  # all_gather: this device's rows against the whole other tower.
  all_c = lax.all_gather(zc, axes, tiled=True)
  all_groups = None if groups is None else lax.all_gather(groups, axes, tiled=True)
  rows = lax.axis_index(axes) * zq.shape[0] + jnp.arange(zq.shape[0])
  pos = rows[:, None] == jnp.arange(n)[None, :]
  keep = contrastive.duplicate_mask(groups, all_groups, pos)
  if kind == 'sigmoid':
    logits = t * (zq @ all_c.T) + bias
    nll = -jax.nn.log_sigmoid(jnp.where(pos, logits, -logits))
    nll = jnp.sum(nll if keep is None else jnp.where(keep, nll, 0.0), axis=1)
    return lax.psum(total + jnp.sum(row_w(nll)), axes) / norm
  all_q = lax.all_gather(zq, axes, tiled=True)
  # Rows of each tower against all of the other; the positive is at `rows`.
  q2c = contrastive.row_cross_entropy(t * (zq @ all_c.T), pos, keep,
                                      contrastive.hard_negative_logits(hard, 'q2c', t))
  c2q = contrastive.row_cross_entropy(t * (zc @ all_q.T), pos, keep,
                                      contrastive.hard_negative_logits(hard, 'c2q', t))
  return lax.psum(jnp.sum(row_w(q2c + c2q)), axes) / (2 * norm)


def make_loss(kind: str, impl: str = 'auto', mesh: Mesh | None = None) -> LossFn:
  """loss(zq, zc, t, bias=None, groups=None, weights=None, hard=None) on global [B, d] arrays
  sharded over the batch axes: row i of the queries `zq` (the dual encoder's images) is paired
  with row i of the candidates `zc` (its texts); `groups`, `weights`: [B]; `hard`: per-row hard
  negatives [B, K] (see `contrastive`)."""
  impl = resolve_impl(kind, impl, mesh)
  dense = contrastive.get(kind)
  if impl == 'dense':
    return dense
  axes = batch_axes(mesh)
  n_dev = num_batch_shards(mesh)
  spec = P(axes)

  def loss(zq, zc, t, bias=None, groups=None, weights=None, hard=None):
    bias = jnp.zeros((), jnp.float32) if bias is None else bias
    extra = {k: v for k, v in (('groups', groups), ('weights', weights)) if v is not None}
    if hard:
      extra['hard'] = dict(hard)

    def fn(zq_local, zc_local, t, bias, extra):
      return _shard_loss(kind, impl, axes, n_dev, zq_local, zc_local, t, bias,
                         extra.get('groups'), extra.get('weights'), extra.get('hard'))

    specs = jax.tree.map(lambda _: spec, extra)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P(), specs),
                         out_specs=P())(zq, zc, t, bias, extra)

  return loss
