"""Orbax checkpoints of a trainer, and the partial restores that inference makes of them.

One checkpoint (a step folder of a `CheckpointManager`) holds three items:
  state   the whole train state (parameters, optimiser states, step), an orbax PyTree
  input   the input pipeline's position (JSON), so a resumed run reads what an
          uninterrupted one would
  model   what the trained network is, as JSON: {"kind": ..., "config": {...}, ...}, so a
          later stage builds the module from the checkpoint itself, whatever its own config
          says (`models/loading.py`)
and, in a checkpoint written on preemption between two log steps, a fourth:
  unlogged  the metrics of the steps since the last log line (JSON), which the resumed run
          logs with its own, so that its metrics.jsonl equals an uninterrupted run's

Every process calls save and restore (orbax coordinates multi-host writes). Restores go
against an abstract, sharded target, so each device reads only its own shard, whatever the
mesh and sharding (replicated or FSDP, any number of devices) the checkpoint was written
from; inference restores only the subtree it needs (`restore_subtree`), without building
optimisers.

Saves are asynchronous (orbax's default for a CheckpointManager): `save` returns once the
state is copied off the devices, and the files are written by a background thread into
STEP.orbax-checkpoint-tmp, which orbax renames to STEP when every item is written. A killed
run leaves that tmp folder, which orbax never lists; a folder with the final name can still
be incomplete (a kill while orbax deletes an old step, a copy cut short, a full disk), and
orbax would list it. `complete_steps` checks each step folder for the files a finished save
leaves, and the restores skip the incomplete ones, with a warning naming the folder.
"""

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
# The store orbax's default handler of jax.Arrays keeps per-array metadata in (no public name).
from orbax.checkpoint._src.metadata import array_metadata_store
from absl import logging

STATE = "state"
INPUT = "input"
MODEL = "model"
UNLOGGED = "unlogged"
ITEMS = (STATE, INPUT, MODEL, UNLOGGED)

# What a finished save leaves (orbax 0.12, atomic rename on a local or network file system):
# the commit marker orbax writes just before the rename and the step's metadata; per item, its
# metadata file (for the state, OCDBT's: the tree and the root manifest). Orbax's own tmp
# folders carry this suffix.
_STEP_FILES = ("commit_success.txt", "_CHECKPOINT_METADATA")
_ITEM_FILES = {STATE: ("_METADATA", "manifest.ocdbt"), INPUT: ("metadata",),
               MODEL: ("metadata",)}
_OCDBT_PROCESS_PREFIX = "ocdbt.process_"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Where an incomplete step folder is moved (STEP.incomplete, in the same folder): a name
# orbax does not list, so that the step can be saved again, and nothing is deleted.
_INCOMPLETE_SUFFIX = ".incomplete"


def make_manager(directory: str, max_to_keep: int = 3, save_interval_steps: int = 1,
                 create: bool = True, compress: bool = False) -> ocp.CheckpointManager:
  """An orbax manager of the four items, saving asynchronously (orbax's default).

  The state is written uncompressed unless `compress`: orbax's default, zstd, gains ~1% on
  float32 parameters and optimiser moments (their mantissas are noise to it) for CPU time
  that the background write takes from the training steps beside it
  (benchmarks/checkpoint_stall.py). Restores read either kind.
  """
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=create)
  handlers = {STATE: ocp.PyTreeCheckpointHandler(use_compression=compress,
                                                 type_handler_registry=_type_handlers()),
              **{item: ocp.JsonCheckpointHandler() for item in (INPUT, MODEL, UNLOGGED)}}
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=handlers)


