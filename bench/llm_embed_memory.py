r"""Compiled per-device memory of the LLM embedder's train step, without running it.

  python bench/llm_embed_memory.py [--config=configs/llm_embed_2b.py] [--devices=8] \
      [--micro_batches=16,4] [--noappend]

The whole train step (GradCache embedding passes, InfoNCE over the global batch with hard
negatives, LoRA-frozen optimizer update) is lowered with abstract inputs only: the state from
`jax.eval_shape` with its FSDP shardings and the batch as ShapeDtypeStructs. Nothing of model
size is ever allocated, so a ~2B-parameter recipe is checked on a laptop. XLA's
`memory_analysis()` of the compiled step gives the per-device arguments (parameters, optimizer
state, the batch shard), outputs and temporaries; their sum bounds what one device needs
(donated state buffers are reused for the outputs, so the real peak is lower). The CPU backend's
fusion decisions differ a little from an accelerator's. A result block is appended to
BENCHMARKS.md.
"""

from __future__ import annotations

import simulated_devices  # noqa: F401  (before jax: sets --devices)

# pylint: disable=wrong-import-position
import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

import train_step as tsb  # noqa: E402  (--config, --append and --benchmarks_file live there)
from mmjax import config as config_lib  # noqa: E402
from mmjax.data import pipeline  # noqa: E402
from mmjax.models import llm_embedder, lora  # noqa: E402
from mmjax.parallel import mesh as mesh_lib  # noqa: E402
from mmjax.train import optim, state as state_lib, step as step_lib, transfer  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list('micro_batches', [], 'GradCache micro-batch counts to compile (default: the '
                  "config's).")

GIB = 2.0 ** 30


def compiled_memory(config) -> dict[str, float]:
  """Per-device memory (GiB) and parameter counts of the compiled train step of `config`."""
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = mesh_lib.rules(config)
  model = llm_embedder.LLMEmbedder(llm_embedder.from_run_config(config))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps,
                               frozen=transfer.frozen_pattern(config))
  abstract, shardings = state_lib.state_layout(model, tx, mesh, rules, jax.random.key(0))
  batch_sh, repl = mesh_lib.batch_sharding(mesh), mesh_lib.replicated(mesh)
  spec = pipeline.batch_spec(config)
  batch = {k: jax.ShapeDtypeStruct(*spec[k], sharding=batch_sh)
           for k in pipeline.train_columns(config)}
  key = jax.eval_shape(lambda: jax.random.key(0))
  rng = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=repl)
  jitted = step_lib.jit_train_step(shardings, batch_sh, repl,
                                   step_lib.make_options(config, mesh))
  t0 = time.perf_counter()
  with mesh_lib.activate(mesh, rules):
    compiled = jitted.lower(abstract, batch, rng).compile()
  mem = compiled.memory_analysis()
  frozen = optim.param_labels(abstract.params, transfer.frozen_pattern(config))
  trainable = sum(x.size for x, lab in zip(jax.tree.leaves(abstract.params),
                                           jax.tree.leaves(frozen)) if lab != optim.FROZEN)
  return {'params': state_lib.param_count(abstract.params), 'trainable': trainable,
          'adapters': lora.adapter_count(abstract.params),
          'arguments': mem.argument_size_in_bytes / GIB, 'outputs': mem.output_size_in_bytes / GIB,
          'temp': mem.temp_size_in_bytes / GIB,
          'total': (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    + mem.temp_size_in_bytes) / GIB,
          'compile_s': time.perf_counter() - t0, 'devices': mesh.size,
          'mesh': dict(mesh.shape)}


def main(argv):
  del argv
  config = FLAGS.config
  rows = []
  for m in [int(x) for x in FLAGS.micro_batches] or [config.micro_batches]:
    config.unlock()
    config.micro_batches = m
    config.lock()
    r = compiled_memory(config)
    rows.append((m, r))
    print(f'micro_batches={m}: {r}', flush=True)
  c = config
  shards = rows[0][1]['mesh']['data'] * rows[0][1]['mesh']['fsdp']
  lines = ['| micro_batches | rows per micro-batch per device | arguments GiB | outputs GiB | '
           'temp GiB | total GiB | compile s |', '|---|---|---|---|---|---|---|']
  for m, r in rows:
    lines.append(f'| {m} | {c.batch_size // shards // m} | {r["arguments"]:.2f} | '
                 f'{r["outputs"]:.2f} | {r["temp"]:.2f} | {r["total"]:.2f} | '
                 f'{r["compile_s"]:.0f} |')
  r = rows[0][1]
  details = [
      '- compiled only (never run): XLA memory_analysis() of the whole train step, per device',
      f'- {r["params"] / 1e9:.2f}B parameters, {r["trainable"] / 1e6:.1f}M trainable '
      f'({r["adapters"] / 1e6:.1f}M LoRA adapters r={c.model.lora.rank}, the rest the '
      f'projector{"" if c.model.image.locked else " and the ViT"}); decoder base frozen'
      f'{", ViT locked" if c.model.image.locked else ""}',
      f'- batch {c.batch_size} (+{c.data.num_hard_negatives} hard negative per query), sequence '
      f'{c.model.llm.max_len}, image {c.model.image.image_size}px, dtype {c.model.dtype}, '
      f'params {c.model.param_dtype}, mesh {r["mesh"]} on {r["devices"]} simulated CPU devices, '
      f'decoder scan={c.model.decoder.scan_layers} remat={c.model.decoder.remat_policy}']
  print('\n'.join(details + lines))
  if FLAGS.append:
    name = config_flags.get_config_filename(FLAGS['config'])
    tsb.append_result(f'llm_embed_memory: {name}', details, lines)


if __name__ == '__main__':
  app.run(main)
