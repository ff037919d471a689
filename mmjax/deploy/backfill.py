"""Backfill: embed a corpus with a serving export into a versioned embedding store.

  python -m mmjax.deploy.backfill --model=runs/demo/serving --data=demo:5000 --out=runs/store \
      [--modality=image] [--shard_size=1024] [--dtype=float32]

writes `OUT/<model version>/` (the format: `mmjax.deploy.store`). A run embeds only what the
store lacks: items whose id is new or whose content hash changed; ids gone from the corpus are
recorded as deleted. It is resumable: killed at any point (SIGKILL included), the same command
continues the unfinished generation, redoing only shards that were not renamed into place, and
ends with the store an uninterrupted run writes (same files, same bytes).

Bad inputs (an unreadable or truncated image, a decompression bomb, an empty or over-long text)
are skipped, counted and listed by id with the reason in the manifest and the generation's
report; they never stop the run. A progress bar shows items/s and the ETA.

Multi-process (the `jax.distributed` start-up of training, `mmjax.parallel.distributed`): every
process embeds the shards `s` with `s % process_count == process_index` on its local devices;
process 0 writes the plan and, after every process has finished, the manifest.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import io
import json
import pathlib
import time
import warnings
from typing import Any, Callable

import jax
import numpy as np
import tqdm
from PIL import Image

from mmjax.data import images as images_lib
from mmjax.deploy import corpus as corpus_lib, serving, store as store_lib

MAX_PIXELS = 40_000_000  # A larger image is refused unread: a decompression bomb.
MAX_TEXT_CHARS = 10_000


class BadInput(ValueError):
  """An item that cannot be embedded; its message is the reason the report gives."""


def prepare_image(raw: Any, view: images_lib.View, max_pixels: int) -> np.ndarray:
  if isinstance(raw, (bytes, bytearray)):
    with warnings.catch_warnings():
      warnings.simplefilter('error', Image.DecompressionBombWarning)
      try:
        with Image.open(io.BytesIO(raw)) as im:
          w, h = im.size
      except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadInput(f'decompression bomb: {e}') from e
      if w * h > max_pixels:
        raise BadInput(f'decompression bomb: {w}x{h} = {w * h} pixels > {max_pixels}')
      return images_lib.load(raw, view)
  return images_lib.load(np.asarray(raw), view)


def prepare_text(raw: Any, max_chars: int) -> str:
  if not isinstance(raw, str):
    raise BadInput(f'text is {type(raw).__name__}, not a string')
  if not raw.strip():
    raise BadInput('empty text')
  if len(raw) > max_chars:
    raise BadInput(f'over-long text: {len(raw)} characters > {max_chars}')
  return raw


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def _plan(directory: pathlib.Path, manifest: dict[str, Any] | None, corpus, settings) -> dict:
  """The generation to run: an unfinished one (same corpus and settings) or a new one."""
  gen = len(manifest['generations']) if manifest else 0
  plan_file = directory / 'plans' / f'g{gen:04d}.json'
  if plan_file.is_file():
    plan = json.loads(plan_file.read_text())
    if plan['corpus_fingerprint'] != corpus.fingerprint() or plan['settings'] != settings:
      raise store_lib.StoreError(
          f'{plan_file}: an unfinished backfill of corpus {plan["corpus_spec"]!r} (fingerprint '
          f'{plan["corpus_fingerprint"]}, settings {plan["settings"]}) is pending, but this run '
          f'has corpus {corpus.spec!r} ({corpus.fingerprint()}, {settings}). Rerun the pending '
          'one to finish it, or delete that plan file and its shards/g'
          f'{gen:04d}-* to drop it.')
    return plan
  live, bad = {}, {}
  if manifest:
    live, bad, _ = store_lib.replay(directory, manifest, verify=False, vectors=False)
  present = {item_id for item_id, _ in corpus.keys}
  todo = [[i, item_id, h] for i, (item_id, h) in enumerate(corpus.keys)
          if live.get(item_id, ('',))[0] != h and bad.get(item_id, ('',))[0] != h]
  deleted = sorted((set(live) | set(bad)) - present)
  if manifest and not todo and not deleted:
    return None  # Up to date: no new generation.
  return {'gen': gen, 'corpus_spec': corpus.spec, 'corpus_fingerprint': corpus.fingerprint(),
          'settings': settings, 'todo': todo, 'deleted': deleted,
          'unchanged': len(corpus.keys) - len(todo)}


def backfill(model: str | pathlib.Path | serving.ServingModel, data: str,
             out: str | pathlib.Path, *, modality: str = 'image', shard_size: int = 1024,
             dtype: str = 'float32', batch_size: int = 256, max_pixels: int = MAX_PIXELS,
             max_text_chars: int = MAX_TEXT_CHARS, workers: int = 4, progress: bool = True,
             after_shard: Callable[[int], None] | None = None) -> dict[str, Any]:
  """Embeds what the store at `out` lacks of corpus `data`; returns the generation's report.

  `after_shard(index)` runs after each shard is committed (tests use it to stop a run).
  """
  if shard_size < 1 or batch_size < 1:
    raise ValueError(f'shard_size={shard_size} and batch_size={batch_size} must be >= 1.')
  if dtype not in store_lib.DTYPES:
    raise ValueError(f'--dtype={dtype!r} is not one of {store_lib.DTYPES}.')
  if not isinstance(model, serving.ServingModel):
    model = serving.load(model, batch_size=batch_size, devices=jax.local_devices())
  corpus = corpus_lib.open_corpus(data, modality=modality, image_size=model.spec['image_size'])
  settings = {'modality': modality, 'shard_size': shard_size, 'dtype': dtype}
  directory, manifest = _open_store(out, model, settings)
  plan = _plan(directory, manifest, corpus, settings)
  if plan is None:
    return {'model_version': model.version, 'store': str(directory), 'up_to_date': True,
            'corpus': corpus.spec, 'corpus_items': len(corpus.keys), 'to_embed': 0,
            'count': manifest['count'], 'bad': manifest['bad']}
  gen, todo = plan['gen'], plan['todo']
  rank, procs = jax.process_index(), jax.process_count()
  shards_dir = _write_plan(directory, plan, rank)
  chunks = [todo[s:s + shard_size] for s in range(0, len(todo), shard_size)]
  share = [s for s in range(len(chunks)) if s % procs == rank]  # This process's shards,
  mine = [s for s in share if not (shards_dir / store_lib.shard_name(gen, s)).is_file()]  # to do.
  prepare = functools.partial(_prepare_entry, corpus, modality, max_pixels, max_text_chars,
                              images_lib.View(model.spec['image_size'], model.spec['resize'],
                                              tuple(model.spec['background'])))
  bar = tqdm.tqdm(total=sum(len(chunks[s]) for s in share),
                  initial=sum(len(chunks[s]) for s in share) - sum(len(chunks[s]) for s in mine),
                  unit='item', desc=f'backfill {model.version}',
                  disable=not progress or rank != 0, dynamic_ncols=True)
  wall, embed_s = _embed_shards(model, modality, dtype, chunks, mine, gen, shards_dir, prepare,
                                workers, bar, after_shard)
  _barrier('mmjax.deploy.backfill.shards_written')
  report = {'model_version': model.version, 'generation': gen, 'store': str(directory),
            'corpus': corpus.spec, 'corpus_items': len(corpus.keys), 'to_embed': len(todo),
            'unchanged': plan['unchanged'], 'deleted': len(plan['deleted']),
            'shards': len(chunks), 'process': rank, 'processes': procs,
            'items_embedded_here': sum(len(chunks[s]) for s in mine), 'wall_seconds': wall,
            'embed_seconds': embed_s, 'device_busy_fraction': embed_s / wall if wall else 0.0}
  report['items_per_second'] = report['items_embedded_here'] / wall if wall else 0.0
  if rank == 0:
    report.update(_commit(directory, manifest, plan, len(chunks), model, corpus))
    (directory / 'reports').mkdir(exist_ok=True)
    (directory / 'reports' / f'g{gen:04d}.json').write_text(
        json.dumps(report, indent=1, sort_keys=True))
  _barrier('mmjax.deploy.backfill.committed')
  return report


def _open_store(out, model: serving.ServingModel, settings: dict) -> tuple[pathlib.Path, Any]:
  """(the version directory under `out`, its manifest or None); refuses another model version
  or a store of another modality/dtype."""
  out = pathlib.Path(out).absolute()
  if (out / store_lib.MANIFEST).is_file():  # A version directory was given.
    directory = store_lib.version_dir(out)
    store_lib.check_same_version(f'The store {directory}', store_lib.read_manifest(
        directory)['model_version'], f'the model {model.path}', model.version)
  else:
    directory = out / model.version
  manifest = store_lib.read_manifest(directory) if (directory / store_lib.MANIFEST).is_file() \
      else None
  if manifest:
    for key in ('modality', 'dtype'):
      if manifest[key] != settings[key]:
        raise store_lib.StoreError(f'{directory} holds {key}={manifest[key]!r}; this run asks '
                                   f'--{key}={settings[key]!r}. Backfill into another store.')
  return directory, manifest


def _write_plan(directory: pathlib.Path, plan: dict, rank: int) -> pathlib.Path:
  """Process 0 writes the generation's plan (once: a resumed run finds it); returns shards/."""
  _barrier('mmjax.deploy.backfill.plan_read')
  shards_dir = directory / 'shards'
  if rank == 0:
    (directory / 'plans').mkdir(parents=True, exist_ok=True)
    shards_dir.mkdir(exist_ok=True)
    plan_file = directory / 'plans' / f'g{plan["gen"]:04d}.json'
    if not plan_file.is_file():
      store_lib.write_json(plan_file, plan)
  _barrier('mmjax.deploy.backfill.plan_written')
  return shards_dir