def _type_handlers():
  """Orbax's handlers of leaf types, with replica-parallel writes off on the CPU backend.

  Replica-parallel splits the write of a replicated array among its replicas, so that several
  hosts (or accelerators' transfers) share it. It slices each array per device with a small
  jitted program, compiled at a process's first save for every shape and device: seconds for
  the tiny diffusion model's state on 8 fake CPU devices, ten for the VAE's thousand leaves.
  On the CPU backend the slices are views of host memory that one thread writes anyway.
  """
  registry = ocp.type_handlers.create_type_handler_registry(
      *((ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types()))
  if jax.default_backend() == "cpu":
    registry.add(jax.Array, ocp.type_handlers.ArrayHandler(
        use_replica_parallel=False,
        array_metadata_store=array_metadata_store.Store()), override=True)
  return registry


def _restore_args(abstract_state) -> ocp.args.PyTreeRestore:
  """Reads the state into `abstract_state`'s shapes, dtypes and shardings."""
  return ocp.args.PyTreeRestore(
      item=abstract_state,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))


def abstract_with_shardings(state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def save(manager: ocp.CheckpointManager, step: int, state, input_position: dict,
         model_record: Mapping[str, Any], force: bool = False,
         unlogged: Mapping[str, Any] | None = None) -> bool:
  """Starts an asynchronous save of one step (`unlogged`: see `encode_unlogged`)."""
  items = {STATE: ocp.args.PyTreeSave(state),
           INPUT: ocp.args.JsonSave(input_position),
           MODEL: ocp.args.JsonSave(dict(model_record))}
  if unlogged:
    items[UNLOGGED] = ocp.args.JsonSave(dict(unlogged))
  saved = manager.save(step, args=ocp.args.Composite(**items), force=force)
  if saved:
    logging.info("checkpoint: saving step %d to %s", step, manager.directory)
  return saved


def step_dir(directory, step: int) -> str:
  """The folder of one step (the manager's default names: the step number)."""
  return os.path.join(os.fspath(directory), str(int(step)))


def incomplete_reason(path: str) -> str | None:
  """Why the step folder `path` is not a finished save (a missing file), or None if it is."""
  missing = [name for name in _STEP_FILES if not os.path.isfile(os.path.join(path, name))]
  for item in (STATE, INPUT, MODEL):
    missing += [os.path.join(item, name) for name in _ITEM_FILES[item]
                if not os.path.isfile(os.path.join(path, item, name))]
  state_dir = os.path.join(path, STATE)
  if os.path.isdir(state_dir):
    # One OCDBT subtree per process that wrote, each with its manifest.
    subtrees = [n for n in os.listdir(state_dir) if n.startswith(_OCDBT_PROCESS_PREFIX)]
    if not subtrees:
      missing.append(os.path.join(STATE, _OCDBT_PROCESS_PREFIX + "*"))
    missing += [os.path.join(STATE, n, "manifest.ocdbt") for n in sorted(subtrees)
                if not os.path.isfile(os.path.join(state_dir, n, "manifest.ocdbt"))]
  if missing:
    return "missing " + ", ".join(missing)
  return None


def _tmp_leftovers(directory: str) -> list[str]:
  """Orbax's tmp folders of saves that never finished (the process was killed)."""
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                if _TMP_SUFFIX in n)


def complete_steps(manager: ocp.CheckpointManager, set_aside: bool = False) -> list[int]:
  """The manager's steps whose folders hold a finished save, oldest first.

  Every incomplete folder (a listed step missing files, an orbax tmp folder left by a kill)
  is skipped with a warning naming it. With `set_aside` (a trainer about to resume and save
  again into this folder) they are also moved out of the way: an incomplete STEP to
  STEP.incomplete, which orbax does not list, so that the step can be saved again; tmp
  folders are deleted, as orbax would before saving that step again. All processes must call
  it together then (process 0 moves, the others wait).
  """
  directory = os.fspath(manager.directory)
  steps, incomplete = [], []
  for step in manager.all_steps():
    path = step_dir(directory, step)
    reason = incomplete_reason(path)
    if reason is None:
      steps.append(step)
    else:
      incomplete.append(path)
      logging.warning("checkpoint: skipped %s, an incomplete checkpoint (%s); it is never "
                      "loaded%s", path, reason,
                      f", and is moved aside ({path}{_INCOMPLETE_SUFFIX})" if set_aside else "")
  leftovers = _tmp_leftovers(directory)
  for path in leftovers:
    logging.warning("checkpoint: skipped %s, a save that never finished (the process "
                    "stopped while writing it); it is never loaded%s", path,
                    ", and is deleted" if set_aside else "")
  if set_aside:
    # Every process has looked before any folder moves, so all of them skip the same ones
    # (and all pass the same barriers, whatever each found).
    _sync("msldm_jax_checkpointing_checked")
    if jax.process_index() == 0:
      for path in incomplete:
        target = path + _INCOMPLETE_SUFFIX
        suffix = 1
        while os.path.exists(target):
          target, suffix = f"{path}{_INCOMPLETE_SUFFIX}.{suffix}", suffix + 1
        os.rename(path, target)
      for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    _sync("msldm_jax_checkpointing_set_aside")
    if incomplete or leftovers:
      manager.reload()
  return sorted(steps)


