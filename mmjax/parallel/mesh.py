"""One place that turns the config into a device mesh and shardings.

The mesh always has the axes ('data', 'fsdp', 'tensor'), even on one CPU device, so the code that
runs on a laptop is the code that runs on a pod: only the axis sizes change.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmjax.types import BATCH_AXES, DEFAULT_MESH, MESH_AXES, require


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves the mesh axis sizes (one may be -1) against the device count."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  require(len(free) <= 1, f'config.mesh: at most one axis may be -1, got {sizes}.')
  for a, s in sizes.items():
    require(s == -1 or s >= 1, f'config.mesh.{a}={s} must be >= 1 or -1.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    require(num_devices % fixed == 0,
             f'config.mesh {sizes}: the fixed axes ({fixed} devices) do not divide the '
             f'{num_devices} available devices.')
    sizes[free[0]] = num_devices // fixed
  require(math.prod(sizes.values()) == num_devices,
           f'config.mesh {sizes} needs {math.prod(sizes.values())} devices, but '
           f'{num_devices} are available.')
  return sizes


def default_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Every device on the 'data' axis: the mesh of a runner or tool that is given none."""
  return make_mesh(DEFAULT_MESH, devices)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over all (or the given) devices with axis sizes from `config.mesh`."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils  # pylint: disable=import-outside-toplevel
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


@contextlib.contextmanager
def activate(mesh: Mesh, axis_rules):
  """Makes `mesh` and the logical axis rules current (for tracing and sharding constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    yield


def rules(config) -> tuple[tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.logical_axis_rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(x: np.ndarray | jax.Array, mesh: Mesh) -> jax.Array:
  """A host value (the same in every process) as one array replicated over the whole mesh.

  Unlike `jax.device_put`, this works when the mesh spans devices of other processes.
  """
  if jax.dtypes.issubdtype(getattr(x, 'dtype', None), jax.dtypes.prng_key):
    return jax.random.wrap_key_data(replicate(jax.random.key_data(x), mesh))
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, replicated(mesh), lambda idx: host[idx])


def logical_shardings(abstract_tree: Any, mesh: Mesh, axis_rules) -> Any:
  """NamedShardings for a tree of (possibly LogicallyPartitioned-boxed) abstract values."""
  # A box around an empty subtree (optax's MaskedNode: no optimizer state for a frozen
  # parameter) gets no sharding: unbox it so it stays empty.
  abstract_tree = jax.tree.map(
      lambda x: x.value if isinstance(x, nn.Partitioned) and not jax.tree.leaves(x) else x,
      abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> one global jax.Array per field, sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
