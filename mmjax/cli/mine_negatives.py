r"""Offline hard-negative mining with an earlier model's embeddings (exact top-k).

  python -m mmjax.cli.mine_negatives --data=data/pairs --model=runs/base/export --k=8 \
      --max_similarity=0.9 --out=negatives.npy --scores_out=scores.npy

Every example's first caption (or its query, for text-text pairs) is embedded with the exported
model, and so is every image (or first caption); for each example the k most similar *other*
examples' images (captions) are its hard negatives. False negatives are filtered first: a
candidate is dropped when its similarity passes `--max_similarity` (likely another true match),
when it shares the example's group, or when it has the same image or normalised caption.
Output, in the dataset directory: `--out` int64 [N, k] of example indices (-1: fewer than k
survived), named by `config.data.negatives` so that batches carry them as `neg_image` /
`neg_tokens` columns; and with `--scores_out` float32 [N], each pair's own image-caption
similarity, the input of `mmjax.data.filter --scores` (noisy-pair filtering).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import flags

from mmjax import cli
from mmjax.data import images as images_lib, records, sources, transforms
from mmjax.embedder import load_embedder
from mmjax.types import ConfigError


def mine(queries: np.ndarray, keys: np.ndarray, duplicate_of: np.ndarray, *, k: int,
         max_similarity: float, chunk: int = 1024) -> np.ndarray:
  """int64 [N, k]: for each query row, the k most similar key rows that are not duplicates.

  `duplicate_of` int [N]: rows with equal values are duplicates of each other (never negatives;
  this includes the row itself). Embeddings are L2-normalised, so dot products are cosines.
  """
  n = len(queries)
  out = np.full((n, k), -1, np.int64)
  for start in range(0, n, chunk):
    sims = queries[start:start + chunk] @ keys.T
    rows = np.arange(start, min(start + chunk, n))
    sims[duplicate_of[rows][:, None] == duplicate_of[None, :]] = -np.inf
    sims[sims > max_similarity] = -np.inf
    take = min(k, sims.shape[1])
    top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind='stable')
    top = np.take_along_axis(top, order, 1)
    valid = np.isfinite(np.take_along_axis(sims, top, 1))
    out[rows, :take] = np.where(valid, top, -1)
  return out


def duplicate_ids(index: list[dict]) -> np.ndarray:
  """One id per duplicate class: shared group, image or first caption (transitively)."""
  keys = {name: np.array([records.hash31(f'{name}:{v}') if v else -1 for v in values])
          for name, values in (
              ('group_key', [e.get('group', '') for e in index]),
              ('image_key', [e.get('sha256') or e.get('query', '') for e in index]),
              ('caption_key', [e['captions'][0] for e in index]))}
  return transforms.assign_groups(keys)['group']


def _rgb(text: str) -> tuple[int, int, int]:
  try:
    rgb = tuple(int(v) for v in text.split(','))
  except ValueError:
    rgb = ()
  if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
    raise ConfigError(f'--background={text!r} must be three integers in [0, 255], e.g. 0,0,0.')
  return rgb


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m mmjax.cli.mine_negatives`."""
  flags.DEFINE_string('data', None, 'An ingested dataset (prepare --out).', flag_values=fv)
  flags.DEFINE_string('model', None, 'An mmjax export directory (or its workdir).',
                      flag_values=fv)
  flags.DEFINE_integer('k', 8, 'Hard negatives per example.', flag_values=fv)
  flags.DEFINE_float('max_similarity', 0.9, 'Candidates more similar than this are dropped '
                     '(likely true matches).', flag_values=fv)
  flags.DEFINE_string('out', 'negatives.npy', 'Relative to --data.', flag_values=fv)
  flags.DEFINE_string('scores_out', '', 'Also write pair similarities (relative).',
                      flag_values=fv)
  flags.DEFINE_integer('batch_size', 256, 'Embedding batch size.', flag_values=fv)
  flags.DEFINE_enum('resize', 'crop', images_lib.RESIZES,
                    "How images are fitted to the model's input: the run's config.data.resize.",
                    flag_values=fv)
  flags.DEFINE_string('background', '255,255,255', 'R,G,B under transparent pixels and in the '
                      'letterbox padding (config.data.background).', flag_values=fv)
  flags.mark_flags_as_required(['data', 'model'], flag_values=fv)


def _embed_pairs(emb, elements: list[dict], view) -> tuple[np.ndarray, np.ndarray]:
  """(queries, keys) embeddings: captions -> images, or queries -> captions for text pairs."""
  ztxt = emb.embed_texts([records.normalise_caption(e['captions'][0]) for e in elements])
  if elements and elements[0]['query'] is not None:
    return emb.embed_texts([e['query'] for e in elements]), ztxt
  return ztxt, emb.embed_images(np.stack([images_lib.load(e['image'], view) for e in elements]))


def _mine_negatives(args, positional: list[str]) -> np.ndarray:
  """The command: embeds the dataset, mines, writes the negatives (and scores)."""
  del positional
  if args.k < 1:
    raise ConfigError(f'--k={args.k} must be >= 1.')
  data = pathlib.Path(args.data)
  src = sources.RecordSource(data)
  index = json.loads((data / 'index.json').read_text())
  emb = load_embedder(args.model, batch_size=args.batch_size)
  view = images_lib.View(emb.config.image.image_size, args.resize, _rgb(args.background))
  queries, keys = _embed_pairs(emb, [src[i] for i in range(len(src))], view)
  negatives = mine(queries, keys, duplicate_ids(index), k=args.k,
                   max_similarity=args.max_similarity)
  np.save(data / args.out, negatives)
  if args.scores_out:
    np.save(data / args.scores_out, np.sum(queries * keys, 1).astype(np.float32))
  print(f'{int((negatives >= 0).sum())} negatives for {len(negatives)} examples -> '
        f'{data / args.out}')
  return negatives


# main(argv) -> the negatives; `python -m mmjax.cli.mine_negatives` runs main.main().
main = cli.Command(define_flags, _mine_negatives)


if __name__ == '__main__':
  main.main()
