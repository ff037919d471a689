"""Preemption: SIGTERM (what TPU VMs, GKE and Slurm send before taking a machine) makes every
process of the run save a checkpoint at the same step boundary and return normally (exit 0);
rerunning the same command resumes from it.

One process: a SIGTERM handler sets a flag that the loop reads after each step. Several
processes: JAX's preemption service (started by `jax.distributed.initialize`) notices the signal
on whichever process receives it and agrees on one step for all of them
(`multihost_utils.reached_preemption_sync_point`), so no process saves a different step or waits
in a collective for a peer that has left.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class Preemption:
  """`reached(step)` is True (on every process at once) once a SIGTERM has arrived."""

  def __init__(self):
    self.multi_process = jax.process_count() > 1
    self._flag = threading.Event()
    self._previous = None
    if not self.multi_process and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._flag.set()

  def reached(self, step: int) -> bool:
    if self.multi_process:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except RuntimeError:  # The preemption service is off (jax_enable_preemption_service).
        return False
    return self._flag.is_set()

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def __enter__(self) -> 'Preemption':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
