"""The two-sample statistics behind the drift report (`mmjax.deploy.drift`): pure numpy
functions of vector arrays. Permutation tests share one set of masks (`permutation_masks`), so
the centroid, MMD and nearest-neighbour tests of a report see the same permutations; `paired`
tests swap each item's A and B vectors instead of relabelling the pooled set."""

from __future__ import annotations

from typing import Any

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def permutation_masks(n: int, m: int, permutations: int, paired: bool,
                      rng: np.random.Generator) -> np.ndarray:
  """[n + m, 1 + permutations] float32 membership of the first set: column 0 is the observed
  split (rows 0..n-1), the others random relabellings (paired: row i and n + i swap or not)."""
  masks = np.zeros((n + m, 1 + permutations), np.float32)
  masks[:n, 0] = 1
  if paired:
    swap = rng.random((n, permutations)) < 0.5
    masks[:n, 1:] = ~swap
    masks[n:, 1:] = swap
  else:
    order = np.argsort(rng.random((n + m, permutations)), axis=0)[:n]
    np.put_along_axis(masks[:, 1:], order, 1.0, axis=0)
  return masks


def p_value(observed: float, null: np.ndarray) -> float:
  """(1 + #{null >= observed}) / (1 + #null): a valid permutation p-value, never 0."""
  return float((1 + np.sum(null >= observed)) / (1 + len(null)))


def centroid_test(x: np.ndarray, y: np.ndarray, masks: np.ndarray, paired: bool) -> dict[str, Any]:
  """Squared distance between the two centroids, its permutation null, and effect sizes relative
  to the reference's spread (RMS distance of its vectors to their centroid)."""
  n, m = len(x), len(y)
  z = np.concatenate([x, y]).astype(np.float64)
  sums = masks.T.astype(np.float64) @ z
  null_and_obs = np.sum((sums / n - (z.sum(0) - sums) / m) ** 2, axis=1)
  obs, null = float(null_and_obs[0]), null_and_obs[1:]
  mx, my = x.mean(0, dtype=np.float64), y.mean(0, dtype=np.float64)
  spread = float(np.sqrt(np.mean(np.sum((x - mx) ** 2, axis=1))))
  if paired:  # Var(mean of x_i - y_i) = tr cov(x - y) / n.
    noise = float(np.sum(np.var(x - y, axis=0, ddof=1))) / n
  else:
    noise = float(np.sum(np.var(x, axis=0, ddof=1))) / n + float(
        np.sum(np.var(y, axis=0, ddof=1))) / m
  cos = float(mx @ my / max(np.linalg.norm(mx) * np.linalg.norm(my), 1e-12))
  return {
      'l2': float(np.sqrt(obs)),
      'relative': float(np.sqrt(obs)) / max(spread, 1e-12),
      'debiased_relative': float(np.sqrt(max(obs - noise, 0.0))) / max(spread, 1e-12),
      'cosine_distance': 1.0 - cos,
      'reference_spread': spread,
      'p_value': p_value(obs, null),
      'effect': float(np.sqrt(max(obs - noise, 0.0))) / max(spread, 1e-12),
  }, null


def pairwise_sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  sq = np.sum(a * a, 1)[:, None] + np.sum(b * b, 1)[None, :] - 2.0 * (a @ b.T)
  return np.maximum(sq, 0.0, out=sq)


def median_bandwidth(z: np.ndarray, rng: np.random.Generator, sample: int = 1000) -> float:
  """The median pairwise distance of (a seeded subsample of) the pooled vectors."""
  s = z[rng.choice(len(z), min(sample, len(z)), replace=False)]
  d2 = pairwise_sq_dists(s, s)[np.triu_indices(len(s), 1)]
  return float(np.sqrt(max(np.median(d2), 1e-12)))


def mmd2_from_kernel(kernel: np.ndarray, masks: np.ndarray, paired: bool = False) -> np.ndarray:
  """Unbiased MMD^2 for every membership column of `masks`, from one [N, N] @ [N, P] matmul.

  With the diagonal of K zeroed and a the first set's indicator: Sxx = a'Ka, Sxy = 1'Ka - Sxx,
  Syy = 1'K1 - Sxx - 2 Sxy. paired (rows i and n + i are one item's two vectors): the item's own
  cross term k(x_i, y_i) is left out as well, the paired U-statistic
  sum_{i != j} k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i) / (n (n - 1))."""
  k0 = kernel.copy()
  np.fill_diagonal(k0, 0.0)
  n = float(masks[:, 0].sum())
  m = len(k0) - n
  cross = n * m
  if paired:
    i = np.arange(int(n))
    k0[i, i + int(n)] = k0[i + int(n), i] = 0.0
    cross = n * (n - 1)
  ka = k0 @ masks
  sxx = np.sum(masks * ka, axis=0, dtype=np.float64)
  sxy = k0.sum(0, dtype=np.float64) @ masks.astype(np.float64) - sxx
  syy = k0.sum(dtype=np.float64) - sxx - 2 * sxy
  return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / cross


