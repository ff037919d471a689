"""The command-line layer: the entry points that train, evaluate or embed with a model.

Every `python -m mmjax...` entry point shares one absl style (`mmjax.command`, re-exported here):
an entry point defines its flags, then calls `run(main)` (or is a `Command`); a `ConfigError` ends
it with a one-line message naming the key. This package adds `define_config`, the `--config` flag
of the commands that read a run config.
"""

from __future__ import annotations

from ml_collections import config_flags

from mmjax.command import FLAGS, Command, parse_flags, run, setup_logging

__all__ = ['FLAGS', 'Command', 'define_config', 'parse_flags', 'run', 'setup_logging']


def define_config(help_text: str = 'Config file (a get_config() module).') -> None:
  """The `--config` flag: a config file, `--config.<key>=value` overrides, locked."""
  config_flags.DEFINE_config_file('config', None, help_text, lock_config=True)
