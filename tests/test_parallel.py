"""Mesh, sharding rules, global batches and checkpoints on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from msldm_jax import checkpointing
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.parallel import sharding
from msldm_jax.training import metric_writer


def test_eight_fake_devices():
  assert jax.device_count() == 8


def test_global_batch_is_sharded_over_data_axis():
  mesh = mesh_lib.make_mesh()
  local = {"audio": np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  batch = mesh_lib.to_global_batch(local, mesh)
  assert batch["audio"].shape == (16, 3)
  assert batch["audio"].sharding.spec == P(mesh_lib.DATA_AXIS)
  assert len(batch["audio"].addressable_shards) == 8
  np.testing.assert_array_equal(np.asarray(batch["audio"]), local["audio"])


def test_batch_size_must_divide():
  mesh = mesh_lib.make_mesh()
  with pytest.raises(ValueError, match="12"):
    mesh_lib.local_batch_size(12, mesh)


def test_fsdp_rules_split_big_leaves_only():
  mesh = mesh_lib.make_mesh()
  state = {"kernel": jax.ShapeDtypeStruct((256, 1024), jnp.float32),
           "bias": jax.ShapeDtypeStruct((1024,), jnp.float32),
           "odd": jax.ShapeDtypeStruct((333, 333), jnp.float32)}
  fsdp = sharding.state_shardings(state, mesh, "fsdp")
  assert fsdp["kernel"].spec == P(None, mesh_lib.DATA_AXIS)
  assert fsdp["bias"].spec == P()
  assert fsdp["odd"].spec == P()
  replicated = sharding.state_shardings(state, mesh, "replicate")
  assert all(s.spec == P() for s in jax.tree.leaves(replicated))
  with pytest.raises(ValueError, match="zero3"):
    sharding.state_shardings(state, mesh, "zero3")


def test_checkpoint_round_trip_with_input_position(tmp_path):
  mesh = mesh_lib.make_mesh()
  state = {"w": jnp.arange(64.0).reshape(8, 8), "step": jnp.int32(3)}
  shardings = sharding.state_shardings(state, mesh, "fsdp", min_fsdp_size=8)
  state = jax.device_put(state, shardings)
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"))
  assert checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(state, shardings)) is None
  checkpointing.save(manager, 3, state, {"epoch": 1, "batch_in_epoch": 7},
                     {"kind": "test", "config": {}})
  manager.wait_until_finished()
  assert checkpointing.read_model_record(str(tmp_path / "ckpt"), 3) == {"kind": "test",
                                                                         "config": {}}
  manager = checkpointing.make_manager(str(tmp_path / "ckpt"))
  restored, position, step = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(state, shardings))
  assert step == 3 and position == {"epoch": 1, "batch_in_epoch": 7}
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
  assert restored["w"].sharding.spec == shardings["w"].spec


def test_check_finite_names_step_and_term():
  metric_writer.check_finite(5, {"loss/mel": 1.0})
  with pytest.raises(FloatingPointError, match=r"loss/kl.*step 7"):
    metric_writer.check_finite(7, {"loss/mel": 1.0, "loss/kl": float("nan")})
