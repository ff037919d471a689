"""Multi-process start-up: one `jax.distributed.initialize` call driven by `config.distributed`.

It must run before anything touches a JAX backend (device counts, arrays), so `mmjax.main` calls
it first. Every process then sees all devices of the job (`jax.devices()`) and its own
(`jax.local_devices()`); each loads only its share of the data and the global batch is assembled
with `jax.make_array_from_process_local_data` (mmjax.parallel.mesh.global_batch).
"""

from __future__ import annotations

import logging

import jax

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
  if addr == 'auto':
    jax.distributed.initialize(initialization_timeout=dist_cfg.timeout_s)
  else:
    jax.distributed.initialize(addr, num_processes=dist_cfg.num_processes,
                               process_id=dist_cfg.process_id,
                               initialization_timeout=dist_cfg.timeout_s)
  log.info('Process %d of %d: %d local devices, %d in total.', jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
