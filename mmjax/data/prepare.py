r"""Ingestion: a manifest or a folder of captioned images or sounds -> sharded ArrayRecord files.

  python -m mmjax.data.prepare --manifest=pairs.jsonl --out=data/pairs
  python -m mmjax.data.prepare --image_dir=/usr/share/tuxpaint/stamps --out=data/tuxpaint
  python -m mmjax.data.prepare --audio_dir=/usr/share/tuxpaint/stamps --out=data/tuxpaint_audio

Inputs (see docs/data.md for worked examples):
- JSONL (one object a line) or CSV manifest. Fields: `image` (path, relative to the manifest's
  folder) or `query` (text-text pairs); `captions` (list; in CSV '|'-separated) or `caption`;
  optional `id`, `label`, `group`, `weight`, `neg_images` (paths), `neg_texts`.
- A folder of images with caption side files (`name.png` + `name.txt`, Tux Paint's layout): the
  non-empty lines of the side file that are not `xx.utf8=` translations are the captions
  (`name_mirror.png` without a side file of its own uses `name.txt`). Only files PIL decodes are
  scanned (png, jpg, jpeg, webp, bmp, gif): SVG stamps are not images here.
- A folder of audio files (wav, flac, ogg) with the same side files (`--audio_dir`; Tux Paint's
  `name_desc.ogg` spoken description also takes `name.txt`), or manifest rows with an `audio`
  path. Clips are checked (`mmjax.data.audio_io`: corrupt, truncated, silent, or a sample rate /
  length outside the `--audio_*` limits -> skipped and reported) and stored as mono FLAC at
  `--audio_sample_rate`.

Output in `--out`: `<name>-SSSSS-of-NNNNN.array_record` shards of `mmjax.data.records`,
`metadata.json` (counts, feature spec, source hash), `report.json` (every skipped row with its
reason) and `index.json` (per example: id, image SHA-256, dHash, caption keys; read by
`mmjax.data.filter`).

Images: the size in the header is checked against `--max_pixels` (default 64M px) before any
decode (`too large: WxH px > limit`); images whose longest side exceeds `--max_image_size`
(default 512) are stored downscaled, so training never decodes huge originals
(`mmjax.data.ingest_images`).

Shards are planned up front from the input order, written by worker processes under a temporary
name and renamed when complete, next to a `.done` marker holding the shard's report; a rerun after
a kill skips completed shards, so nothing is written twice and nothing is lost. One unreadable
file or bad caption is reported and skipped, never fatal. A worker killed by the OS (e.g. out of
memory) fails the run with the input it was processing named, and `incomplete.json` written in
place of `metadata.json`; `--skip_killed` then reports that input and goes on
(`mmjax.data.ingest_workers`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Any

import tqdm
from absl import flags
from array_record.python import array_record_module

from mmjax import command
from mmjax.data import audio_io, ingest_images, ingest_workers, records
from mmjax.data.ingest_rows import Options, Skip, make_example
from mmjax.data.manifests import (IMAGE_EXTENSIONS, read_manifest, read_side_captions,  # noqa: F401
                                  scan_audio_dir, scan_image_dir)
from mmjax.types import ConfigError


# ----------------------------------------------------------------------------- planning

def plan_hash(rows: list[dict[str, Any]], opts: Options) -> str:
  """SHA-256 of what will be written: every row and the options that change the bytes."""
  h = hashlib.sha256()
  h.update(json.dumps([opts.examples_per_shard, opts.max_image_size, opts.max_caption_chars,
                       opts.max_negatives, opts.max_pixels,
                       dataclasses.asdict(opts.audio)]).encode())
  for row in rows:
    h.update(json.dumps(row, sort_keys=True, default=str).encode())
  return h.hexdigest()


# ----------------------------------------------------------------------------- shards

def shard_path(opts: Options, shard: int, num_shards: int) -> pathlib.Path:
  return opts.out / f'{opts.name}-{shard:05d}-of-{num_shards:05d}.array_record'


def _marker(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + '.done')


def write_shard(task: tuple[int, int, list[dict[str, Any]], int, Options],
                ctx: ingest_workers.WorkerContext | None = None) -> dict[str, Any]:
  """Writes one shard (temp name, then rename, then marker); returns its counts."""
  shard, num_shards, rows, first_index, opts = task
  ctx = ctx or ingest_workers.WorkerContext()
  final = shard_path(opts, shard, num_shards)
  tmp = final.with_name(final.name + f'.tmp-{os.getpid()}')
  writer = array_record_module.ArrayRecordWriter(str(tmp), 'group_size:1')
  skipped, index = [], []
  for i, row in enumerate(rows):
    where = {k: row[k] for k in ('id', '_line', 'image', 'query') if k in row}
    line = f'line {row["_line"]}, ' if '_line' in row else ''
    ctx.doing(f'{first_index + i}\t{row.get("image") or row.get("id", "")}\t'
              f'(row {first_index + i}, {line}shard {shard})')
    try:
      if first_index + i in opts.skip_rows:
        raise Skip(KILLED_REASON)
      ex, entry = make_example(row, first_index + i, opts, ctx)
    except Skip as e:
      skipped.append({**where, 'reason': str(e)})
      continue
    except Exception as e:  # pylint: disable=broad-except  # never lose a shard to one row
      skipped.append({**where, 'reason': f'unexpected {type(e).__name__}: {e}'})
      continue
    writer.write(records.encode(ex))
    index.append(entry)
  writer.close()
  tmp.replace(final)
  report = {'shard': final.name, 'num_examples': len(index), 'skipped': skipped, 'index': index}
  marker = _marker(final)
  marker.with_suffix('.tmp').write_text(json.dumps(report))
  marker.with_suffix('.tmp').replace(marker)
  return {'shard': shard, 'done': len(rows)}


KILLED_REASON = ('worker killed: a worker process died while processing this input in an '
                 'earlier run (out of memory?); skipped by --skip_killed')
KILLED_FILE, INCOMPLETE_FILE = 'killed.json', 'incomplete.json'


def _check_plan(opts: Options, digest: str) -> None:
  plan_file = opts.out / 'plan.json'
  if plan_file.exists():
    old = json.loads(plan_file.read_text())
    if old['source_hash'] != digest or old['name'] != opts.name:
      raise ConfigError(f'{opts.out} holds an ingestion of other inputs or options '
                       f'(source hash {old["source_hash"][:12]} vs {digest[:12]}); use a new '
                       '--out or delete it.')
  else:
    plan_file.write_text(json.dumps({'source_hash': digest, 'name': opts.name}))


def killed_rows(out: pathlib.Path) -> frozenset[int]:
  """Rows whose processing killed a worker in an earlier run into `out` (for --skip_killed)."""
  path = out / KILLED_FILE
  return frozenset(k['row'] for k in json.loads(path.read_text())) if path.exists() else frozenset()


def _fail(opts: Options, e: ingest_workers.WorkerDied, done: int, total: int) -> SystemExit:
  """Records the input that killed a worker and returns the error that ends the run."""
  row, what, detail = (e.doing.split('\t') + ['', ''])[:3]
  if row.isdigit():
    path = opts.out / KILLED_FILE
    killed = json.loads(path.read_text()) if path.exists() else []
    killed.append({'row': int(row), 'input': what, 'exitcode': e.exitcode})
    path.write_text(json.dumps(killed, indent=1))
  else:
    what = e.doing
  msg = (f'Ingestion failed: worker {e.pid} {e.how} while processing {what} {detail}. {done} of '
         f'{total} shards are complete and kept in {opts.out}; metadata.json is not written '
         f'({INCOMPLETE_FILE} says why). Rerun the same command to retry it, add --skip_killed '
         'to report this input and go on, or lower --workers / --max_pixels / '
         '--max_pixels_in_flight to use less memory.')
  (opts.out / INCOMPLETE_FILE).write_text(json.dumps({'error': msg, 'input': what}, indent=1))
  return SystemExit(msg)


def prepare(rows: list[dict[str, Any]], problems: list[dict[str, Any]], opts: Options, *,
            workers: int = 1, source: str = '', progress: bool = True) -> dict[str, Any]:
  """Ingests `rows` into `opts.out` (resuming a previous run); returns the metadata."""
  opts.out.mkdir(parents=True, exist_ok=True)
  digest = plan_hash(rows, opts)
  _check_plan(opts, digest)
  n = opts.examples_per_shard
  num_shards = max(1, -(-len(rows) // n))
  tasks = [(s, num_shards, rows[s * n:(s + 1) * n], s * n, opts) for s in range(num_shards)]
  todo = [t for t in tasks if not _marker(shard_path(opts, t[0], num_shards)).exists()]
  for stale in opts.out.glob(f'{opts.name}-*.tmp-*'):  # Left by a killed run.
    stale.unlink()
  if todo:  # Until every shard is done, the directory must not look finished.
    (opts.out / 'metadata.json').unlink(missing_ok=True)
    (opts.out / INCOMPLETE_FILE).write_text(json.dumps({'error': 'ingestion in progress'}))
  bar = tqdm.tqdm(total=len(rows), initial=len(rows) - sum(len(t[2]) for t in todo),
                  unit='ex', disable=not progress, file=sys.stderr)
  started, worker_peaks = time.perf_counter(), []
  if workers > 1 and len(todo) > 1:
    try:
      for summary, rss_mb in ingest_workers.run(write_shard, todo, min(workers, len(todo)),
                                                max_pixels_in_flight=opts.max_pixels_in_flight):
        bar.update(summary['done'])
        worker_peaks.append(rss_mb)
    except ingest_workers.WorkerDied as e:
      bar.close()
      done = sum(_marker(shard_path(opts, s, num_shards)).exists() for s in range(num_shards))
      raise _fail(opts, e, done, num_shards) from None
  else:
    for t in todo:
      bar.update(write_shard(t)['done'])
  bar.close()
  run_stats = {'seconds': round(time.perf_counter() - started, 3), 'workers': workers,
               'shards_written': len(todo),
               'parent_peak_rss_mb': round(ingest_workers.peak_rss_mib(), 1),
               'worker_peak_rss_mb': round(max(worker_peaks, default=0.0), 1)}
  meta = finalise(opts, num_shards, problems, digest, source, run_stats)
  (opts.out / INCOMPLETE_FILE).unlink(missing_ok=True)
  return {**meta, 'last_run': run_stats}


def finalise(opts: Options, num_shards: int, problems: list[dict[str, Any]], digest: str,
             source: str, run_stats: dict[str, Any] | None = None) -> dict[str, Any]:
  reports = [json.loads(_marker(shard_path(opts, s, num_shards)).read_text())
             for s in range(num_shards)]
  skipped = problems + [s for r in reports for s in r['skipped']]
  index = [e for r in reports for e in r['index']]
  reasons: dict[str, int] = {}
  for s in skipped:
    kind = s['reason'].split(':')[0]
    reasons[kind] = reasons.get(kind, 0) + 1
  meta = {
      'format': records.FORMAT, 'source': source, 'source_hash': digest,
      'num_examples': len(index), 'num_skipped': len(skipped), 'skipped_by_reason': reasons,
      'num_captions': sum(len(e['captions']) for e in index),
      'num_images': sum('sha256' in e for e in index),
      'num_audio': sum('audio_sha256' in e for e in index),
      'num_text_pairs': sum('query' in e for e in index),
      'num_documents': sum('num_images' in e for e in index),
      'shards': [r['shard'] for r in reports],
      'shard_lengths': [r['num_examples'] for r in reports],
      'num_resized': sum('original_size' in e for e in index),
      'options': {'max_pixels': opts.max_pixels, 'max_image_size': opts.max_image_size,
                  'max_pixels_in_flight': opts.max_pixels_in_flight,
                  'audio': dataclasses.asdict(opts.audio)},
      'feature_spec': records.FEATURE_SPEC,
  }
  report = {'skipped': skipped, 'last_run': run_stats or {}}
  for name, obj in (('report.json', report), ('index.json', index), ('metadata.json', meta)):
    tmp = opts.out / (name + '.tmp')
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(opts.out / name)
  return meta


def read_inputs(args) -> tuple[tuple[list, list], str]:
  if sum(map(bool, (args.manifest, args.image_dir, args.audio_dir))) != 1:
    raise ConfigError('Give exactly one of --manifest, --image_dir or --audio_dir.')
  if args.manifest:
    path = pathlib.Path(args.manifest)
    if not path.is_file():
      raise ConfigError(f'--manifest={path} does not exist.')
    return read_manifest(path), str(path)
  flag = 'image_dir' if args.image_dir else 'audio_dir'
  path = pathlib.Path(getattr(args, flag))
  if not path.is_dir():
    raise ConfigError(f'--{flag}={path} is not a directory.')
  return (scan_image_dir if args.image_dir else scan_audio_dir)(path), str(path)


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m mmjax.data.prepare`."""
  flags.DEFINE_string('manifest', None, 'JSONL or CSV manifest.', flag_values=fv)
  flags.DEFINE_string('image_dir', None, 'Folder of images with caption side files (name.txt).',
                      flag_values=fv)
  flags.DEFINE_string('audio_dir', None, 'Folder of audio files (wav, flac, ogg) with caption '
                      'side files (name.txt; Tux Paint name_desc.ogg too).', flag_values=fv)
  d = audio_io.AudioLimits()
  flags.DEFINE_integer('audio_sample_rate', d.sample_rate, 'Clips are stored resampled to this '
                       'rate (Hz), mono FLAC.', flag_values=fv)
  flags.DEFINE_integer('audio_min_rate', d.min_rate, 'Files with a lower sample rate are skipped.',
                       flag_values=fv)
  flags.DEFINE_integer('audio_max_rate', d.max_rate, 'Files with a higher sample rate are '
                       'skipped.', flag_values=fv)
  flags.DEFINE_float('audio_min_seconds', d.min_seconds, 'Shorter clips are skipped.',
                     flag_values=fv)
  flags.DEFINE_float('audio_max_seconds', d.max_seconds, 'Longer clips are skipped.',
                     flag_values=fv)
  flags.DEFINE_float('audio_crop_seconds', d.crop_seconds, 'Clips are stored cut to this length; '
                     '0: whole.', flag_values=fv)
  flags.DEFINE_string('out', None, 'Output directory (resumed if it exists).', flag_values=fv)
  flags.DEFINE_string('name', 'data', 'Shard file prefix.', flag_values=fv)
  flags.DEFINE_integer('examples_per_shard', 1000, 'Examples per shard.', flag_values=fv)
  flags.DEFINE_integer('workers', os.cpu_count() or 1, 'Worker processes.', flag_values=fv)
  flags.DEFINE_integer('max_image_size', ingest_images.DEFAULT_MAX_IMAGE_SIZE,
                       'Longest side of stored images: larger ones are downscaled (aspect kept; '
                       'JPEG stays JPEG, others become PNG); 0 keeps every original file.',
                       flag_values=fv)
  flags.DEFINE_integer('max_pixels', ingest_images.DEFAULT_MAX_PIXELS,
                       'Images whose header says more pixels (W*H) are skipped as `too large` '
                       'before any decode; 0: no limit (and no Pillow bomb check).', flag_values=fv)
  flags.DEFINE_integer('max_pixels_in_flight', 0,
                       'Pixels decoded at once by all workers together (bounds memory whatever '
                       '--workers); 0: 2 * --max_pixels.', flag_values=fv)
  flags.DEFINE_boolean('skip_killed', False, 'Report (and skip) inputs that killed a worker in '
                       'an earlier run into --out.', flag_values=fv)
  flags.DEFINE_integer('max_negatives', 16, 'Hard negatives kept per example.', flag_values=fv)
  flags.DEFINE_boolean('no_progress', False, 'No progress bar.', flag_values=fv)
  flags.mark_flag_as_required('out', flag_values=fv)


