"""One metric writer: `metrics.jsonl` and TensorBoard event files, written by process 0 only."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Mapping

import jax


class MetricWriter:

  def __init__(self, workdir: str | pathlib.Path):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      workdir = pathlib.Path(workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      self._jsonl = open(workdir / 'metrics.jsonl', 'a', encoding='utf-8')  # pylint: disable=consider-using-with
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self._tb = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': int(step), 'time': time.time(), **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k.replace('@', '_at_'), v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
