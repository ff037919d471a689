r"""Retrieval quality side by side: mmjax and open_clip, one recipe, one ingested real corpus.

Run (mmjax's venv; open_clip runs in its own venv, see ../shared/DATA.md "Peers"):
  python bench/quality.py --steps=100 --seeds=0,1 [--config=configs/quality_tuxpaint.py] \
      [--root=runs/quality] [--peer_python=/work/peer-venv/bin/python] [--noappend]

Needs the Debian package `tuxpaint-stamps-default` (/usr/share/tuxpaint/stamps: 796 captioned
PNG stamps). What it does:

1. **Corpus.** The stamps are listed with mmjax's own folder reader
   (`mmjax.data.manifests.scan_image_dir`) and split by the fixed held-out list
   `bench/tuxpaint_heldout.txt` (133 stamps; a stamp and its `_mirror` share a caption and a
   split) into two JSONL manifests, each ingested with `python -m mmjax.data.prepare`.
2. **Per seed, the same batches for both.** `bench/peer_data.py` dumps the first `--steps`
   training batches of the mmjax run (bitwise what `train_and_evaluate` reads: letterboxed,
   augmented, tokenised) and the held-out split as mmjax's evaluator sees it; the time this takes
   is mmjax's input pipeline for those batches in one process.
3. **mmjax** trains with `python -m mmjax.main` (the CLI a user runs). Training time = the sum of
   the logged intervals (`train/pairs_per_sec`): the loop with its input pipeline, without
   compilation or evaluation.
4. **open_clip** (`bench/peer_openclip.py`) trains the same towers, loss, AdamW, decay mask,
   schedule, clipping and seed on the dumped batches and is scored with mmjax's metrics on the
   same held-out pairs. Its training time is its loop on batches already in memory (no decode).
5. **Equal wall time.** mmjax is trained again with the number of steps its measured step time
   fits into open_clip's training time (schedule fitted to that length), and scored the same way.

Reports i2t/t2i R@1/5/10 of the held-out split (`held_out/...`, every caption of each image) and
the training times, per seed and as the mean over seeds, and appends a block to BENCHMARKS.md.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / 'bench'))
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

import provenance  # noqa: E402  pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined when run, so tests can import the helpers)."""
  flags.DEFINE_string('config', str(REPO / 'configs' / 'quality_tuxpaint.py'), 'The shared recipe.')
  flags.DEFINE_string('root', str(REPO / 'runs' / 'quality'), 'Corpus, dumps and workdirs.')
  flags.DEFINE_string('stamps', '/usr/share/tuxpaint/stamps', 'The Tux Paint stamps folder.')
  flags.DEFINE_string('heldout', str(REPO / 'bench' / 'tuxpaint_heldout.txt'),
                      'Held-out stamp paths, relative to --stamps.')
  flags.DEFINE_integer('steps', 120, 'Training steps of the equal-steps comparison.')
  flags.DEFINE_list('seeds', ['0', '1'], 'Seeds (each: one dump, one run of each system, plus the '
                    'equal-wall-time mmjax run).')
  flags.DEFINE_bool('equal_time', True, 'Also train mmjax for open_clip\'s training time.')
  flags.DEFINE_string('peer_python', '/work/peer-venv/bin/python', 'open_clip\'s interpreter.')
  flags.DEFINE_integer('threads', 0, 'torch threads for open_clip (0: torch\'s default).')
  flags.DEFINE_list('overrides', [], 'Extra --config.KEY=VALUE overrides for both systems, '
                    'e.g. model.image.depth=2.')
  flags.DEFINE_bool('append', True, 'Append the result block to BENCHMARKS.md.')
  flags.DEFINE_string('benchmarks_file', str(REPO / 'BENCHMARKS.md'), 'Where results go.')
  flags.DEFINE_string('note', '', 'Free text stored with the result.')
  flags.DEFINE_bool('report_only', False, 'Report (and append) the seeds\' result.json files under '
                    '--root instead of training.')


DIRECTIONS = ('i2t', 't2i')
KS = (1, 5, 10)


# --- 1. The corpus -------------------------------------------------------------------------------

def read_heldout(path: str | pathlib.Path) -> set[str]:
  lines = pathlib.Path(path).read_text().splitlines()
  return {s.strip() for s in lines if s.strip() and not s.startswith('#')}