def _check(args) -> None:
  for key in ('examples_per_shard', 'workers'):
    if getattr(args, key) < 1:
      raise ConfigError(f'--{key}={getattr(args, key)} must be >= 1.')
  for key in ('max_image_size', 'max_pixels', 'max_pixels_in_flight', 'audio_crop_seconds'):
    if getattr(args, key) < 0:
      raise ConfigError(f'--{key}={getattr(args, key)} must be >= 0.')
  if not 0 < args.audio_min_rate <= args.audio_sample_rate <= args.audio_max_rate:
    raise ConfigError(f'Need 0 < --audio_min_rate={args.audio_min_rate} <= --audio_sample_rate='
                      f'{args.audio_sample_rate} <= --audio_max_rate={args.audio_max_rate}.')
  if not 0 <= args.audio_min_seconds < args.audio_max_seconds:
    raise ConfigError(f'Need 0 <= --audio_min_seconds={args.audio_min_seconds} < '
                      f'--audio_max_seconds={args.audio_max_seconds}.')


def _prepare(args, positional: list[str]) -> dict[str, Any]:
  """The command: reads the inputs, ingests them, prints a one-line summary."""
  del positional
  _check(args)
  (rows, problems), source = read_inputs(args)
  out = pathlib.Path(args.out)
  opts = Options(out=out, name=args.name, examples_per_shard=args.examples_per_shard,
                 max_image_size=args.max_image_size, max_negatives=args.max_negatives,
                 max_pixels=args.max_pixels,
                 max_pixels_in_flight=args.max_pixels_in_flight or 2 * args.max_pixels,
                 skip_rows=killed_rows(out) if args.skip_killed else frozenset(),
                 audio=audio_io.AudioLimits(args.audio_sample_rate, args.audio_min_rate,
                                            args.audio_max_rate, args.audio_min_seconds,
                                            args.audio_max_seconds, args.audio_crop_seconds))
  meta = prepare(rows, problems, opts, workers=args.workers, source=source,
                 progress=not args.no_progress)
  run = meta['last_run']
  workers = (f' + {run["worker_peak_rss_mb"]:.0f} MiB per worker'
             if run['worker_peak_rss_mb'] else ' (no worker processes)')
  print(f'{meta["num_examples"]} examples in {len(meta["shards"])} shards under {opts.out} '
        f'({meta["num_resized"]} downscaled); {meta["num_skipped"]} skipped '
        f'{meta["skipped_by_reason"]} (see report.json). {run["seconds"]:.1f} s, peak RSS '
        f'{run["parent_peak_rss_mb"]:.0f} MiB main{workers}.')
  return meta


# main(argv) -> metadata.json's dict; `python -m mmjax.data.prepare` runs main.main().
main = command.Command(define_flags, _prepare)


if __name__ == '__main__':
  main.main()
