"""mmjax.deploy.serve: the embedding and search service, micro-batching, the query cache, refusals.

Most tests run the app in process over httpx's ASGI transport (no socket); one starts the real
server (`python -m mmjax.deploy.serve`) on 127.0.0.1 and drives it with a bounded request loop.
The models are conftest's two untrained tiny exports (v1, v2); the index is a v1 build of 60 demo
scene images.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip('fastapi', reason='the serve extra (fastapi, uvicorn, prometheus-client, '
                    'httpx) is not installed: pip install mmjax[serve]')
httpx = pytest.importorskip('httpx', reason='httpx (the serve extra) is not installed')

from mmjax.deploy import (backfill, corpus as corpus_lib, index, serve, serving,  # noqa: E402
                          store)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = serve.Settings(max_batch=8, buckets=(1, 8), max_wait_ms=20, max_items=16,
                          max_request_bytes=200_000, max_text_chars=500, max_k=50)


def _png(array: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  return buf.getvalue()


def _b64(data: bytes) -> str:
  return base64.b64encode(data).decode()


def _png_bomb(side: int = 12_000) -> bytes:
  """A valid 1-bit PNG of side x side pixels: ~40 kB encoded, 144 M pixels decoded."""
  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + tag + data + struct.pack(
        '>I', zlib.crc32(tag + data) & 0xffffffff)
  ihdr = struct.pack('>IIBBBBB', side, side, 1, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) +
          chunk(b'IDAT', zlib.compress((b'\x00' + bytes(side // 8)) * side, 9)) +
          chunk(b'IEND', b''))


@pytest.fixture(scope='module')
def env(deploy_models, tmp_path_factory):
  root = tmp_path_factory.mktemp('serve')
  v1 = serving.load(deploy_models['v1'][1], batch_size=8)
  v2 = serving.load(deploy_models['v2'][1], batch_size=8)
  backfill.backfill(v1, 'demo:60', root / 'store', shard_size=32, progress=False)
  index.build(root / 'store', root / 'index', name='b1', held_out=20)
  index.promote(root / 'index', 'b1', min_recall=0.5)
  corpus = corpus_lib.open_corpus('demo:60', modality='image', image_size=v1.spec['image_size'])
  images = [_png(corpus.load(i)) for i in (0, 7, 33)]
  ids = [corpus.keys[i][0] for i in (0, 7, 33)]
  return {'v1': v1, 'v2': v2, 'root': root, 'searcher': index.Searcher(root / 'index'),
          'images': images, 'image_ids': ids, 'serving_dir': deploy_models['v1'][1]}


@contextlib.asynccontextmanager
async def _client(service: serve.Service, *, start: bool = True, headers=None):
  app = serve.create_app(service, lifespan=False)
  if start:
    await service.start()
  try:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url='http://serve',
                                 headers=headers) as client:
      yield client
  finally:
    await service.stop()


def _service(env, settings=SETTINGS, model='v1') -> serve.Service:
  return serve.Service(env[model], env['searcher'], settings)


def _metric(service: serve.Service, name: str, **labels) -> float:
  return service.metrics.registry.get_sample_value(name, labels) or 0.0


# --- In process ---------------------------------------------------------------------------------

def test_embed_and_search_match_direct_embedding_and_search(env):
  model, searcher = env['v1'], env['searcher']
  texts = ['a red star in the center.', 'a blue circle']

  async def body():
    service = _service(env)
    async with _client(service) as c:
      r = await c.post('/embed', json={'texts': texts, 'images': [_b64(env['images'][0])]})
      assert r.status_code == 200, r.text
      out = r.json()
      assert out['model_version'] == model.version
      text_q = await c.post('/search', json={'text': texts[0], 'k': 5})
      image_q = [await c.post('/search', json={'image': _b64(png), 'k': 3})
                 for png in env['images']]
      spaced = await c.post('/search', json={'text': '  a red   star in the center. ', 'k': 5})
      metrics = (await c.get('/metrics')).text
    return out, text_q.json(), [r.json() for r in image_q], spaced.json(), metrics, service

  out, text_q, image_q, spaced, metrics, service = asyncio.run(body())
  np.testing.assert_allclose(out['text_vectors'], model.embed_texts(texts), atol=1e-5)
  pixels = backfill.prepare_image(env['images'][0], service.view, 10**7)[None]
  np.testing.assert_allclose(out['image_vectors'], model.embed_images(pixels), atol=1e-5)
  scores, ids = searcher.search_texts(model, texts[:1], k=5)
  assert text_q['ids'] == ids[0].tolist() and text_q['index_build'] == 'b1'
  np.testing.assert_allclose(text_q['scores'], scores[0], atol=1e-5)
  # /embed embedded texts[0] already: the search's query embedding comes from the cache.
  assert text_q['model_version'] == model.version and text_q['cached']
  assert [r['cached'] for r in image_q] == [True, False, False]  # images[0] was in /embed.
  for got, item_id in zip(image_q, env['image_ids']):  # An indexed image finds itself first.
    assert got['ids'][0] == item_id and got['scores'][0] == pytest.approx(1.0, abs=1e-4)
  # The same text up to whitespace is the same normalised input: a cache hit, the same answer.
  assert spaced['cached'] and spaced['ids'] == text_q['ids']
  assert 'mmjax_cache_hits_total 3.0' in metrics  # Two text searches, one image search.
  assert 'mmjax_cache_misses_total 5.0' in metrics  # 2 texts + 1 image embedded, 2 images.
  assert 'mmjax_cache_hit_ratio 0.375' in metrics
  assert f'mmjax_version{{index_build="b1",model_version="{model.version}"}} 1.0' in metrics
  assert 'mmjax_index_size 60.0' in metrics
  assert 'mmjax_requests_total{endpoint="/search",status="200"} 5.0' in metrics
  assert 'mmjax_request_latency_seconds_count{endpoint="/embed"} 1.0' in metrics


def test_concurrent_requests_are_micro_batched_without_recompiling(env):
  model = env['v1']
  texts = [f'a green square number {i}' for i in range(24)]
  compiled = {m: model._fns[m]._cache_size() for m in serving.MODALITIES}  # pylint: disable=protected-access

  async def body():
    service = _service(env)
    async with _client(service) as c:
      rs = await asyncio.gather(*(c.post('/embed', json={'texts': [t]}) for t in texts))
    return service, rs

  service, rs = asyncio.run(body())
  assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
  np.testing.assert_allclose([r.json()['text_vectors'][0] for r in rs], model.embed_texts(texts),
                             atol=1e-5)
  calls = _metric(service, 'mmjax_batch_items_count', modality='text')
  assert _metric(service, 'mmjax_batch_items_sum', modality='text') == 24
  assert 3 <= calls < 24, calls  # Gathered: at most 8 a call, far fewer calls than requests.
  # Every batch was padded to a bucket compiled at start-up (1 and 8 rows): nothing new compiled.
  for m in serving.MODALITIES:
    assert model._fns[m]._cache_size() <= max(compiled[m], len(service.buckets)), m  # pylint: disable=protected-access


def test_unbatched_settings_run_one_item_per_call(env):
  async def body():
    service = _service(env, serve.Settings(max_batch=1, max_wait_ms=0))
    async with _client(service) as c:
      await asyncio.gather(*(c.post('/embed', json={'texts': [f'star {i}']}) for i in range(5)))
    return service

  service = asyncio.run(body())
  assert service.buckets == (1,)
  assert _metric(service, 'mmjax_batch_items_count', modality='text') == 5


def test_lru_cache_is_bounded_and_keyed_by_model_version():
  cache = serve.LRUCache(2)
  cache.put(('v1', 'text', 'a'), np.ones(2))
  cache.put(('v1', 'text', 'b'), np.ones(2))
  assert cache.get(('v1', 'text', 'a')) is not None  # 'a' is now the most recent.
  cache.put(('v1', 'text', 'c'), np.ones(2))
  assert len(cache) == 2 and cache.get(('v1', 'text', 'b')) is None
  assert cache.get(('v2', 'text', 'a')) is None  # Another model version never hits.
  assert (cache.hits, cache.misses) == (1, 2) and cache.hit_ratio == pytest.approx(1 / 3)
  off = serve.LRUCache(0)
  off.put(('v1', 'text', 'a'), np.ones(2))
  assert off.get(('v1', 'text', 'a')) is None and len(off) == 0


def _bad_requests(env):
  """(what, method, path, json or raw bytes, expected status, message fragment)."""
  good_png = env['images'][0]
  return [
      ('unknown field', '/search', {'text': 'a', 'kk': 3}, 422, 'kk'),
      ('unknown embed field', '/embed', {'texts': ['a'], 'audio': ['x']}, 422, 'audio'),
      ('no query', '/search', {'k': 3}, 422, 'exactly one of'),
      ('two queries', '/search', {'text': 'a', 'image': _b64(good_png)}, 422, 'exactly one of'),
      ('k zero', '/search', {'text': 'a', 'k': 0}, 422, 'k=0'),
      ('k huge', '/search', {'text': 'a', 'k': 10**6}, 422, 'k=1000000'),
      ('k not int', '/search', {'text': 'a', 'k': 'ten'}, 422, 'k'),
      ('empty text', '/search', {'text': '   '}, 422, 'empty text'),
      ('huge text', '/embed', {'texts': ['a', 'word ' * 200]}, 422, 'texts[1]: over-long'),
      ('text not str', '/embed', {'texts': [3]}, 422, 'texts'),
      ('nothing to embed', '/embed', {}, 422, 'at least one'),
      ('too many items', '/embed', {'texts': ['a'] * 17}, 413, 'max_items=16'),
      ('not base64', '/search', {'image': '###'}, 422, 'image: not valid base64'),
      ('undecodable', '/embed', {'images': [_b64(b'not an image at all')]}, 422,
       'images[0]: not a decodable image'),
      ('truncated', '/search', {'image': _b64(good_png[:len(good_png) // 2])}, 422,
       'image: not a decodable image'),
      ('bomb', '/search', {'image': _b64(_png_bomb())}, 422, 'decompression bomb'),
      ('vector no version', '/search', {'vector': [0.1] * env['v1'].embed_dim}, 422,
       'model_version'),
      ('vector wrong dim', '/search', {'vector': [0.1, 0.2], 'model_version': 'x'}, 422,
       f'expected {env["v1"].embed_dim} finite floats'),
      ('cross-version vector', '/search',
       {'vector': [0.1] * env['v1'].embed_dim, 'model_version': env['v2'].version}, 409,
       f'model version {env["v2"].version!r}'),
      ('oversize body', '/embed', {'texts': ['x' * 300_000]}, 413, 'max_request_bytes=200000'),
      ('not json', '/search', b'{"text": "a", ', 422, ''),
      ('json not object', '/search', b'[1, 2]', 422, ''),
  ]


def _send(client, path, payload):
  if isinstance(payload, bytes):
    return client.post(path, content=payload, headers={'content-type': 'application/json'})
  return client.post(path, json=payload)


def test_bad_input_is_a_4xx_with_a_message_and_the_service_keeps_serving(env):
  cases = _bad_requests(env)

  async def body():
    service = _service(env)
    async with _client(service) as c:
      got = [(await _send(c, path, payload)) for _, path, payload, _, _ in cases]
      after = await c.post('/search', json={'text': 'a red star', 'k': 2})
      health = await c.get('/healthz')
      schema = (await c.get('/openapi.json')).json()
    return got, after, health, schema

  got, after, health, schema = asyncio.run(body())
  assert {'/embed', '/search', '/items', '/items/{item_id}'} <= set(schema['paths'])
  assert schema['components']['schemas']['SearchRequest']['additionalProperties'] is False
  for (what, _, _, status, fragment), r in zip(cases, got):
    assert r.status_code == status, (what, r.status_code, r.text)
    assert fragment in json.dumps(r.json()['detail']), (what, r.text)
  assert after.status_code == 200 and len(after.json()['ids']) == 2
  assert health.json() == {'status': 'ok'}


def test_not_ready_until_started_and_api_key(env):
  async def body():
    service = _service(env, dataclasses.replace(SETTINGS, api_key='s3cret'))
    async with _client(service, start=False) as c:
      before = (await c.get('/readyz')).status_code, (await c.get('/healthz')).status_code
      await service.start()
      no_key = await c.post('/search', json={'text': 'a'})
      wrong = await c.post('/search', json={'text': 'a'}, headers={'x-api-key': 'nope'})
      bearer = await c.post('/search', json={'text': 'a'},
                            headers={'authorization': 'Bearer s3cret'})
      header = await c.get('/metrics', headers={'x-api-key': 's3cret'})
      ready = await c.get('/readyz')
    return before, no_key, wrong, bearer, header, ready

  before, no_key, wrong, bearer, header, ready = asyncio.run(body())
  assert before == (503, 200)
  assert no_key.status_code == wrong.status_code == 401 and 'API key' in no_key.json()['detail']
  assert bearer.status_code == 200 and header.status_code == 200
  assert ready.json()['index_build'] == 'b1'
  serve.check_bind('127.0.0.1', None)
  serve.check_bind('::1', None)
  with pytest.raises(ValueError, match='0.0.0.0 is not a loopback address: pass --api_key'):
    serve.check_bind('0.0.0.0', None)
  serve.check_bind('0.0.0.0', 'key')


def test_a_model_of_another_version_than_the_index_is_refused(env):
  with pytest.raises(store.VersionMismatchError, match=env['v2'].version):
    _service(env, model='v2')
  with pytest.raises(ValueError, match='largest must hold max_batch=8'):
    serve.Settings(max_batch=8, buckets=(1, 4)).bucket_sizes()
  assert serve.Settings(max_batch=6).bucket_sizes() == (1, 2, 4, 6)
  assert serve.Settings(max_batch=6).bucket_sizes(shards=4) == (4, 8)


def test_upserted_items_are_found_and_deleted_ones_are_not(env):
  async def body():
    service = _service(env)
    out = {}
    async with _client(service) as c:
      q = {'text': 'a purple hexagon on grass', 'k': 5}
      out['put'] = await c.post('/items', json={'id': 'new-1', 'text': q['text']})
      out['found'] = (await c.post('/search', json=q)).json()
      out['del'] = await c.delete('/items/new-1')
      out['gone'] = (await c.post('/search', json=q)).json()
      out['again'] = await c.delete('/items/new-1')
      image = {'image': _b64(env['images'][1]), 'k': 5}
      out['img_before'] = (await c.post('/search', json=image)).json()
      out['del_indexed'] = await c.delete(f'/items/{env["image_ids"][1]}')
      out['img_after'] = (await c.post('/search', json=image)).json()
      out['bad'] = [await c.post('/items', json=b) for b in (
          {'id': 'x', 'text': 'a', 'extra': 1}, {'id': '', 'text': 'a'}, {'id': 'x'},
          {'id': 'x', 'text': 'a', 'image': _b64(env['images'][0])}, {'id': 'x', 'text': ' '})]
      out['metrics'] = (await c.get('/metrics')).text
    return out

  out = asyncio.run(body())
  assert out['put'].status_code == 200 and out['put'].json()['index_build'] == 'b1'
  assert out['found']['ids'][0] == 'new-1' and out['found']['scores'][0] == pytest.approx(1, 1e-4)
  assert out['del'].json()['deleted'] and 'new-1' not in out['gone']['ids']
  assert len(out['gone']['ids']) == 5 and out['again'].status_code == 404
  assert out['img_before']['ids'][0] == env['image_ids'][1]
  assert out['del_indexed'].status_code == 200 and env['image_ids'][1] not in out['img_after']['ids']
  assert [r.status_code for r in out['bad']] == [422] * 5, [r.text for r in out['bad']]
  assert 'mmjax_requests_total{endpoint="/items",status="200"} 3.0' in out['metrics']


def test_write_ahead_log_replays_and_drops_only_a_torn_tail(tmp_path):
  path = tmp_path / 'wal' / 'v.jsonl'
  delta = serve.Delta(path, 'v', 2)
  delta.upsert('a', np.array([1, 0]))
  delta.upsert('b', np.array([0, 1]))
  delta.delete('a')
  delta.close()
  with open(path, 'a', encoding='utf-8') as f:
    f.write('{"op": "upsert", "id": "c", "vers')  # Killed mid-write.
  again = serve.Delta(path, 'v', 2)
  assert set(again.vectors) == {'b'} and again.deleted == {'a'}
  assert again.search(np.array([0, 1]), 3) == [(1.0, 'b')]
  again.close()
  lines = path.read_text().splitlines()
  path.write_text('\n'.join(lines[:1] + ['garbage'] + lines[1:]) + '\n')
  with pytest.raises(ValueError, match='line 2: not JSON'):
    serve.Delta(path, 'v', 2)
  other = tmp_path / 'wal' / 'w.jsonl'
  other.write_text(lines[0] + '\n')  # A line of version 'v' in the log of version 'w'.
  with pytest.raises(store.VersionMismatchError, match="line 1 is of model version 'v'"):
    serve.Delta(other, 'w', 2)


# --- A real server on loopback -------------------------------------------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _fuzz(rng: random.Random, good_png: bytes):
  """One malformed request: (path, body bytes)."""
  kind = rng.randrange(8)
  if kind == 0:
    return '/search', bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
  if kind == 1:
    return '/search', json.dumps({rng.choice(['txt', 'q', 'K', 'vec']): 'x'}).encode()
  if kind == 2:
    return '/search', json.dumps({'text': 'a', 'k': rng.choice([-1, 0, 10**9, 'x', None, 2.5])
                                  }).encode()
  if kind == 3:
    cut = good_png[:rng.randrange(1, len(good_png))]
    noise = bytearray(good_png)
    noise[rng.randrange(8, len(noise))] ^= 0xFF
    return '/search', json.dumps({'image': _b64(rng.choice([cut, bytes(noise)]))}).encode()
  if kind == 4:
    return '/embed', json.dumps({'texts': [rng.choice(['', ' ', 'w' * 600, 5, None])]}).encode()
  if kind == 5:
    return '/embed', json.dumps({'images': [rng.choice(['', '!!', 'AAAA', 'a' * 7])]}).encode()
  if kind == 6:
    return '/search', json.dumps({'vector': [rng.random()] * rng.randrange(0, 5),
                                  'model_version': 'other'}).encode()
  return rng.choice(['/embed', '/search']), json.dumps(
      rng.choice([[], 'text', 1, {'texts': 'abc'}, {'text': ['a']}])).encode()


def _wait_ready(c, proc, log_path, timeout=240) -> None:
  deadline = time.monotonic() + timeout
  while True:
    assert proc.poll() is None, log_path.read_text()
    assert time.monotonic() < deadline, f'not ready in {timeout} s'
    try:
      if c.get('/readyz').status_code == 200:
        return
    except httpx.TransportError:
      pass
    time.sleep(0.3)


def test_real_server_on_loopback_serves_refuses_and_survives_fuzzing(env, tmp_path):
  port = _free_port()
  log = open(tmp_path / 'server.log', 'w')  # pylint: disable=consider-using-with
  cmd = [sys.executable, '-m', 'mmjax.deploy.serve', f'--index={env["root"] / "index"}',
         f'--port={port}', '--max_batch=4', '--buckets=1,4', '--max_request_bytes=200000',
         '--max_text_chars=500']
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,  # pylint: disable=consider-using-with
                          env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  base = f'http://127.0.0.1:{port}'
  try:
    with httpx.Client(base_url=base, timeout=30) as c:
      _wait_ready(c, proc, tmp_path / 'server.log')
      model = env['v1']
      r = c.post('/embed', json={'texts': ['a red star']})
      assert r.status_code == 200 and r.json()['model_version'] == model.version
      np.testing.assert_allclose(r.json()['text_vectors'], model.embed_texts(['a red star']),
                                 atol=1e-5)
      r = c.post('/search', json={'image': _b64(env['images'][1]), 'k': 3})
      assert r.status_code == 200 and r.json()['ids'][0] == env['image_ids'][1], r.text
      r = c.post('/search', json={'text': 'a blue circle', 'k': 4})
      assert r.status_code == 200 and len(r.json()['ids']) == 4
      for what, path, payload, status, _ in _bad_requests(env):
        if what in ('too many items',):  # The CLI keeps the default max_items.
          continue
        r = _send(c, path, payload)
        assert r.status_code == status, (what, r.status_code, r.text)
      rng, statuses = random.Random(0), {}
      for _ in range(1000):
        path, body = _fuzz(rng, env['images'][0])
        r = c.post(path, content=body, headers={'content-type': 'application/json'})
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        # A 4xx with a message (400: a body that is not UTF-8 JSON); a damaged PNG may decode.
        assert r.status_code == 200 or (400 <= r.status_code < 500 and r.json()['detail']), (
            path, body[:200], r.status_code, r.text)
      assert statuses.get(200, 0) < 100, statuses
      assert c.get('/healthz').json() == {'status': 'ok'}
      r = c.post('/search', json={'text': 'a blue circle', 'k': 4})
      assert r.status_code == 200 and len(r.json()['ids']) == 4
      metrics = c.get('/metrics').text
      assert 'mmjax_requests_total{endpoint="/search",status="422"}' in metrics
      # Live updates, then kill -9: every acknowledged update survives the restart.
      q = {'text': 'a purple hexagon on grass', 'k': 5}
      assert c.post('/items', json={'id': 'keep-1', 'text': q['text']}).status_code == 200
      assert c.post('/items', json={'id': 'drop-1', 'text': q['text'] + ' too'}).status_code == 200
      assert c.delete('/items/drop-1').status_code == 200
      assert c.post('/search', json=q).json()['ids'][0] == 'keep-1'
    proc.kill()
    proc.wait()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,  # pylint: disable=consider-using-with
                            env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
    with httpx.Client(base_url=base, timeout=30) as c:
      _wait_ready(c, proc, tmp_path / 'server.log')
      ids = c.post('/search', json=q).json()['ids']
      assert ids[0] == 'keep-1' and 'drop-1' not in ids, ids
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
  assert proc.returncode in (0, -15), (tmp_path / 'server.log').read_text()


def test_cli_refuses_a_public_bind_without_an_api_key(env):
  r = subprocess.run([sys.executable, '-m', 'mmjax.deploy.serve', f'--model={env["serving_dir"]}',
                      '--host=0.0.0.0'], capture_output=True, text=True, cwd=REPO, timeout=120,
                     env={**os.environ, 'PYTHONPATH': REPO, 'MMJAX_SERVE_API_KEY': ''})
  assert r.returncode == 1 and 'not a loopback address' in r.stderr, r.stderr


def test_promoting_a_build_switches_while_serving_and_no_request_fails(env, tmp_path):
  v1, v2, root = env['v1'], env['v2'], tmp_path / 'index'
  backfill.backfill(v2, 'demo:60', tmp_path / 'store2', shard_size=32, progress=False)
  index.build(env['root'] / 'store', root, name='b1', held_out=20)
  index.build(tmp_path / 'store2', root, name='b2', held_out=20)
  index.promote(root, 'b1', min_recall=0.5)
  settings = dataclasses.replace(SETTINGS, watch_s=0.05)

  async def body():
    service = serve.Service(v1, index.Searcher(root), settings, index_root=root, watch='current')
    seen, stop = [], asyncio.Event()
    async with _client(service) as c:

      async def client(i):
        while not stop.is_set():
          r = await c.post('/search', json={'text': f'a red star {i % 3}', 'k': 3})
          seen.append((r.status_code, r.json().get('model_version'), r.json().get('index_build')))

      async def wait_for(build):
        for _ in range(2400):
          if service.build == build:
            return
          await asyncio.sleep(0.05)
        raise AssertionError(f'no switch to {build}')

      clients = [asyncio.get_running_loop().create_task(client(i)) for i in range(4)]
      await asyncio.sleep(0.3)
      await asyncio.to_thread(index.promote, root, 'b2', min_recall=0.5)
      await wait_for('b2')
      n = len(seen)
      while len(seen) < n + 20:
        await asyncio.sleep(0.02)
      await asyncio.to_thread(index.rollback, root)
      await wait_for('b1')
      n = len(seen)
      while len(seen) < n + 20:
        await asyncio.sleep(0.02)
      stop.set()
      await asyncio.gather(*clients)
      metrics = (await c.get('/metrics')).text
    return seen, metrics

  seen, metrics = asyncio.run(body())
  assert all(s == 200 for s, _, _ in seen), [x for x in seen if x[0] != 200][:5]
  # Each answer names a consistent pair, and all three phases were served.
  assert set((v, b) for _, v, b in seen) == {(v1.version, 'b1'), (v2.version, 'b2')}
  phases = [b for i, (_, _, b) in enumerate(seen) if i == 0 or b != seen[i - 1][2]]
  assert phases[0] == 'b1' and 'b2' in phases and seen[-1][2] == 'b1', phases
  assert 'mmjax_switches_total 2.0' in metrics
  assert f'mmjax_version{{index_build="b2",model_version="{v2.version}"}} 0.0' in metrics
  assert f'mmjax_version{{index_build="b1",model_version="{v1.version}"}} 1.0' in metrics

  # Started with an explicit --model, the service refuses to switch to another model version.
  async def fixed():
    service = serve.Service(v1, index.Searcher(root), SETTINGS, index_root=root,
                            watch='current', fixed_model=True)
    await asyncio.to_thread(index.promote, root, 'b2', min_recall=0.5)
    with pytest.raises(store.VersionMismatchError, match='started with --model'):
      await service.check_switch()
    assert service.build == 'b1'

  asyncio.run(fixed())
