"""Orbax checkpoints of one stage: the train state plus the input pipeline's position.

Every process calls save and restore (orbax coordinates multi-host writes). Restores go
against the abstract, sharded state, so each device reads only its own shard.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
INPUT = "input"


def make_manager(directory: str, max_to_keep: int = 3,
                 save_interval_steps: int = 1) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=(STATE, INPUT))


def abstract_with_shardings(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def save(manager: ocp.CheckpointManager, step: int, state, input_position: dict,
         force: bool = False) -> bool:
  saved = manager.save(
      step,
      args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 INPUT: ocp.args.JsonSave(input_position)}),
      force=force)
  if saved:
    logging.info("checkpoint: saved step %d to %s", step, manager.directory)
  return saved


def restore_latest(manager: ocp.CheckpointManager, abstract_state) -> tuple[Any, dict, int] | None:
  """(state, input_position, step) of the newest checkpoint, or None when there is none."""
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
      step,
      args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(abstract_state),
                                 INPUT: ocp.args.JsonRestore()}))
  logging.info("checkpoint: resumed from step %d in %s", step, manager.directory)
  return restored[STATE], dict(restored[INPUT]), step