def split_rows(stamps: pathlib.Path, heldout: set[str]) -> tuple[list[dict], list[dict]]:
  """(train, val) manifest rows of every captioned stamp image; val = the held-out list."""
  from mmjax.data import manifests  # pylint: disable=import-outside-toplevel
  rows, _ = manifests.scan_image_dir(stamps)
  ids = {r['id'] for r in rows}
  missing = sorted(heldout - ids)
  if missing:
    raise SystemExit(f'{len(missing)} held-out stamps of --heldout are not under {stamps}, e.g. '
                     f'{missing[0]} (a different tuxpaint-stamps-default version?).')
  return [r for r in rows if r['id'] not in heldout], [r for r in rows if r['id'] in heldout]


def build_corpus(stamps: str, heldout: str, root: pathlib.Path) -> dict[str, pathlib.Path]:
  """Ingests both splits with `python -m mmjax.data.prepare` (kept if already there)."""
  stamps_dir = pathlib.Path(stamps)
  if not stamps_dir.is_dir():
    raise SystemExit(f'--stamps={stamps} is not a directory: install the Debian package '
                     'tuxpaint-stamps-default (see ../shared/DATA.md).')
  train, val = split_rows(stamps_dir, read_heldout(heldout))
  out = {}
  for name, rows in (('train', train), ('val', val)):
    manifest = root / 'corpus' / f'{name}.jsonl'
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(''.join(json.dumps({'id': r['id'], 'image': r['image'],
                                            'captions': r['captions']}) + '\n' for r in rows))
    out[name] = root / 'corpus' / name
    if not (out[name] / 'metadata.json').is_file():
      subprocess.run([sys.executable, '-m', 'mmjax.data.prepare', f'--manifest={manifest}',
                      f'--out={out[name]}', '--max_image_size=256', '--no_progress'],
                     check=True, cwd=REPO, env=_env())
  return out


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(REPO), env.get('PYTHONPATH')]))
  return env


# --- 2-5. The runs -------------------------------------------------------------------------------

def overrides(corpus: dict[str, pathlib.Path], seed: int, steps: int,
              warmup: int | None = None) -> dict[str, object]:
  """The config overrides of one run (both systems' recipe comes from the same config)."""
  out = {'data.path': str(corpus['train'].absolute()),
         'evals.held_out.path': str(corpus['val'].absolute()), 'seed': seed, 'total_steps': steps}
  if warmup is not None:
    out['optimizer.warmup_steps'] = warmup
  for kv in FLAGS.overrides:
    key, value = kv.split('=', 1)
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value  # A string.
  return out


def as_flags(values: dict[str, object]) -> list[str]:
  return [f'--config.{k}={v}' for k, v in values.items()]


def load_config(values: dict[str, object]):
  """The run config the CLI builds from FLAGS.config and `as_flags(values)`."""
  from mmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(FLAGS.config)
  config.update_from_flattened_dict(values)
  return config


def train_seconds(workdir: pathlib.Path, batch_size: int) -> tuple[float, int]:
  """(seconds, steps) of the training loop from metrics.jsonl: each logged interval's
  steps x batch / pairs_per_sec (the loop restarts its clock after each evaluation)."""
  total, prev = 0.0, 0
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    row = json.loads(line)
    if 'train/pairs_per_sec' in row:
      total += (row['step'] - prev) * batch_size / row['train/pairs_per_sec']
      prev = row['step']
  return total, prev


def run_mmjax(workdir: pathlib.Path, values: dict[str, object],
              tokenizer: pathlib.Path | None) -> dict:
  """`python -m mmjax.main` into `workdir`; its held-out metrics and times."""
  workdir.mkdir(parents=True, exist_ok=True)
  if tokenizer is not None and not (workdir / 'tokenizer.json').exists():
    (workdir / 'tokenizer.json').write_bytes(tokenizer.read_bytes())  # The dump's very ids.
  t0, c0 = time.perf_counter(), _children_cpu()
  subprocess.run([sys.executable, '-m', 'mmjax.main', f'--config={FLAGS.config}',
                  f'--workdir={workdir}', *as_flags(values)], check=True, cwd=REPO, env=_env(),
                 stdout=subprocess.DEVNULL)
  wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
  result = json.loads((workdir / 'eval.json').read_text())
  batch = load_config(values).batch_size
  train_s, steps = train_seconds(workdir, batch)
  return {**result, 'train_s': train_s, 'wall_s': wall, 'cpu_s': cpu, 'steps': steps}


