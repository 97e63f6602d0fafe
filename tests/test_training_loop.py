"""The training loop's compiled step (training/loop.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import loop


def test_a_state_donated_to_a_step_is_refused_not_a_crash():
  """jax's CPU client crashes the process when a donated state is stepped again; the step
  raises instead, and stepping from the returned state goes on."""
  mesh = mesh_lib.make_mesh()
  compiled = loop.CompiledStep(lambda key: {"w": jnp.zeros((4,))},
                               lambda state, batch: ({"w": state["w"] + jnp.mean(batch)},
                                                     {"mean": jnp.mean(batch)}),
                               mesh, "replicate")
  batch = mesh_lib.to_global_batch(np.ones((8, 2), np.float32), mesh)
  state = compiled.init(jax.random.key(0))
  returned, _ = compiled.step(state, batch)
  with pytest.raises(ValueError, match="donated to an earlier step"):
    compiled.step(state, batch)
  returned, _ = compiled.step(returned, batch)
  np.testing.assert_allclose(np.asarray(returned["w"]), 2.0)
