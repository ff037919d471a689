r"""Compiled memory of the decoder's forward + backward per remat policy, without running it.

  python bench/decoder_remat.py [--width=1536] [--mlp_dim=8960] [--depth=4] [--batch=8] \
      [--length=512] [--noappend]

The loss is the sum of the final hidden states (a stand-in for any objective), differentiated
w.r.t. all parameters; parameters and inputs are abstract (ShapeDtypeStructs), so nothing of model
size is allocated. For each layout (layer loop, scanned) and remat setting it reports XLA's
`memory_analysis()` temporaries (activations kept for the backward pass + workspace) and the
compile time, on the CPU backend (an accelerator fuses and schedules differently; the ordering is
what this shows). A result block is appended to BENCHMARKS.md (train_step.append_result).
"""

from __future__ import annotations

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import app, flags

import train_step as tsb  # (provenance and --append, --benchmarks_file live there)
from mmjax.config import REMAT_POLICIES, DecoderConfig
from mmjax.models.decoder import Decoder

FLAGS = flags.FLAGS
flags.DEFINE_integer('width', 1536, 'hidden_size (Qwen2-1.5B: 1536).')
flags.DEFINE_integer('depth', 4, 'Layers.')
flags.DEFINE_integer('mlp_dim', 8960, 'intermediate_size (Qwen2-1.5B: 8960).')
flags.DEFINE_integer('batch', 8, 'Sequences.')
flags.DEFINE_integer('length', 512, 'Tokens per sequence.')

MIB = 2.0 ** 20


def measure(cfg: DecoderConfig, batch: int, length: int) -> tuple[float, float]:
  """(temporary MiB, compile seconds) of value_and_grad of the decoder on abstract inputs."""
  model = Decoder(cfg, jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32),
      method=Decoder.encode_ids))['params'])

  def loss(p, i, m):
    h = model.apply({'params': p}, i, m, method=Decoder.encode_ids)
    return h.astype(jnp.float32).sum()

  start = time.perf_counter()
  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, ids, ids).compile()
  seconds = time.perf_counter() - start
  return compiled.memory_analysis().temp_size_in_bytes / MIB, seconds


def main(_):
  heads = FLAGS.width // 128  # Qwen2-1.5B: 12 heads of 128, 2 key/value heads.
  base = DecoderConfig(vocab_size=32_000, width=FLAGS.width, depth=FLAGS.depth, num_heads=heads,
                       num_kv_heads=max(heads // 6, 1), mlp_dim=FLAGS.mlp_dim,
                       max_len=FLAGS.length)
  rows = []
  for scan in (False, True):
    for policy in (None,) + REMAT_POLICIES:
      cfg = dataclasses.replace(base, scan_layers=scan, remat=policy is not None,
                                remat_policy=policy or 'nothing_saveable')
      mib, sec = measure(cfg, FLAGS.batch, FLAGS.length)
      rows.append(f'| {"scan" if scan else "loop"} | {policy or "no remat"} | {mib:,.0f} | '
                  f'{sec:.1f} |')
      print(rows[-1], flush=True)
  if FLAGS.append:
    tsb.append_result(
        f'decoder_remat: width {FLAGS.width}, depth {FLAGS.depth}, {FLAGS.batch} x '
        f'{FLAGS.length} tokens',
        [f'- decoder: {base.num_heads} heads, {base.num_kv_heads} kv heads, mlp {base.mlp_dim}, '
         'bfloat16 compute; forward + backward compiled only; XLA temporaries (activations '
         'saved for the backward pass and workspace)'],
        ['| layers | remat policy | temporaries (MiB) | compile (s) |',
         '| --- | --- | --- | --- |', *rows])

if __name__ == '__main__':
  app.run(main)
