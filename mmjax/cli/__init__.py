"""The command-line layer: every `python -m mmjax...` entry point shares this style.

An entry point defines its flags, then calls `run(main)`: absl parses them (a `--config` file
with `--config.*` overrides, locked, as `config_flags` does), logging goes to stderr at INFO with
the chattiest libraries at WARNING, and a `ConfigError` ends the program with a one-line
message naming the key instead of a traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

from mmjax.types import ConfigError

FLAGS = flags.FLAGS
QUIET_LOGGERS = ('absl', 'orbax', 'jax._src', 'grain')


def define_config(help_text: str = 'Config file (a get_config() module).') -> None:
  """The `--config` flag: a config file, `--config.<key>=value` overrides, locked."""
  config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                      stream=sys.stderr, force=True)
  for noisy in QUIET_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.WARNING)


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
             'comment, in mmjax/schema.py.')
  except flags.Error as e:
    sys.exit(f'Config error: {e}')


def run(main: Callable[[], None]) -> None:
  """Parses the flags and runs `main()` (no positional arguments are accepted)."""

  def absl_main(argv):
    if len(argv) > 1:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    setup_logging()
    try:
      main()
    except ConfigError as e:
      sys.exit(f'Config error: {e}')

  app.run(absl_main, flags_parser=parse_flags)
