"""Multi-process start-up: one `jax.distributed.initialize` call driven by `config.distributed`.

It must run before anything touches a JAX backend (device counts, arrays), so `mmjax.main` calls
it first. Every process then sees all devices of the job (`jax.devices()`) and its own
(`jax.local_devices()`); each loads only its share of the data and the global batch is assembled
with `jax.make_array_from_process_local_data` (mmjax.parallel.mesh.global_batch).

A process that dies (SIGKILL, lost host) must not leave the others hanging: a collective with a
dead peer fails at once on CPU (gloo: "connection closed by peer") and, where a collective would
wait forever (TPU ICI, NCCL), the coordinator declares the peer dead after
`heartbeat_timeout_s` without heartbeats and stops every process. `failure_exit` turns the
first kind into a prompt, named exit: without it, the failing process would then block in
jax.distributed's shutdown barrier, waiting for the dead peer, until the heartbeat timeout
aborts it (SIGABRT).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback

import jax
from jax._src import distributed as jax_distributed  # The coordinator client (live processes).

from mmjax.types import ConfigError

log = logging.getLogger(__name__)


def initialize(dist_cfg) -> bool:
  """Joins the job described by `config.distributed`; False if it is a single-process run."""
  addr = dist_cfg.coordinator_address
  if not addr:
    return False
  if jax.distributed.is_initialized():
    return True
  # Cross-process collectives between CPU devices (a no-op setting for GPU/TPU backends).
  jax.config.update('jax_cpu_collectives_implementation', dist_cfg.cpu_collectives)
  timeouts = dict(initialization_timeout=dist_cfg.timeout_s,
                  heartbeat_timeout_seconds=dist_cfg.heartbeat_timeout_s,
                  shutdown_timeout_seconds=dist_cfg.shutdown_timeout_s)
  if addr == 'auto':
    jax.distributed.initialize(**timeouts)
  else:
    jax.distributed.initialize(addr, num_processes=dist_cfg.num_processes,
                               process_id=dist_cfg.process_id, **timeouts)
  log.info('Process %d of %d: %d local devices, %d in total.', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def live_processes() -> list[int] | None:
  """The process ids the coordinator still hears from (None: unknown, e.g. it is gone too)."""
  client = jax_distributed.global_state.client
  if client is None:
    return None
  try:
    return sorted(int(i) for i in client.get_live_nodes(list(range(jax.process_count()))))
  except Exception:  # pylint: disable=broad-except  # the coordinator itself may be the lost one
    return None


@contextlib.contextmanager
def failure_exit():
  """In a multi-process run, an exception ends this process at once with status 1, after
  logging it and naming the processes the coordinator no longer hears from, instead of letting
  interpreter exit wait in the shutdown barrier for a peer that is gone. Checkpoints already
  written are complete (each is committed atomically); one being written is left unfinished and
  ignored on resume. One-process runs raise as usual."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    if not jax.distributed.is_initialized() or jax.process_count() == 1:
      raise
    live = live_processes()
    lost = (sorted(set(range(jax.process_count())) - set(live)) if live is not None else None)
    if isinstance(e, ConfigError):  # As mmjax.command reports it: the message, no traceback.
      print(f'Config error: {e}', file=sys.stderr)
    else:
      traceback.print_exc()
    who = (f'lost process(es) {lost} (the coordinator hears only from {live})' if lost else
           'no process reported lost yet (the coordinator declares one dead after '
           'distributed.heartbeat_timeout_s)' if live is not None else
           'the coordinator (process 0) is unreachable')
    log.error('Process %d of %d stops: %s: %s; %s. Exiting with status 1 without waiting for '
              'the other processes.', jax.process_index(), jax.process_count(),
              type(e).__name__, str(e).splitlines()[0] if str(e) else '', who)
    for handler in logging.getLogger().handlers:
      handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
