"""The study's control (`--mode=control`, study/control.py): the planted dependence and its
scores, then msldm and isldm trained on it from the command line: the joint model keeps the
dependence, the independent one cannot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax import stems
from msldm_jax.latents import store
from msldm_jax.study import control

SHAPE = dict(num_stems=stems.NUM_STEMS, latent_dim=8, frames=72, segments=8, sigma_data=0.4)
GIVEN = [stems.stem_index(stem) for stem in control.GIVEN_STEMS]


def _planted(count, dependent, seed=0):
  return control.planted_latents(count, seed=seed, dependent=dependent, **SHAPE)


def _scores(total, partial):
  return control.scores(total, partial, GIVEN, bootstrap_samples=200, confidence=0.95, seed=0)


def test_coordinates_read_back_the_planted_signs_at_sigma_datas_scale():
  latents, signs = _planted(32, dependent=True)
  assert latents.shape == (32, 4, 8, 72)
  # Every element's RMS near σ_data: the scale the denoiser's preconditioning expects.
  assert np.sqrt(np.mean(latents ** 2)) == pytest.approx(0.4, rel=0.05)
  coords = control.coordinates(latents, SHAPE["segments"], SHAPE["sigma_data"])
  np.testing.assert_allclose(coords, signs, atol=0.05)
  assert (signs == signs[:, :1]).all()  # one sign per chunk and segment for every stem
  frames = control.frame_coordinates(latents, SHAPE["sigma_data"])
  assert frames.shape == (32, 4, 72)
  np.testing.assert_allclose(np.abs(frames), 1.0, atol=0.2)


def test_frames_at_the_datas_level_whose_signs_disagree_within_segments():
  """What a network that learned each frame but not the segments generates: the frame
  coordinates at ±1, the segments' near 0."""
  latents, _ = _planted(32, dependent=True)
  flipped = latents * np.where(np.arange(72) % 2, 1.0, -1.0)  # every other frame's sign
  segments = control.coordinates(flipped, SHAPE["segments"], SHAPE["sigma_data"])
  frames = control.frame_coordinates(flipped, SHAPE["sigma_data"])
  scores = control.scores(segments, segments, GIVEN, bootstrap_samples=200, confidence=0.95,
                          seed=0, total_frames=frames)
  assert scores["median_abs_frame_coordinate"] == pytest.approx(1.0, abs=0.05)
  assert scores["median_abs_coordinate"] < 0.2  # 1 of 9 frames per segment left over
  assert "median_abs_frame_coordinate" not in _scores(segments, segments)


def test_dependent_stems_score_one_and_independent_ones_a_half():
  dependent, _ = _planted(64, dependent=True)
  independent, signs = _planted(64, dependent=False)
  assert not (signs == signs[:, :1]).all()
  coords = {name: control.coordinates(x, SHAPE["segments"], SHAPE["sigma_data"])
            for name, x in (("dependent", dependent), ("independent", independent))}
  tied = _scores(coords["dependent"], coords["dependent"])
  apart = _scores(coords["independent"], coords["independent"])
  assert tied["agreement"]["value"] == 1.0 and tied["partial_agreement"]["value"] == 1.0
  for key in ("agreement", "partial_agreement"):
    assert abs(apart[key]["value"] - 0.5) < 0.05, (key, apart[key])
    assert apart[key]["high"] < 0.6 and tied[key]["low"] == 1.0
  # The marginals are the same either way: on the modes, fair signs.
  for scores in (tied, apart):
    assert scores["median_abs_coordinate"] == pytest.approx(1.0, abs=0.05)
    assert 0.8 < scores["segment_spread"] <= 1.0
    assert scores["positive_share"] == pytest.approx(0.5, abs=0.06)


def test_the_planted_store_is_kept_and_other_settings_are_refused(tmp_path):
  config = config_loading.load_config("configs/study.py:variant=tiny")
  directory = str(tmp_path / "latents")
  manifest = control.write_store(config, directory)
  assert manifest["shape"] == [4, 8, 72]
  assert manifest["splits"]["train"]["num_chunks"] == config.study.control_chunks
  held_out = store.LatentStore(directory, control.HELD_OUT_SPLIT).read_all()
  assert len(held_out) == config.study.control_pieces
  assert control.write_store(config, directory) == manifest
  # A write killed before it completed is made again.
  with open(os.path.join(directory, store.MANIFEST)) as f:
    unfinished = json.load(f)
  unfinished["status"] = store.STATUS_ENCODING
  with open(os.path.join(directory, store.MANIFEST), "w") as f:
    json.dump(unfinished, f)
  assert control.write_store(config, directory)["status"] == store.STATUS_COMPLETE
  config.study.control_segments = 4
  with pytest.raises(ValueError, match="planted store at .*other settings"):
    control.write_store(config, directory)
  config.study.control_segments = 100
  with pytest.raises(ValueError, match="study.control_segments=100"):
    control.segment_index(72, config.study.control_segments)