def mmd_test(x: np.ndarray, y: np.ndarray, masks: np.ndarray, paired: bool,
             rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
  """MMD^2 with k(u, v) = exp(-|u - v|^2 / (2 sigma^2)), sigma = median pooled distance."""
  z = np.concatenate([x, y]).astype(np.float32)
  sigma = median_bandwidth(z, rng)
  kernel = pairwise_sq_dists(z, z)
  np.multiply(kernel, -0.5 / sigma**2, out=kernel)
  np.exp(kernel, out=kernel)
  values = mmd2_from_kernel(kernel, masks, paired)
  obs, null = float(values[0]), values[1:]
  return {'mmd2': obs, 'bandwidth': sigma, 'null_mean': float(null.mean()),
          'null_q99': float(np.quantile(null, 0.99)), 'p_value': p_value(obs, null),
          'effect': obs}, null


def nearest_distance(queries: np.ndarray, index: np.ndarray, block: int = 1024) -> np.ndarray:
  """Cosine distance (1 - cos) of each query to its nearest vector of `index`."""
  q, x = normalize(queries), normalize(index)
  best = np.empty(len(q), np.float32)
  for s in range(0, len(q), block):
    best[s:s + block] = np.max(q[s:s + block] @ x.T, axis=1)
  return 1.0 - best


def nn_distance_test(x: np.ndarray, y: np.ndarray, paired: bool, permutations: int,
                     rng: np.random.Generator) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Distances to the nearest neighbour in one half of the reference (the index), for the other
  half (the baseline) and for the current set, which are then exchangeable under no drift.

  paired: baseline and current are the A and B vectors of the same held-out items (sign-flip
  test on their differences); otherwise a two-sample permutation test on the means."""
  order = rng.permutation(len(x))
  index, held = order[:len(x) // 2], order[len(x) // 2:]
  base = nearest_distance(x[held], x[index])
  cur = nearest_distance(y[held] if paired else y, x[index])
  obs = abs(float(cur.mean() - base.mean()))
  if paired:
    diff = (cur - base).astype(np.float64)
    signs = np.where(rng.random((permutations, len(diff))) < 0.5, -1.0, 1.0)
    null = np.abs(signs @ diff) / len(diff)
  else:
    pooled = np.concatenate([base, cur]).astype(np.float64)
    perm = np.argsort(rng.random((permutations, len(pooled))), axis=1)
    shuffled = pooled[perm]
    null = np.abs(shuffled[:, len(base):].mean(1) - shuffled[:, :len(base)].mean(1))
  rel = float(cur.mean() / max(base.mean(), 1e-12) - 1.0)
  q99 = float(np.quantile(base, 0.99))
  return {
      'reference_mean': float(base.mean()), 'current_mean': float(cur.mean()),
      'reference_median': float(np.median(base)), 'current_median': float(np.median(cur)),
      'relative_shift': rel,
      'share_beyond_reference_q99': float(np.mean(cur > q99)),
      'index_size': int(len(index)), 'p_value': p_value(obs, null), 'effect': abs(rel),
  }, {'nn_reference': base, 'nn_current': cur, 'nn_null': null}


def psi_per_dimension(ref: np.ndarray, cur: np.ndarray, bins: int = 10,
                      eps: float = 1e-4) -> np.ndarray:
  """Population stability index of each dimension over the reference's quantile bins:
  sum over bins of (p_cur - p_ref) ln(p_cur / p_ref), proportions floored at `eps`."""
  edges = np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1], axis=0)  # [bins - 1, d]

  def proportions(v):
    idx = np.zeros(v.shape, np.int32)
    for e in edges:
      idx += v > e
    return np.stack([np.mean(idx == b, axis=0) for b in range(bins)])  # [bins, d]

  p, q = np.maximum(proportions(ref), eps), np.maximum(proportions(cur), eps)
  return np.sum((q - p) * np.log(q / p), axis=0)


def psi_summary(x: np.ndarray, y: np.ndarray, bins: int, threshold: float) -> dict[str, Any]:
  psi = psi_per_dimension(x, y, bins)
  top = np.argsort(-psi)[:5]
  return {
      'mean': float(psi.mean()), 'max': float(psi.max()), 'share_over_threshold':
      float(np.mean(psi > threshold)), 'bins': bins,
      # E[PSI] of identically distributed sets, chi-square approximation: (bins - 1)(1/n + 1/m).
      'noise_floor': (bins - 1) * (1 / len(x) + 1 / len(y)),
      'top_dimensions': {int(j): float(psi[j]) for j in top},
  }, psi


def knn_overlap(a: np.ndarray, b: np.ndarray, probe_size: int, k: int,
                rng: np.random.Generator) -> tuple[dict[str, Any], np.ndarray]:
  """|top-k neighbours of a probe under A  ∩  under B| / k, over a seeded probe set; neighbours
  by cosine among all aligned items but the probe itself. Needs no shared space."""
  k = min(k, len(a) - 1)
  probes = rng.choice(len(a), min(probe_size, len(a)), replace=False)

  def top(v):
    v = normalize(v)
    sims = v[probes] @ v.T
    sims[np.arange(len(probes)), probes] = -np.inf
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]

  ta, tb = top(a), top(b)
  overlap = (ta[:, :, None] == tb[:, None, :]).any(axis=2).sum(axis=1) / k
  return {'mean': float(overlap.mean()), 'median': float(np.median(overlap)),
          'p10': float(np.quantile(overlap, 0.1)),
          'share_below_half': float(np.mean(overlap < 0.5)),
          'k': int(k), 'probes': int(len(probes))}, overlap
