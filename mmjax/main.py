r"""Command line entry point.

  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo [--config.batch_size=64 ...]
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo --mode=eval
  python -m mmjax.main --config=configs/demo.py --workdir=runs/demo --mode=export
"""

from __future__ import annotations

import logging
import sys

from mmjax import config as config_lib

config_lib.ensure_configs_importable()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and exports.')
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'export'],
                  'train: train + evaluate (resumes from workdir); eval: evaluate the newest '
                  'checkpoint; export: write params + config + tokenizer to workdir/export.')
config_flags.DEFINE_config_file('config', None, 'Config file (a get_config() module).',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear message for an unknown --config.* key."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:
    key = str(e).strip('"\'')
    culprit = next((a for a in argv[1:] if a.startswith('--config.') and
                    a.split('=')[0].split('.')[-1] == key), None)
    where = f' in {culprit}' if culprit else ''
    sys.exit(f'Config error: unknown config key {key!r}{where}. Every key is listed, with a '
             'comment, in configs/base.py.')
  except flags.Error as e:
    sys.exit(f'Config error: {e}')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                      stream=sys.stderr, force=True)
  for noisy in ('absl', 'orbax', 'jax._src', 'grain'):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  config = FLAGS.config
  from mmjax.parallel import distributed  # pylint: disable=import-outside-toplevel
  try:
    config_lib.validate_schema(config)
    distributed.initialize(config.distributed)  # Before anything touches a JAX backend.
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    sys.exit(f'Config error: {e}')

  from mmjax.train import loop  # pylint: disable=import-outside-toplevel
  try:
    if FLAGS.mode == 'train':
      loop.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == 'eval':
      loop.evaluate_checkpoint(config, FLAGS.workdir)
    else:
      loop.export_checkpoint(config, FLAGS.workdir)
  except config_lib.ConfigError as e:
    sys.exit(f'Error: {e}')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
