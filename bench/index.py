r"""Recall@10 / QPS of the ScaNN index (mmjax.index.ScannIndex) against exact search on CPU and
faiss-cpu (IVF-PQ fast-scan + exact refinement, and HNSW), side by side in one run.

  python bench/index.py [--n=1000000] [--dim=128] [--queries=1000] [--faiss=ivfpq,hnsw] \
      [--export=runs/demo/export --real_n=50000] [--note="..."] [--noappend]

Two corpora:
- synthetic: `--n` x `--dim` clustered vectors (`--clusters` Gaussian clusters, L2-normalised,
  inner product), queries drawn from the same clusters;
- real (with `--export`): image embeddings of `--real_n` demo training scenes from a trained,
  exported demo model, queried with the text embeddings of validation captions.

Ground truth is the exact top-k. Every method gets the same thread count (`--threads`) and is
timed on the whole query batch (best of `--repeats`), so QPS is batch throughput. Each ScaNN /
faiss point is one search setting; the block appended to BENCHMARKS.md lists all points and
the fastest one of each method at recall@10 >= `--target`. faiss needs the optional `bench`
extra (`pip install -e .[bench]`).
"""

from __future__ import annotations

import datetime
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO, REPO / 'bench'):
  if str(path) not in sys.path:
    sys.path.insert(0, str(path))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import train_step as tsb  # noqa: E402  (provenance helpers; --append, --note, --benchmarks_file)
from mmjax.index import ExactSearch, ScannIndex, default_params, recall_at_k  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer('n', 1_000_000, 'Synthetic corpus size (0 skips the synthetic corpus).')
flags.DEFINE_integer('dim', 128, 'Synthetic dimension.')
flags.DEFINE_integer('clusters', 1000, 'Gaussian clusters of the synthetic corpus.')
flags.DEFINE_float('spread', 0.12, 'Per-coordinate std of points around their cluster centre '
                   '(centres are unit vectors).')
flags.DEFINE_integer('queries', 1000, 'Queries per corpus.')
flags.DEFINE_integer('k', 10, 'Neighbours (recall@k).')
flags.DEFINE_integer('threads', os.cpu_count(), 'Threads for every method.')
flags.DEFINE_integer('repeats', 2, 'Timed runs per point; the best is kept.')
flags.DEFINE_float('target', 0.95, 'Recall@k the summary compares methods at.')
flags.DEFINE_list('faiss', ['ivfpq', 'hnsw'], 'faiss peers: ivfpq, hnsw (empty: none).')
flags.DEFINE_list('leaves', [], 'ScaNN num_leaves_to_search sweep (default: from the params).')
flags.DEFINE_list('reorder', ['100', '250'], 'ScaNN reorder sweep.')
flags.DEFINE_string('export', '', 'An exported demo model (DIR/export) for the real corpus.')
flags.DEFINE_integer('real_n', 50_000, 'Demo scenes embedded as the real corpus.')
flags.DEFINE_integer('seed', 0, 'Data seed.')


def timed(fn, repeats):
  best, out = float('inf'), None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - t0)
  return out, best


def synthetic(n, dim, clusters, spread, num_queries, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, dim)).astype(np.float32)
  centres /= np.linalg.norm(centres, axis=1, keepdims=True)

  def draw(m):
    x = np.empty((m, dim), np.float32)
    for s in range(0, m, 100_000):  # Chunks keep the float64 temporaries small.
      c = rng.integers(0, clusters, min(100_000, m - s))
      x[s:s + len(c)] = centres[c] + spread * rng.standard_normal((len(c), dim), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)

  return draw(n), draw(num_queries)


def real_embeddings(export, n, num_queries, seed):
  import mmjax  # pylint: disable=import-outside-toplevel
  from mmjax.data import demo  # pylint: disable=import-outside-toplevel
  emb = mmjax.load_embedder(export)
  size = emb.config.image.image_size
  train = demo.DemoScenes('train', num_examples=n, image_size=size, seed=seed)
  corpus = []
  for s in range(0, n, 4096):
    images = np.stack([train[i]['image'] for i in range(s, min(n, s + 4096))])
    corpus.append(emb.embed_images(images))
  val = demo.DemoScenes('validation', num_examples=num_queries, image_size=size, seed=seed)
  queries = emb.embed_texts([val[i]['captions'][0] for i in range(num_queries)])
  return np.concatenate(corpus), queries


