r"""mmjax and open_clip on the identical bench-tiny workload, interleaved, in one invocation.

  make bench-peers [ARGS="--rounds=3 --steps=5"]   # creates .venv-peers (open_clip, CPU torch)
  python bench/peers.py --peer_python=.venv-peers/bin/python [--rounds=3] [--steps=5] \
      [--warmup_steps=2] [--config=configs/bench_tiny.py] [--mmjax_arg=--config.X=Y ...] \
      [--noappend] [--note="..."]

Each round runs A (mmjax: `bench/train_step.py`, the step `mmjax.main` runs, on synthetic
batches) then B (open_clip 3.3.0 on torch's CPU wheel, eager, in its own venv: `--child` mode
of this file), each in a fresh child process, so neither sees the other's caches or threads and
the machine's load is shared evenly between them over the rounds. Per system: the median and
the min over every timed step of every round, pairs/s of the median, and the peak RSS of its
child process (`os.wait4`'s ru_maxrss, the largest over the rounds); then the ratios. The result
block goes to BENCHMARKS.md with the date, commit, machine and load average.

Same workload: the recipe (tower sizes, embed dim, sigmoid loss with learned temperature and
bias, AdamW with mmjax's decay mask, betas, eps, weight decay, gradient clipping, batch) is read
from the mmjax config and copied by `bench/peer_openclip.build_model` / `make_optimizer`; the
batches are random uint8 images and random token ids with right-padded masks from the same
generator. What differs is listed in the block (`DIFFERENCES`).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

BENCH = pathlib.Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
  sys.path.insert(0, str(BENCH))

import children  # noqa: E402  (stdlib only: both venvs import it)

REPO = children.REPO
SPECIAL_TOKENS, EOS_ID = 3, 2  # mmjax.data.tokenizer's [PAD]=0, [UNK]=1, [EOS]=2.

DIFFERENCES = (
    'open_clip runs eagerly in PyTorch (torch 2.13.0+cpu, default intra-op threads), mmjax as one '
    'XLA program (jit, donated state, the optimizer update inside the step)',
    "open_clip's ViT always prepends a class token (65 positions instead of 64; with 'avg' "
    'pooling it is attended to but not pooled): +1 position embedding row and class embedding',
    'GELU: exact in open_clip, tanh approximation in mmjax; LayerNorm eps 1e-5 / 1e-6',
    "text pooling: open_clip's projected tokens pooled at the last valid position (mmjax's "
    "'last'), as bench/peer_openclip.py does",
    'initialisation differs (it does not change the step cost)',
)


# --- Synthetic data (numpy only; the same generator as bench/train_step.synthetic_batch) --------

def synthetic_batch(image_size: int, max_len: int, vocab: int, rows: int, seed: int) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(rows, image_size, image_size, 3), dtype=np.uint8)
  lengths = rng.integers(min(4, max_len), max_len + 1, size=(rows,))
  pos = np.arange(max_len)[None, :]
  mask = (pos < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(SPECIAL_TOKENS, vocab, size=(rows, max_len), dtype=np.int32)
  tokens = np.where(pos == lengths[:, None] - 1, EOS_ID, tokens)
  tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
  return {'image': images, 'tokens': tokens, 'mask': mask}


# --- Child: open_clip (runs in the peer venv: torch, no jax) -------------------------------------

def openclip_child(recipe_path: str, steps: int, warmup: int) -> None:
  """Times `warmup + steps` open_clip train steps; prints one JSON line."""
  import math  # pylint: disable=import-outside-toplevel
  import peer_openclip as peer  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  recipe = json.loads(pathlib.Path(recipe_path).read_text())
  torch.manual_seed(recipe['seed'])
  model = peer.build_model(recipe)
  optimizer, loss_fn = peer.make_optimizer(model, recipe['optimizer']), peer.make_loss(recipe)
  for group in optimizer.param_groups:
    group['lr'] = recipe['optimizer']['learning_rate']
  m, b = recipe['model'], recipe['batch_size']
  batches = [synthetic_batch(m['image']['image_size'], m['text']['max_len'],
                             m['text']['vocab_size'], b, seed=1000 * i) for i in range(2)]
  clip = recipe['optimizer']['grad_clip_norm']
  model.train()
  times, cpu_times, loss = [], [], None
  for i in range(warmup + steps):
    batch = batches[i % 2]
    t0, c0 = time.perf_counter(), time.process_time()
    zimg = peer.encode_images(model, batch['image'])
    ztxt = peer.encode_texts(model, batch['tokens'], batch['mask'])
    loss = loss_fn(zimg, ztxt, model.logit_scale.exp(), model.logit_bias)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip if clip > 0 else math.inf)
    optimizer.step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      cpu_times.append(time.process_time() - c0)
  print(json.dumps({
      'times': times, 'cpu_times': cpu_times, 'loss': float(loss),
      'params': sum(p.numel() for p in model.parameters()),
      'threads': torch.get_num_threads(), 'torch': torch.__version__,
      'open_clip': peer.import_open_clip().__version__}))


# --- Parent ---------------------------------------------------------------------------------------

def recipe_of(config_path: str, overrides: list[str]) -> dict:
  """bench/peer_data.recipe of the config (mmjax's venv), with --config.* overrides applied."""
  sys.path.insert(0, str(REPO))
  import peer_data  # pylint: disable=import-outside-toplevel
  from mmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  config = config_lib.load_config_file(config_path)
  for o in overrides:
    key, value = o[len('--config.'):].split('=', 1)
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value if isinstance(node[leaf], str) else ast.literal_eval(value)
  return peer_data.recipe(config) | {'pad_id': 0}


def parse_mmjax(text: str) -> dict:
  """The numbers of bench/train_step.py's printed table."""
  out = {}
  if m := re.search(r'step time\s+median ([\d.]+) s \(min ([\d.]+), max ([\d.]+), (\d+) steps', text):
    out |= {'median': float(m[1]), 'min': float(m[2]), 'max': float(m[3])}
  if m := re.search(r'params\s+([\d,]+)', text):
    out['params'] = int(m[1].replace(',', ''))
  if m := re.search(r'memory / device\s+(.*)', text):
    out['xla_memory'] = m[1].strip()
  if m := re.search(r'final loss\s+([\d.]+)', text):
    out['loss'] = float(m[1])
  if 'median' not in out:
    raise RuntimeError(f'bench/train_step.py printed no step time:\n{text[-3000:]}')
  return out


def mmjax_round(args) -> dict:
  cmd = [sys.executable, str(BENCH / 'train_step.py'), f'--config={args.config}', '--noappend',
         f'--steps={args.steps}', f'--warmup_steps={args.warmup_steps}', '--matmul_runs=1',
         '--matmul_n=512', *args.mmjax_arg]
  res = children.run(cmd, echo=args.echo).check()
  return parse_mmjax(res.text) | {'maxrss': res.maxrss_bytes, 'wall': res.wall_s}


def openclip_round(args, recipe_path: str) -> dict:
  cmd = [args.peer_python, str(pathlib.Path(__file__).resolve()), '--child=open_clip',
         f'--recipe={recipe_path}', f'--steps={args.steps}', f'--warmup_steps={args.warmup_steps}']
  res = children.run(cmd, echo=args.echo).check()
  out = json.loads(res.lines[-1][1])
  return out | {'median': statistics.median(out['times']), 'min': min(out['times']),
                'maxrss': res.maxrss_bytes, 'wall': res.wall_s}


def summarise(name: str, rounds: list[dict], batch: int) -> dict:
  """Median of the per-round medians (each round's own steps), min over every step."""
  med = statistics.median(r['median'] for r in rounds)
  return {'name': name, 'median': med, 'min': min(r['min'] for r in rounds),
          'pairs_s': batch / med, 'maxrss': max(r['maxrss'] for r in rounds),
          'rounds': [r['median'] for r in rounds], 'params': rounds[0].get('params')}


def report(args, recipe: dict, a: dict, b: dict, load: tuple[str, str], extra: dict) -> list[str]:
  gb = lambda x: f'{x / 1e9:.2f} GB'  # noqa: E731
  rows = ['| system | median step | min step | pairs/s | peak RSS (child) | params | round medians (s) |',
          '|---|---|---|---|---|---|---|']
  for s in (a, b):
    rows.append(f"| {s['name']} | {s['median']:.3f} s | {s['min']:.3f} s | {s['pairs_s']:.1f} | "
                f"{gb(s['maxrss'])} | {s['params']:,} | "
                f"{', '.join(f'{t:.3f}' for t in s['rounds'])} |")
  return [
      f'- command: `python bench/peers.py {" ".join(sys.argv[1:])}`',
      f"- workload: `{args.config}` {' '.join(args.mmjax_arg)}; batch {recipe['batch_size']}, "
      f"loss {recipe['model']['loss']}, AdamW (lr {recipe['optimizer']['learning_rate']}, wd "
      f"{recipe['optimizer']['weight_decay']}), f32; {args.rounds} interleaved rounds "
      f'(mmjax, open_clip, ...), {args.steps} timed steps after {args.warmup_steps} warm-up '
      'steps per round, each round a fresh child process',
      f'- load average (1/5/15 min): {load[0]} before, {load[1]} after',
      f"- peer: open_clip {extra.get('open_clip')}, torch {extra.get('torch')}, "
      f"{extra.get('threads')} threads; mmjax XLA memory analysis: {a.get('xla_memory')}",
      *([f'- note: {args.note}'] if args.note else []),
      '', *rows, '',
      f"- mmjax / open_clip: **{a['pairs_s'] / b['pairs_s']:.2f}x pairs/s** (median step "
      f"{a['median']:.3f} s vs {b['median']:.3f} s), min step {b['min'] / a['min']:.2f}x, peak "
      f"RSS {a['maxrss'] / b['maxrss']:.2f}x ({gb(a['maxrss'])} vs {gb(b['maxrss'])})",
      '- what differs: ' + '; '.join(DIFFERENCES) + '.',
  ]


def main(argv=None) -> dict | None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--child', choices=['open_clip'], help=argparse.SUPPRESS)
  parser.add_argument('--recipe', help=argparse.SUPPRESS)
  parser.add_argument('--peer_python', default=str(REPO / '.venv-peers' / 'bin' / 'python'))
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--mmjax_arg', action='append', default=[],
                      help='Extra bench/train_step.py argument, e.g. --config.model.image.remat=True '
                           '(--config.* ones also change the peer recipe).')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup_steps', type=int, default=2)
  parser.add_argument('--append', action=argparse.BooleanOptionalAction, default=True)
  parser.add_argument('--noappend', dest='append', action='store_false', help=argparse.SUPPRESS)
  parser.add_argument('--benchmarks_file', default=str(REPO / 'BENCHMARKS.md'))
  parser.add_argument('--note', default='')
  parser.add_argument('--echo', action='store_true', help="Print the children's output.")
  args = parser.parse_args(argv)
  if args.child:
    return openclip_child(args.recipe, args.steps, args.warmup_steps)
  if args.rounds < 1 or args.steps < 1:
    parser.error('--rounds and --steps must be >= 1.')
  if not pathlib.Path(args.peer_python).exists():
    parser.error(f'--peer_python={args.peer_python} does not exist: `make bench-peers` creates '
                 'the peer venv (.venv-peers).')
  recipe = recipe_of(args.config, [o for o in args.mmjax_arg if o.startswith('--config.')])
  with tempfile.TemporaryDirectory() as tmp:
    recipe_path = os.path.join(tmp, 'recipe.json')
    pathlib.Path(recipe_path).write_text(json.dumps(recipe))
    load_before = children.loadavg()
    a_rounds, b_rounds = [], []
    for r in range(args.rounds):
      a_rounds.append(mmjax_round(args))
      print(f"round {r}: mmjax median {a_rounds[-1]['median']:.3f} s", flush=True)
      b_rounds.append(openclip_round(args, recipe_path))
      print(f"round {r}: open_clip median {b_rounds[-1]['median']:.3f} s", flush=True)
    load_after = children.loadavg()
  b = recipe['batch_size']
  a, o = summarise('mmjax', a_rounds, b), summarise('open_clip', b_rounds, b)
  lines = report(args, recipe, a | {'xla_memory': a_rounds[0].get('xla_memory')}, o,
                 (load_before, load_after), b_rounds[0])
  print('\n'.join(lines))
  if args.append:
    children.append_block(pathlib.Path(args.benchmarks_file),
                          'peers: mmjax vs open_clip, bench-tiny, interleaved', lines)
  return {'mmjax': a, 'open_clip': o}


if __name__ == '__main__':
  main()
