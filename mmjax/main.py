r"""Command line entry point.

  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo [--config.batch_size=64 ...]
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo --mode=export
"""

from __future__ import annotations

from absl import flags

from mmjax import cli
from mmjax import config as config_lib
from mmjax.parallel import distributed
from mmjax.train import loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'],
                  'train: train + evaluate (resumes from workdir); eval: evaluate the newest '
                  'checkpoint; export: write params + config + tokenizer to workdir/export.')
cli.define_config()
flags.mark_flags_as_required(['config', 'workdir'])
parse_flags = cli.parse_flags  # Kept for callers of the old name.


def main() -> None:
  config = FLAGS.config
  config_lib.validate_schema(config)
  distributed.initialize(config.distributed)  # Before anything touches a JAX backend.
  config_lib.validate(config)
  if FLAGS.mode == 'train':
    loop.train_and_evaluate(config, FLAGS.workdir)
  elif FLAGS.mode == 'eval':
    loop.evaluate_checkpoint(config, FLAGS.workdir)
  else:
    loop.export_checkpoint(config, FLAGS.workdir)


if __name__ == '__main__':
  cli.run(main)
