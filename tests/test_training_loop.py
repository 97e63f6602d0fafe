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


def test_programs_are_built_once_per_key_and_the_oldest_go_past_the_limit():
  built = []

  def build(name):
    built.append(name)
    return object()

  first = loop.reuse_programs(("a", 1), lambda: build("a"))
  assert loop.reuse_programs(("a", 1), lambda: build("a again")) is first
  assert loop.reuse_programs(("a", 2), lambda: build("a2")) is not first
  assert built == ["a", "a2"]
  for i in range(loop._MAX_PROGRAMS):
    loop.reuse_programs(("b", i), lambda: build("b"))
  assert ("a", 1) not in loop._PROGRAMS  # the oldest went first
  assert len(loop._PROGRAMS) == loop._MAX_PROGRAMS
  loop.clear_programs()
  assert loop.reuse_programs(("a", 2), lambda: build("a2 again")) is not None
  assert built[-1] == "a2 again"


def test_settings_key_leaves_out_only_the_named_sections():
  import ml_collections  # pylint: disable=g-import-not-at-top
  section = ml_collections.ConfigDict({"model": {"width": 4}, "train": {"num_steps": 2},
                                       "latents_dir": "/a"})
  changed_train = ml_collections.ConfigDict(section.to_dict())
  changed_train.train.num_steps = 9
  changed_model = ml_collections.ConfigDict(section.to_dict())
  changed_model.model.width = 8
  assert loop.settings_key(section) == loop.settings_key(changed_train)
  assert loop.settings_key(section) != loop.settings_key(changed_model)
  assert loop.settings_key(section, leave_out=()) != loop.settings_key(changed_train,
                                                                        leave_out=())
  assert "/a" not in loop.settings_key(section, leave_out=("train", "latents_dir"))