def run_openclip(data: pathlib.Path, out: pathlib.Path) -> dict:
  cmd = [FLAGS.peer_python, str(REPO / 'bench' / 'peer_openclip.py'), f'--data={data}',
         f'--out={out}']
  if FLAGS.threads:
    cmd.append(f'--threads={FLAGS.threads}')
  t0, c0 = time.perf_counter(), _children_cpu()
  subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL)
  wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
  result = json.loads((out / 'eval.json').read_text())
  return {**result, 'wall_s': wall, 'cpu_s': cpu, 'steps': result['step']}


def _children_cpu() -> float:
  """User + system CPU seconds of the finished child processes (the whole command, start-up,
  compilation and evaluation included): steadier than wall time on a shared machine."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_seed(corpus: dict[str, pathlib.Path], seed: int, root: pathlib.Path) -> dict[str, dict]:
  steps = FLAGS.steps
  base = root / f'seed{seed}'
  values = overrides(corpus, seed, steps)
  config = load_config(values)
  npz = base / 'batches.npz'
  mm_dir = base / 'mmjax'
  if not npz.exists():
    subprocess.run([sys.executable, str(REPO / 'bench' / 'peer_data.py'),
                    f'--config={FLAGS.config}', f'--workdir={mm_dir}', f'--out={npz}',
                    f'--steps={steps}', *as_flags(values)],
                   check=True, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL)
  with np.load(npz) as dumped:
    rec = json.loads(str(dumped['recipe']))
  out = {'mmjax': run_mmjax(mm_dir, values, None),
         'open_clip': run_openclip(npz, base / 'open_clip')}
  out['mmjax']['pipeline_s'] = rec.get('pipeline_s', float('nan'))
  print(f'seed {seed}: ' + summary_line('mmjax', out['mmjax']) + ' | '
        + summary_line('open_clip', out['open_clip']), flush=True)
  if FLAGS.equal_time:
    per_step = out['mmjax']['train_s'] / out['mmjax']['steps']
    eq_steps = max(1, round(out['open_clip']['train_s'] / per_step))
    # The warm-up keeps its fraction of the schedule.
    warmup = max(1, round(config.optimizer.warmup_steps * eq_steps / steps))
    out['mmjax_equal_time'] = run_mmjax(base / f'mmjax_{eq_steps}',
                                        overrides(corpus, seed, eq_steps, warmup),
                                        mm_dir / 'tokenizer.json')
    print(f'seed {seed}: ' + summary_line(f'mmjax {eq_steps} steps', out['mmjax_equal_time']),
          flush=True)
  (base / 'result.json').write_text(json.dumps(out, indent=1))
  return out


# --- Reporting -----------------------------------------------------------------------------------

def recall(result: dict, direction: str, k: int) -> float:
  return result[f'held_out/{direction}/recall@{k}']


def summary_line(name: str, r: dict) -> str:
  return (f'{name}: {r["steps"]} steps {r["train_s"]:.0f} s, R@10 i2t '
          f'{recall(r, "i2t", 10):.3f} t2i {recall(r, "t2i", 10):.3f}')


def _cells(r: dict) -> str:
  return ' | '.join(' / '.join(f'{100 * recall(r, d, k):.1f}' for k in KS) for d in DIRECTIONS)


def report(results: dict[int, dict[str, dict]], chance10: float) -> list[str]:
  """The markdown table (one row per system and seed, then the means) and the ratios."""
  lines = ['| system | seed | steps | train time (s/step) | command wall / CPU | '
           'i2t R@1 / R@5 / R@10 (%) | t2i R@1 / R@5 / R@10 (%) |',
           '|---|---|---|---|---|---|---|']
  systems = [('open_clip', 'open_clip 3.3.0'), ('mmjax', 'mmjax, equal steps'),
             ('mmjax_equal_time', 'mmjax, equal wall time')]
  for key, label in systems:
    rows = [r[key] for r in results.values() if key in r]
    for seed, r in results.items():
      if key in r:
        x = r[key]
        cpu = f'{x["cpu_s"]:.0f} s' if 'cpu_s' in x else 'n/a'
        lines.append(f'| {label} | {seed} | {x["steps"]} | {x["train_s"]:.0f} s '
                     f'({x["train_s"] / x["steps"]:.2f}) | {x["wall_s"]:.0f} s / {cpu} | '
                     f'{_cells(x)} |')
    if len(rows) > 1:
      mean = {f'held_out/{d}/recall@{k}': statistics.mean(recall(x, d, k) for x in rows)
              for d in DIRECTIONS for k in KS}
      t = statistics.mean(x['train_s'] for x in rows)
      n = statistics.mean(x['steps'] for x in rows)
      lines.append(f'| **{label}** | mean | {n:.0f} | {t:.0f} s ({t / n:.2f}) | | '
                   f'{_cells(mean)} |')
  lines.append('')
  lines.append(f'Chance R@10 on the held-out split: {100 * chance10:.1f} %.')
  for key, label in (('mmjax', 'equal steps'), ('mmjax_equal_time', 'equal wall time')):
    rows = [r for r in results.values() if key in r]
    if rows:
      ratios = {d: statistics.mean(recall(r[key], d, 10) for r in rows)
                / max(statistics.mean(recall(r['open_clip'], d, 10) for r in rows), 1e-9)
                for d in DIRECTIONS}
      lines.append(f'- mmjax / open_clip R@10 at {label} (means over seeds): i2t '
                   f'{ratios["i2t"]:.2f}x, t2i {ratios["t2i"]:.2f}x.')
  pipe = [r['mmjax']['pipeline_s'] / r['mmjax']['steps'] for r in results.values()]
  lines.append(f'- mmjax\'s input pipeline alone (the dump, one process): '
               f'{statistics.mean(pipe):.2f} s per batch; open_clip\'s time excludes it (it '
               'reads the dumped batches from memory).')
  return lines


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.root).absolute()
  load_before = _loadavg()
  t0 = time.perf_counter()
  if FLAGS.report_only:
    results = {int(s): json.loads((root / f'seed{s}' / 'result.json').read_text())
               for s in FLAGS.seeds if (root / f'seed{s}' / 'result.json').is_file()}
    if not results:
      raise SystemExit(f'No seed{{{",".join(FLAGS.seeds)}}}/result.json under {root}.')
  else:
    corpus = build_corpus(FLAGS.stamps, FLAGS.heldout, root)
    results = {int(s): run_seed(corpus, int(s), root) for s in FLAGS.seeds}
  load_after = _loadavg()
  num_val = len(read_heldout(FLAGS.heldout))
  lines = report(results, min(1.0, 10 / num_val))
  print('\n'.join(lines))
  if FLAGS.append:
    steps = next(iter(results.values()))['open_clip']['steps']
    append(lines, load_before, load_after, time.perf_counter() - t0, list(results), steps)


def _loadavg() -> str:
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def append(lines: list[str], load_before: str, load_after: str, seconds: float,
           seeds: list[int], steps: int) -> None:
  import datetime  # pylint: disable=import-outside-toplevel
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  config = pathlib.Path(FLAGS.config).resolve()
  try:
    config = config.relative_to(REPO)
  except ValueError:
    pass
  block = [f'\n## quality: mmjax vs open_clip on the Tux Paint stamps ({now})\n',
           f'- commit: `{provenance.git_revision()}`',
           f'- machine: {provenance.cpu_model()}, {os.cpu_count()} cores; ' + (
               'load average: in the note (--report_only)' if FLAGS.report_only else
               f'load average {load_before} -> {load_after} (1/5/15 min, start -> end); '
               f'{seconds:.0f} s in all'),
           f'- command: `python bench/quality.py --config={config} --steps={steps} '
           f'--seeds={",".join(map(str, seeds))}'
           + ''.join(f' --overrides={o}' for o in FLAGS.overrides) + '`',
           f'- corpus: {FLAGS.stamps}, held-out list bench/tuxpaint_heldout.txt '
           f'({len(read_heldout(FLAGS.heldout))} images), ingested with mmjax.data.prepare',
           *([f'- note: {FLAGS.note}'] if FLAGS.note else []), '', *lines]
  with pathlib.Path(FLAGS.benchmarks_file).open('a') as f:
    f.write('\n'.join(block) + '\n')
  print(f'appended to {FLAGS.benchmarks_file}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
