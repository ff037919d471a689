r"""Click logs and interleaved documents -> ingestion manifests (JSONL for `mmjax.data.prepare`).

  python -m mmjax.data.convert clicks --log=clicks.jsonl --items=items.jsonl --out=pairs.jsonl
  python -m mmjax.data.convert documents --docs=docs.jsonl --out=pairs.jsonl \
      [--documents_out=d.jsonl]

Click logs: one row per shown result — `query`, `item_id`, `position` (1 = top), `clicked`
(bool), optional `impression` (rows of one result page; default: the query). Items: `item_id`
with `image` (path) and/or `text`. Every clicked (query, item) becomes one positive pair: query
text <-> item image (or query <-> item text, a text-text pair, for items without an image). The
items shown in the same impressions but never clicked for that query are its hard negatives
(`neg_images` / `neg_texts`); an item clicked for the query anywhere is never its negative.

Position bias: a result lower on the page is seen less often, so its clicks undercount its
relevance. Each click is weighted by the inverse of the examination propensity of its position
(inverse propensity scoring, Joachims et al., WSDM 2017): with `--propensity=power`,
p(k) = (1/k)^eta (eta = `--eta`, 1.0 by default); with `--propensity=ctr`, p(k) = CTR(k) / CTR(1)
estimated from the log itself (cheap, but confounded with the ranker's quality). A pair's weight is
the sum of its clicks' 1/p, clipped at `--max_weight` (bounds the variance) and rescaled to mean
1 over the pairs; it is the record's `weight` and the batch's `weight` column.

Interleaved documents: `{"id": .., "segments": [{"text": ..} | {"image": path}, ...]}`. Each image
is paired with its adjacent text segments (the one before and the one after, both kept as
captions and sampled per epoch); pairs of one document share a group (`--no_group_by_document`
to turn off), so they are never each other's in-batch negatives. `--documents_out` also writes
whole documents (`segments` rows), ingested as-is (records keep their `segments`) for a
document-level embedder to read.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Any, Iterable

from absl import flags

from mmjax import command
from mmjax.data import prepare
from mmjax.types import ConfigError


def _bool(v: Any) -> bool:
  if isinstance(v, str):
    return v.strip().lower() in ('1', 'true', 'yes', 'y')
  return bool(v)


def read_rows(path: pathlib.Path) -> list[dict[str, Any]]:
  """Rows of a JSONL or CSV file (bad lines raise: a log must be well formed to weight it)."""
  rows, problems = prepare.read_manifest(path)
  if problems:
    raise ValueError(f'{path}: {len(problems)} unreadable lines, first: {problems[0]}')
  return rows


def propensities(log: list[dict[str, Any]], kind: str, eta: float) -> dict[int, float]:
  """Examination propensity per position (1-based)."""
  positions = sorted({int(r['position']) for r in log})
  if kind == 'power':
    return {k: (1.0 / k) ** eta for k in positions}
  if kind == 'ctr':
    shown, clicks = collections.Counter(), collections.Counter()
    for r in log:
      shown[int(r['position'])] += 1
      clicks[int(r['position'])] += _bool(r['clicked'])
    top = clicks[positions[0]] / shown[positions[0]]
    if top == 0:
      raise ValueError('--propensity=ctr: no click at the top position to normalise by.')
    # A position with no clicks contributes no weight; keep its propensity finite.
    return {k: max(clicks[k] / shown[k] / top, 1e-3) for k in positions}
  raise ValueError(f'Unknown propensity {kind!r}; expected power or ctr.')


def clicks_to_pairs(log: list[dict[str, Any]], items: list[dict[str, Any]], *,
                    propensity: str = 'power', eta: float = 1.0, max_weight: float = 10.0,
                    max_negatives: int = 16) -> list[dict[str, Any]]:
  """Manifest rows: one per clicked (query, item), weighted, with shown-not-clicked negatives."""
  by_id = {str(it['item_id']): it for it in items}
  missing = sorted({str(r['item_id']) for r in log} - set(by_id))
  if missing:
    raise ValueError(f'{len(missing)} logged item ids are not in the items file, '
                     f'e.g. {missing[:5]}')
  prop = propensities(log, propensity, eta)
  weight: dict[tuple[str, str], float] = collections.defaultdict(float)
  shown_in: dict[str, list[str]] = collections.defaultdict(list)  # impression -> items
  impressions_of: dict[str, set[str]] = collections.defaultdict(set)  # query -> impressions
  for r in log:
    query, item = str(r['query']), str(r['item_id'])
    imp = str(r.get('impression', query))
    shown_in[imp].append(item)
    impressions_of[query].add(imp)
    if _bool(r['clicked']):
      weight[(query, item)] += 1.0 / prop[int(r['position'])]
  clicked: dict[str, set[str]] = collections.defaultdict(set)
  for query, item in weight:
    clicked[query].add(item)
  raw = {k: min(w, max_weight) for k, w in weight.items()}
  scale = len(raw) / sum(raw.values()) if raw else 1.0
  rows = []
  for (query, item), w in raw.items():
    negs = list(dict.fromkeys(i for imp in sorted(impressions_of[query]) for i in shown_in[imp]
                              if i not in clicked[query]))[:max_negatives]
    it = by_id[item]
    row: dict[str, Any] = {'id': f'{query}\t{item}', 'weight': w * scale, 'group': f'item:{item}'}
    if it.get('image'):
      row |= {'image': it['image'], 'captions': [query],
              'neg_images': [by_id[n]['image'] for n in negs if by_id[n].get('image')]}
    else:
      row |= {'query': query, 'captions': [it['text']],
              'neg_texts': [by_id[n]['text'] for n in negs if by_id[n].get('text')]}
    rows.append(row)
  return rows


def documents_to_pairs(docs: Iterable[dict[str, Any]], *, group_by_document: bool = True
                       ) -> list[dict[str, Any]]:
  """One image-text manifest row per image with an adjacent text segment."""
  rows = []
  for d, doc in enumerate(docs):
    segs = doc.get('segments') or []
    doc_id = str(doc.get('id', d))
    for s, seg in enumerate(segs):
      if 'image' not in seg:
        continue
      near = [segs[j]['text'] for j in (s - 1, s + 1)
              if 0 <= j < len(segs) and isinstance(segs[j].get('text'), str)]
      if not near:
        continue
      row = {'id': f'{doc_id}#{s}', 'image': seg['image'], 'captions': near}
      if group_by_document:
        row['group'] = f'doc:{doc_id}'
      rows.append(row)
  return rows


def write_jsonl(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for row in rows:
      f.write(json.dumps({k: v for k, v in row.items() if k != '_line'}) + '\n')


def _absolute(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Paths were resolved against the input file's folder; the output may live elsewhere."""
  return [{k: (str(pathlib.Path(v).absolute()) if k == 'image' else v) for k, v in r.items()}
          for r in rows]