def _prepare_entry(corpus, modality: str, max_pixels: int, max_text_chars: int,
                   view: images_lib.View, entry) -> tuple[Any, str | None]:
  """(model input, None) or (None, the reason the item is bad): a failure is that item's."""
  index, _, _ = entry
  try:
    raw = corpus.load(index)
    if modality == 'image':
      return prepare_image(raw, view, max_pixels), None
    return prepare_text(raw, max_text_chars), None
  except Exception as e:  # pylint: disable=broad-except  (any failure is that item's)
    reason = str(e) if isinstance(e, BadInput) else f'{type(e).__name__}: {e}'
    return None, reason or type(e).__name__


def _embed_shards(model, modality, dtype, chunks, mine, gen, shards_dir, prepare, workers, bar,
                  after_shard) -> tuple[float, float]:
  """Embeds and writes this process's missing shards (decoding two shards ahead of the device);
  returns (wall seconds, seconds in the model)."""
  if mine:  # Compile before the clock starts: the report measures the steady state.
    size = model.spec['image_size']
    model.embed(modality, np.zeros((1, size, size, 3), np.uint8) if modality == 'image' else ['a'])
  t0, embed_s = time.perf_counter(), 0.0
  with concurrent.futures.ThreadPoolExecutor(max(1, workers)) as pool, \
      concurrent.futures.ThreadPoolExecutor(1) as ahead:
    queue = collections.deque()

    def submit(k):
      if k < len(mine):
        queue.append(ahead.submit(lambda s: list(pool.map(prepare, chunks[s])), mine[k]))

    submit(0)
    submit(1)
    for k, s in enumerate(mine):
      prepared = queue.popleft().result()
      submit(k + 2)
      seconds, num_bad = _write_shard(model, modality, dtype, chunks[s], prepared,
                                      shards_dir / store_lib.shard_name(gen, s))
      embed_s += seconds
      bar.update(len(chunks[s]))
      bar.set_postfix(bad=num_bad)
      if after_shard is not None:
        after_shard(s)
  bar.close()
  return time.perf_counter() - t0, embed_s


