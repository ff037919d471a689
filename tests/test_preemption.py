"""One process: SIGTERM sets the preemption flag the loop reads after each step (the
multi-process path, JAX's preemption sync point, runs in tests/test_multiprocess.py)."""

from __future__ import annotations

import os
import signal

from mmjax.train import preemption


def test_sigterm_is_caught_and_the_handler_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption() as p:
    assert not p.multi_process and not p.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)  # Handled: the test process keeps running.
    assert p.reached(2) and p.reached(3)
  assert signal.getsignal(signal.SIGTERM) is before