CLICKS_FLAGS = ('log', 'items', 'propensity', 'eta', 'max_weight', 'max_negatives')
DOCUMENTS_FLAGS = ('docs', 'documents_out', 'no_group_by_document')
REQUIRED = {'clicks': ('log', 'items', 'out'), 'documents': ('docs', 'out')}


def define_flags(fv: flags.FlagValues) -> None:
  """The flags of `python -m mmjax.data.convert clicks|documents`."""
  flags.DEFINE_string('out', None, 'Output manifest (JSONL).', flag_values=fv)
  # clicks: click log + items -> weighted pairs with hard negatives.
  flags.DEFINE_string('log', None, 'clicks: the click log (JSONL or CSV).', flag_values=fv)
  flags.DEFINE_string('items', None, 'clicks: the items (JSONL or CSV).', flag_values=fv)
  flags.DEFINE_enum('propensity', 'power', ('power', 'ctr'), 'clicks: examination propensity.',
                    flag_values=fv)
  flags.DEFINE_float('eta', 1.0, 'clicks: p(k) = (1/k)^eta with --propensity=power.',
                     flag_values=fv)
  flags.DEFINE_float('max_weight', 10.0, "clicks: clip of a pair's weight.", flag_values=fv)
  flags.DEFINE_integer('max_negatives', 16, 'clicks: hard negatives kept per pair.',
                       flag_values=fv)
  # documents: interleaved documents -> adjacent image-text pairs.
  flags.DEFINE_string('docs', None, 'documents: the documents (JSONL).', flag_values=fv)
  flags.DEFINE_string('documents_out', '', 'documents: also write whole documents here.',
                      flag_values=fv)
  flags.DEFINE_boolean('no_group_by_document', False, 'documents: pairs of one document do not '
                       'share a group.', flag_values=fv)


def _kind(args, positional: list[str]) -> str:
  """The subcommand, checked with its flags as a subparser would."""
  if len(positional) != 1 or positional[0] not in REQUIRED:
    raise ConfigError(f'Give one command, clicks or documents (got {positional}).')
  kind = positional[0]
  missing = [f'--{k}' for k in REQUIRED[kind] if not getattr(args, k)]
  if missing:
    raise ConfigError(f'{kind} needs {", ".join(missing)}.')
  defaults = flags.FlagValues()
  define_flags(defaults)
  other = DOCUMENTS_FLAGS if kind == 'clicks' else CLICKS_FLAGS
  given = [f'--{k}' for k in other if getattr(args, k) != defaults[k].default]
  if given:
    raise ConfigError(f'{", ".join(given)} {"is" if len(given) == 1 else "are"} not a flag of '
                      f'{kind}.')
  return kind


def _convert(args, positional: list[str]) -> None:
  if _kind(args, positional) == 'clicks':
    items = _absolute(read_rows(pathlib.Path(args.items)))
    rows = clicks_to_pairs(read_rows(pathlib.Path(args.log)), items, propensity=args.propensity,
                           eta=args.eta, max_weight=args.max_weight,
                           max_negatives=args.max_negatives)
  else:
    docs = read_rows(pathlib.Path(args.docs))
    base = pathlib.Path(args.docs).parent
    for doc in docs:
      for seg in doc.get('segments') or []:
        if isinstance(seg.get('image'), str):
          seg['image'] = str((base / seg['image']).absolute())
    rows = documents_to_pairs(docs, group_by_document=not args.no_group_by_document)
    if args.documents_out:
      write_jsonl(docs, pathlib.Path(args.documents_out))
  write_jsonl(rows, pathlib.Path(args.out))
  print(f'{len(rows)} pairs -> {args.out}')


# main(['clicks' | 'documents', *flags]); `python -m mmjax.data.convert` runs main.main().
main = command.Command(define_flags, _convert, positional=True)


if __name__ == '__main__':
  main.main()