def _write_shard(model, modality: str, dtype: str, chunk, prepared,
                 path: pathlib.Path) -> tuple[float, int]:
  """Embeds one shard's good items and writes them with the bad ones' reasons; returns (the
  seconds spent in the model, the number of bad items)."""
  good = [i for i, (_, reason) in enumerate(prepared) if reason is None]
  bad = [i for i, (_, reason) in enumerate(prepared) if reason is not None]
  t = time.perf_counter()
  if good:
    inputs = [prepared[i][0] for i in good]
    vecs = model.embed(modality, np.stack(inputs) if modality == 'image' else inputs)
  else:
    vecs = np.zeros((0, model.embed_dim), np.float32)
  seconds = time.perf_counter() - t
  store_lib.write_shard(path, {
      'ids': np.asarray([chunk[i][1] for i in good], dtype=str).reshape(-1),
      'hashes': np.asarray([chunk[i][2] for i in good], dtype=str).reshape(-1),
      'bad_ids': np.asarray([chunk[i][1] for i in bad], dtype=str).reshape(-1),
      'bad_hashes': np.asarray([chunk[i][2] for i in bad], dtype=str).reshape(-1),
      'bad_reasons': np.asarray([prepared[i][1] for i in bad], dtype=str).reshape(-1),
      'model_version': np.asarray(model.version),
      **store_lib.quantize(vecs, dtype)})
  return seconds, len(bad)


