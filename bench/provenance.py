"""Where a benchmark number came from: commit, CPU, load; shared by the scripts in bench/."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess

REPO = pathlib.Path(__file__).resolve().parents[1]


def git_revision() -> str:
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


def loadavg() -> str:
  try:
    return '/'.join(f'{x:.1f}' for x in os.getloadavg())
  except OSError:
    return 'n/a'
