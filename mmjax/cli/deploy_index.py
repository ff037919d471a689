r"""Index builds from a store, the promotion gate, rollback and search (mmjax.deploy.index).

  python -m mmjax.deploy.index build --store=runs/store [--version=V] --out=runs/index
  python -m mmjax.deploy.index promote --out=runs/index --build=NAME [--min_recall=0.95] \
      [--eval=queries.jsonl] [--tolerance=0.01]
  python -m mmjax.deploy.index rollback --out=runs/index
  python -m mmjax.deploy.index search --out=runs/index --model=SERVING --text='a red star'

Exits 1 with the reason when the gate refuses a build or a search mixes model versions.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from mmjax import cli
from mmjax.deploy import index, serving

COMMANDS = ('build', 'promote', 'rollback', 'search')
flags.DEFINE_string('out', None, 'The index root (builds/, current, previous).')
flags.DEFINE_string('store', None, 'build: the embedding store.')
flags.DEFINE_string('version', None, 'build: the store version (needed when it holds several).')
flags.DEFINE_string('name', '', 'build: the build name (default: VERSION-CORPUSFINGERPRINT).')
flags.DEFINE_integer('held_out', 1000, 'build: sample vectors recall@10 is measured on.')
flags.DEFINE_string('build', None, 'promote: the build to make current.')
flags.DEFINE_float('min_recall', 0.95, 'promote: the lowest recall@10 vs exact search allowed.')
flags.DEFINE_string('eval', None, 'promote: JSONL {"query": text, "relevant": [ids]}.')
flags.DEFINE_float('tolerance', 0.01, 'promote: allowed hit-rate@10 drop against current.')
flags.DEFINE_string('model', None, 'search: the serving export the query is embedded with.')
flags.DEFINE_multi_string('text', [], 'search: query text(s).')
flags.DEFINE_integer('k', 10, 'search: neighbours returned.')
flags.mark_flags_as_required(['out'])
FLAGS = flags.FLAGS


def run_command(command: str) -> None:
  if command == 'build':
    if not FLAGS.store:
      raise app.UsageError('build needs --store.')
    info = index.build(FLAGS.store, FLAGS.out, version=FLAGS.version, name=FLAGS.name,
                       held_out=FLAGS.held_out)
    print(json.dumps(info, sort_keys=True))
  elif command == 'promote':
    if not FLAGS.build:
      raise app.UsageError('promote needs --build.')
    gate = index.promote(FLAGS.out, FLAGS.build, min_recall=FLAGS.min_recall,
                         eval_set=FLAGS.eval, tolerance=FLAGS.tolerance)
    print(f'Promoted {FLAGS.build}: ' + json.dumps(gate, sort_keys=True))
  elif command == 'rollback':
    print(json.dumps(index.rollback(FLAGS.out), sort_keys=True))
  else:
    if not FLAGS.model or not FLAGS.text:
      raise app.UsageError('search needs --model and --text.')
    searcher = index.Searcher(FLAGS.out)
    scores, ids = searcher.search_texts(serving.load(FLAGS.model), FLAGS.text, FLAGS.k)
    for text, s_row, i_row in zip(FLAGS.text, scores, ids):
      print(json.dumps({'query': text, 'ids': i_row.tolist(),
                        'scores': [round(float(s), 6) for s in s_row]}))


def main(argv) -> None:
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f'Expected one command of {COMMANDS}, got {argv[1:]}.')
  cli.setup_logging()
  try:
    run_command(argv[1])
  except (ValueError, OSError) as e:  # GateError, StoreError, index refusals, a missing build.
    sys.exit(f'Refused: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