def numpy_exact(corpus, queries, k):
  """Exact top-k with NumPy's BLAS matmul and argpartition, in query chunks."""
  out = []
  for s in range(0, len(queries), 256):
    scores = queries[s:s + 256] @ corpus.T
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
    out.append(np.take_along_axis(part, order, 1))
  return np.concatenate(out)


def run_corpus(name, corpus, queries, k, rows):
  n, dim = corpus.shape
  logging.info('%s: %d x %d, %d queries.', name, n, dim, len(queries))
  ids, t = timed(lambda: numpy_exact(corpus, queries, k), FLAGS.repeats)
  truth = ids
  rows.append((name, 'exact (NumPy BLAS + argpartition)', '', 1.0, len(queries) / t, 0.0))
  ex = ExactSearch(corpus, block_size=16384, query_batch=min(1024, len(queries)))
  ex.search(queries[:1], k)  # Compile.
  (_, ids), t = timed(lambda: ex.search(queries, k), FLAGS.repeats)
  rows.append((name, 'exact (mmjax ExactSearch, JAX CPU)', '', recall_at_k(ids, truth),
               len(queries) / t, 0.0))
  exact_qps = rows[-2][4]

  t0 = time.perf_counter()
  index = ScannIndex.build(corpus, k=k, recall_queries=queries, exact=ex)
  build = time.perf_counter() - t0
  index.searcher.set_num_threads(FLAGS.threads)
  p = index.params
  leaves = ([int(x) for x in FLAGS.leaves] if FLAGS.leaves else
            sorted({max(1, p.num_leaves_to_search // 4), max(1, p.num_leaves_to_search // 2),
                    p.num_leaves_to_search, min(p.num_leaves, 2 * p.num_leaves_to_search)})
            if p.num_leaves else [0])
  for lv in leaves:
    for ro in (int(x) for x in FLAGS.reorder):
      (_, ids), t = timed(lambda lv=lv, ro=ro: index.search(
          queries, k, num_leaves_to_search=lv or None, reorder=ro), FLAGS.repeats)
      rows.append((name, 'ScaNN (tree + AH + reorder)',
                   f'leaves {p.num_leaves}, search {lv}, reorder {ro}',
                   recall_at_k(ids, truth), len(queries) / t, build))
  for kind in FLAGS.faiss:
    rows.extend(faiss_points(name, kind, corpus, queries, truth, k))
  return exact_qps, index.meta


def faiss_points(name, kind, corpus, queries, truth, k):
  import faiss  # pylint: disable=import-outside-toplevel
  faiss.omp_set_num_threads(FLAGS.threads)
  n, dim = corpus.shape
  t0 = time.perf_counter()
  points = []
  if kind == 'ivfpq':
    nlist = default_params(n, dim).num_leaves or 16
    index = faiss.index_factory(dim, f'IVF{nlist},PQ{dim // 2}x4fs,RFlat',
                                faiss.METRIC_INNER_PRODUCT)
    sample = corpus[np.random.default_rng(1).choice(n, min(n, 250_000), replace=False)]
    index.train(sample)
    index.add(corpus)
    build = time.perf_counter() - t0
    ivf = faiss.extract_index_ivf(index)
    for nprobe in sorted({max(1, nlist // 64), max(1, nlist // 32), max(1, nlist // 16),
                          max(1, nlist // 8)}):
      for k_factor in (10, 25):
        ivf.nprobe = nprobe
        index.k_factor = k_factor
        (_, ids), t = timed(lambda: index.search(queries, k), FLAGS.repeats)
        points.append((name, 'faiss IVF-PQ fast-scan + refine',
                       f'nlist {nlist}, nprobe {nprobe}, k_factor {k_factor}',
                       recall_at_k(ids, truth), len(queries) / t, build))
  elif kind == 'hnsw':
    index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 64
    index.add(corpus)
    build = time.perf_counter() - t0
    for ef in (16, 32, 64, 128):
      index.hnsw.efSearch = ef
      (_, ids), t = timed(lambda: index.search(queries, k), FLAGS.repeats)
      points.append((name, 'faiss HNSW32 (flat)', f'efConstruction 64, efSearch {ef}',
                     recall_at_k(ids, truth), len(queries) / t, build))
  else:
    raise app.UsageError(f'--faiss: unknown peer {kind!r} (ivfpq, hnsw).')
  logging.info('faiss %s: built in %.1f s.', kind, build)
  return points


def summary(rows, name, exact_qps, target):
  lines = []
  for method in dict.fromkeys(r[1] for r in rows if r[0] == name):
    ok = [r for r in rows if r[0] == name and r[1] == method and r[3] >= target]
    if ok:
      best = max(ok, key=lambda r: r[4])
      lines.append(f'- {name} / {method}: fastest at recall@{FLAGS.k} >= {target}: '
                   f'{best[4]:,.0f} QPS ({best[4] / exact_qps:.1f}x exact NumPy), recall '
                   f'{best[3]:.4f}, {best[2] or "-"}')
    else:
      top = max((r for r in rows if r[0] == name and r[1] == method), key=lambda r: r[3])
      lines.append(f'- {name} / {method}: no point reached recall@{FLAGS.k} >= {target} '
                   f'(best {top[3]:.4f} at {top[4]:,.0f} QPS)')
  return lines


def main(argv):
  del argv
  k = FLAGS.k
  rows, summaries, meta_lines = [], [], []
  load_before = tsb._loadavg()  # pylint: disable=protected-access
  t_start = time.perf_counter()
  corpora = []
  if FLAGS.n:
    corpora.append((f'synthetic {FLAGS.n:,} x {FLAGS.dim} ({FLAGS.clusters} clusters)',
                    lambda: synthetic(FLAGS.n, FLAGS.dim, FLAGS.clusters, FLAGS.spread,
                                      FLAGS.queries, FLAGS.seed)))
  if FLAGS.export:
    corpora.append((f'demo model: {FLAGS.real_n:,} image embeddings, text queries',
                    lambda: real_embeddings(FLAGS.export, FLAGS.real_n, FLAGS.queries,
                                            FLAGS.seed)))
  for name, make in corpora:
    corpus, queries = make()
    exact_qps, meta = run_corpus(name, corpus, queries, k, rows)
    summaries += summary(rows, name, exact_qps, FLAGS.target)
    meta_lines.append(f'- {name}: ScaNN default params {meta["params"]}, built in '
                      f'{meta["build_seconds"]:.1f} s, recall@{k} at build '
                      f'{meta[f"recall@{k}"]:.4f}')
    print('\n'.join(summaries[-(len(summaries)):]))
  table = ['| corpus | method | setting | recall@10 | QPS | build (s) |',
           '|---|---|---|---|---|---|']
  table += [f'| {r[0]} | {r[1]} | {r[2] or "-"} | {r[3]:.4f} | {r[4]:,.0f} | '
            f'{r[5]:.1f} |' for r in rows]
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  block = '\n'.join([
      '', f'## index: ScaNN vs exact vs faiss ({now})', '',
      f'- commit: `{tsb.git_revision()}`',
      f'- machine: {tsb.cpu_model()} ({os.cpu_count()} cores); {FLAGS.threads} threads for every '
      f'method; jax {jax.__version__} ({jax.device_count()} x {jax.devices()[0].platform}); '
      f'load average {load_before} -> {tsb._loadavg()}',  # pylint: disable=protected-access
      f'- command: `python bench/index.py {" ".join(sys.argv[1:])}`',
      f'- queries: {FLAGS.queries} per corpus, batch throughput (best of {FLAGS.repeats}); '
      f'whole run {time.perf_counter() - t_start:.0f} s',
      *( [f'- note: {FLAGS.note}'] if FLAGS.note else []),
      *meta_lines, '', *summaries, '', *table, ''])
  print(block)
  if FLAGS.append:
    with pathlib.Path(FLAGS.benchmarks_file).open('a') as f:
      f.write(block)


if __name__ == '__main__':
  app.run(main)
