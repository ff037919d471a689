"""The one CLI style (mmjax.command): commands callable in-process and as `python -m`."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
from absl import flags

from mmjax import command
from mmjax.types import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def _define(fv):
  flags.DEFINE_string('out', None, 'Where.', flag_values=fv)
  flags.DEFINE_integer('k', 2, 'How many.', flag_values=fv)
  flags.mark_flag_as_required('out', flag_values=fv)


def _body(args, positional):
  if args.k < 1:
    raise ConfigError(f'--k={args.k} must be >= 1.')
  return vars(args), positional


def test_a_command_parses_its_own_flags_each_call():
  first = command.Command(_define, _body)
  other = command.Command(_define, _body, positional=True)  # The same flag names: no clash.
  assert first(['--out=a', '--k=3']) == ({'out': 'a', 'k': 3}, [])
  assert first(['--out=b']) == ({'out': 'b', 'k': 2}, [])  # Nothing left from the last call.
  assert other(['clicks', '--out=c']) == ({'out': 'c', 'k': 2}, ['clicks'])


@pytest.mark.parametrize('argv, message', [
    (['--k=3'], 'Config error: flag --out=None'),
    (['--out=a', '--k=x'], "Config error: flag --k=x: invalid literal for int() with base 10: 'x'"),
    (['--out=a', '--nope=1'], "Config error: Unknown command line flag 'nope'"),
    (['--out=a', 'extra'], "Config error: unexpected arguments ['extra']."),
    (['--out=a', '--k=0'], 'Config error: --k=0 must be >= 1.'),
])
def test_bad_input_is_one_config_error_line(argv, message):
  with pytest.raises(SystemExit) as e:
    command.Command(_define, _body)(argv)
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_python_m_prints_the_docstring_and_flags_and_names_bad_flags(tmp_path):
  run = lambda *a: subprocess.run([sys.executable, '-m', *a], cwd=REPO, capture_output=True,
                                  text=True, timeout=120, check=False)
  helped = run('mmjax.data.filter', '--help')
  assert 'Noisy-pair filtering' in helped.stdout and '--keep_fraction' in helped.stdout
  bad = run('mmjax.data.convert', 'documents', f'--docs={tmp_path}/d.jsonl', '--out=o',
            '--log=clicks.jsonl')
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1] == 'Config error: --log is not a flag of documents.'
