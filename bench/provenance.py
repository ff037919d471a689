"""Where a benchmark ran: the git revision and the CPU (no JAX import, for the scripts that only
drive the CLI)."""

from __future__ import annotations

import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def git_revision() -> str:
  """The short HEAD revision, '-dirty' when tracked files differ from it."""
  try:
    rev = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.strip()
    return rev + ('-dirty' if dirty else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def cpu_model() -> str:
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
