"""Any length and the user's own recordings: window plans, joins, long total and partial
generation, formats, rates, lengths and bad files of given stems."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from msldm_jax import stems as stems_lib
from msldm_jax.data import audio_files
from msldm_jax.diffusion import generation_program
from msldm_jax.generation import conditions
from msldm_jax.generation import long_form
from msldm_jax.generation import outputs
from msldm_jax.generation import stage
from msldm_jax.models import source_vae

import test_generation
from test_generation import models  # noqa: F401  (a fixture)

SR = stems_lib.SAMPLE_RATE
HOP = 320


def test_a_minute_costs_the_windows_its_overlap_implies():
  """60 s at the paper's window (1024 frames, 14.86 s) and a quarter overlap: 6 windows,
  1 + ⌈(T − F)/(F − O)⌉, within 60/14.86 · (1 − 1/4)⁻¹ + 1."""
  window, overlap = 1024, 256
  plan = long_form.plan_windows(60 * SR, window, overlap, HOP)
  total = -(-60 * SR // HOP)
  assert plan.total_frames == total
  assert plan.num_windows == 1 + -(-(total - window) // (window - overlap)) == 6
  assert plan.num_windows <= 60 / (window * HOP / SR) / (1 - overlap / window) + 1
  assert plan.starts[0] == 0 and plan.starts[-1] + window == total  # ends at the end
  for w in range(1, plan.num_windows):
    assert plan.known_frames(w) >= overlap
  assert long_form.plan_windows(5 * SR, window, overlap, HOP).starts == (0,)
  with pytest.raises(ValueError, match="overlap of 1024 frames"):
    long_form.plan_windows(60 * SR, window, 1024, HOP)
  with pytest.raises(ValueError, match="shorter than one latent frame"):
    long_form.plan_windows(100, window, overlap, HOP)
  with pytest.raises(ValueError, match="sample.overlap=1.5"):
    long_form.overlap_frames_for(window, 1.5)


def test_join_crossfades_each_overlap_and_keeps_the_rest():
  # Windows of 4 frames decode to 4·hop − 8 samples; the plan covers the piece's last 8 too.
  plan = long_form.plan_windows(10 * HOP, 4, 1, HOP, decoded_shortfall=8)
  assert plan.starts == (0, 3, 6, 7) and plan.total_frames == 11
  windows = [np.full((2, 4 * HOP - 8), float(w + 1), np.float32) for w in range(4)]
  joined = long_form.join_windows(windows, plan, 10 * HOP)
  assert joined.shape == (2, 10 * HOP)
  np.testing.assert_array_equal(joined[:, :3 * HOP], 1.0)
  ramp = joined[0, 3 * HOP:4 * HOP - 8]
  assert np.all(np.diff(ramp) > 0) and 1.0 < ramp[0] < ramp[-1] < 2.0
  np.testing.assert_array_equal(joined[:, 4 * HOP:6 * HOP], 2.0)
  assert np.all(joined[:, 7 * HOP:] > 3.0)  # windows 3 and 4 crossfade to the end
  assert np.all(np.diff(joined[0, 7 * HOP:]) >= 0) and joined[0, -1] > 3.99


def _long_config(**sample):
  config = test_generation._config(num_pieces=2, batch_size=2, **sample)
  return config


def test_long_total_generation_continues_each_window_and_joins_smoothly(models, tmp_path,
                                                                        monkeypatch):
  """2.6 windows of total generation: each window keeps the previous one's overlap frames
  exactly, costs one sampler call per window, and the joined audio has no jump at a join
  larger than its own sample-to-sample changes nearby."""
  vae, vae_params, denoiser, denoiser_params = models
  config = _long_config()
  window = int(config.data.chunks.samples)
  config.sample.seconds = 2.6 * window / SR
  calls = []
  original = generation_program.sample_masked

  def counting(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  monkeypatch.setattr(generation_program, "sample_masked", counting)
  output = stage.generate_to_dir(config, str(tmp_path), *models)
  spec = stage.make_spec(config, vae, denoiser)
  plan = long_form.plan_for(spec, int(round(config.sample.seconds * SR)),
                           long_form.overlap_frames_for(spec.num_frames, 0.25))
  assert len(calls) == plan.num_windows == 4  # one compiled call per window, both pieces
  stems, mix, record = test_generation._read_piece(outputs.piece_dir(output, 1))
  assert record["windows"] == plan.num_windows and record["overlap"] == 0.25
  length = int(round(config.sample.seconds * SR))
  latents = np.load(os.path.join(outputs.piece_dir(output, 1), "latents.npy"))
  assert latents.shape == (spec.channels, plan.total_frames)
  for name, audio in stems.items():
    assert audio.shape == (length,) and np.isfinite(audio).all()
    steps = np.abs(np.diff(audio))
    for start in plan.starts[1:]:
      for edge in (start * HOP, (plan.starts[plan.starts.index(start) - 1] + spec.num_frames)
                   * HOP - 8):
        if edge >= length - 1:
          continue
        near = np.concatenate([steps[max(0, edge - 2048):edge - 2],
                               steps[edge + 2:edge + 2048]])
        assert steps[edge - 1:edge + 1].max() <= near.max() + 1e-6, (name, edge)
  np.testing.assert_array_equal(mix, outputs.mixture(stems))


def test_long_windows_hold_their_given_frames_exactly(models):
  vae, vae_params, denoiser, denoiser_params = models
  config = _long_config()
  spec = stage.make_spec(config, vae, denoiser)
  overlap = long_form.overlap_frames_for(spec.num_frames, 0.25)
  num_samples = int(2.2 * spec.num_samples)
  plan = long_form.plan_for(spec, num_samples, overlap)
  keys = generation_program.piece_keys(0, [0])
  windows = list(long_form.generate_long(spec, vae_params, denoiser_params, keys, plan,
                                         num_samples))
  assert len(windows) == plan.num_windows == 3
  for w in range(1, plan.num_windows):
    held = plan.known_frames(w)
    shift = plan.starts[w] - plan.starts[w - 1]
    np.testing.assert_array_equal(windows[w][1][:, :, :held],
                                  windows[w - 1][1][:, :, shift:shift + held])


def _write(path, seconds, rate, freq, channels=1, subtype=None):
  t = np.arange(int(round(seconds * rate))) / rate
  x = 0.4 * np.sin(2 * np.pi * freq * t)
  audio = np.stack([x, 0.5 * x], axis=1) if channels == 2 else x
  sf.write(path, audio.astype(np.float32), rate, subtype=subtype)
  return len(t)


@pytest.mark.parametrize("ext,subtype", [(".wav", "PCM_24"), (".flac", "PCM_16"),
                                         (".ogg", "VORBIS"), (".mp3", "MPEG_LAYER_III")])
def test_given_stems_in_every_format_rate_and_channel_count(tmp_path, ext, subtype):
  path = str(tmp_path / f"bass{ext}")
  frames = _write(path, 1.3, 44100, 110, channels=2, subtype=subtype)
  given = conditions.read_given_stems(conditions.find_in_dir(str(tmp_path), ("bass",)))
  audio = given.waveforms["bass"]
  assert given.output_rate(SR) == 44100
  assert given.output_length(SR) == sf.info(path).frames
  # MP3 frames carry encoder padding: its length is what the decoder reports, ±a frame.
  assert abs(len(audio) - audio_files.resampled_length(frames, 44100, SR)) <= (
      1200 if ext == ".mp3" else 0)
  spectrum = np.abs(np.fft.rfft(audio[SR // 4: SR // 4 + 8192]))
  assert abs(np.argmax(spectrum) * SR / 8192 - 110) < 5  # the tone, at the model's rate


def test_given_stems_of_different_lengths_fail_or_pad(tmp_path):
  _write(str(tmp_path / "bass.wav"), 1.0, SR, 110)
  _write(str(tmp_path / "piano.flac"), 0.5, 44100, 440, subtype="PCM_16")
  paths = {"bass": str(tmp_path / "bass.wav"), "piano": str(tmp_path / "piano.flac")}
  with pytest.raises(ValueError, match=r"bass\.wav 1\.000 s.*piano\.flac 0\.500 s.*--pad"):
    conditions.read_given_stems(paths)
  given = conditions.read_given_stems(paths, pad=True)
  assert given.padded == ("piano",) and given.num_samples == SR
  assert np.all(given.waveforms["piano"][SR // 2 + 2:] == 0)


def test_condition_flag_values_are_checked():
  assert conditions.parse_condition("piano=b.flac, bass=a.mp3") == {"bass": "a.mp3",
                                                                    "piano": "b.flac"}
  with pytest.raises(ValueError, match="'flute'"):
    conditions.parse_condition("flute=x.wav")
  with pytest.raises(ValueError, match="not STEM=FILE"):
    conditions.parse_condition("bass")
  with pytest.raises(ValueError, match="given twice"):
    conditions.parse_condition("bass=a.wav,bass=b.wav")


@pytest.mark.parametrize("defect", ["empty", "nan", "text"])
def test_a_broken_recording_fails_naming_it_before_anything_is_written(tmp_path, defect):
  bad = tmp_path / "drums.wav"
  if defect == "empty":
    bad.write_bytes(b"")
  elif defect == "nan":
    audio = np.zeros(SR, np.float32)
    audio[10] = np.nan
    sf.write(bad, audio, SR, subtype="FLOAT")
  else:
    bad.write_text("not audio")
  _write(str(tmp_path / "bass.wav"), 1.0, SR, 110)
  config = test_generation._config(condition=f"bass={tmp_path / 'bass.wav'},drums={bad}")
  with pytest.raises(audio_files.BadAudioError, match="drums.wav"):
    stage.prepare_task(config)
  config = test_generation._config(condition=f"bass={tmp_path / 'bass.wav'}",
                                   generate="drums")
  with pytest.raises(ValueError, match="needs exactly the others"):
    stage.prepare_task(config)


def test_accompany_recordings_from_the_command_line(models, tmp_path):
  """`--condition=bass=…mp3,piano=…flac`: 44.1 kHz stereo recordings 1.6 windows long; the
  drums and guitar are generated window by window and every stem is written at 44.1 kHz
  and the recordings' length, the given ones as recorded."""
  config = test_generation._config()
  test_generation._write_checkpoints(str(tmp_path), models, config)
  window_seconds = int(config.data.chunks.samples) / SR
  bass, piano = str(tmp_path / "bass.mp3"), str(tmp_path / "piano.flac")
  _write(bass, 1.6 * window_seconds, 44100, 110, channels=2, subtype="MPEG_LAYER_III")
  _write(piano, 1.6 * window_seconds, 44100, 440, channels=2, subtype="PCM_16")
  length = max(sf.info(bass).frames, sf.info(piano).frames)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=sample", f"--condition=bass={bass},piano={piano}",
       "--pad", "--config.sample.num_pieces=1", "--config.sample.batch_size=1"],
      capture_output=True, text=True, env=env, timeout=600,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert result.returncode == 0, result.stderr[-3000:]
  piece = outputs.piece_dir(os.path.join(str(tmp_path), "samples"), 0)
  with open(os.path.join(piece, "piece.json")) as f:
    record = json.load(f)
  assert record["generated"] == ["drums", "guitar"] and record["given"] == ["bass", "piano"]
  assert record["windows"] == 2 and record["sample_rate"] == 44100
  audio = {}
  for name in stems_lib.STEM_NAMES:
    audio[name], rate = sf.read(os.path.join(piece, "stems", f"{name}.wav"), dtype="float32")
    assert rate == 44100 and audio[name].shape == (length,) and np.isfinite(audio[name]).all()
  recorded, _ = sf.read(piano, dtype="float32")
  np.testing.assert_allclose(audio["piano"][:len(recorded)], recorded.mean(axis=1),
                             atol=1e-6)
  assert np.max(np.abs(audio["drums"])) > 0
