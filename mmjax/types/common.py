"""The names shared across layers: mesh and batch axes, the LLM embedder's tasks, roles and
image-slot id, batch type aliases, the `Embedder` protocol, `ConfigError` and the one
check-and-raise of every config validator. Part of `mmjax.types` (imports nothing of mmjax)."""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np

# The mesh always has these three axes (mmjax.parallel.mesh); the batch is split over the first
# two, so `data x fsdp` is the number of batch shards.
MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')
# The mesh of a runner or tool given none: every device on 'data'.
DEFAULT_MESH = {'data': -1, 'fsdp': 1, 'tensor': 1}

# The LLM embedder: its training tasks, the batch-column prefix of each of its roles, and the
# token id that marks one visual token's place in a sequence (spliced in by the model).
LLM_TASKS = ('i2t', 't2i', 'composed')
LLM_ROLE_PREFIX = {'query': 'query_', 'candidate': 'cand_', 'neg_candidate': 'neg_cand_'}
IMAGE_SLOT = -200

Batch = dict[str, Any]  # Column name -> [B, ...] array (numpy on the host, jax.Array on device).
Embeddings = dict[str, Any]  # Role -> [B, d] (hard negatives [B, K, d]) L2-normalised embeddings.


class Embedder(Protocol):
  """What evaluators embed through: images uint8 [N, H, W, 3] and texts -> [N, d] numpy."""

  embed_dim: int

  def embed_images(self, images: np.ndarray) -> np.ndarray: ...

  def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def require(cond: bool, msg: str) -> None:
  """Raises ConfigError(msg) unless `cond`: the one check of every config validator."""
  if not cond:
    raise ConfigError(msg)


def check_batch_divides(batch_size: int, processes: int) -> None:
  """Every process loads batch_size / processes rows: refuse a batch that does not divide."""
  if batch_size % processes:
    raise ConfigError(f'config.batch_size={batch_size} is not divisible by the {processes} '
                      'processes.')


class ConfigError(ValueError):
  """A config that cannot run: names the offending key and value."""


def lists_to_tuples(d: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON / ConfigDict mapping with list values as tuples (the frozen dataclasses' fields)."""
  return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
