"""Clustering of frozen embeddings: k-means, scored against labels by NMI, ARI and AMI.

The embeddings of a labelled set are L2-normalised and clustered by scikit-learn's k-means into
as many clusters as there are classes (MTEB's clustering protocol). The clusters are compared
with the labels by normalised mutual information (NMI), the adjusted Rand index (ARI) and the
adjusted mutual information (AMI). ARI and AMI are corrected for chance (0 for a random
clustering, 1 for a perfect one); NMI is not, and sits a little above 0 at chance on a finite
set, so the evaluator also reports the NMI of a random assignment of the same sizes
('chance/nmi').

The demo task: one-object demo scenes (`classification.demo_single_objects`) labelled by their
object's shape or colour, as images or as their captions (`modality`).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np
from sklearn import cluster, metrics as sk_metrics

from mmjax.data import demo
from mmjax.eval import classification as cls_lib
from mmjax.types import Embedder

METRICS = ('nmi', 'ari', 'ami')
MODALITIES = ('image', 'text')


def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def kmeans_labels(z: np.ndarray, num_clusters: int, seed: int, n_init: int = 10) -> np.ndarray:
  """Cluster ids [N] of the L2-normalised rows of `z` (k-means++ starts, best of n_init)."""
  km = cluster.KMeans(n_clusters=num_clusters, n_init=n_init, random_state=seed)
  return km.fit_predict(_normalise(z))


def scores(labels: np.ndarray, assigned: np.ndarray, seed: int = 0) -> dict[str, float]:
  """NMI, ARI, AMI of a clustering against the labels, and the NMI of a random permutation of
  the same assignment (what NMI reads at chance on this many items)."""
  chance = np.random.default_rng(seed).permutation(assigned)
  return {'nmi': float(sk_metrics.normalized_mutual_info_score(labels, assigned)),
          'ari': float(sk_metrics.adjusted_rand_score(labels, assigned)),
          'ami': float(sk_metrics.adjusted_mutual_info_score(labels, assigned)),
          'chance/nmi': float(sk_metrics.normalized_mutual_info_score(labels, chance))}


def cluster_metrics(z: np.ndarray, labels: np.ndarray, seed: int, n_init: int = 10,
                    names: Sequence[str] = METRICS) -> dict[str, float]:
  """k-means with one cluster per class, then `scores` (the metrics in `names` + chance/nmi)."""
  labels = np.asarray(labels)
  if len(z) != len(labels):
    raise ValueError(f'{len(z)} embeddings for {len(labels)} labels.')
  out = scores(labels, kmeans_labels(z, len(np.unique(labels)), seed, n_init), seed)
  return {k: v for k, v in out.items() if k in names or k.startswith('chance/')}


class ClusteringEvaluator:
  """`config.evals` type 'clustering': k-means on the embeddings of one-object demo scenes (the
  images, or their captions with modality='text'), labelled by `attribute`."""

  def __init__(self, spec: dict[str, Any], image_size: int):
    self.spec, self.image_size = spec, image_size

  @functools.cached_property
  def data(self) -> tuple[Any, np.ndarray]:
    """(inputs: images uint8 [N, S, S, 3] or N captions, labels [N])."""
    s = self.spec
    images, labels, _, scenes = cls_lib.demo_single_object_scenes(
        s['num_images'], self.image_size, s['attribute'], s['seed'])
    if s['modality'] == 'text':
      return [demo.canonical_caption(scene) for scene in scenes], labels
    return images, labels

  def __call__(self, embedder: Embedder) -> dict[str, float]:
    inputs, labels = self.data
    s = self.spec
    z = embedder.embed_texts(inputs) if s['modality'] == 'text' else embedder.embed_images(inputs)
    return cluster_metrics(z, labels, s['seed'], s['n_init'], s['metrics'])
