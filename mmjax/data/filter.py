r"""Noisy-pair filtering and duplicate removal over an ingested dataset -> a keep file.

  python -m mmjax.data.filter --data=data/pairs --out=keep.npy --dedupe_images --near_bits=4 \
      --dedupe_captions --scores=data/pairs/scores.npy --keep_fraction=0.8

Nothing is rewritten: the result is a sorted int64 array of the example indices to keep, saved in
the dataset directory (`--out`, relative to `--data`) and named by `config.data.keep`, so each
filter is switched on and off (and measured) from the config. A `<out>.json` report counts what
each step dropped.

- `--dedupe_images`: an image whose pixels were seen before (SHA-256 of the decoded pixels) is
  dropped; with `--near_bits=b > 0` also one whose 64-bit dHash is within b bits of a kept one
  (re-encodes, resizes, small edits). Text-text pairs use the normalised query instead.
- `--dedupe_captions`: an example whose normalised captions were all seen before is dropped.
- `--scores` (float [N], higher = better matched, e.g. `mine_negatives --scores_out` or a
  teacher's image-caption similarity) with `--keep_fraction=f`: the best-scored fraction f of the
  remaining examples is kept.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any

import numpy as np
from absl import flags

from mmjax import command
from mmjax.types import ConfigError


def near_duplicates(hashes: list[int], bits: int) -> set[int]:
  """Indices whose hash is within `bits` of an earlier kept hash (later ones are dropped).

  Multi-index hashing: split 64 bits into bits+1 bands; two hashes within `bits` of each other
  agree on at least one band (pigeonhole), so only band-mates are compared.
  """
  bands = bits + 1
  edges = [64 * b // bands for b in range(bands + 1)]
  masks = [((1 << (hi - lo)) - 1) << lo for lo, hi in zip(edges[:-1], edges[1:])]
  buckets: list[dict[int, list[int]]] = [collections.defaultdict(list) for _ in masks]
  dropped: set[int] = set()
  for i, h in enumerate(hashes):
    cands = {j for b, m in enumerate(masks) for j in buckets[b].get(h & m, ())}
    if any(bin(h ^ hashes[j]).count('1') <= bits for j in cands):
      dropped.add(i)
      continue
    for b, m in enumerate(masks):
      buckets[b][h & m].append(i)
  return dropped


def select(index: list[dict[str, Any]], *, dedupe_images: bool = False, near_bits: int = 0,
           dedupe_captions: bool = False, scores: np.ndarray | None = None,
           keep_fraction: float = 1.0) -> tuple[np.ndarray, dict[str, int]]:
  """(kept indices, {reason: dropped count}) for a dataset's index.json entries."""
  keep = np.ones(len(index), bool)
  report: dict[str, int] = {}
  if dedupe_images:
    seen: set[str] = set()
    for i, e in enumerate(index):
      key = e.get('sha256') or e.get('query')
      if key is None:
        continue
      if key in seen:
        keep[i] = False
      seen.add(key)
    report['exact_image_duplicates'] = int((~keep).sum())
    if near_bits:
      live = [i for i in range(len(index)) if keep[i] and 'dhash' in index[i]]
      near = near_duplicates([index[i]['dhash'] for i in live], near_bits)
      keep[[live[j] for j in near]] = False
      report['near_image_duplicates'] = len(near)
  if dedupe_captions:
    seen_caps: set[str] = set()
    n = 0
    for i, e in enumerate(index):
      if not keep[i]:
        continue
      caps = set(e['captions']) | ({e['query']} if 'query' in e else set())
      if caps <= seen_caps:
        keep[i], n = False, n + 1
      seen_caps |= caps
    report['caption_duplicates'] = n
  if scores is not None and keep_fraction < 1.0:
    if len(scores) != len(index):
      raise ValueError(f'{len(scores)} scores for {len(index)} examples.')
    live = np.flatnonzero(keep)
    n_keep = int(np.ceil(keep_fraction * len(live)))
    order = live[np.argsort(-scores[live], kind='stable')]
    keep[order[n_keep:]] = False
    report['low_score'] = len(live) - n_keep
  report['kept'] = int(keep.sum())
  return np.flatnonzero(keep).astype(np.int64), report


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m mmjax.data.filter`."""
  flags.DEFINE_string('data', None, 'An ingested dataset (prepare --out).', flag_values=fv)
  flags.DEFINE_string('out', 'keep.npy', 'Keep file, relative to --data.', flag_values=fv)
  flags.DEFINE_boolean('dedupe_images', False, 'Drop repeated images (text pairs: queries).',
                       flag_values=fv)
  flags.DEFINE_integer('near_bits', 0, 'With --dedupe_images, also drop images whose dHash is '
                       'within this many bits of a kept one.', flag_values=fv)
  flags.DEFINE_boolean('dedupe_captions', False, 'Drop examples whose captions were all seen.',
                       flag_values=fv)
  flags.DEFINE_string('scores', '', 'float [N] .npy of pair scores (higher = better matched).',
                      flag_values=fv)
  flags.DEFINE_float('keep_fraction', 1.0, 'With --scores, the best-scored fraction kept.',
                     flag_values=fv)
  flags.mark_flag_as_required('data', flag_values=fv)


def _filter(args, positional: list[str]) -> dict[str, int]:
  """The command: selects, writes the keep file and its report, prints a summary."""
  del positional
  if not 0.0 < args.keep_fraction <= 1.0:
    raise ConfigError(f'--keep_fraction={args.keep_fraction} must be in (0, 1].')
  if not 0 <= args.near_bits < 32:
    raise ConfigError(f'--near_bits={args.near_bits} must be in [0, 32).')
  data = pathlib.Path(args.data)
  index = json.loads((data / 'index.json').read_text())
  scores = np.load(args.scores) if args.scores else None
  keep, report = select(index, dedupe_images=args.dedupe_images, near_bits=args.near_bits,
                        dedupe_captions=args.dedupe_captions, scores=scores,
                        keep_fraction=args.keep_fraction)
  out = data / (args.out if args.out.endswith('.npy') else args.out + '.npy')
  np.save(out, keep)
  out.with_suffix('.json').write_text(json.dumps({'args': vars(args), **report}, indent=1))
  print(f'kept {report["kept"]} of {len(index)} -> {out} ({report})')
  return report


# main(argv) -> the report; `python -m mmjax.data.filter` runs main.main().
main = command.Command(define_flags, _filter)


if __name__ == '__main__':
  main.main()
