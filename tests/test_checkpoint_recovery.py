"""Checkpoints under failure: incomplete step folders, kills, another topology, another model.

  - an incomplete step folder (fabricated: a step's files with one missing, and a tmp folder
    as a killed save leaves) is skipped with a warning naming it and never loaded;
  - a command-line run of `--mode=train_ldm` (tiny config) killed with SIGKILL three times at
    random steps, once while an asynchronous save is being written, then preempted with
    SIGTERM (it exits 0), resumes each time from the newest complete checkpoint and ends
    (finished in this process) with the parameters and loss curve of an uninterrupted run,
    bit for bit;
  - a checkpoint written on 8 devices under FSDP resumes on 2 devices replicated, and the
    2-device run's checkpoint resumes on 8 devices under FSDP (the 2-device side in a
    subprocess with 2 fake CPU devices);
  - a checkpoint of another network, or of another state, is one error naming the folder and
    what differs.
The diffusion trainer on synthetic latents, as tests/test_train_ldm.py.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import checkpointing
from msldm_jax import workdir_layout
from msldm_jax.models import loading
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.parallel import sharding
from msldm_jax.training import train_ldm

# pytest puts this folder on sys.path: the diffusion trainer's test helpers.
import test_train_ldm  # pylint: disable=g-bad-import-order

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
TMP_SUFFIX = ".orbax-checkpoint-tmp"


def _checkpoint_dir(workdir) -> str:
  return os.path.join(str(workdir), workdir_layout.LDM, workdir_layout.CHECKPOINTS)


def _same_params(a_workdir, b_workdir):
  for use_ema in (False, True):
    a = loading.load_denoiser(str(a_workdir), use_ema=use_ema)
    b = loading.load_denoiser(str(b_workdir), use_ema=use_ema)
    assert a.identity["step"] == b.identity["step"]
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_incomplete_step_folder_is_skipped_with_a_warning(tmp_path, caplog):
  config = test_train_ldm.make_config(tmp_path, num_steps=4, checkpoint_every=2,
                                      keep_checkpoints=3)
  workdir = tmp_path / "run"
  train_ldm.run(config, str(workdir))
  directory = _checkpoint_dir(workdir)
  # Step 6: step 4's files under the final name with the state's manifest missing, as a copy
  # cut short or a kill while orbax deletes a folder leaves it; step 8: a save killed before
  # orbax renamed its tmp folder.
  truncated = os.path.join(directory, "6")
  shutil.copytree(os.path.join(directory, "4"), truncated)
  os.remove(os.path.join(truncated, "state", "manifest.ocdbt"))
  unfinished = os.path.join(directory, "8" + TMP_SUFFIX)
  shutil.copytree(os.path.join(directory, "4"), unfinished)
  assert checkpointing.make_manager(directory).latest_step() == 6  # orbax alone takes it

  with caplog.at_level("WARNING"):
    # Inference's probe skips both and leaves them where they are.
    assert checkpointing.latest_step(directory) == 4
    assert loading.load_denoiser(str(workdir)).identity["step"] == 4
  assert f"skipped {truncated}, an incomplete checkpoint (missing state/manifest.ocdbt)" in (
      caplog.text)
  assert f"skipped {unfinished}, a save that never finished" in caplog.text
  assert os.path.isdir(truncated) and os.path.isdir(unfinished)
  # An earlier step on request (a run's progress), never an incomplete one.
  assert checkpointing.saved_steps(directory) == [2, 4]
  earlier = loading.load_denoiser(str(workdir), step=2)
  assert earlier.identity["step"] == 2
  assert earlier.identity["params_sha256"] != loading.load_denoiser(str(workdir)).identity[
      "params_sha256"]
  with pytest.raises(ValueError, match="no complete checkpoint at step 6; saved steps: 2, 4"):
    loading.load_denoiser(str(workdir), step=6)

  caplog.clear()
  config.ldm.train.num_steps = 6
  with caplog.at_level("INFO"):
    train_ldm.run(config, str(workdir))
  assert f"skipped {truncated}" in caplog.text and f"skipped {unfinished}" in caplog.text
  assert f"resumed from step 4 in {directory}" in caplog.text
  # Moved aside, so that step 6 could be saved again; the tmp folder deleted.
  assert os.path.isdir(truncated + ".incomplete") and not os.path.exists(unfinished)
  assert checkpointing.make_manager(directory).all_steps() == [2, 4, 6]
  assert checkpointing.incomplete_reason(truncated) is None
  assert [s for s, _ in test_train_ldm._losses(str(workdir))] == [1, 2, 3, 4, 5, 6]


# -- kills of a command-line run -------------------------------------------------------------

_RUN_TIMEOUT = 240  # seconds for one command-line run (imports, compilation, steps)


def _reap(process, log):
  """Kills `process` if it still runs (a failed wait), waits for it, closes its log."""
  if process.poll() is None:
    process.kill()
    process.wait()
  log.close()


def _newest_complete_step(directory):
  steps = [int(n) for n in os.listdir(directory) if n.isdigit()] if os.path.isdir(
      directory) else []
  complete = [s for s in steps
              if checkpointing.incomplete_reason(os.path.join(directory, str(s))) is None]
  return max(complete, default=None)


def _last_logged_step(metrics_path):
  try:
    with open(metrics_path) as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return 0
  for line in reversed(lines):
    try:
      return json.loads(line)["step"]
    except (ValueError, KeyError):  # a line being written
      continue
  return 0


def _wait(condition, process, deadline, what, interval=0.01):
  while not condition():
    if process.poll() is not None:
      raise AssertionError(f"the run ended (status {process.returncode}) before {what}")
    if time.monotonic() > deadline:
      raise AssertionError(f"timed out waiting for {what}")
    time.sleep(interval)


def _names(directory):
  try:
    return os.listdir(directory)
  except FileNotFoundError:
    return []


def _kill_during_a_save(process, directory, log_path, deadline):
  """SIGKILL while a tmp folder of orbax's is being written; returns that folder.

  Once the run has trained a step (it has set aside what an earlier kill left), the process
  is stopped (SIGSTOP) as soon as a tmp folder shows, and killed only if the folder is still
  there: the save had not finished. Otherwise it continues to the next save.
  """
  _wait(lambda: "train_ldm step" in log_path.read_text(), process, deadline,
        "the first step of the run")
  while True:
    # A tiny state's save is written within some 0.1 s: look often.
    _wait(lambda: any(TMP_SUFFIX in n for n in _names(directory)), process, deadline,
          "a checkpoint being written", interval=0.001)
    process.send_signal(signal.SIGSTOP)
    left = [n for n in _names(directory) if TMP_SUFFIX in n]
    if left:
      process.kill()
      return os.path.join(directory, left[0])
    process.send_signal(signal.SIGCONT)
    _wait(lambda: not any(TMP_SUFFIX in n for n in _names(directory)), process,
          deadline, "the save to finish")


def test_command_line_run_survives_kills_and_a_preemption(repo_root, tmp_path,
                                                           caplog):
  num_steps = 18
  config = test_train_ldm.make_config(tmp_path, num_steps=num_steps, checkpoint_every=2,
                                      keep_checkpoints=2)
  straight = tmp_path / "straight"
  train_ldm.run(config, str(straight))

  workdir = tmp_path / "killed"
  directory = _checkpoint_dir(workdir)
  metrics_path = os.path.join(workdir, workdir_layout.LDM, workdir_layout.METRICS_FILE)
  command = [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
             f"--workdir={workdir}", "--mode=train_ldm",
             f"--config.ldm.latents_dir={config.ldm.latents_dir}",
             "--config.ldm.train.sample_every=0", "--config.ldm.train.log_every=1",
             f"--config.ldm.train.num_steps={num_steps}",
             "--config.ldm.train.checkpoint_every=2", "--config.ldm.train.keep_checkpoints=2"]
  rng = np.random.default_rng(0)
  resume_from, left_behind = None, []

  def start(name):
    log = open(tmp_path / f"{name}.log", "w")  # pylint: disable=consider-using-with
    return subprocess.Popen(command, cwd=repo_root, stdout=log, stderr=subprocess.STDOUT), log

  def check_resume(name):
    text = (tmp_path / f"{name}.log").read_text()
    if resume_from is None:
      assert "checkpoint: resumed from" not in text, text[-3000:]
    else:
      assert f"checkpoint: resumed from step {resume_from} in {directory}" in text, text[-3000:]
    for path in left_behind:
      assert f"checkpoint: skipped {path}, a save that never finished" in text, text[-3000:]
    return text

  # Kills 1 and 3 a few steps after the run got going, kill 2 while a save is written.
  for kill in range(3):
    process, log = start(f"kill{kill}")
    deadline = time.monotonic() + _RUN_TIMEOUT
    unfinished = None
    try:
      if kill == 1:
        unfinished = _kill_during_a_save(process, directory, tmp_path / "kill1.log", deadline)
      else:
        target = _last_logged_step(metrics_path) + int(rng.integers(1, 4))
        _wait(lambda: _last_logged_step(metrics_path) >= target, process, deadline,
              f"step {target}")
        process.kill()
      process.wait(timeout=60)
    finally:
      _reap(process, log)
    assert process.returncode == -signal.SIGKILL
    check_resume(f"kill{kill}")
    # What the next run must resume from, and the unfinished saves it must skip.
    resume_from = _newest_complete_step(directory)
    left_behind = [os.path.join(directory, n) for n in _names(directory) if TMP_SUFFIX in n]
    assert resume_from is None or resume_from < num_steps
    assert unfinished is None or unfinished in left_behind

  # A preemption notice from outside: the step is finished and saved, and the process exits 0.
  process, log = start("preempted")
  try:
    # Once this run has trained a step (the signal handler is in place from its start).
    _wait(lambda: "train_ldm step" in (tmp_path / "preempted.log").read_text(), process,
          time.monotonic() + _RUN_TIMEOUT, "the first step of the run")
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
  finally:
    _reap(process, log)
  text = check_resume("preempted")
  assert process.returncode == 0, text[-3000:]
  preempted_at = int(re.search(r"train_ldm: preempted at step (\d+)", text).group(1))
  assert _newest_complete_step(directory) == preempted_at < num_steps

  # The rest in this process (the same program as the command line's, compiled here already).
  caplog.clear()
  with caplog.at_level("INFO"):
    train_ldm.run(config, str(workdir))
  assert f"checkpoint: resumed from step {preempted_at} in {directory}" in caplog.text
  assert test_train_ldm._losses(str(workdir)) == test_train_ldm._losses(str(straight))
  _same_params(workdir, straight)


# -- another topology ------------------------------------------------------------------------

# The 2-device side: restores step 4 of run A (written on 8 devices under FSDP), replicated,
# saves what it read, continues A to step 6 (written from 2 devices) and saves that state.
_TWO_DEVICE_SIDE = """
import os, pathlib, sys
import jax, numpy as np
sys.path.insert(0, {tests_dir!r})
from msldm_jax import checkpointing
from msldm_jax.training import train_ldm
import test_train_ldm
assert jax.device_count() == 2, jax.devices()
tmp = pathlib.Path({tmp!r})
config = test_train_ldm.make_config(tmp, num_steps=4, checkpoint_every=2)
config.ldm.sharding = "replicate"

