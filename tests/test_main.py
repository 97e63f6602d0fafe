"""The entry point as users run it: `python -m msldm_jax.main ... --mode=data`."""

import subprocess
import sys

import pytest
import tensorflow_datasets as tfds

from msldm_jax import workdir_layout
from msldm_jax.data import build


def test_data_mode_builds_the_mini_dataset_then_reuses_it(repo_root, tmp_path, mini_dataset):
  # Rendering from an empty workdir is the session fixture's own run of this stage; here the
  # command line finds that rendering in WORKDIR/minislakh, as a user's second run would.
  mini_dataset.copy_rendering_to(tmp_path)
  command = [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
             f"--workdir={tmp_path}", "--mode=data", *mini_dataset.config_flags()]
  logs = []
  for _ in range(2):  # The first run builds, the second reuses the build.
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logs.append(result.stderr)
  assert all("mini Slakh already rendered" in log for log in logs)
  assert "Building dataset" in logs[0] and "Building dataset" not in logs[1]
  assert "Reusing the dataset" in logs[1]
  dataset_dir = workdir_layout.dataset_path(str(tmp_path / "tfds"), "minislakh")
  builder = tfds.builder_from_directory(dataset_dir)
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {"train": 1, "validation": 1, "test": 1}
  report = build.read_build_report(dataset_dir)
  assert not report.skipped


def test_mode_all_from_the_command_line_runs_the_stages_in_order(repo_root, tmp_path):
  # A source folder that does not exist: the first stage (data) fails at once, naming it,
  # which shows that `--mode=all` dispatched to the stages under `python -m` (where this
  # module is __main__ and must not be imported a second time).
  missing = tmp_path / "no_such_stems"
  command = [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
             f"--workdir={tmp_path / 'work'}", "--mode=all",
             f"--config.data.source_dir={missing}"]
  result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "DuplicateFlagError" not in result.stderr
  assert "stage data: running" in result.stderr
  assert str(missing) in result.stderr


def test_mode_all_skips_stages_finished_under_the_same_config(tmp_path, monkeypatch):
  """run_all's markers on stand-in stages (each records that it ran): a second run skips
  every stage; another config runs every stage again. (The stages themselves resume from
  what a workdir holds: tests/test_train_vae.py, test_train_ldm.py, test_latents.py.)"""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from msldm_jax import main  # pylint: disable=g-import-not-at-top
  ran = []

  def recording(mode, config, workdir):
    if mode == "all":
      return main.run_all(config, workdir)
    ran.append(mode)
    return mode
  monkeypatch.setattr(main, "run", recording)
  config = ml_collections.ConfigDict({"sample": {"num_steps": 4}})
  workdir = str(tmp_path)
  assert main.run("all", config, workdir) == {mode: mode for mode in main.ALL_STAGES}
  assert ran == list(main.ALL_STAGES)
  assert main.run("all", config, workdir) == {} and len(ran) == len(main.ALL_STAGES)
  config.sample.num_steps = 5
  assert list(main.run("all", config, workdir)) == list(main.ALL_STAGES)
  # A stage that fails leaves no marker: the next run redoes it and what follows.
  config.sample.num_steps = 6

  def failing(mode, config, workdir):
    if mode == "all":
      return main.run_all(config, workdir)
    if mode == "sample":
      raise RuntimeError("sampling failed")
    return mode
  monkeypatch.setattr(main, "run", failing)
  with pytest.raises(RuntimeError, match="sampling failed"):
    main.run("all", config, workdir)
  ran.clear()
  monkeypatch.setattr(main, "run", recording)
  assert list(main.run("all", config, workdir)) == ["sample", "evaluate"]
