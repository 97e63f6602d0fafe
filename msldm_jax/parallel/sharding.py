"""Sharding rules over an abstract train state: replicate, or FSDP over the data axis.

Decided from shapes alone (`jax.eval_shape` output), so model code carries no annotations:
  - 'replicate': every leaf on every device (plain data parallelism);
  - 'fsdp': each leaf split along its largest axis that the data axis divides, provided the
    leaf is at least `min_fsdp_size` elements; small leaves (biases, norms, Snake alphas)
    stay replicated, where splitting would only add communication.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from msldm_jax.parallel.mesh import DATA_AXIS

STRATEGIES = ("replicate", "fsdp")


def _leaf_spec(shape, axis_size: int, strategy: str, min_fsdp_size: int) -> P:
  if strategy == "replicate" or not shape or int(np.prod(shape)) < min_fsdp_size:
    return P()
  # Largest divisible axis first: the bigger the split axis, the smaller each shard's
  # all-gather payload per step relative to its compute.
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % axis_size == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, strategy: str = "replicate",
                    min_fsdp_size: int = 2**14):
  """A pytree of NamedShardings matching `abstract_state` (arrays or ShapeDtypeStructs)."""
  if strategy not in STRATEGIES:
    raise ValueError(f"sharding strategy {strategy!r}: expected one of {STRATEGIES}")
  axis_size = mesh.shape[DATA_AXIS]

  def leaf(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, _leaf_spec(tuple(shape), axis_size, strategy, min_fsdp_size))

  return jax.tree.map(leaf, abstract_state)