def restore():
  trainer = train_ldm.LDMTrainer(config, str(tmp / "A"))
  manager = checkpointing.make_manager(os.path.join(trainer.stage_dir, "checkpoints"))
  state, _, step = checkpointing.restore_latest(manager, trainer.compiled.abstract_state)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 2
  np.savez(tmp / f"A{{step}}_on_2.npz", *[np.asarray(x) for x in jax.tree.leaves(state)])

restore()
config.ldm.train.num_steps = 6
train_ldm.run(config, str(tmp / "A"))
restore()
"""


def _restore(workdir, config):
  trainer = train_ldm.LDMTrainer(config, str(workdir))
  manager = checkpointing.make_manager(os.path.join(trainer.stage_dir, "checkpoints"))
  state, _, step = checkpointing.restore_latest(manager, trainer.compiled.abstract_state)
  return state, step


def _npz_leaves(path):
  with np.load(path) as saved:
    return [saved[f"arr_{i}"] for i in range(len(saved.files))]


def test_a_checkpoint_resumes_on_another_topology(repo_root, tmp_path):
  config = test_train_ldm.make_config(tmp_path, num_steps=4, checkpoint_every=2)
  config.ldm.sharding = "fsdp"
  assert jax.device_count() == 8
  train_ldm.run(config, str(tmp_path / "A"))
  # The same run continued on the 8 devices, to compare the 2-device continuation with.
  shutil.copytree(tmp_path / "A", tmp_path / "A8")
  fsdp_state, _ = _restore(tmp_path / "A", config)

  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=2")
  script = _TWO_DEVICE_SIDE.format(tests_dir=TESTS_DIR, tmp=str(tmp_path))
  result = subprocess.run([sys.executable, "-c", script], cwd=repo_root, env=env,
                          capture_output=True, text=True, timeout=_RUN_TIMEOUT)
  assert result.returncode == 0, result.stderr[-3000:]

  # 8 devices, FSDP -> 2 devices, replicated: the same values, and the run went on.
  for read, written in zip(_npz_leaves(tmp_path / "A4_on_2.npz"),
                           jax.tree.leaves(fsdp_state)):
    np.testing.assert_array_equal(read, np.asarray(written))
  config.ldm.train.num_steps = 6
  train_ldm.run(config, str(tmp_path / "A8"))
  on_2, on_8 = (test_train_ldm._losses(str(tmp_path / name)) for name in ("A", "A8"))
  assert [s for s, _ in on_2] == [s for s, _ in on_8] == [1, 2, 3, 4, 5, 6]
  # Other devices sum in another order: equal to float32 rounding, not bit for bit.
  np.testing.assert_allclose([l for _, l in on_2], [l for _, l in on_8], rtol=1e-5)

  # 2 devices, replicated -> 8 devices, FSDP: the same values, split over the devices, and
  # the run goes on.
  state, step = _restore(tmp_path / "A", config)
  assert step == 6
  for read, written in zip(jax.tree.leaves(state), _npz_leaves(tmp_path / "A6_on_2.npz")):
    np.testing.assert_array_equal(np.asarray(read), written)
  expected = sharding.state_shardings(state, mesh_lib.make_mesh(), "fsdp")
  specs = set()
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(expected)):
    assert leaf.sharding.spec == want.spec and len(leaf.sharding.device_set) == 8
    specs.add(leaf.sharding.spec)
  assert any(mesh_lib.DATA_AXIS in tuple(spec) for spec in specs)  # some leaves are split
  config.ldm.train.num_steps = 8
  train_ldm.run(config, str(tmp_path / "A"))
  assert [s for s, _ in test_train_ldm._losses(str(tmp_path / "A"))] == list(range(1, 9))


# -- another model ---------------------------------------------------------------------------

def test_a_checkpoint_of_another_network_is_one_clear_error(tmp_path):
  config = test_train_ldm.make_config(tmp_path, num_steps=2, checkpoint_every=2)
  workdir = str(tmp_path / "run")
  train_ldm.run(config, workdir)
  folder = os.path.join(_checkpoint_dir(workdir), "2")
  config.ldm.model.width = 2 * config.ldm.model.width
  config.ldm.model.depth = 3
  with pytest.raises(ValueError) as raised:
    train_ldm.run(config, workdir)
  message = str(raised.value)
  assert message.startswith(f"{folder}: this checkpoint holds another network")
  assert "ldm.model.depth: checkpoint 2, this run 3" in message
  assert "ldm.model.width: checkpoint 64, this run 128" in message


def test_a_checkpoint_of_another_state_is_one_clear_error(tmp_path):
  mesh = mesh_lib.make_mesh()
  state = {"w": jnp.ones((8, 8)), "b": jnp.zeros(8), "step": jnp.int32(1)}
  directory = str(tmp_path / "checkpoints")
  manager = checkpointing.make_manager(directory)
  checkpointing.save(manager, 1, state, {"epoch": 0, "batch_in_epoch": 1},
                     {"kind": "test", "config": {}})
  manager.wait_until_finished()
  other = {"w": jnp.ones((4, 8)), "c": jnp.zeros(8), "step": jnp.int32(1)}
  abstract = checkpointing.abstract_with_shardings(
      other, sharding.state_shardings(other, mesh, "replicate"))
  with pytest.raises(ValueError) as raised:
    checkpointing.restore_latest(checkpointing.make_manager(directory), abstract)
  message = str(raised.value)
  assert message.startswith(f"{os.path.join(directory, '1')}: the train state in this "
                            "checkpoint does not match")
  assert "b: only in the checkpoint" in message and "c: not in the checkpoint" in message
  assert "w: checkpoint float32[8, 8], this run float32[4, 8]" in message
