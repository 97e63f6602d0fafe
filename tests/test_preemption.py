"""Preemption (SIGTERM) during training: the step it arrives in is finished and saved, the
process exits 0, no later stage runs, and the rerun continues the same run.

Both trainers share the loop (`training/loop.py`): the diffusion trainer at the tiny config on
synthetic latents (as tests/test_train_ldm.py) checks that the rerun's loss curve and
parameters equal an uninterrupted run's bit for bit, also when the notice arrives between two
log steps; the SourceVAE trainer checks the same path on its state; `--mode=all` checks that
a preempted stage is neither marked done nor followed by the next stage. The notice from
outside a command-line run is tested with the kills (tests/test_checkpoint_recovery.py).
"""

import os
import signal

import numpy as np
import pytest

from msldm_jax import checkpointing
from msldm_jax import main
from msldm_jax import workdir_layout
from msldm_jax.generation import stage as generation_stage
from msldm_jax.models import loading
from msldm_jax.training import loop
from msldm_jax.training import preemption
from msldm_jax.training import train_ldm
from msldm_jax.training import train_vae

# pytest puts this folder on sys.path: the trainers' test helpers.
import test_train_ldm  # pylint: disable=g-bad-import-order
import test_train_vae  # pylint: disable=g-bad-import-order


def _sigterm_at(batch_number):
  """An input hook that sends this process SIGTERM while batch `batch_number` is read, as a
  scheduler's notice arriving during that step."""

  def hook(count, batch):
    if count == batch_number:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  return hook


def _hooked(trainer_class, hook):
  """`trainer_class` with its input batches passed through hook(k, batch), k counted from
  this run's start."""

  class Hooked(trainer_class):

    def train_inputs(self, position=None):
      inputs = super().train_inputs(position)

      class Inputs:
        count = 0

        def __next__(self):
          Inputs.count += 1
          return hook(Inputs.count, next(inputs))

        def state(self):
          return inputs.state()

      return Inputs()

  return Hooked


def _checkpoints(stage_dir):
  return checkpointing.make_manager(os.path.join(stage_dir, workdir_layout.CHECKPOINTS))


def test_sigterm_between_log_steps_saves_that_step_and_the_rerun_is_the_same_run(tmp_path):
  config = test_train_ldm.make_config(tmp_path, num_steps=8, checkpoint_every=8, log_every=3)
  straight = str(tmp_path / "straight")
  train_ldm.run(config, straight)

  preempted = str(tmp_path / "preempted")
  handler = signal.getsignal(signal.SIGTERM)
  trainer = _hooked(train_ldm.LDMTrainer, _sigterm_at(5))(config, preempted)
  with pytest.raises(preemption.Preempted) as raised:
    trainer.train()
  # A SystemExit of status 0: uncaught, the process exits 0.
  assert isinstance(raised.value, SystemExit) and raised.value.code == 0
  assert raised.value.step == 5 and "preempted at step 5" in str(raised.value)
  assert signal.getsignal(signal.SIGTERM) is handler  # the loop's handler is gone again
  manager = _checkpoints(trainer.stage_dir)
  assert manager.all_steps() == [5]
  # Steps 4 and 5 are not logged yet (the next log step is 6): the checkpoint carries them.
  unlogged = checkpointing.decode_unlogged(checkpointing.read_unlogged(manager, 5))
  assert [step for step, _ in unlogged] == [4, 5]
  assert [s for s, _ in test_train_ldm._losses(preempted)] == [3]

  train_ldm.run(config, preempted)
  assert test_train_ldm._losses(preempted) == test_train_ldm._losses(straight)
  assert [s for s, _ in test_train_ldm._losses(straight)] == [3, 6, 8]
  for use_ema in (False, True):
    a = loading.load_denoiser(straight, use_ema=use_ema)
    b = loading.load_denoiser(preempted, use_ema=use_ema)
    assert a.identity["params_sha256"] == b.identity["params_sha256"]


