r"""Per-device memory of the contrastive loss (forward + backward) across devices, by implementation.

  python bench/loss_memory.py [--devices=8] [--batches=4096,8192,16384,32768,65536] \
      [--embed_dim=512] [--noappend]

For each global batch B the loss and its gradient w.r.t. both towers' embeddings, the temperature
and the bias are lowered and compiled (never run) on `--devices` simulated CPU devices with the
batch split over the `data` axis, and XLA's `memory_analysis()` gives the per-device temporary
bytes. Implementations (mmjax.losses.distributed):

- ring (sigmoid): text blocks circulate with ppermute; O(b^2) per device, b = B / D;
- all_gather (sigmoid, softmax): local rows vs the gathered other tower; O(b * B) per device;
- dense: the global [B, B] logits matrix, as a single-device implementation would build it.

Compiling is enough: the numbers are what XLA allocates, the same as on an accelerator with the
same partitioning (the CPU backend's fusion decisions differ a little). A result block is
appended to BENCHMARKS.md.
"""

from __future__ import annotations

import simulated_devices  # noqa: F401  (before jax: sets --devices)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

import train_step as tsb  # noqa: E402  (its flags, e.g. --append, are shared)
from mmjax import config as config_lib  # noqa: E402
from mmjax.losses import distributed  # noqa: E402
from mmjax.parallel import mesh as mesh_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('batches', ['4096', '8192', '16384', '32768', '65536'], 'Global batch sizes.')
flags.DEFINE_integer('embed_dim', 512, 'Embedding dimension.')


def main(argv):
  del argv

  mesh_cfg = config_lib.base_config().mesh
  mesh = mesh_lib.make_mesh(mesh_cfg)
  n_dev = distributed.num_batch_shards(mesh)
  impls = [('sigmoid', 'ring'), ('sigmoid', 'all_gather'), ('sigmoid', 'dense'),
           ('softmax', 'all_gather'), ('softmax', 'dense')]
  rows = []
  for batch in map(int, FLAGS.batches):
    if batch % n_dev:
      raise app.UsageError(f'Batch {batch} does not divide over {n_dev} devices.')
    z = jax.ShapeDtypeStruct((batch, FLAGS.embed_dim), jnp.float32,
                             sharding=mesh_lib.batch_sharding(mesh))
    s = jax.ShapeDtypeStruct((), jnp.float32, sharding=mesh_lib.replicated(mesh))
    row = {'batch': batch}
    for kind, impl in impls:
      loss = distributed.make_loss(kind, impl, mesh)
      with mesh_lib.activate(mesh, ()):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3))).lower(
            z, z, s, s).compile()
      row[f'{kind}/{impl}'] = compiled.memory_analysis().temp_size_in_bytes
      print(f'B={batch:>6} {kind:>7} {impl:>10}: temp {row[f"{kind}/{impl}"] / 2**20:10.1f} MiB '
            'per device', flush=True)
    rows.append(row)

  cols = [f'{k}/{i}' for k, i in impls]
  b_col = lambda r: r['batch'] // n_dev
  lines = ['| global B | b per device | ' + ' | '.join(cols) + ' | ring / all_gather |',
           '|---' * (len(cols) + 3) + '|']
  for r in rows:
    ratio = r['sigmoid/all_gather'] / max(r['sigmoid/ring'], 1)
    lines.append(f'| {r["batch"]} | {b_col(r)} | ' +
                 ' | '.join(f'{r[c] / 2**20:.1f}' for c in cols) + f' | 1/{ratio:.1f} |')
  print('\nPer-device temp memory (MiB) of loss + gradient, '
        f'{n_dev} devices, d={FLAGS.embed_dim}:\n' + '\n'.join(lines))
  if FLAGS.append:
    tsb.append_result(f'loss_memory: {n_dev} devices, d={FLAGS.embed_dim}',
                      ['- compiled only: XLA memory analysis, per-device temp bytes of loss + '
                       'gradient, MiB'], lines)


if __name__ == '__main__':
  app.run(main)
