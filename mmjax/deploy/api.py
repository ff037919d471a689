"""The service's wire types: its settings, request/response models (unknown fields refused)
and the error a bad request raises (status + a message naming the field)."""

from __future__ import annotations

import dataclasses

from pydantic import BaseModel, ConfigDict, Field


@dataclasses.dataclass(frozen=True)
class Settings:
  """Service limits and batching; every field is a flag of `python -m mmjax.deploy.serve`."""
  max_batch: int = 32  # Items per model call; 1 = no micro-batching.
  max_wait_ms: float = 3.0  # How long the first queued item waits for company.
  buckets: tuple[int, ...] = ()  # Padded batch sizes (default: powers of 2 up to max_batch).
  cache_size: int = 10_000  # LRU entries of query embeddings; 0 = no cache.
  max_request_bytes: int = 8 << 20  # Request bodies over this are refused (413).
  max_items: int = 64  # Texts + images in one /embed request.
  max_text_chars: int = 2_000
  max_pixels: int = 25_000_000  # A larger image is refused unread (a decompression bomb).
  max_k: int = 1_000
  api_key: str | None = None
  watch_s: float = 2.0  # How often the served alias is checked for a new build; 0 = never.

  def bucket_sizes(self, shards: int = 1) -> tuple[int, ...]:
    if self.max_batch < 1:
      raise ValueError(f'max_batch={self.max_batch}: must be at least 1.')
    sizes = self.buckets or tuple(sorted({min(1 << i, self.max_batch)
                                          for i in range(self.max_batch.bit_length() + 1)}))
    if max(sizes) < self.max_batch:
      raise ValueError(f'buckets={sizes}: the largest must hold max_batch={self.max_batch}.')
    return tuple(sorted({-(-s // shards) * shards for s in sizes}))



# --- Request and response models (unknown fields refused) ----------------------------------------

class EmbedRequest(BaseModel):
  model_config = ConfigDict(extra='forbid')
  texts: list[str] = Field(default_factory=list, description='Texts to embed.')
  images: list[str] = Field(default_factory=list,
                            description='Encoded image files (PNG, JPEG, ...), base64.')


class EmbedResponse(BaseModel):
  model_version: str
  text_vectors: list[list[float]]
  image_vectors: list[list[float]]


class SearchRequest(BaseModel):
  model_config = ConfigDict(extra='forbid')
  text: str | None = Field(None, description='A text query.')
  image: str | None = Field(None, description='An image query: an encoded image file, base64.')
  vector: list[float] | None = Field(None, description='A query embedding (needs model_version).')
  model_version: str | None = Field(
      None, description='The model version of the query; refused (409) unless the index\'s.')
  k: int = Field(10, description='Neighbours returned.')


class ItemRequest(BaseModel):
  model_config = ConfigDict(extra='forbid')
  id: str = Field(..., min_length=1, max_length=256, description='The item id (upsert: replace).')
  text: str | None = Field(None, description='The item as a text.')
  image: str | None = Field(None, description='The item as an image: an encoded file, base64.')


class SearchResponse(BaseModel):
  ids: list[str]
  scores: list[float]
  model_version: str
  index_build: str
  cached: bool


class BadRequest(ValueError):
  """Input the service refuses: (status, message naming the field)."""

  def __init__(self, message: str, status: int = 422):
    super().__init__(message)
    self.status = status

