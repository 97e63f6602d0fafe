"""Orbax checkpoints of a trainer, and the partial restores that inference makes of them.

One checkpoint (a step folder of a `CheckpointManager`) holds three items:
  state   the whole train state (parameters, optimiser states, step), orbax StandardSave
  input   the input pipeline's position (JSON), so a resumed run reads what an
          uninterrupted one would
  model   what the trained network is, as JSON: {"kind": ..., "config": {...}, ...}, so a
          later stage builds the module from the checkpoint itself, whatever its own config
          says (`models/loading.py`)

Every process calls save and restore (orbax coordinates multi-host writes). Restores go
against an abstract, sharded target, so each device reads only its own shard; inference
restores only the subtree it needs (`restore_subtree`), without building optimisers.
"""

import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

STATE = "state"
INPUT = "input"
MODEL = "model"
ITEMS = (STATE, INPUT, MODEL)


def make_manager(directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
                 create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=create)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_names=ITEMS)


def abstract_with_shardings(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def save(manager: ocp.CheckpointManager, step: int, state, input_position: dict,
         model_record: Mapping[str, Any], force: bool = False) -> bool:
  saved = manager.save(
      step,
      args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                 INPUT: ocp.args.JsonSave(input_position),
                                 MODEL: ocp.args.JsonSave(dict(model_record))}),
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


def latest_step(directory: str) -> int | None:
  """The newest complete step of a checkpoint folder; None when it holds none (or is absent).

  Opens the folder without creating anything, so probing a wrong path leaves no trace.
  """
  if not os.path.isdir(directory):
    return None
  return make_manager(directory, create=False).latest_step()


def read_model_record(directory: str, step: int) -> dict:
  """The `model` item of one checkpoint (what network it holds)."""
  manager = make_manager(directory, create=False)
  restored = manager.restore(step, args=ocp.args.Composite(**{MODEL: ocp.args.JsonRestore()}))
  return dict(restored[MODEL])


def restore_subtree(directory: str, step: int, abstract_subtree) -> Any:
  """Restores only the leaves of `abstract_subtree` (a dict naming some of the train state's
  fields, e.g. {"ema_params": abstract}) from the `state` item of one checkpoint.

  The rest of the state (optimiser moments, the discriminator) is not read, so inference
  needs neither optimisers nor their memory.
  """
  manager = make_manager(directory, create=False)
  restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_subtree)
  restored = manager.restore(step, args=ocp.args.Composite(**{
      STATE: ocp.args.PyTreeRestore(item=abstract_subtree, restore_args=restore_args,
                                    partial_restore=True)}))
  return restored[STATE]
