r"""Command line entry point.

  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo [--config.batch_size=64 ...]
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo --mode=export
  python -m mmjax.main --config=configs/tiny.py --workdir=runs/aot --mode=compile \
      --compile_topology=v5e:2x2   # needs the `tpu` extra (libtpu); no TPU needed
"""

from __future__ import annotations

from absl import flags

from mmjax import cli
from mmjax import config as config_lib
from mmjax.parallel import distributed
from mmjax.train import aot, compile_cache, loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export', 'compile'],
                  'train: train + evaluate (resumes from workdir); eval: evaluate the newest '
                  'checkpoint; export: write params + config + tokenizer to workdir/export; '
                  'compile: compile the train and embedding steps for --compile_topology and '
                  'report per-chip memory, FLOPs, collectives (workdir/compile_<topology>.json).')
flags.DEFINE_string('compile_topology', None,
                    "--mode=compile: the TPU topology to compile for, e.g. 'v5e:2x2', "
                    "'v5e:16x16', 'v5p:4x4x8' (mmjax.train.aot).")
cli.define_config()
flags.mark_flags_as_required(['config', 'workdir'])
parse_flags = cli.parse_flags  # Kept for callers of the old name.


def main() -> None:
  config = FLAGS.config
  config_lib.validate_schema(config)
  if FLAGS.mode == 'compile':  # One process, no backend of its own: the topology's devices.
    if not FLAGS.compile_topology:
      raise config_lib.ConfigError('--mode=compile needs --compile_topology (e.g. v5e:2x2).')
    aot.compile_for_topology(config, FLAGS.workdir, FLAGS.compile_topology)
    return
  compile_cache.cpu_schedule(config)  # XLA:CPU flags: read once, when the backend starts.
  distributed.initialize(config.distributed)  # Before anything touches a JAX backend.
  with distributed.failure_exit():  # A dead peer: exit promptly, never hang (multi-process).
    config_lib.validate(config)
    if FLAGS.mode == 'train':
      loop.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      loop.evaluate_checkpoint(config, FLAGS.workdir)
    else:
      loop.export_checkpoint(config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
