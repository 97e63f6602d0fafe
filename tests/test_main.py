"""The entry point as users run it: `python -m msldm_jax.main ... --mode=data`."""

import os
import subprocess
import sys

import tensorflow_datasets as tfds

from msldm_jax.data import build


def test_data_mode_renders_and_builds_the_mini_dataset(repo_root, tmp_path):
  command = [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
             f"--workdir={tmp_path}", "--mode=data", "--config.data.render.num_pieces=3",
             "--config.data.render.max_seconds=6", "--config.data.min_duration=2"]
  for attempt in range(2):  # The second run must reuse both the rendering and the build.
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
  dataset_dir = build.dataset_path(str(tmp_path / "tfds"), "minislakh")
  builder = tfds.builder_from_directory(dataset_dir)
  counts = {split: info.num_examples for split, info in builder.info.splits.items()}
  assert counts == {"train": 1, "validation": 1, "test": 1}
  report = build.read_build_report(dataset_dir)
  assert not report.skipped
  assert os.path.isfile(tmp_path / "minislakh" / "minislakh.json")


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
