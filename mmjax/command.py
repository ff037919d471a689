"""The one style of every `python -m mmjax...` entry point: absl flags and absl's app.

An entry point defines its flags, then calls `run(main)`: absl parses them, logging goes to
stderr at INFO with the chattiest libraries at WARNING, and a `ConfigError` (or a bad flag) ends
the program with a one-line `Config error: ...` message naming the key instead of a traceback.

A command that is also called from Python with an argument list (tests, notebooks:
`prepare.main(['--manifest=m.jsonl', '--out=d'])`) is a `Command`: it defines its flags on a
`FlagValues` of its own for each call, so several commands live in one process. This module sits
below mmjax.data and mmjax.hf (it imports only mmjax.types), so their own commands use it;
`mmjax.cli` adds the `--config` flag of the commands that read a run config.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import types
from typing import Any, Callable, Sequence

from absl import app, flags

from mmjax.types import ConfigError

FLAGS = flags.FLAGS
QUIET_LOGGERS = ('absl', 'orbax', 'jax._src', 'grain')


def setup_logging() -> None:
  logging.basicConfig(level=logging.INFO, format='%(asctime)s %(levelname)s %(name)s: %(message)s',
                      stream=sys.stderr, force=True)
  for noisy in QUIET_LOGGERS:
    logging.getLogger(noisy).setLevel(logging.WARNING)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
  """absl flag parsing, with a clear message for an unknown --config.* key or a bad flag."""
  try:
    return flag_values(argv)
  except (AttributeError, KeyError) as e:
    key = str(e).strip('"\'')
    culprit = next((a for a in argv[1:] if a.startswith('--config.') and
                    a.split('=')[0].split('.')[-1] == key), None)
    where = f' in {culprit}' if culprit else ''
    sys.exit(f'Config error: unknown config key {key!r}{where}. Every key is listed, with a '
             'comment, in mmjax/schema/.')
  except flags.Error as e:
    sys.exit(f'Config error: {e}')


def _app(main: Callable[[list[str]], Any], *, positional: bool) -> None:
  def absl_main(argv):
    if len(argv) > 1 and not positional:
      raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    setup_logging()
    try:
      main(argv[1:])
    except ConfigError as e:
      sys.exit(f'Config error: {e}')

  app.run(absl_main, flags_parser=parse_flags)


def run(main: Callable[[], None]) -> None:
  """Parses the flags and runs `main()` (no positional arguments are accepted)."""
  _app(lambda args: main(), positional=False)


@dataclasses.dataclass(frozen=True)
class Command:
  """A command run as `python -m NAME` (`.main()`) and from Python as `command(argv)`.

  `define(flag_values)` defines the command's flags on `flag_values` (absl `DEFINE_*(...,
  flag_values=flag_values)`); `body(args, positional)` runs it with `args` a namespace of those
  flags' values and the positional arguments, and returns its result.
  """

  define: Callable[[flags.FlagValues], None]
  body: Callable[[types.SimpleNamespace, list[str]], Any]
  positional: bool = False  # Whether positional arguments are accepted (else a usage error).

  def _namespace(self, flag_values: flags.FlagValues) -> Callable[[], types.SimpleNamespace]:
    """Defines the flags on `flag_values`; returns what reads their parsed values."""
    before = set(flag_values)
    self.define(flag_values)
    names = [n for n in flag_values if n not in before]
    return lambda: types.SimpleNamespace(**{n: flag_values[n].value for n in names})

  def __call__(self, argv: Sequence[str] | None = None) -> Any:
    """Runs in this process on `argv` (the arguments after the program name; default
    sys.argv[1:]) and returns the body's result; a bad flag exits as `python -m` would."""
    flag_values = flags.FlagValues()
    args = self._namespace(flag_values)
    argv = list(sys.argv[1:] if argv is None else argv)
    positional = parse_flags([sys.argv[0], *argv], flag_values)[1:]
    if positional and not self.positional:
      sys.exit(f'Config error: unexpected arguments {positional}.')
    try:
      return self.body(args(), positional)
    except ConfigError as e:
      sys.exit(f'Config error: {e}')

  def main(self) -> None:
    """As the program: absl's app on the global flags (`--help` prints the module's docstring
    and these flags), logging to stderr."""
    args = self._namespace(FLAGS)
    _app(lambda positional: self.body(args(), positional), positional=self.positional)
