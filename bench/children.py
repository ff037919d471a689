"""Child processes of the side-by-side benchmarks (stdlib only: it runs in any venv).

`run` starts a command, streams its output lines with the wall time each arrived at (so a parent
can time events a child logs: start-up, compile, first step), and reads the child's own peak RSS
from `os.wait4` (ru_maxrss: the child alone, not the parent or other children).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import pathlib
import subprocess
import sys
import time

import provenance

REPO = provenance.REPO


@dataclasses.dataclass
class Result:
  cmd: list[str]
  returncode: int
  wall_s: float
  maxrss_bytes: int
  lines: list[tuple[float, str]]  # (seconds after the start, line) of stdout + stderr.

  @property
  def text(self) -> str:
    return '\n'.join(line for _, line in self.lines)

  def first(self, needle: str) -> float | None:
    """Seconds after the start at which the first line containing `needle` arrived."""
    return next((t for t, line in self.lines if needle in line), None)

  def check(self) -> Result:
    if self.returncode:
      raise RuntimeError(f'{" ".join(self.cmd)} failed ({self.returncode}):\n{self.text[-3000:]}')
    return self


def run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: pathlib.Path = REPO,
        echo: bool = False, timeout_s: float | None = None, stop_at: str | None = None) -> Result:
  """Runs `cmd` to completion (or until a line contains `stop_at`, then kills it); its lines
  are timestamped as they arrive."""
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1)
  lines = []
  for line in proc.stdout:
    lines.append((time.perf_counter() - t0, line.rstrip('\n')))
    if echo:
      print('   |', line, end='', flush=True)
    if (timeout_s and time.perf_counter() - t0 > timeout_s) or (stop_at and stop_at in line):
      proc.kill()
      break
  _, status, usage = os.wait4(proc.pid, 0)
  proc.returncode = os.waitstatus_to_exitcode(status)
  proc.stdout.close()
  # Linux reports ru_maxrss in KiB.
  return Result(cmd, proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024, lines)


def loadavg() -> str:
  try:
    return '/'.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'n/a'


def append_block(path: pathlib.Path, title: str, lines: list[str]) -> None:
  """Appends '## title (date)' with the commit, the machine and `lines` to BENCHMARKS.md."""
  now = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
  block = [f'\n## {title} ({now})\n', f'- commit: `{provenance.git_revision()}`',
           f'- machine: {provenance.cpu_model()} ({os.cpu_count()} cores); python '
           f'{sys.version.split()[0]}', *lines]
  with pathlib.Path(path).open('a') as f:
    f.write('\n'.join(block) + '\n')
  print(f'appended to {path}')
