"""The service behind the HTTP app: the model, the index build, the micro-batcher, the query
cache, the write-ahead-logged updates and the hot switch between builds (see mmjax.deploy.serve
for the endpoints)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import functools
import hashlib
import logging
import pathlib
from typing import Any

import numpy as np
import prometheus_client

from mmjax.data import images as images_lib
from mmjax.deploy import backfill, index as index_lib, serving, store as store_lib
from mmjax.deploy.api import (BadRequest, EmbedRequest, EmbedResponse, ItemRequest,
                              SearchRequest, SearchResponse, Settings)
from mmjax.deploy.batching import Batcher, LRUCache
from mmjax.deploy.live import Delta


class Metrics:
  """The Prometheus metrics of one service (its own registry: several apps in one process)."""

  def __init__(self):
    self.registry = r = prometheus_client.CollectorRegistry()
    self.requests = prometheus_client.Counter(
        'mmjax_requests', 'Requests by endpoint and status code.', ['endpoint', 'status'],
        registry=r)
    self.latency = prometheus_client.Histogram(
        'mmjax_request_latency_seconds', 'Request latency by endpoint.', ['endpoint'], registry=r,
        buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
    self.batch = prometheus_client.Histogram(
        'mmjax_batch_items', 'Items per model call (before padding).', ['modality'], registry=r,
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
    self.padded = prometheus_client.Counter(
        'mmjax_batch_padding_rows', 'Padding rows run by the model.', ['modality'], registry=r)
    self.cache_hits = prometheus_client.Counter('mmjax_cache_hits', 'Query cache hits.',
                                                registry=r)
    self.cache_misses = prometheus_client.Counter('mmjax_cache_misses', 'Query cache misses.',
                                                  registry=r)
    self.cache_ratio = prometheus_client.Gauge('mmjax_cache_hit_ratio',
                                               'Query cache hits / lookups.', registry=r)
    self.index_size = prometheus_client.Gauge('mmjax_index_size', 'Items in the index.',
                                              registry=r)
    self.version = prometheus_client.Gauge(
        'mmjax_version', 'The served model version and index build (value 1).',
        ['model_version', 'index_build'], registry=r)
    self.ready = prometheus_client.Gauge('mmjax_ready', '1 once compiled and loaded.', registry=r)
    self.delta_size = prometheus_client.Gauge(
        'mmjax_delta_size', 'Upserted items searched beside the index.', registry=r)
    self.switches = prometheus_client.Counter('mmjax_switches', 'Hot switches to a new build.',
                                              registry=r)
    self.switch_failures = prometheus_client.Counter(
        'mmjax_switch_failures', 'Promoted builds that could not be switched to.', registry=r)


@dataclasses.dataclass(frozen=True)
class Served:
  """What one request is answered with, start to end: a model and the index build of its
  version. A hot switch replaces the service's `Served` in one assignment; a request in flight
  keeps the one it started with."""
  model: serving.ServingModel
  searcher: index_lib.Searcher | None
  delta: Delta | None = None

  def __post_init__(self):
    if self.searcher is not None:
      store_lib.check_same_version('The serving model', self.model.version,
                                   f'the index build {self.searcher.path.name}',
                                   self.searcher.version)

  @property
  def build(self) -> str:
    return self.searcher.path.name if self.searcher is not None else ''

  @functools.cached_property
  def index_ids(self) -> set[str]:
    return set(map(str, self.searcher.ids)) if self.searcher is not None else set()

  @property
  def view(self) -> images_lib.View:
    spec = self.model.spec
    return images_lib.View(spec['image_size'], spec['resize'], tuple(spec['background']))


class Service:
  """The model, the index, the batcher and the cache behind the HTTP app.

  Given `index_root` and an alias (`current`, `previous`) as `watch`, the service checks the
  alias every `settings.watch_s` seconds and switches to the build it points at: the new build
  (and, for another model version, its serving export) is loaded and compiled beside the one
  serving, then swapped in (`check_switch`). `fixed_model`: the model was given explicitly, so a
  build of another version is not switched to (counted in mmjax_switch_failures)."""

  def __init__(self, model: serving.ServingModel, searcher: index_lib.Searcher | None,
               settings: Settings = Settings(), *, index_root: str | pathlib.Path | None = None,
               watch: str | None = None, fixed_model: bool = False):
    self.wal_dir = pathlib.Path(index_root) / 'wal' if index_root is not None else None
    self.state = Served(model, searcher, self._delta(model, searcher))
    self.settings = settings
    self.index_root, self.watch, self.fixed_model = index_root, watch, fixed_model
    self.metrics = Metrics()
    self.cache = LRUCache(settings.cache_size)
    self.buckets = settings.bucket_sizes(len(model.devices))
    self.batcher = Batcher(self._embed_batch, self.buckets, settings.max_wait_ms / 1000,
                           self._on_batch)
    self.ready = False
    self._search_lock: asyncio.Lock | None = None
    self._watcher: asyncio.Task | None = None

  def _delta(self, model: serving.ServingModel, searcher) -> Delta | None:
    if searcher is None:
      return None
    path = self.wal_dir / f'{model.version}.jsonl' if self.wal_dir is not None else None
    return Delta(path, model.version, model.embed_dim)

  @property
  def model(self) -> serving.ServingModel:
    return self.state.model

  @property
  def searcher(self) -> index_lib.Searcher | None:
    return self.state.searcher

  @property
  def build(self) -> str:
    return self.state.build

  @property
  def view(self) -> images_lib.View:
    return self.state.view

  def _embed_batch(self, modality: str, items: list, batch_size: int) -> np.ndarray:
    """items: (model, input) pairs; one model call per model (two only across a switch)."""
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (model, _) in enumerate(items):
      groups.setdefault(id(model), []).append(i)
    for rows in groups.values():
      model = items[rows[0]][0]
      xs = [items[i][1] for i in rows]
      inputs = np.stack(xs) if modality == 'image' else xs
      size = batch_size if len(groups) == 1 else self.batcher.bucket(len(rows))
      for i, v in zip(rows, model.embed(modality, inputs, batch_size=size)):
        out[i] = v
    return np.stack(out)

  def _on_batch(self, modality: str, n: int, padded: int) -> None:
    self.metrics.batch.labels(modality).observe(n)
    self.metrics.padded.labels(modality).inc(padded - n)

  def warm_up(self, state: Served | None = None) -> None:
    """Compiles every bucket size of both modalities (and one search) before /readyz says so."""
    model, searcher = (state or self.state).model, (state or self.state).searcher
    size = model.spec['image_size']
    for b in self.buckets:
      model.embed_images(np.zeros((b, size, size, 3), np.uint8), batch_size=b)
      model.embed_texts(['warm up'] * b, batch_size=b)
    if searcher is not None:
      searcher.search(np.zeros((1, model.embed_dim), np.float32), 1, query_version=model.version)

  def _show(self, state: Served, value: float) -> None:
    self.metrics.version.labels(state.model.version, state.build).set(value)
    if value:
      self.metrics.index_size.set(len(state.searcher.ids) if state.searcher is not None else 0)

  async def start(self) -> None:
    self._search_lock = asyncio.Lock()
    await asyncio.to_thread(self.warm_up)
    self.batcher.start(serving.MODALITIES)
    self._show(self.state, 1)
    if self.index_root is not None and self.watch in index_lib.ALIASES and self.settings.watch_s:
      self._watcher = asyncio.get_running_loop().create_task(self._watch())
    self.ready = True
    self.metrics.ready.set(1)

  async def stop(self) -> None:
    self.ready = False
    self.metrics.ready.set(0)
    if self._watcher is not None:
      self._watcher.cancel()
      await asyncio.gather(self._watcher, return_exceptions=True)
      self._watcher = None
    await self.batcher.stop()
    if self.state.delta is not None:
      self.state.delta.close()

  def _load(self, name: str) -> Served:
    searcher = index_lib.Searcher(self.index_root, name)
    model = self.model
    if searcher.version != model.version:
      if self.fixed_model:
        raise store_lib.VersionMismatchError(
            f'The promoted build {name} is of model version {searcher.version!r} but the service '
            f'was started with --model of {model.version!r}: not switched. Restart without '
            '--model (the build\'s own serving export is then loaded).')
      model = serving.load(searcher.info['model']['path'], batch_size=max(self.buckets),
                           devices=model.devices)
    state = Served(model, searcher, self._delta(model, searcher))
    self.warm_up(state)
    return state

  async def check_switch(self) -> bool:
    """Switches to the build the watched alias points at, if it moved; True if switched."""
    name = index_lib.alias(self.index_root, self.watch)
    if name is None or name == self.build:
      return False
    new = await asyncio.to_thread(self._load, name)
    old, self.state = self.state, new  # Requests that started on `old` finish on it.
    self._show(old, 0)
    self._show(new, 1)
    self.metrics.switches.inc()
    logging.info('Switched from %s (%s) to %s (%s).', old.build, old.model.version, new.build,
                 new.model.version)
    return True

  async def _watch(self) -> None:
    failed: str | None = None
    while True:
      await asyncio.sleep(self.settings.watch_s)
      try:
        await self.check_switch()
        failed = None
      except Exception as e:  # pylint: disable=broad-except  # Keep serving the old build.
        if str(e) != failed:  # Count and log each new failure once, not every poll.
          failed = str(e)
          self.metrics.switch_failures.inc()
          logging.error('Hot switch failed, still serving %s: %s', self.build, e)

  # Input preparation (raises BadRequest naming the field).
  def prepare_text(self, text: Any, field: str) -> str:
    try:
      text = backfill.prepare_text(text, self.settings.max_text_chars)
    except backfill.BadInput as e:
      raise BadRequest(f'{field}: {e}.') from e
    return ' '.join(text.split())

  def prepare_image(self, data: str, field: str, state: Served | None = None) -> np.ndarray:
    try:
      raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
      raise BadRequest(f'{field}: not valid base64 ({e}).') from e
    if not raw:
      raise BadRequest(f'{field}: empty image.')
    try:
      return backfill.prepare_image(raw, (state or self.state).view, self.settings.max_pixels)
    except backfill.BadInput as e:
      raise BadRequest(f'{field}: {e}.') from e
    except Exception as e:  # pylint: disable=broad-except  # Pillow raises many kinds.
      raise BadRequest(f'{field}: not a decodable image ({type(e).__name__}: {e}).') from e

  async def embed_one(self, modality: str, item,
                      state: Served | None = None) -> tuple[np.ndarray, bool]:
    state = state or self.state
    digest = item if modality == 'text' else hashlib.sha256(item.tobytes()).hexdigest()
    key = (state.model.version, modality, digest)
    vector = self.cache.get(key)
    hit = vector is not None
    if hit:
      self.metrics.cache_hits.inc()
    else:
      self.metrics.cache_misses.inc()
      vector = await self.batcher.submit(modality, (state.model, item))
      self.cache.put(key, vector)
    self.metrics.cache_ratio.set(self.cache.hit_ratio)
    return vector, hit

  async def _embed_items(self, modality: str, items: list, state: Served) -> list[np.ndarray]:
    return [v for v, _ in await asyncio.gather(*(self.embed_one(modality, x, state)
                                                 for x in items))]

  async def embed(self, req: EmbedRequest) -> EmbedResponse:
    state = self.state
    n = len(req.texts) + len(req.images)
    if n == 0:
      raise BadRequest('Give at least one of texts, images.')
    if n > self.settings.max_items:
      raise BadRequest(f'{n} items in one request: at most max_items={self.settings.max_items}.',
                       413)
    texts = [self.prepare_text(t, f'texts[{i}]') for i, t in enumerate(req.texts)]
    images = await asyncio.to_thread(
        lambda: [self.prepare_image(x, f'images[{i}]', state) for i, x in enumerate(req.images)]
    ) if req.images else []
    tv, iv = await asyncio.gather(self._embed_items('text', texts, state),
                                  self._embed_items('image', images, state))
    return EmbedResponse(model_version=state.model.version,
                         text_vectors=[v.tolist() for v in tv],
                         image_vectors=[v.tolist() for v in iv])

  async def search(self, req: SearchRequest) -> SearchResponse:
    state = self.state
    model, searcher = state.model, state.searcher
    if searcher is None:
      raise BadRequest('This service has no index (started without --index): /search is off.',
                       404)
    given = [f for f in ('text', 'image', 'vector') if getattr(req, f) is not None]
    if len(given) != 1:
      raise BadRequest(f'Give exactly one of text, image, vector (got {given or "none"}).')
    if not 1 <= req.k <= self.settings.max_k:
      raise BadRequest(f'k={req.k}: must be in [1, {self.settings.max_k}].')
    hit = False
    if req.vector is not None:
      if req.model_version is None:
        raise BadRequest('vector needs its model_version.')
      vector = np.asarray(req.vector, np.float32)
      if vector.shape != (model.embed_dim,) or not np.isfinite(vector).all():
        raise BadRequest(f'vector: expected {model.embed_dim} finite floats, got '
                         f'{len(req.vector)}.')
    else:
      if req.text is not None:
        vector, hit = await self.embed_one('text', self.prepare_text(req.text, 'text'), state)
      else:
        pixels = await asyncio.to_thread(self.prepare_image, req.image, 'image', state)
        vector, hit = await self.embed_one('image', pixels, state)
    version = req.model_version or model.version
    try:
      store_lib.check_same_version('The query', version, f'the index build {state.build}',
                                   searcher.version)
    except store_lib.VersionMismatchError as e:
      raise BadRequest(str(e), 409) from e
    async with self._search_lock:
      hits = await asyncio.to_thread(self._search, state, vector, req.k, version)
    return SearchResponse(ids=[i for _, i in hits], scores=[s for s, _ in hits],
                          model_version=model.version, index_build=state.build,
                          cached=hit)

  @staticmethod
  def _search(state: Served, vector: np.ndarray, k: int, version: str) -> list[tuple[float, str]]:
    """The index's top k merged with the delta's (exact), deleted and replaced ids left out."""
    delta, searcher = state.delta, state.searcher
    hidden = delta.hidden if delta is not None else set()
    scores, ids = searcher.search(vector[None], k + len(hidden), query_version=version)
    hits = [(float(s), str(i)) for s, i in zip(scores[0], ids[0]) if str(i) not in hidden]
    if delta is not None:
      hits += delta.search(vector, k)
    return sorted(hits, key=lambda h: -h[0])[:k]

  async def upsert(self, req: 'ItemRequest') -> dict[str, Any]:
    state = self.state
    if state.delta is None:
      raise BadRequest('This service has no index (started without --index): /items is off.',
                       404)
    if (req.text is None) == (req.image is None):
      raise BadRequest('Give exactly one of text, image.')
    if req.text is not None:
      vector, _ = await self.embed_one('text', self.prepare_text(req.text, 'text'), state)
    else:
      pixels = await asyncio.to_thread(self.prepare_image, req.image, 'image', state)
      vector, _ = await self.embed_one('image', pixels, state)
    async with self._search_lock:
      await asyncio.to_thread(state.delta.upsert, req.id, vector)
    self.metrics.delta_size.set(len(state.delta.vectors))
    return {'id': req.id, 'model_version': state.model.version, 'index_build': state.build}

  async def delete(self, item_id: str) -> dict[str, Any]:
    state = self.state
    if state.delta is None:
      raise BadRequest('This service has no index (started without --index): /items is off.',
                       404)
    known = item_id in state.delta.vectors or (
        item_id not in state.delta.deleted and item_id in state.index_ids)
    if not known:
      raise BadRequest(f'No item {item_id!r} in the index build {state.build} or its updates.',
                       404)
    async with self._search_lock:
      await asyncio.to_thread(state.delta.delete, item_id)
    self.metrics.delta_size.set(len(state.delta.vectors))
    return {'id': item_id, 'deleted': True, 'index_build': state.build}
