r"""Latency and throughput of the embedding service (mmjax.deploy.serve) over loopback.

  python bench/serve.py [--n=2000] [--requests=300] [--concurrency=1,8,50] [--queries=60] \
      [--export=runs/demo/export] [--note="..."] [--noappend]

The demo model (configs/demo.py's towers; random parameters unless --export names a trained
params export) is exported for serving, `--n` demo validation scenes are backfilled (images) and
indexed, then `python -m mmjax.deploy.serve` is started on 127.0.0.1 once per setting:
micro-batching + cache, micro-batching without cache, and unbatched (--max_batch=1) without
cache. A bounded load generator (asyncio + httpx, `--concurrency` clients in a closed loop,
`--requests` requests per cell) sends one-text /embed and text /search requests drawn from
`--queries` distinct captions (so a cache can hit), and reports p50/p95/p99 latency and QPS. The
reference is the model's embedding time for one full batch and one ScaNN search, measured in
this process: the issue's goal is p99 /search at 50 clients within 3x their sum. Client and
server share the machine's cores, so figures are lower bounds; the load average is recorded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO, REPO / 'bench'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn  # noqa: E402
import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import train_step as tsb  # noqa: E402  (provenance helpers; --append, --note, --benchmarks_file)
from mmjax import embedder as embedder_lib, kinds  # noqa: E402
from mmjax.data import demo, tokenizer as tokenizer_lib  # noqa: E402
from mmjax.deploy import backfill, export, index, serving  # noqa: E402

flags.DEFINE_integer('n', 2000, 'Demo validation scenes backfilled and indexed.')
flags.DEFINE_integer('requests', 300, 'Requests per (setting, endpoint, concurrency) cell.')
flags.DEFINE_list('concurrency', ['1', '8', '50'], 'Closed-loop clients.')
flags.DEFINE_integer('queries', 60, 'Distinct query captions the requests are drawn from.')
flags.DEFINE_integer('max_batch', 32, 'The batched settings\' --max_batch.')
flags.DEFINE_float('max_wait_ms', 3.0, 'The batched settings\' --max_wait_ms.')
flags.DEFINE_string('export', '', 'A trained params export (default: random demo towers).')
FLAGS = flags.FLAGS

SETTINGS = (('micro-batching + cache', ['--cache_size=10000']),
            ('micro-batching, no cache', ['--cache_size=0']),
            ('unbatched, no cache', ['--cache_size=0', '--max_batch=1']))


def demo_export(directory: pathlib.Path) -> pathlib.Path:
  """The demo towers, random init, as a params export (as bench/backfill.py makes them)."""
  from configs import demo as demo_config  # pylint: disable=import-outside-toplevel
  config = demo_config.get_config()
  kind = kinds.get(config)
  model_config = kind.model_config(config)
  model = kind.model(model_config)
  params = nn.unbox(model.init(jax.random.key(0), *model.init_inputs())['params'])
  tok = tokenizer_lib.train_wordpiece(demo.caption_corpus(num_scenes=2000),
                                      vocab_size=model_config.text.vocab_size)
  encoder = tokenizer_lib.TextEncoder(tok, model_config.text.max_len)
  return embedder_lib.export(directory / 'export', model_config, params, encoder.to_str())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_server(root: pathlib.Path, extra: list[str], log: pathlib.Path):
  port = _free_port()
  cmd = [sys.executable, '-m', 'mmjax.deploy.serve', f'--index={root}', f'--port={port}',
         f'--max_batch={FLAGS.max_batch}', f'--max_wait_ms={FLAGS.max_wait_ms}', *extra]
  proc = subprocess.Popen(cmd, stdout=open(log, 'w'), stderr=subprocess.STDOUT, cwd=REPO,  # pylint: disable=consider-using-with
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
  base = f'http://127.0.0.1:{port}'
  deadline = time.monotonic() + 600
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'server exited: {log.read_text()[-2000:]}')
    try:
      if httpx.get(base + '/readyz', timeout=5).status_code == 200:
        return proc, base
    except httpx.TransportError:
      pass
    time.sleep(0.5)
  proc.kill()
  raise RuntimeError('server not ready in 600 s')


def stop_server(proc) -> None:
  proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()


async def load(base: str, endpoint: str, queries: list[str], clients: int, total: int, seed: int):
  """`clients` closed-loop clients send `total` requests; (latencies s, wall s, failures)."""
  rng = random.Random(seed)
  plan = [rng.choice(queries) for _ in range(total)]
  latencies, failures, nxt = [], 0, 0
  limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
  async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:

    async def worker():
      nonlocal nxt, failures
      while nxt < len(plan):
        q = plan[nxt]
        nxt += 1
        body = {'/embed': {'texts': [q]}, '/search': {'text': q, 'k': 10},
                '/embed (image)': {'images': [q]}}[endpoint]
        t0 = time.perf_counter()
        r = await client.post(endpoint.split()[0], json=body)
        latencies.append(time.perf_counter() - t0)
        failures += r.status_code != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - t0
  return np.asarray(latencies), wall, failures


def main(argv):
  del argv
  logging.getLogger('httpx').setLevel(logging.WARNING)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix='bench_serve_'))
  try:
    params_dir = (pathlib.Path(FLAGS.export) if FLAGS.export
                  else demo_export(tmp / 'model'))
    served = export.export_serving(params_dir, tmp / 'serving', name='bench')
    model = serving.load(served, batch_size=FLAGS.max_batch)
    backfill.backfill(model, f'demo:{FLAGS.n}', tmp / 'store', progress=False)
    index.build(tmp / 'store', tmp / 'index', name='bench', held_out=200)
    index.promote(tmp / 'index', 'bench', min_recall=0.0)
    searcher = index.Searcher(tmp / 'index')
    scenes = demo.DemoScenes('train', FLAGS.queries, image_size=model.spec['image_size'])
    queries = [scenes[i]['captions'][0] for i in range(FLAGS.queries)]
    images = [_b64png(scenes[i]['image']) for i in range(FLAGS.queries)]
    # Reference: one full batch of the text tower, one single-query search (best of 20).
    model.embed_texts(queries[:1] * FLAGS.max_batch)
    t_batch = min(_timed(lambda: model.embed_texts(queries[:1] * FLAGS.max_batch))
                  for _ in range(20))
    model.embed_texts(queries[:1], batch_size=1)
    t_one = min(_timed(lambda: model.embed_texts(queries[:1], batch_size=1)) for _ in range(20))
    pixels = np.stack([scenes[i]['image'] for i in range(FLAGS.max_batch)])
    model.embed_images(pixels)
    t_img_batch = min(_timed(lambda: model.embed_images(pixels)) for _ in range(10))
    model.embed_images(pixels[:1], batch_size=1)
    t_img_one = min(_timed(lambda: model.embed_images(pixels[:1], batch_size=1))
                    for _ in range(10))
    vec = model.embed_texts(queries[:1])
    t_search = min(_timed(lambda: searcher.search(vec, 10, query_version=model.version))
                   for _ in range(20))
    rows = []
    for name, extra in SETTINGS:
      proc, base = start_server(tmp / 'index', extra, tmp / f'server-{len(rows)}.log')
      try:
        for endpoint in ('/embed', '/embed (image)', '/search'):
          for clients in map(int, FLAGS.concurrency):
            load_before = tsb._loadavg()  # pylint: disable=protected-access
            inputs = images if 'image' in endpoint else queries
            lat, wall, failures = asyncio.run(load(base, endpoint, inputs, clients,
                                                   FLAGS.requests, seed=clients))
            p50, p95, p99 = np.percentile(lat, [50, 95, 99]) * 1000
            rows.append((name, endpoint, clients, f'{p50:.1f}', f'{p95:.1f}', f'{p99:.1f}',
                         f'{len(lat) / wall:.1f}', str(failures), load_before))
            print(rows[-1], flush=True)
      finally:
        stop_server(proc)
    body = ['| setting | endpoint | clients | p50 ms | p95 ms | p99 ms | QPS | failed | '
            'load avg |', '|---|---|---|---|---|---|---|---|---|',
            *['| ' + ' | '.join(map(str, r)) + ' |' for r in rows]]
    qps = {(r[0], r[1], r[2]): float(r[6]) for r in rows}
    top = max(map(int, FLAGS.concurrency))
    gain = {e: qps[(SETTINGS[1][0], e, top)] / qps[(SETTINGS[2][0], e, top)]
            for e in ('/embed', '/embed (image)')}
    p99 = {(r[0], r[1], r[2]): float(r[5]) for r in rows}
    goal = (t_batch + t_search) * 1000
    details = [
        f'- model: {"demo towers, random init" if not FLAGS.export else FLAGS.export}; '
        f'index: {FLAGS.n} demo images (ScaNN); devices {jax.local_device_count()}; '
        f'os.cpu_count() {os.cpu_count()}; client and server on the same cores',
        f'- {FLAGS.requests} requests per row from {FLAGS.queries} distinct captions; batched '
        f'settings --max_batch={FLAGS.max_batch} --max_wait_ms={FLAGS.max_wait_ms}',
        f'- reference: text tower {t_one * 1000:.2f} ms for 1 row, {t_batch * 1000:.2f} ms for '
        f'{FLAGS.max_batch} rows; image tower {t_img_one * 1000:.2f} ms for 1 row, '
        f'{t_img_batch * 1000:.2f} ms for {FLAGS.max_batch}; one ScaNN search '
        f'{t_search * 1000:.2f} ms (best of 10-20, in the bench process)',
        f'- micro-batching throughput gain at {top} clients, no cache: /embed text '
        f'{gain["/embed"]:.2f}x, /embed image {gain["/embed (image)"]:.2f}x',
        f'- p99 /search at {top} clients (micro-batching, no cache) '
        f'{p99[(SETTINGS[1][0], "/search", top)]:.1f} ms vs 3 x (batch + search) = '
        f'{3 * goal:.1f} ms',
        *([f'- note: {FLAGS.note}'] if FLAGS.note else [])]
    print('\n'.join(details + body))
    if FLAGS.append:
      tsb.append_result('serve: /embed and /search over loopback', details, body)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def _b64png(array) -> str:
  import base64, io  # pylint: disable=import-outside-toplevel,multiple-imports
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buf = io.BytesIO()
  Image.fromarray(np.asarray(array, np.uint8)).save(buf, format='PNG')
  return base64.b64encode(buf.getvalue()).decode()


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


if __name__ == '__main__':
  app.run(main)
