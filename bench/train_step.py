r"""Steady-state throughput of the real mmjax train step on synthetic batches.

  python bench/train_step.py --config=configs/bench_tiny.py [--config.batch_size=128] \
      [--steps=5] [--warmup_steps=2] [--note="..."] [--noappend] [--profile_dir=/tmp/prof]

Everything is built through the library (validate, make_mesh, TwoTower, make_optimizer,
create_train_state, jit_train_step), so this times exactly the step that `mmjax.main` runs; only
the data is synthetic (random pixels and token ids, with realistic masks), so the input pipeline is
not part of the number.

Reported: step FLOPs (XLA cost analysis, and an analytic 6*N*tokens + attention estimate), compile
time, median warm step time, pairs/s, achieved FLOP/s, and MFU against the FLOP/s of a dense f32
n x n matmul measured in the same process (a practical peak of this machine, not a datasheet one),
plus the memory analysis of the compiled step. With --append (the default) a result block is
appended to BENCHMARKS.md at the repository root.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from mmjax import config as config_lib  # noqa: E402


# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmjax.models import TwoTower  # noqa: E402
from provenance import cpu_model, git_revision  # noqa: E402  pylint: disable=unused-import
from mmjax.parallel import mesh as mesh_lib  # noqa: E402
from mmjax.train import compile_cache, loop, optim, state as state_lib, step as step_lib  # noqa: E402,E501

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', str(REPO / 'configs' / 'bench_tiny.py'),
                                'Config file (a get_config() module).', lock_config=True)
flags.DEFINE_integer('warmup_steps', 2, 'Steps run (and not timed) after compilation.')
flags.DEFINE_integer('steps', 5, 'Timed steps; the median is reported.')
flags.DEFINE_bool('append', True, 'Append a result block to BENCHMARKS.md.')
flags.DEFINE_integer('matmul_n', 2048, 'Side of the f32 matmul that measures the peak FLOP/s.')
flags.DEFINE_integer('matmul_runs', 5, 'Timed runs of the peak matmul (median reported).')
flags.DEFINE_string('note', '', 'Free text stored with the result.')
flags.DEFINE_string('profile_dir', None, 'If set, a jax.profiler trace of 2 steps goes here.')
flags.DEFINE_string('benchmarks_file', str(REPO / 'BENCHMARKS.md'), 'Where --append writes.')

SPECIAL_TOKENS = 3  # [PAD]=0, [UNK]=1, [EOS]=2 (mmjax.data.tokenizer).
EOS_ID = 2


def mesh_context(mesh, rules):
  """The mesh + logical axis rules context the library traces under."""
  activate = getattr(mesh_lib, 'activate', None)  # The library's own helper, where it has one.
  if activate is not None:
    return activate(mesh, rules)
  stack = contextlib.ExitStack()
  stack.enter_context(mesh)
  stack.enter_context(nn.logical_axis_rules(rules))
  return stack


# ---------------------------------------------------------------------------------------------
# Synthetic data.


def synthetic_batch(cfg: config_lib.ModelConfig, rows: int, seed: int) -> dict:
  """Random uint8 images; right-padded captions of random length ending in EOS, with their mask."""
  rng = np.random.default_rng(seed)
  s, L, vocab = cfg.image.image_size, cfg.text.max_len, cfg.text.vocab_size
  images = rng.integers(0, 256, size=(rows, s, s, 3), dtype=np.uint8)
  lengths = rng.integers(min(4, L), L + 1, size=(rows,))  # EOS included.
  pos = np.arange(L)[None, :]
  mask = (pos < lengths[:, None]).astype(np.int32)
  tokens = rng.integers(SPECIAL_TOKENS, vocab, size=(rows, L), dtype=np.int32)
  tokens = np.where(pos == lengths[:, None] - 1, EOS_ID, tokens)
  tokens = np.where(mask == 1, tokens, 0).astype(np.int32)
  return {'image': images, 'tokens': tokens, 'mask': mask}


# ---------------------------------------------------------------------------------------------
# FLOPs.


def _tokens_per_example(path: tuple[str, ...], cfg: config_lib.ModelConfig) -> int:
  """How many positions of one example a matmul kernel at `path` is applied to."""
  img_len = cfg.image.num_patches + (1 if cfg.image.pool == 'cls' else 0)
  txt_len = cfg.text.max_len
  tower = path[0]
  if tower in ('img_head', 'txt_head'):
    return 1
  seq = img_len if tower == 'img' else txt_len
  if 'map_head' in path:  # The probe is one query; keys/values span the sequence.
    return seq if ('key' in path or 'value' in path) else 1
  return seq


def analytic_flops(params, cfg: config_lib.ModelConfig, batch: int) -> dict[str, float]:
  """6 * (matmul params x positions) + attention (QK^T and AV, fwd + bwd) + the b x b loss.

  Counts the full L x L score matrix also for causal attention (what the XLA path computes).
  The token embedding is a gather, not a matmul, and is not counted.
  """
  dense = 0.0
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for kp, leaf in flat:
    path = tuple(getattr(k, 'key', str(k)) for k in kp)
    if path[-1] in ('kernel', 'patch_kernel'):
      dense += 6.0 * leaf.size * _tokens_per_example(path, cfg) * batch
  attn = 0.0
  img_len = cfg.image.num_patches + (1 if cfg.image.pool == 'cls' else 0)
  for tower_cfg, seq in ((cfg.image, img_len), (cfg.text, cfg.text.max_len)):
    attn += 3.0 * 4.0 * seq * seq * tower_cfg.width * tower_cfg.depth * batch
    if tower_cfg.pool == 'map':
      attn += 3.0 * 4.0 * seq * tower_cfg.width * batch
  loss = 3.0 * 2.0 * batch * batch * cfg.embed_dim
  return {'dense': dense, 'attention': attn, 'loss': loss, 'total': dense + attn + loss}


def matmul_peak(n: int, runs: int) -> tuple[float, float]:
  """A jitted dense f32 (n x n) @ (n x n) on the default device, median of `runs` after warmup:
  (FLOP per wall second, FLOP per second of process CPU time)."""
  key_a, key_b = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key_a, (n, n), jnp.float32)
  b = jax.random.normal(key_b, (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  for _ in range(2):
    f(a, b).block_until_ready()
  times, cpu_times = [], []
  for _ in range(runs):
    t0, c0 = time.perf_counter(), time.process_time()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  flops = 2.0 * n ** 3
  return flops / float(np.median(times)), flops / max(float(np.median(cpu_times)), 1e-9)


# ---------------------------------------------------------------------------------------------
# Provenance.


def machine_info() -> dict[str, str]:
  dev = jax.devices()[0]
  return {
      'cpu': f'{cpu_model()} ({os.cpu_count()} cores)',
      'jax': f'{jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} x '
             f'{dev.device_kind}, {jax.process_count()} process(es)',
      'XLA_FLAGS': os.environ.get('XLA_FLAGS', '') or '(none)',
  }


def config_name() -> str:
  path = pathlib.Path(config_flags.get_config_filename(FLAGS['config'])).resolve()
  try:
    return str(path.relative_to(REPO))
  except ValueError:
    return str(path)


def config_overrides(argv: list[str]) -> list[str]:
  return [a for a in argv[1:] if a.startswith('--config.')]


# ---------------------------------------------------------------------------------------------
# Formatting.


def _si(x: float | None, unit: str) -> str:
  if x is None:
    return 'n/a'
  for scale, prefix in ((1e12, 'T'), (1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
    if abs(x) >= scale:
      return f'{x / scale:.3g} {prefix}{unit}'
  return f'{x:.3g} {unit}'


def _loadavg() -> str:
  try:
    return '/'.join(f'{x:.1f}' for x in os.getloadavg())
  except OSError:
    return 'n/a'


def _mib(x: int | None) -> str:
  return 'n/a' if x is None else f'{x / 2**20:.1f} MiB'


def table(rows: list[tuple[str, str]]) -> str:
  w = max(len(k) for k, _ in rows)
  return '\n'.join(f'  {k:<{w}}  {v}' for k, v in rows)


# ---------------------------------------------------------------------------------------------


def main(argv):
  config = FLAGS.config
  compile_cache.cpu_schedule(config)  # Before the backend starts (XLA reads its flags once).
  config_lib.validate(config)
  if FLAGS.steps < 1:
    raise app.UsageError('--steps must be >= 1.')

  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.rules(config)
  cfg = config_lib.model_config(config)
  model = TwoTower(cfg)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  state, state_shardings = state_lib.create_train_state(model, tx, mesh, rules,
                                                        jax.random.key(config.seed))
  n_params = state_lib.param_count(state.params)

  batch_sh = mesh_lib.batch_sharding(mesh)
  repl = mesh_lib.replicated(mesh)
  b = config.batch_size
  rows = b // jax.process_count()
  batches = [mesh_lib.global_batch(
      synthetic_batch(cfg, rows, seed=1000 * i + jax.process_index()), mesh)
             for i in range(2)]
  rng = jax.device_put(jax.random.key(config.seed), repl)

  jitted = step_lib.jit_train_step(state_shardings, batch_sh, repl,
                                   step_lib.make_options(config, mesh))
  t0 = time.perf_counter()
  with mesh_context(mesh, rules):
    lowered = jitted.lower(state, batches[0], rng)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0

  xla_flops = loop.step_flops(compiled)
  analytic = analytic_flops(state.params, cfg, b)
  mem = compiled.memory_analysis()

  def run_step(i):
    nonlocal state
    state, metrics = compiled(state, batches[i % len(batches)], rng)  # `state` is donated.
    jax.block_until_ready((state, metrics))
    return metrics

  peak_before, peak_cpu_before = matmul_peak(FLAGS.matmul_n, FLAGS.matmul_runs)
  for i in range(FLAGS.warmup_steps):
    run_step(i)
  load_before = _loadavg()
  times, cpu_times = [], []
  for i in range(FLAGS.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    metrics = run_step(i)
    times.append(time.perf_counter() - t0)
    cpu_times.append(time.process_time() - c0)
  load_after = _loadavg()
  loss = float(metrics['loss'])

  if FLAGS.profile_dir:
    with jax.profiler.trace(FLAGS.profile_dir):
      for i in range(2):
        run_step(i)

  peak_after, peak_cpu_after = matmul_peak(FLAGS.matmul_n, FLAGS.matmul_runs)
  # Other processes on the machine only ever slow the matmul down: the faster of the two
  # measurements is the better estimate of what this machine can do.
  peak = max(peak_before, peak_after)
  peak_cpu = max(peak_cpu_before, peak_cpu_after)

  # XLA's cost analysis of an SPMD program is per device; the peak is one device's.
  n_dev = jax.device_count()
  step_s = float(np.median(times))
  flops_global = xla_flops * n_dev if xla_flops else None
  achieved = flops_global / step_s if flops_global else None
  mfu = achieved / (peak * n_dev) if achieved else None
  analytic_achieved = analytic['total'] / step_s
  cpu_step_s = float(np.median(cpu_times))
  # Process CPU time / (wall time x cores): ~1 when the step uses every core and nothing else
  # runs; well below 1 means a contended machine (see the load average) or idle cores.
  cpu_util = sum(cpu_times) / (sum(times) * (os.cpu_count() or 1))
  # The same ratio in FLOP per second of process CPU time, for the step and for the matmul: it
  # stays put when other processes take cores away (single-process CPU runs only).
  mfu_cpu = (flops_global / cpu_step_s) / peak_cpu if flops_global and n_dev == 1 else None

  rows_out = [
      ('config', ' '.join([config_name()] + config_overrides(sys.argv))),
      ('params', f'{n_params:,}'),
      ('batch', f'{b} pairs, mesh {dict(mesh.shape)}'),
      ('step FLOPs (XLA)', _si(flops_global, 'FLOP')),
      ('step FLOPs (analytic)', f"{_si(analytic['total'], 'FLOP')} (dense "
                                f"{_si(analytic['dense'], '')}, attn "
                                f"{_si(analytic['attention'], '')}, loss "
                                f"{_si(analytic['loss'], '')})"),
      ('compile', f'{compile_s:.1f} s'),
      ('step time', f'median {step_s:.3f} s (min {min(times):.3f}, max {max(times):.3f}, '
                    f'{len(times)} steps after {FLAGS.warmup_steps} warmup)'),
      ('step CPU time', f'median {cpu_step_s:.3f} s of process CPU time; CPU utilisation '
                        f'{100 * cpu_util:.0f}% of {os.cpu_count()} cores; load average '
                        f'{load_before} -> {load_after}'),
      ('throughput', f'{b / step_s:.1f} pairs/s'),
      ('achieved', f'{_si(achieved, "FLOP/s")} (XLA count), '
                   f'{_si(analytic_achieved, "FLOP/s")} (analytic)'),
      ('matmul peak', f'{_si(peak, "FLOP/s")} per device (f32 {FLAGS.matmul_n}^3, median of '
                      f'{FLAGS.matmul_runs}; before steps {_si(peak_before, "FLOP/s")}, after '
                      f'{_si(peak_after, "FLOP/s")})'),
      ('MFU', 'n/a' if mfu is None else f'{100 * mfu:.1f}% (XLA FLOPs / matmul peak)' + (
          '' if mfu_cpu is None else f'; per CPU-second {100 * mfu_cpu:.1f}% (step FLOP per CPU '
          f'second / matmul FLOP per CPU second, {_si(peak_cpu, "FLOP/s")})')),
      ('memory / device', 'n/a' if mem is None else
       f'args {_mib(mem.argument_size_in_bytes)}, out {_mib(mem.output_size_in_bytes)}, '
       f'temp {_mib(mem.temp_size_in_bytes)}'),
      ('final loss', f'{loss:.4f}'),
  ]
  info = machine_info()
  print('\nmmjax train-step benchmark')
  print(table(rows_out + [('machine', info['cpu']), ('jax', info['jax']),
                          ('XLA_FLAGS', info['XLA_FLAGS'])]))
  if FLAGS.profile_dir:
    print(f'  profile: {FLAGS.profile_dir}')
  if cpu_util < 0.8 and (os.cpu_count() or 1) > 1:
    print(f'  WARNING: the step used {100 * cpu_util:.0f}% of the cores: other processes were '
          'probably competing for the CPU (or the model is too small to use every core), so the '
          'wall times and MFU are pessimistic; the per-CPU-second MFU is the steadier figure.')

  if FLAGS.append and jax.process_index() == 0:
    body = ['| metric | value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in rows_out[1:]]
    body.append(f'| step times (s) | {", ".join(f"{t:.3f}" for t in times)} |')
    body.append(f'| step CPU times (s) | {", ".join(f"{t:.3f}" for t in cpu_times)} |')
    append_result(f'train_step: {rows_out[0][1].strip()}',
                  [f'- note: {FLAGS.note}'] if FLAGS.note else [], body)


def append_result(title: str, details: list[str], body: list[str]) -> None:
  """Appends a '## title (date)' block with commit and machine lines to FLAGS.benchmarks_file."""
  info = machine_info()
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  block = [f'\n## {title} ({now})\n', f'- commit: `{git_revision()}`',
           f'- machine: {info["cpu"]}; jax {info["jax"]}; XLA_FLAGS: `{info["XLA_FLAGS"]}`',
           *details, '', *body]
  path = pathlib.Path(FLAGS.benchmarks_file)
  if not path.exists():
    path.write_text(BENCHMARKS_HEADER)
  with path.open('a') as f:
    f.write('\n'.join(block) + '\n')
  print(f'appended to {path}')


BENCHMARKS_HEADER = """\
# Benchmarks

Results are appended by the scripts in `bench/` (see `bench/README.md`), newest last. Each block
records the date (UTC), the commit (`-dirty` when tracked files had uncommitted changes), the
machine (CPU model and cores, jax backend and devices, jax version, XLA_FLAGS) and the config with
its command-line overrides. Numbers from different machines are not comparable; MFU is relative
to a dense f32 matmul measured on the same machine in the same process.
"""


if __name__ == '__main__':
  app.run(main)