@pytest.mark.slow(minutes=3)
def test_msldm_learns_the_planted_dependence_and_isldm_cannot(repo_root, tmp_path):
  """The tiny study's DiT, 300 steps on 64 planted chunks (about a minute on 2 cores)."""
  command = [sys.executable, "-m", "msldm_jax.main", "--config=configs/study.py:variant=tiny",
             f"--workdir={tmp_path}", "--mode=control", "--config.ldm.train.num_steps=300",
             "--config.ldm.train.checkpoint_every=150", "--config.ldm.train.log_every=50",
             "--config.ldm.ema_decay=0.95", "--config.study.control_chunks=64",
             # A budget that the 300 steps stay within: the trainer logs the CPU seconds spent.
             "--config.study.control_seconds=3600",
             "--config.study.control_pieces=32", "--config.sample.batch_size=16",
             "--config.sample.num_steps=32"]
  # One device: this is about learning, not sharding, and 8 fake devices on 2 loaded cores
  # once missed XLA's 40 s all-reduce rendezvous in the trainer's step.
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "--xla_force_host_platform_device_count=1"))
  result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=1200,
                          env=env)
  assert result.returncode == 0, result.stderr[-4000:]
  folder = control.control_dir(str(tmp_path))
  with open(os.path.join(folder, control.RESULTS_FILE)) as f:
    rows = json.load(f)["rows"]
  assert list(rows) == [control.DATA_ROW, "msldm", "isldm"]
  msldm, isldm = rows["msldm"], rows["isldm"]
  assert msldm["steps"] == isldm["steps"] == 300
  # Measured: msldm 0.91 [0.89, 0.95] and 1.00 given bass and drums; isldm 0.51 and 0.53.
  assert msldm["agreement"]["value"] > 0.8, msldm
  assert msldm["partial_agreement"]["value"] > 0.9, msldm
  assert msldm["agreement"]["low"] > isldm["agreement"]["high"]
  assert msldm["partial_agreement"]["low"] > isldm["partial_agreement"]["high"]
  for key in ("agreement", "partial_agreement"):
    assert 0.35 < isldm[key]["value"] < 0.65, (key, isldm)
  # Both learned the marginals: signs on both sides.
  for row in (msldm, isldm):
    assert 0.3 < row["positive_share"] < 0.7, row
    assert row["segment_spread"] > 0.0, row
  with open(os.path.join(folder, control.TABLE_FILE)) as f:
    assert "| msldm | 300 |" in f.read()
  assert os.path.getsize(os.path.join(folder, control.PLOT_FILE)) > 0

  # The samplers' benchmark on the trained control: one row per system, checkpoint (150 and
  # 300 steps kept), sampler and budget; the plot against the budget spent.
  flags = [f for f in command[3:] if f.startswith(("--config=", "--workdir=", "--config.sample"))]
  plot = tmp_path / "progress.png"
  benchmark = subprocess.run(
      [sys.executable, "-m", "benchmarks.control_samplers", *flags, "--systems=msldm,isldm",
       "--samplers=heun,dpmpp_2m", "--evaluations=4,16", "--every_checkpoint",
       f"--plot={plot}"],
      cwd=repo_root, capture_output=True, text=True, timeout=600, env=env)
  assert benchmark.returncode == 0, benchmark.stderr[-4000:]
  table_rows = [line.split(" | ") for line in benchmark.stdout.splitlines()
                if line.startswith(("| msldm |", "| isldm |"))]
  assert [(r[0], r[1], r[3], r[4], r[5]) for r in table_rows] == [
      (f"| {name}", trained, sampler, evaluations, steps) for name in ("msldm", "isldm")
      for trained in ("150", "300")
      for sampler, evaluations, steps in (("heun", "4", "2"), ("heun", "16", "8"),
                                          ("dpmpp_2m", "4", "4"), ("dpmpp_2m", "16", "16"))]
  # The CPU seconds each checkpoint had trained for, from the trainer's log.
  spent = {(r[0], r[1]): float(r[2]) for r in table_rows}
  assert 0 < spent[("| msldm", "150")] < spent[("| msldm", "300")]
  # At the control's own budget msldm keeps the dependence under either sampler; isldm has
  # none to keep.
  agreement = {(r[0], r[1], r[3], r[4]): float(r[6].split()[0]) for r in table_rows}
  for sampler in ("heun", "dpmpp_2m"):
    assert agreement[("| msldm", "300", sampler, "16")] > 0.7, benchmark.stdout
    assert agreement[("| isldm", "300", sampler, "16")] < 0.65, benchmark.stdout
  assert plot.stat().st_size > 0
