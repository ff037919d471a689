r"""Objectives on/off on the demo data: contrastive / +ITM / +captioning / +both.

Run (mmjax's venv, from the repository root; CPU is fine):
  python bench/objectives.py --steps=150 --seeds=0,1,2 [--variants=contrastive,itm,caption,both]
      [--root=runs/objectives] [--noappend]

Each (variant, seed) trains `configs/demo_objectives.py` (the demo recipe plus a 1-block ITM
fusion and a 1-block captioning decoder) with `mmjax.train.loop.train_and_evaluate` for
`--steps` steps, the heads a variant leaves out turned off (depth 0, weight 0); everything else
(batches, schedule, towers, seed) is the same. Then, on the demo validation set (1000 scenes,
half in one-attribute near-duplicate pairs):

- R@1 both ways from the embeddings (the primary evaluation), and on the near-duplicate scenes;
- with ITM: the two-stage R@1 (embedding top-`--k` re-scored by the ITM head, 'rerank'
  evaluator), on all and on the near-duplicate scenes, and the re-scoring's wall time;
- the compositionality score (true caption vs two attributes swapped, colour / shape / size,
  chance 0.5) of the embeddings, and of the ITM head where there is one;
- the training time (the loop's logged intervals, no compile or eval) and the whole wall time;
- with captioning: three greedy captions of validation images, to read.

A finished (variant, seed) is not retrained (its result.json is reused). The mean and the spread
(sample standard deviation, min-max) over seeds go to BENCHMARKS.md with the load average.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import provenance  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
VARIANTS = {'contrastive': (False, False), 'itm': (True, False), 'caption': (False, True),
            'both': (True, True)}


def define_flags() -> None:
  flags.DEFINE_integer('steps', 150, 'Training steps of every run.')
  flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds.')
  flags.DEFINE_list('variants', list(VARIANTS), 'Which of contrastive, itm, caption, both.')
  flags.DEFINE_integer('k', 10, 'Candidates the ITM head re-scores per query.')
  flags.DEFINE_string('root', str(REPO / 'runs' / 'objectives'), 'Workdirs.')
  flags.DEFINE_bool('append', True, 'Append the result block to BENCHMARKS.md.')
  flags.DEFINE_string('benchmarks_file', str(REPO / 'BENCHMARKS.md'), 'Where results go.')
  flags.DEFINE_string('note', '', 'Free text stored with the result.')
  flags.DEFINE_bool('report_only', False, 'Report the finished (variant, seed) runs under --root '
                    '(their bench_result.json) without training the missing ones.')


def variant_config(variant: str, seed: int, steps: int, k: int):
  """configs/demo_objectives.py with the variant's heads and the bench's schedule."""
  from configs import base, demo_objectives  # pylint: disable=import-outside-toplevel
  itm, caption = VARIANTS[variant]
  c = demo_objectives.get_config()
  c.seed, c.total_steps = seed, steps
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, steps // 5)
  c.eval.every_steps = c.checkpoint.every_steps = steps  # Evaluate and save at the end only.
  for name in list(c.evals.keys()):
    del c.evals[name]
  if itm:
    c.evals.rerank = base.spec('rerank', k=k)
  else:
    c.model.itm.depth, c.loss.itm_weight = 0, 0.0
  if not caption:
    c.model.caption.depth, c.loss.caption_weight = 0, 0.0
  return c


def train_seconds(workdir: pathlib.Path, batch_size: int) -> float:
  """The loop's training time from metrics.jsonl (steps x batch / pairs_per_sec per interval)."""
  total, prev = 0.0, 0
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'train/pairs_per_sec' in row:
      total += (row['step'] - prev) * batch_size / row['train/pairs_per_sec']
      prev = row['step']
  return total


def near_duplicate_r1(embedder, data) -> dict[str, float]:
  """Embedding R@1 on the near-duplicate scenes, and the embeddings' compositionality."""
  from mmjax.eval import rerank, robustness  # pylint: disable=import-outside-toplevel
  zimg, ztxt = embedder.embed_images(data['images']), embedder.embed_texts(data['captions'])
  hard = np.flatnonzero(np.asarray(data['near_duplicate_of']) >= 0)
  s = zimg @ ztxt.T
  out = {f'{d}/near_duplicates/recall@1': rerank.recall_at_1(rerank.topk(m, 1), hard)
         for d, m in (('i2t', s), ('t2i', s.T))}
  out.update(robustness.compositionality(zimg, embedder.embed_texts, data['scene_keys']))
  return out


