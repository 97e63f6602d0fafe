"""What a checkpoint writes from on the CPU backend: a copy of the state in buffers kept for
the whole run, so that saving does not keep the next step from updating the state in place.

Orbax saves a jax.Array through a view of its host memory. On an accelerator that memory is
a copy orbax makes itself; on the CPU backend it is the array's own buffer, viewed without a
copy for as long as the background write runs (seconds for a GiB). A buffer with such a view
cannot be donated, so the step after a save gets no state to update in place: the runtime
copies the state into fresh memory first, in the dispatching thread, and the first touch of
that much fresh memory is the dearest part of a save on a small machine (the `small` DiT's
2 GiB state: 1-3 s of page faults against a 1-1.5 s step, benchmarks/checkpoint_stall.py).

`HostSnapshot` copies the state into its buffers with a jitted copy that donates them, so
XLA writes into the same memory every save: one memcpy on XLA's threads (0.2 s for 2 GiB),
and the state stays free to donate. The price is one more copy of the state in memory for
the whole run, where saving without it holds the same two copies only while a write runs.
Off the CPU backend it does nothing: saving passes the state itself.
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp


def _copy_into(destination, source):
  """`source`'s values in `destination`'s (donated) buffers. A whole-array update, not the
  source itself: jit forwards an unchanged argument as its output, which would hand orbax the
  live state again."""

  def leaf(d, s):
    whole = lax.dynamic_update_slice(d.reshape(-1), s.reshape(-1), (0,))
    return whole.reshape(d.shape)

  return jax.tree.map(leaf, destination, source)


def on_cpu(abstract_state) -> bool:
  """Whether the state lives on the CPU backend (its first leaf's devices)."""
  leaves = jax.tree.leaves(abstract_state)
  sharding = getattr(leaves[0], "sharding", None) if leaves else None
  return sharding is not None and all(d.platform == "cpu" for d in sharding.device_set)


class HostSnapshot:
  """Call with the state before a save; returns what to save (see the module docstring).

  The caller must make sure the previous save has finished writing first
  (`manager.wait_until_finished()`, which the next save would wait for anyway): the copy
  reuses the buffers that save was writing from.
  """

  def __init__(self, abstract_state):
    self.enabled = on_cpu(abstract_state)
    self._buffers = None
    if not self.enabled:
      return
    shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
    # Compiled and allocated now, at the start of a run, so that the first save costs no
    # more than the next ones.
    self._copy = jax.jit(_copy_into, donate_argnums=(0,), out_shardings=shardings).lower(
        abstract_state, abstract_state).compile()
    self._buffers = jax.jit(
        lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_state),
        out_shardings=shardings)()

  def __call__(self, state) -> Any:
    if not self.enabled:
      return state
    self._buffers = self._copy(self._buffers, state)
    return self._buffers