def _sync(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _record_differences(saved: Mapping[str, Any], expected: Mapping[str, Any],
                        settings_key: str) -> list[str]:
  """The settings in which two model records differ, named as config keys.

  Compared: the network's kind, ISLDM's number of stems, and every setting both records
  hold (a setting one of them lacks was added or removed by another version of the code,
  not changed by the user). Other entries (the latents a denoiser learned) are the stages'
  own checks.
  """
  expected = json.loads(json.dumps(dict(expected)))  # tuples -> lists, as recorded
  differences = []
  for key, default in (("kind", None), ("independent_stems", 0)):
    if saved.get(key, default) != expected.get(key, default):
      differences.append(f"{key}: checkpoint {saved.get(key, default)!r}, this run "
                         f"{expected.get(key, default)!r}")
  saved_config, config = saved.get("config") or {}, expected.get("config") or {}
  for key in sorted(set(saved_config) & set(config)):
    if saved_config[key] != config[key]:
      differences.append(f"{settings_key}.{key}: checkpoint {saved_config[key]!r}, this run "
                         f"{config[key]!r}")
  return differences


def _path_name(path) -> str:
  """A tree path as 'params/Dense_0/kernel', whatever kind of node (dataclass field, dict
  key, tuple index) each level is: orbax records every level as a name."""
  names = []
  for key in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(key, attribute):
        names.append(str(getattr(key, attribute)))
        break
    else:
      names.append(str(key))
  return "/".join(names)


def _shape_differences(saved_tree, abstract_state, limit: int = 8) -> list[str]:
  """Leaves whose presence, shape or dtype differ between a checkpoint's state metadata and
  the abstract state (at most `limit` named, then a count)."""
  def by_name(tree):
    return {_path_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  saved, wanted = by_name(saved_tree), by_name(abstract_state)
  differences = [f"{name}: only in the checkpoint" for name in sorted(set(saved) - set(wanted))]
  differences += [f"{name}: not in the checkpoint" for name in sorted(set(wanted) - set(saved))]
  for name in sorted(set(saved) & set(wanted)):
    have, want = saved[name], wanted[name]
    have_shape, want_shape = tuple(getattr(have, "shape", ())), tuple(want.shape)
    have_dtype, want_dtype = getattr(have, "dtype", None), np.dtype(want.dtype)
    other_dtype = have_dtype is not None and np.dtype(have_dtype) != want_dtype
    if have_shape != want_shape or other_dtype:
      differences.append(f"{name}: checkpoint {have_dtype}{list(have_shape)}, this run "
                         f"{want_dtype}{list(want_shape)}")
  if len(differences) > limit:
    differences = differences[:limit] + [f"… {len(differences) - limit} more"]
  return differences


def check_compatible(manager: ocp.CheckpointManager, step: int, abstract_state,
                     model_record: Mapping[str, Any] | None = None,
                     settings_key: str = "model"):
  """Raises ValueError, naming the step folder and what differs, when the checkpoint holds
  another network (its model record) or another state (leaf names, shapes, dtypes) than
  this run builds: one clear error instead of one from deep inside orbax or XLA."""
  path = step_dir(manager.directory, step)
  if model_record is not None:
    saved = dict(manager.restore(step, args=ocp.args.Composite(
        **{MODEL: ocp.args.JsonRestore()}))[MODEL])
    differences = _record_differences(saved, model_record, settings_key)
    if differences:
      raise ValueError(
          f"{path}: this checkpoint holds another network than this run's config builds "
          f"({'; '.join(differences)}): resume with the settings it was trained with, or "
          "train in a new workdir")
  # Read by a handler of its own, whichever handler the manager has for the item.
  saved_tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(os.path.join(path, STATE)))
  saved_tree = getattr(saved_tree, "tree", saved_tree)
  differences = _shape_differences(saved_tree, abstract_state)
  if differences:
    raise ValueError(
        f"{path}: the train state in this checkpoint does not match the one this run's "
        f"config builds ({'; '.join(differences)}): resume with the settings it was trained "
        "with, or train in a new workdir")


def restore_latest(manager: ocp.CheckpointManager, abstract_state,
                   model_record: Mapping[str, Any] | None = None,
                   settings_key: str = "model") -> tuple[Any, dict, int] | None:
  """(state, input_position, step) of the newest complete checkpoint, or None when there is
  none.

  Incomplete step folders are skipped with a warning naming them and moved aside
  (`complete_steps`); every process must call this together. With `model_record` (the
  trainer's), a checkpoint of another network is a ValueError naming the differing
  settings (as `settings_key`.KEY); so is a state of other shapes (`check_compatible`).
  """
  steps = complete_steps(manager, set_aside=True)
  if not steps:
    return None
  step = steps[-1]
  check_compatible(manager, step, abstract_state, model_record, settings_key)
  try:
    restored = manager.restore(
        step,
        args=ocp.args.Composite(**{STATE: _restore_args(abstract_state),
                                   INPUT: ocp.args.JsonRestore()}))
  except Exception as e:  # pylint: disable=broad-except
    # Its files are all there and it matches this run's state: what failed is its content.
    raise ValueError(f"{step_dir(manager.directory, step)}: the checkpoint could not be read "
                     f"({type(e).__name__}: {e}); move the folder away to resume from the "
                     "one before") from e
  logging.info("checkpoint: resumed from step %d in %s", step, manager.directory)
  return restored[STATE], dict(restored[INPUT]), step


def read_unlogged(manager: ocp.CheckpointManager, step: int) -> dict | None:
  """The `unlogged` item of a step (a preemption's checkpoint), or None when it has none."""
  if not os.path.isdir(os.path.join(step_dir(manager.directory, step), UNLOGGED)):
    return None
  restored = manager.restore(step, args=ocp.args.Composite(
      **{UNLOGGED: ocp.args.JsonRestore()}))
  return dict(restored[UNLOGGED])


def encode_unlogged(steps: Sequence[tuple[int, Mapping[str, Any]]],
                    **extra) -> dict[str, Any]:
  """Fetched per-step metrics [(step, {name: array})] as JSON values that `decode_unlogged`
  turns back into the same arrays, bit for bit (a float32 is exact as a JSON float)."""
  encoded = []
  for step, metrics in steps:
    values = {}
    for name, value in metrics.items():
      value = np.asarray(value)
      values[name] = {"dtype": value.dtype.name, "shape": list(value.shape),
                      "values": value.ravel().tolist()}
    encoded.append([int(step), values])
  return {"steps": encoded, **extra}


def decode_unlogged(unlogged: Mapping[str, Any] | None) -> list[tuple[int, dict]]:
  if not unlogged:
    return []
  return [(int(step), {name: np.asarray(v["values"], dtype=v["dtype"]).reshape(v["shape"])
                       for name, v in values.items()})
          for step, values in unlogged["steps"]]


def saved_steps(directory: str) -> list[int]:
  """The complete steps of a checkpoint folder, oldest first; [] when it holds none (or is
  absent).

  Opens the folder without creating anything, so probing a wrong path leaves no trace;
  incomplete step folders are skipped with a warning, and left where they are.
  """
  if not os.path.isdir(directory):
    return []
  return complete_steps(make_manager(directory, create=False))


def latest_step(directory: str) -> int | None:
  """The newest complete step of a checkpoint folder (`saved_steps`); None when none."""
  steps = saved_steps(directory)
  return steps[-1] if steps else None


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