def run_one(variant: str, seed: int) -> dict:
  from mmjax.data import demo  # pylint: disable=import-outside-toplevel
  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  workdir = pathlib.Path(FLAGS.root) / f'{variant}_s{seed}_n{FLAGS.steps}'
  result_file = workdir / 'bench_result.json'
  if result_file.exists():
    return json.loads(result_file.read_text())
  config = variant_config(variant, seed, FLAGS.steps, FLAGS.k)
  load = os.getloadavg()
  t0 = time.perf_counter()
  metrics = loop.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t0
  run, state, _ = loop.load_for_inference(config, workdir)
  run.checkpointer.close()
  embedder = loop.make_embedder(run, state.params)
  data = demo.make_eval_set(num_scenes=config.eval.num_scenes,
                            image_size=config.model.image.image_size, seed=config.eval.seed)
  out = {'variant': variant, 'seed': seed, 'steps': FLAGS.steps, 'wall_s': wall,
         'train_s': train_seconds(workdir, config.batch_size),
         'load_start': load[0], 'load_end': os.getloadavg()[0],
         **{k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
         **near_duplicate_r1(embedder, data)}
  if VARIANTS[variant][1]:
    out['captions'] = list(zip(data['captions'][:3], embedder.caption(data['images'][:3])))
  last = [json.loads(x) for x in (workdir / 'metrics.jsonl').read_text().splitlines()]
  out['train_loss_last'] = next(r['train/loss'] for r in reversed(last) if 'train/loss' in r)
  result_file.write_text(json.dumps(out, indent=1))
  return out


COLUMNS = [('i2t/recall@1', 'i2t R@1'), ('t2i/recall@1', 't2i R@1'),
           ('rerank/i2t/reranked_recall@1', 'i2t R@1 re-ranked'),
           ('rerank/t2i/reranked_recall@1', 't2i R@1 re-ranked'),
           ('i2t/near_duplicates/recall@1', 'i2t R@1 near-dup'),
           ('rerank/i2t/near_duplicates/reranked_recall@1', 'i2t R@1 near-dup re-ranked'),
           ('t2i/near_duplicates/recall@1', 't2i R@1 near-dup'),
           ('rerank/t2i/near_duplicates/reranked_recall@1', 't2i R@1 near-dup re-ranked'),
           ('compositionality', 'compositionality (emb)'),
           ('itm_compositionality', 'compositionality (ITM)'),
           ('train_s', 'train s'), ('rerank/rerank_seconds', 're-rank s')]


def value(r: dict, key: str):
  if key in ('compositionality', 'itm_compositionality'):
    prefix = 'rerank/itm_compositionality/' if key.startswith('itm') else 'compositionality/'
    vals = [v for k, v in r.items() if k.startswith(prefix)]
    return float(np.mean(vals)) if vals else None
  return r.get(key)


def cell(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '—'
  fmt = '.0f' if max(values) > 20 else '.3f'
  if len(values) == 1:
    return f'{values[0]:{fmt}}'
  return (f'{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}} '
          f'({min(values):{fmt}}–{max(values):{fmt}})')


def report(results: list[dict]) -> str:
  lines = ['| variant | seeds | ' + ' | '.join(c[1] for c in COLUMNS) + ' |',
           '|---|---|' + '---|' * len(COLUMNS)]
  for variant in FLAGS.variants:
    rs = [r for r in results if r['variant'] == variant]
    if rs:
      lines.append(f'| {variant} | {",".join(str(r["seed"]) for r in rs)} | '
                   + ' | '.join(cell([value(r, k) for r in rs]) for k, _ in COLUMNS) + ' |')
  loads = [r[k] for r in results for k in ('load_start', 'load_end')]
  lines.append('')
  missing = [f'{v} seed {s}' for s in FLAGS.seeds for v in FLAGS.variants
             if not any(r['variant'] == v and str(r['seed']) == s for r in results)]
  if missing:
    lines.append(f'Not run (out of time): {", ".join(missing)}.')
  lines.append(f'{FLAGS.steps} steps per run, batch 128, configs/demo_objectives.py; mean ± '
               f'sample std (min–max) over seeds; 1-min load average {min(loads):.1f}–'
               f'{max(loads):.1f} (times measured under that load).')
  for r in results:
    if 'captions' in r:
      lines.append(f'- {r["variant"]} seed {r["seed"]} greedy captions: ' + '; '.join(
          f'"{got}" (true: "{true}")' for true, got in r['captions']))
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  if FLAGS.report_only:
    files = [pathlib.Path(FLAGS.root) / f'{v}_s{s}_n{FLAGS.steps}' / 'bench_result.json'
             for s in FLAGS.seeds for v in FLAGS.variants]
    results = [json.loads(f.read_text()) for f in files if f.exists()]
  else:
    results = [run_one(v, int(s)) for s in FLAGS.seeds for v in FLAGS.variants]
  text = report(results)
  print(text)
  if FLAGS.append:
    with open(FLAGS.benchmarks_file, 'a', encoding='utf-8') as f:
      f.write(f'\n## bench/objectives.py ({time.strftime("%Y-%m-%d")}, commit '
              f'{provenance.git_revision()}, {provenance.cpu_model()}, CPU)\n\n'
              f'{FLAGS.note}\n\n{text}\n')


if __name__ == '__main__':
  define_flags()
  app.run(main)