def test_sigterm_at_a_log_step_and_after_the_last_step(tmp_path):
  config = test_train_ldm.make_config(tmp_path, num_steps=4, checkpoint_every=4, log_every=2)
  workdir = str(tmp_path / "run")
  # At log step 2: logged as usual, nothing left over for the checkpoint.
  with pytest.raises(preemption.Preempted, match="at step 2"):
    _hooked(train_ldm.LDMTrainer, _sigterm_at(2))(config, workdir).train()
  manager = _checkpoints(os.path.join(workdir, "ldm"))
  assert manager.all_steps() == [2] and checkpointing.read_unlogged(manager, 2) is None
  # During the last step: the run is trained and saved, but the notice still stops the job
  # (a later stage must not start); the rerun has nothing left to train and returns.
  with pytest.raises(preemption.Preempted, match="at step 4"):
    _hooked(train_ldm.LDMTrainer, _sigterm_at(2))(config, workdir).train()
  assert _checkpoints(os.path.join(workdir, "ldm")).all_steps() == [2, 4]
  assert train_ldm.run(config, workdir) == {}
  assert [s for s, _ in test_train_ldm._losses(workdir)] == [2, 4]


def test_mode_all_stops_at_a_preempted_stage_and_resumes_it(tmp_path, monkeypatch):
  config = test_train_ldm.make_config(tmp_path, num_steps=4, checkpoint_every=4, log_every=1)
  workdir = str(tmp_path / "work")
  sampled = []
  monkeypatch.setattr(main, "ALL_STAGES", ("train_ldm", "sample"))
  monkeypatch.setattr(generation_stage, "run", lambda c, w: sampled.append(w))
  plain = train_ldm.LDMTrainer
  monkeypatch.setattr(train_ldm, "LDMTrainer", _hooked(plain, _sigterm_at(2)))
  with pytest.raises(SystemExit) as raised:
    main.run("all", config, workdir)
  assert raised.value.code == 0
  markers = workdir_layout.stage_markers_dir(workdir)
  assert not os.path.exists(os.path.join(markers, "train_ldm.done"))
  assert not sampled  # the next stage did not run

  monkeypatch.setattr(train_ldm, "LDMTrainer", plain)
  main.run("all", config, workdir)
  assert os.path.isfile(os.path.join(markers, "train_ldm.done")) and sampled == [workdir]
  assert [s for s, _ in test_train_ldm._losses(workdir)] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tfds_dir(mini_dataset):
  return mini_dataset.tfds_dir


def test_the_vae_trainer_is_preempted_the_same_way(repo_root, tmp_path, tfds_dir):
  """The same loop on the SourceVAE's state, up to the checkpoint (resuming from it and the
  equality with an uninterrupted run are the diffusion trainer's tests above: a VAE step
  costs far more on CPU)."""
  config = test_train_vae._config(repo_root, tfds_dir, num_steps=4, checkpoint_every=4,
                                  log_every=2, eval_every=0)
  trainer = _hooked(train_vae.VAETrainer, _sigterm_at(3))(config, str(tmp_path))
  with pytest.raises(preemption.Preempted, match="train_vae: preempted at step 3") as raised:
    trainer.train()
  assert raised.value.code == 0
  manager = _checkpoints(trainer.stage_dir)
  assert manager.all_steps() == [3]
  unlogged = checkpointing.decode_unlogged(checkpointing.read_unlogged(manager, 3))
  assert [step for step, _ in unlogged] == [3]
  assert [r["step"] for r in loop.read_metrics(trainer.stage_dir)] == [2]
  # What the resumed run would log with step 4, as the uninterrupted run logs steps 3-4.
  summary = trainer.summarize(unlogged)
  assert np.isfinite(summary["loss/mel"]) and summary["loss/mel"] > 0
  state, position, step = checkpointing.restore_latest(
      manager, trainer.compiled.abstract_state, model_record=trainer.model_record(),
      settings_key=trainer.settings_key)
  assert step == 3 and int(state.step) == 3 and set(position) == {"epoch", "batch_in_epoch"}
