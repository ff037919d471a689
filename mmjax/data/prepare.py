r"""Ingestion: a manifest or a folder of captioned images -> sharded ArrayRecord files.

  python -m mmjax.data.prepare --manifest=pairs.jsonl --out=data/pairs
  python -m mmjax.data.prepare --image_dir=/usr/share/tuxpaint/stamps --out=data/tuxpaint

Inputs (see docs/data.md for worked examples):
- JSONL (one object a line) or CSV manifest. Fields: `image` (path, relative to the manifest's
  folder) or `query` (text-text pairs); `captions` (list; in CSV '|'-separated) or `caption`;
  optional `id`, `label`, `group`, `weight`, `neg_images` (paths), `neg_texts`.
- A folder of images with caption side files (`name.png` + `name.txt`, Tux Paint's layout): the
  non-empty lines of the side file that are not `xx.utf8=` translations are the captions
  (`name_mirror.png` without a side file of its own uses `name.txt`). Only files PIL decodes are
  scanned (png, jpg, jpeg, webp, bmp, gif): SVG stamps are not images here.

Output in `--out`: `<name>-SSSSS-of-NNNNN.array_record` shards of `mmjax.data.records`,
`metadata.json` (counts, feature spec, source hash), `report.json` (every skipped row with its
reason) and `index.json` (per example: id, image SHA-256, dHash, caption keys; read by
`mmjax.data.filter`).

Shards are planned up front from the input order, written by worker processes under a temporary
name and renamed when complete, next to a `.done` marker holding the shard's report; a rerun after
a kill skips completed shards, so nothing is written twice and nothing is lost. One unreadable
file or bad caption is reported and skipped, never fatal.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import re
import sys
from typing import Any

import tqdm
from array_record.python import array_record_module
from PIL import Image

from mmjax.data import records

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif')
# Tux Paint translations: `fr.utf8=Un lori.`, `pt_BR.utf8=...`, `ca@valencia.utf8=...`.
_TRANSLATION = re.compile(r'^[A-Za-z]+([_@][A-Za-z]+)*(\.[\w-]+)?=')
LIST_FIELDS = ('captions', 'neg_images', 'neg_texts')


@dataclasses.dataclass(frozen=True)
class Options:
  out: pathlib.Path
  name: str = 'data'
  examples_per_shard: int = 1000
  max_image_size: int = 0  # Longest side in pixels; 0 keeps the original file bytes.
  max_caption_chars: int = 2000
  max_negatives: int = 16


# ----------------------------------------------------------------------------- planning

def read_manifest(path: pathlib.Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(rows, problems): rows of a JSONL or CSV manifest; unparsable lines become problems."""
  rows, problems = [], []
  base = path.parent
  if path.suffix.lower() == '.csv':
    with open(path, newline='', encoding='utf-8') as f:
      for n, row in enumerate(csv.DictReader(f), start=2):
        row = {k: v for k, v in row.items() if k and v not in (None, '')}
        for k in LIST_FIELDS:
          if k in row:
            row[k] = [x for x in row[k].split('|') if x]
        rows.append({**row, '_line': n})
  else:
    with open(path, encoding='utf-8') as f:
      for n, line in enumerate(f, start=1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
          if not isinstance(row, dict):
            raise ValueError('not a JSON object')
        except ValueError as e:
          problems.append({'line': n, 'reason': f'bad JSON: {e}'})
          continue
        rows.append({**row, '_line': n})
  for row in rows:
    for k in ('image', 'neg_images'):
      if isinstance(row.get(k), str):
        row[k] = str(base / row[k])
      elif isinstance(row.get(k), list):
        row[k] = [str(base / p) for p in row[k] if isinstance(p, str)]
  return rows, problems


def read_side_captions(path: pathlib.Path) -> list[str]:
  """Captions of a side file: its non-empty lines that are not `xx.utf8=` translations."""
  text = path.read_bytes().decode('utf-8', errors='replace')
  return [ln for ln in text.splitlines() if ln.strip() and not _TRANSLATION.match(ln)]


def scan_image_dir(root: pathlib.Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """(rows, problems) for every image under `root` with a caption side file, in path order."""
  rows, problems = [], []
  for path in sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS):
    side = path.with_suffix('.txt')
    if not side.is_file() and path.stem.endswith('_mirror'):  # Tux Paint's mirrored variant.
      side = path.with_name(path.stem[:-len('_mirror')] + '.txt')
    rel = str(path.relative_to(root))
    if not side.is_file():
      problems.append({'id': rel, 'reason': 'no caption side file'})
      continue
    try:
      rows.append({'id': rel, 'image': str(path), 'captions': read_side_captions(side)})
    except OSError as e:
      problems.append({'id': rel, 'reason': f'unreadable caption file: {e}'})
  return rows, problems


def plan_hash(rows: list[dict[str, Any]], opts: Options) -> str:
  """SHA-256 of what will be written: every row and the options that change the bytes."""
  h = hashlib.sha256()
  h.update(json.dumps([opts.examples_per_shard, opts.max_image_size, opts.max_caption_chars,
                       opts.max_negatives]).encode())
  for row in rows:
    h.update(json.dumps(row, sort_keys=True, default=str).encode())
  return h.hexdigest()


# ----------------------------------------------------------------------------- one example

class Skip(Exception):
  """This example cannot be ingested; the message is the reason in the report."""


def _read_image(path: str, opts: Options) -> tuple[bytes, Any]:
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise Skip(f'unreadable image: {e.strerror or e}') from e
  try:
    pixels = records.decode_image(data)
  except Exception as e:  # pylint: disable=broad-except  # PIL raises many types on bad files
    raise Skip(f'corrupt image: {type(e).__name__}: {e}') from e
  if opts.max_image_size and max(pixels.shape[:2]) > opts.max_image_size:
    im = Image.fromarray(pixels)
    im.thumbnail((opts.max_image_size, opts.max_image_size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format='PNG')
    data = buf.getvalue()
    pixels = records.decode_image(data)
  return data, pixels


def _texts(value: Any, field: str, opts: Options) -> list[str]:
  if isinstance(value, str):
    value = [value]
  if not isinstance(value, list):
    raise Skip(f'bad {field}: expected a string or a list of strings, got {type(value).__name__}')
  out = []
  for text in value:
    if not isinstance(text, str):
      raise Skip(f'bad {field}: {text!r} is not a string')
    text = records.normalise_caption(text)
    if '\ufffd' in text:
      raise Skip(f'bad {field}: not valid UTF-8: {text[:80]!r}')
    if text:
      out.append(text[:opts.max_caption_chars])
  return out


def make_example(row: dict[str, Any], index: int, opts: Options) -> tuple[dict[str, Any], dict]:
  """(record, index entry) of one manifest row; raises Skip with the reason."""
  if 'segments' in row:
    return _document(row, index, opts)
  captions = _texts(row.get('captions', row.get('caption', row.get('text', []))), 'captions', opts)
  if not captions:
    raise Skip('bad captions: no non-empty caption')
  ex: dict[str, Any] = {'id': str(row.get('id', index)), 'captions': captions}
  entry: dict[str, Any] = {'id': ex['id'], 'captions': [records.caption_key(c) for c in captions]}
  if 'image' in row:
    if not isinstance(row['image'], str):
      raise Skip(f'bad image field: {row["image"]!r}')
    data, pixels = _read_image(row['image'], opts)
    ex['image'] = data
    entry['sha256'] = hashlib.sha256(pixels.tobytes()).hexdigest()
    entry['dhash'] = records.dhash(pixels)
  elif 'query' in row:
    query = _texts(row['query'], 'query', opts)
    if len(query) != 1:
      raise Skip('bad query: expected one non-empty string')
    ex['query'] = query[0]
    entry['query'] = records.caption_key(query[0])
  else:
    raise Skip('row has neither `image` nor `query`')
  try:
    for key, cast in (('label', int), ('group', str), ('weight', float)):
      if key in row:
        ex[key] = cast(row[key])
  except (TypeError, ValueError) as e:
    raise Skip(f'bad {key}: {row[key]!r} ({e})') from e
  if 'weight' in ex and not ex['weight'] >= 0:
    raise Skip(f'bad weight: {ex["weight"]} (must be >= 0)')
  entry['group'] = ex.get('group', '')
  negs = []
  for path in (row.get('neg_images') or [])[:opts.max_negatives]:
    try:
      negs.append(_read_image(path, opts)[0])
    except Skip:  # A bad negative only loses that negative.
      entry['bad_negatives'] = entry.get('bad_negatives', 0) + 1
  if negs:
    ex['neg_images'] = negs
  if row.get('neg_texts'):
    ex['neg_texts'] = _texts(row['neg_texts'], 'neg_texts', opts)[:opts.max_negatives]
  return ex, entry


def _document(row: dict[str, Any], index: int, opts: Options) -> tuple[dict[str, Any], dict]:
  """An interleaved document: its segments in order, images as encoded bytes."""
  segments, texts = [], []
  if not isinstance(row['segments'], list):
    raise Skip('bad segments: expected a list')
  for seg in row['segments']:
    if isinstance(seg, dict) and isinstance(seg.get('image'), str):
      segments.append({'image': _read_image(seg['image'], opts)[0]})
    elif isinstance(seg, dict) and 'text' in seg:
      text = _texts(seg['text'], 'segment text', opts)
      if text:
        segments.append({'text': text[0]})
        texts.append(text[0])
    else:
      raise Skip(f'bad segment: {str(seg)[:80]!r}')
  if not texts:
    raise Skip('bad segments: no text segment')
  ex = {'id': str(row.get('id', index)), 'segments': segments, 'captions': texts}
  return ex, {'id': ex['id'], 'captions': [records.caption_key(t) for t in texts],
              'num_images': len(segments) - len(texts), 'group': ''}


# ----------------------------------------------------------------------------- shards

def shard_path(opts: Options, shard: int, num_shards: int) -> pathlib.Path:
  return opts.out / f'{opts.name}-{shard:05d}-of-{num_shards:05d}.array_record'


def _marker(path: pathlib.Path) -> pathlib.Path:
  return path.with_name(path.name + '.done')


def write_shard(args: tuple[int, int, list[dict[str, Any]], int, Options]) -> dict[str, Any]:
  """Writes one shard (temp name, then rename, then marker); returns its report."""
  shard, num_shards, rows, first_index, opts = args
  final = shard_path(opts, shard, num_shards)
  tmp = final.with_name(final.name + f'.tmp-{os.getpid()}')
  writer = array_record_module.ArrayRecordWriter(str(tmp), 'group_size:1')
  skipped, index = [], []
  for i, row in enumerate(rows):
    where = {k: row[k] for k in ('id', '_line', 'image', 'query') if k in row}
    try:
      ex, entry = make_example(row, first_index + i, opts)
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
  return report


def prepare(rows: list[dict[str, Any]], problems: list[dict[str, Any]], opts: Options, *,
            workers: int = 1, source: str = '', progress: bool = True) -> dict[str, Any]:
  """Ingests `rows` into `opts.out` (resuming a previous run); returns the metadata."""
  opts.out.mkdir(parents=True, exist_ok=True)
  digest = plan_hash(rows, opts)
  plan_file = opts.out / 'plan.json'
  if plan_file.exists():
    old = json.loads(plan_file.read_text())
    if old['source_hash'] != digest or old['name'] != opts.name:
      raise SystemExit(f'{opts.out} holds an ingestion of other inputs or options '
                       f'(source hash {old["source_hash"][:12]} vs {digest[:12]}); use a new '
                       '--out or delete it.')
  else:
    plan_file.write_text(json.dumps({'source_hash': digest, 'name': opts.name}))
  n = opts.examples_per_shard
  num_shards = max(1, -(-len(rows) // n))
  tasks = [(s, num_shards, rows[s * n:(s + 1) * n], s * n, opts) for s in range(num_shards)]
  todo = [t for t in tasks if not _marker(shard_path(opts, t[0], num_shards)).exists()]
  for stale in opts.out.glob(f'{opts.name}-*.tmp-*'):  # Left by a killed run.
    stale.unlink()
  bar = tqdm.tqdm(total=len(rows), initial=len(rows) - sum(len(t[2]) for t in todo),
                  unit='ex', disable=not progress, file=sys.stderr)
  if workers > 1 and len(todo) > 1:
    with multiprocessing.get_context('spawn').Pool(min(workers, len(todo))) as pool:
      for rep in pool.imap_unordered(write_shard, todo):
        bar.update(rep['num_examples'] + len(rep['skipped']))
  else:
    for t in todo:
      rep = write_shard(t)
      bar.update(rep['num_examples'] + len(rep['skipped']))
  bar.close()
  return finalise(opts, num_shards, problems, digest, source)


def finalise(opts: Options, num_shards: int, problems: list[dict[str, Any]], digest: str,
             source: str) -> dict[str, Any]:
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
      'num_text_pairs': sum('query' in e for e in index),
      'num_documents': sum('num_images' in e for e in index),
      'shards': [r['shard'] for r in reports],
      'shard_lengths': [r['num_examples'] for r in reports],
      'feature_spec': records.FEATURE_SPEC,
  }
  for name, obj in (('report.json', {'skipped': skipped}), ('index.json', index),
                    ('metadata.json', meta)):
    tmp = opts.out / (name + '.tmp')
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(opts.out / name)
  return meta


def read_inputs(args) -> tuple[tuple[list, list], str]:
  if bool(args.manifest) == bool(args.image_dir):
    raise SystemExit('Give exactly one of --manifest or --image_dir.')
  if args.manifest:
    path = pathlib.Path(args.manifest)
    if not path.is_file():
      raise SystemExit(f'--manifest={path} does not exist.')
    return read_manifest(path), str(path)
  path = pathlib.Path(args.image_dir)
  if not path.is_dir():
    raise SystemExit(f'--image_dir={path} is not a directory.')
  return scan_image_dir(path), str(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
  p = argparse.ArgumentParser(prog='python -m mmjax.data.prepare', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--manifest', help='JSONL or CSV manifest.')
  p.add_argument('--image_dir', help='Folder of images with caption side files (name.txt).')
  p.add_argument('--out', required=True, help='Output directory (resumed if it exists).')
  p.add_argument('--name', default='data', help='Shard file prefix.')
  p.add_argument('--examples_per_shard', type=int, default=1000)
  p.add_argument('--workers', type=int, default=os.cpu_count() or 1)
  p.add_argument('--max_image_size', type=int, default=0,
                 help='Downscale (PNG re-encode) images whose longest side is larger; 0: keep.')
  p.add_argument('--max_negatives', type=int, default=16)
  p.add_argument('--no_progress', action='store_true')
  args = p.parse_args(argv)
  if args.examples_per_shard < 1:
    raise SystemExit(f'--examples_per_shard={args.examples_per_shard} must be >= 1.')
  (rows, problems), source = read_inputs(args)
  opts = Options(out=pathlib.Path(args.out), name=args.name,
                 examples_per_shard=args.examples_per_shard, max_image_size=args.max_image_size,
                 max_negatives=args.max_negatives)
  meta = prepare(rows, problems, opts, workers=args.workers, source=source,
                 progress=not args.no_progress)
  print(f'{meta["num_examples"]} examples in {len(meta["shards"])} shards under {opts.out}; '
        f'{meta["num_skipped"]} skipped {meta["skipped_by_reason"]} (see report.json).')
  return meta


if __name__ == '__main__':
  main()
