"""An embedding and search service over a serving export and an index build (FastAPI + uvicorn).

  python -m mmjax.deploy.serve --index=runs/index [--build=current] [--model=SERVING_EXPORT] \
      [--host=127.0.0.1] [--port=8000] [--api_key=...]

  POST /embed   {"texts": [str], "images": [base64]} -> vectors, model_version
  POST /search  {"text": str} | {"image": base64} | {"vector": [float], "model_version": str},
                "k": int -> ids, scores, model_version, index build
  POST /items   {"id": str, "text": str | "image": base64} (upsert; searchable on return)
  DELETE /items/{id}
  GET  /healthz (alive), /readyz (200 once every batch size is compiled and the index loaded),
       /metrics (Prometheus text)

Queries are embedded through a micro-batcher (`Batcher`): concurrent requests' items are gathered
for at most `max_wait_ms` into a batch padded to the smallest bucket size that holds it, so the
service compiles each bucket once at start-up and never while serving. Query embeddings are kept
in an LRU cache keyed by model version + modality + normalised input (whitespace-collapsed text,
the SHA-256 of the preprocessed image pixels): a cache never outlives its model version.

Upserts and deletes go to a write-ahead log (INDEX_ROOT/wal/MODEL_VERSION.jsonl, fsync'ed before
the answer) and to an exact-search `Delta` merged into every search; the log is replayed at
start-up, so a killed server keeps every acknowledged update.

Served on an alias (`--build=current`, the default), the service picks up a newly promoted build
without a restart: every `watch_s` seconds it reads the alias; a new build (and its serving
export, when of another model version) is loaded and compiled beside the serving one, then
swapped in with one assignment, so no request fails and a request in flight finishes on the
model and index it started with.

Bad input is a 4xx with a message naming the field: unknown fields, empty or over-long texts,
undecodable images, decompression bombs, too many items, a k out of range (422); a body over
`max_request_bytes` (413); a query vector of another model version than the index (409). Binding a
non-loopback address requires an API key (`Authorization: Bearer KEY` or `X-API-Key: KEY`, on
every endpoint but /healthz and /readyz).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import pathlib
import time
from typing import Any

try:
  import prometheus_client
  from fastapi import FastAPI, Request
  from fastapi.responses import JSONResponse, PlainTextResponse
except ImportError as e:  # The default install stays lean: the service is an extra.
  raise ImportError(f'mmjax.deploy.serve needs the serve extra ({e.name} is missing): '
                    'pip install "mmjax[serve]" (fastapi, uvicorn, prometheus-client).') from e

from mmjax.deploy import index as index_lib, serving
# The service's public API, re-exported: `serve.Service`, `serve.Settings`, ...
from mmjax.deploy.api import (BadRequest, EmbedRequest, EmbedResponse, ItemRequest,  # noqa: F401
                              SearchRequest, SearchResponse, Settings)
from mmjax.deploy.batching import LRUCache  # noqa: F401
from mmjax.deploy.live import Delta  # noqa: F401
from mmjax.deploy.service import Service

OPEN_PATHS = ('/healthz', '/readyz')


def is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def check_bind(host: str, api_key: str | None) -> None:
  if not is_loopback(host) and not api_key:
    raise ValueError(f'--host={host} is not a loopback address: pass --api_key (or '
                     'MMJAX_SERVE_API_KEY) so that the service is not open to the network.')



class BodyLimit:
  """ASGI middleware: a request body over `limit` bytes is answered 413 before any handler."""

  def __init__(self, app, limit: int):
    self.app, self.limit = app, limit

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    headers = dict(scope.get('headers') or [])
    try:
      declared = int(headers.get(b'content-length', b'0'))
    except ValueError:
      declared = 0
    chunks, size, more = [], 0, declared <= self.limit
    while more:
      message = await receive()
      if message['type'] != 'http.request':
        break
      chunks.append(message.get('body', b''))
      size += len(chunks[-1])
      more = message.get('more_body', False) and size <= self.limit
    if declared > self.limit or size > self.limit:
      response = JSONResponse({'detail': f'Request body over max_request_bytes={self.limit}.'},
                              status_code=413)
      return await response(scope, receive, send)
    body, sent = b''.join(chunks), False

    async def replay():
      nonlocal sent
      if not sent:
        sent = True
        return {'type': 'http.request', 'body': body, 'more_body': False}
      return await receive()

    return await self.app(scope, replay, send)


def _not_ready() -> JSONResponse:
  return JSONResponse({'detail': 'Not ready: compiling the model or loading the index.'},
                      status_code=503)


def _guard(service: Service):
  """The HTTP middleware: the API key check (all but OPEN_PATHS), 503 until the service is
  ready (all but OPEN_PATHS and /metrics), and the request metrics."""
  metrics = service.metrics

  async def guard(request: Request, call_next):
    path, start = request.url.path, time.perf_counter()
    key = service.settings.api_key
    if key and path not in OPEN_PATHS:
      given = request.headers.get('x-api-key') or ''
      auth = request.headers.get('authorization') or ''
      if auth.lower().startswith('bearer '):
        given = auth[7:]
      if not hmac.compare_digest(given.encode(), key.encode()):
        response = JSONResponse({'detail': 'Missing or wrong API key (Authorization: Bearer KEY '
                                           'or X-API-Key: KEY).'}, status_code=401)
        metrics.requests.labels(path, '401').inc()
        return response
    if not service.ready and path not in OPEN_PATHS + ('/metrics',):
      response = _not_ready()  # /embed, /search, /items wait for compile + load.
    else:
      response = await call_next(request)
    endpoint = (path if path in ('/embed', '/search', '/metrics') + OPEN_PATHS else
                '/items' if path.startswith('/items') else 'other')
    metrics.requests.labels(endpoint, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response

  return guard


def create_app(service: Service, *, lifespan: bool = True) -> Any:
  """The app of `service`: its lifespan starts `service.start()` (compile, load), after which
  /readyz turns 200 (with lifespan=False the caller starts and stops the service).
  Returns the ASGI app (the body-size limit around FastAPI); `.fastapi` is the FastAPI one."""
  @contextlib.asynccontextmanager
  async def run(_):
    # Compiling runs beside serving: /healthz answers at once, /readyz once it is done.
    starting = asyncio.get_running_loop().create_task(service.start())
    try:
      yield
    finally:
      starting.cancel()
      await asyncio.gather(starting, return_exceptions=True)
      await service.stop()

  api = FastAPI(title='mmjax embedding service', version=service.model.version,
                lifespan=run if lifespan else None)
  metrics = service.metrics
  api.middleware('http')(_guard(service))

  @api.exception_handler(BadRequest)
  async def bad_request(_, e: BadRequest):
    return JSONResponse({'detail': str(e)}, status_code=e.status)

  @api.get('/healthz')
  async def healthz():
    return {'status': 'ok'}

  @api.get('/readyz')
  async def readyz():
    if not service.ready:
      return _not_ready()
    return {'status': 'ready', 'model_version': service.model.version,
            'index_build': service.build}

  @api.get('/metrics')
  async def metrics_text():
    return PlainTextResponse(prometheus_client.generate_latest(metrics.registry),
                             media_type=prometheus_client.CONTENT_TYPE_LATEST)

  @api.post('/embed', response_model=EmbedResponse)
  async def embed(req: EmbedRequest):
    return await service.embed(req)

  @api.post('/items')
  async def upsert(req: ItemRequest):
    return await service.upsert(req)

  @api.delete('/items/{item_id}')
  async def delete(item_id: str):
    return await service.delete(item_id)

  @api.post('/search', response_model=SearchResponse)
  async def search(req: SearchRequest):
    return await service.search(req)

  app = BodyLimit(api, service.settings.max_request_bytes)
  app.fastapi = api
  return app


def load_service(index: str | None, *, build: str = 'current', model: str | None = None,
                 settings: Settings = Settings()) -> Service:
  """The service of an index build and a serving export (default: the build's own model)."""
  searcher = index_lib.Searcher(index, build) if index else None
  fixed_model = model is not None
  if model is None:
    if searcher is None:
      raise ValueError('Give --model (a serving export), --index (an index root) or both.')
    model = searcher.info['model']['path']
  if not pathlib.Path(model).is_dir():
    raise FileNotFoundError(f'--model={model}: no such serving export directory.')
  return Service(serving.load(model, batch_size=max(settings.bucket_sizes())), searcher,
                 settings, index_root=index, watch=build, fixed_model=fixed_model)


def describe(service: Service) -> str:
  return json.dumps({'model_version': service.model.version, 'index_build': service.build,
                     'buckets': list(service.buckets)}, sort_keys=True)


if __name__ == '__main__':  # The command lives in the CLI layer (mmjax.cli.deploy_serve).
  import runpy
  runpy.run_module('mmjax.cli.deploy_serve', run_name='__main__')
