"""Exact nearest-neighbour search on device: the reference every approximate index is measured
against.

The corpus is split by rows over every device of the mesh. Each device scans its rows in blocks of
`block_size`, keeping a running top-k per query (one [Q, block] score tile at a time, never the
[Q, N] score matrix), then the per-device top-k lists are all-gathered and merged. Queries go in
fixed-size padded batches, so the search compiles once.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

METRICS = ('dot_product', 'squared_l2')


def _all_devices_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), ('rows',))


class ExactSearch:
  """Brute-force top-k by inner product ('dot_product') or Euclidean distance ('squared_l2').

  `search` returns (scores, ids), best first. Scores are inner products, or negative squared
  distances for 'squared_l2' (higher is better either way, as in ScaNN's `search_batched` with
  the sign of its distances flipped).
  """

  def __init__(self, corpus: np.ndarray, *, metric: str = 'dot_product', mesh: Mesh | None = None,
               block_size: int = 8192, query_batch: int = 256):
    corpus = np.asarray(corpus, np.float32)
    if corpus.ndim != 2 or corpus.shape[0] == 0:
      raise ValueError(f'corpus must be a non-empty [N, D] array, got shape {corpus.shape}.')
    if metric not in METRICS:
      raise ValueError(f'metric={metric!r} is not one of {METRICS}.')
    self.metric = metric
    self.mesh = mesh or _all_devices_mesh()
    self.axes = tuple(self.mesh.axis_names)
    shards = math.prod(self.mesh.shape.values())
    self.size, self.dim = corpus.shape
    # Rows per shard rounded up to a shape bucket, so corpora of nearby sizes (the evaluators'
    # sets, a growing index) share one compiled search; the true size is an argument.
    per_shard = bucket(-(-self.size // shards))
    self.block_size = min(block_size, per_shard)
    per_shard = bucket(-(-per_shard // self.block_size)) * self.block_size
    padded = np.zeros((per_shard * shards, self.dim), np.float32)
    padded[:self.size] = corpus
    rows = NamedSharding(self.mesh, P(self.axes))
    self._corpus = jax.make_array_from_callback(padded.shape, rows, lambda i: padded[i])
    # For squared_l2 the ranking of -|q - c|^2 is that of 2 q.c - |c|^2 (|q|^2 is per query).
    norms = (np.sum(padded ** 2, axis=1) if metric == 'squared_l2'
             else np.zeros(len(padded), np.float32))
    self._half_norms = jax.make_array_from_callback(norms.shape, rows,
                                                    lambda i: (0.5 * norms)[i])
    self.query_batch = query_batch
    self._n = jax.device_put(np.int32(self.size), NamedSharding(self.mesh, P()))

  def _compiled(self, k: int):
    key = (k, self.block_size, self.mesh, self.axes)
    if key not in _SEARCH:
      _SEARCH[key] = jax.jit(functools.partial(_sharded_top_k, mesh=self.mesh, axes=self.axes,
                                               k=k, block=self.block_size))
    return _SEARCH[key]

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise ValueError(f'queries must be [Q, {self.dim}], got shape {queries.shape}.')
    if not 1 <= k <= self.size:
      raise ValueError(f'k={k} must be in [1, corpus size {self.size}].')
    fn = self._compiled(k)
    b = self.query_batch
    scores, ids = [], []
    for start in range(0, len(queries), b):
      q = queries[start:start + b]
      valid = len(q)
      q = np.concatenate([q, np.zeros((b - valid, self.dim), np.float32)]) if valid < b else q
      with jax.set_mesh(self.mesh):  # Our mesh, whatever mesh the caller has made current.
        s, i = fn(jnp.asarray(q), self._corpus, self._half_norms, self._n)
      scores.append(np.asarray(s)[:valid])
      ids.append(np.asarray(i)[:valid])
    scores = np.concatenate(scores) if scores else np.zeros((0, k), np.float32)
    ids = np.concatenate(ids) if ids else np.zeros((0, k), np.int32)
    if self.metric == 'squared_l2':  # Back from 2 q.c - |c|^2 to -|q - c|^2.
      scores = 2 * scores - np.sum(queries ** 2, axis=1, keepdims=True)
    return scores, ids


# One jitted search per (k, block, mesh): jax compiles it once per corpus shape bucket.
_SEARCH: dict = {}


def bucket(n: int) -> int:
  """The shape bucket of `n` rows: n itself up to 8, else the smallest m * 2**e >= n with m in
  4..7 (at most 25% padding)."""
  if n <= 8:
    return n
  e = n.bit_length() - 3
  return -(-n // 2**e) * 2**e


def _sharded_top_k(queries, corpus, half_norms, n, *, mesh, axes, k, block):
  def local(q, c, hn, n):
    shard = jax.lax.axis_index(axes)
    rows = c.shape[0]
    kl = min(k, rows)  # Each shard's own top-k (a shard may hold fewer than k rows).
    blocks = c.reshape(rows // block, block, c.shape[1])
    hn = hn.reshape(rows // block, block)
    init = (jnp.full((q.shape[0], kl), -jnp.inf, jnp.float32),
            jnp.zeros((q.shape[0], kl), jnp.int32))

    def scan_block(best, i):
      ids = shard * rows + i * block + jnp.arange(block, dtype=jnp.int32)
      s = jnp.dot(q, blocks[i].T, preferred_element_type=jnp.float32) - hn[i]
      s = jnp.where(ids < n, s, -jnp.inf)  # Padding rows never win.
      top_s, top_j = jax.lax.top_k(s, min(kl, block))
      return _merge(best, (top_s, ids[top_j]), kl), None

    best, _ = jax.lax.scan(scan_block, init, jnp.arange(rows // block))
    all_s = jax.lax.all_gather(best[0], axes, axis=1, tiled=True)  # [Q, shards * k]
    all_i = jax.lax.all_gather(best[1], axes, axis=1, tiled=True)
    top_s, top_j = jax.lax.top_k(all_s, k)
    return top_s, jnp.take_along_axis(all_i, top_j, axis=1)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axes), P(axes), P()),
                       out_specs=(P(), P()), check_vma=False)(queries, corpus, half_norms, n)


def _merge(a, b, k):
  s = jnp.concatenate([a[0], b[0]], axis=1)
  i = jnp.concatenate([a[1], b[1]], axis=1)
  top_s, top_j = jax.lax.top_k(s, k)
  return top_s, jnp.take_along_axis(i, top_j, axis=1)