def _commit(directory: pathlib.Path, manifest, plan, num_shards: int, model, corpus) -> dict:
  """Replaces the manifest with one that adds generation `plan['gen']`: the last write."""
  gen = plan['gen']
  entries = []
  for s in range(num_shards):
    path = directory / 'shards' / store_lib.shard_name(gen, s)
    if not path.is_file():
      raise store_lib.StoreError(f'{path} was not written by any process: rerun the backfill.')
    shard = store_lib.read_shard(path)
    entries.append({'file': path.name, 'rows': int(len(shard['ids'])),
                    'bad': int(len(shard['bad_ids'])), 'sha256': serving.sha256(path),
                    'bytes': path.stat().st_size})
  new = dict(manifest) if manifest else {
      'format': store_lib.FORMAT, 'model_version': model.version,
      'model': {**model.info['version'], 'path': str(model.path)},
      'modality': plan['settings']['modality'], 'dtype': plan['settings']['dtype'],
      'dim': model.embed_dim, 'preprocessing': model.spec, 'generations': []}
  new['generations'] = [*new['generations'], {
      'gen': gen, 'corpus_spec': plan['corpus_spec'],
      'corpus_fingerprint': plan['corpus_fingerprint'], 'shard_size':
      plan['settings']['shard_size'], 'shards': entries, 'deleted': plan['deleted'],
      'embedded': sum(e['rows'] for e in entries), 'bad': sum(e['bad'] for e in entries)}]
  new['corpus'] = {'spec': corpus.spec, 'fingerprint': corpus.fingerprint(),
                   'items': len(corpus.keys)}
  live, bad, _ = store_lib.replay(directory, new, verify=False, vectors=False)
  new['count'] = len(live)
  new['bad'] = [{'id': k, 'reason': v[1]} for k, v in sorted(bad.items())]
  store_lib.write_json(directory / store_lib.MANIFEST, new)
  return {'count': new['count'], 'bad': new['bad'],
          'embedded': new['generations'][-1]['embedded']}


if __name__ == '__main__':  # The command lives in the CLI layer (mmjax.cli.deploy_backfill).
  import runpy
  runpy.run_module('mmjax.cli.deploy_backfill', run_name='__main__')
