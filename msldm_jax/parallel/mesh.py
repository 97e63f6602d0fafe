"""One device mesh for every stage, and global batches laid out over its data axis.

The mesh has a single axis, DATA_AXIS, over all devices of all processes: batches are split
along it (data parallel), and under FSDP the parameters are split along it too (see
`parallel/sharding.py`), as big_vision does.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh, setting: str = "batch_size") -> int:
  """This process's share of a global batch; an error naming `setting` (the config key, e.g.
  "vae.batch_size") if it does not split evenly over the processes and the devices."""
  processes = jax.process_count()
  if global_batch_size <= 0 or global_batch_size % processes:
    raise ValueError(f"{setting}={global_batch_size} (global) must be a positive multiple of "
                     f"the {processes} processes")
  if global_batch_size % mesh.shape[DATA_AXIS]:
    raise ValueError(f"{setting}={global_batch_size} (global) is not divisible by the "
                     f"{mesh.shape[DATA_AXIS]} devices of the mesh's data axis "
                     f"({processes} process(es)): use a multiple of "
                     f"{mesh.shape[DATA_AXIS]}")
  return global_batch_size // processes


def to_global_batch(local_batch, mesh: Mesh):
  """Assembles each process's rows of a batch into global jax.Arrays over the data axis."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
