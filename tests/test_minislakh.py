"""The mini Slakh renderer: layout, audio format, musical sanity, determinism, caching."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from msldm_jax import stems
from msldm_jax.data import drum_patterns
from msldm_jax.data import minislakh

# The settings of conftest's mini dataset, which most tests here read (a rendering under
# other settings would fail its settings check in `_render`).
NUM_PIECES = 3
MAX_SECONDS = 6.0


def _render(out_dir, workers=1, **overrides):
  settings = dict(num_pieces=NUM_PIECES, seed=0, max_seconds=MAX_SECONDS, workers=workers)
  settings.update(overrides)
  return minislakh.render_dataset(str(out_dir), **settings)


@pytest.fixture(scope="module")
def rendered(mini_dataset):
  """The session's mini dataset, rendered by the data stage (read only); its manifest."""
  out_dir = mini_dataset.source_dir
  with open(os.path.join(out_dir, minislakh.MANIFEST_NAME)) as f:
    manifest = json.load(f)
  return out_dir, manifest


def _stem_paths(out_dir, track):
  folder = os.path.join(out_dir, track["split"], track["track"])
  return {s: os.path.join(folder, s + ".wav") for s in stems.STEM_NAMES}


def _read(path):
  audio, rate = sf.read(path, dtype="float64")
  assert rate == stems.SAMPLE_RATE
  return audio


def test_layout_and_audio_format(rendered):
  out_dir, manifest = rendered
  tracks = manifest["tracks"]
  assert manifest["complete"]
  assert (manifest["settings"]["num_pieces"], manifest["settings"]["max_seconds"]) == (
      NUM_PIECES, MAX_SECONDS)
  assert [t["track"] for t in tracks] == [f"Track{i:05d}" for i in range(1, NUM_PIECES + 1)]
  assert sorted(os.listdir(out_dir)) == sorted([minislakh.MANIFEST_NAME, *minislakh.SPLITS])
  found = {}
  for split in minislakh.SPLITS:
    for track in os.listdir(os.path.join(out_dir, split)):
      assert track not in found, f"{track} is in two splits"
      found[track] = split
      files = sorted(os.listdir(os.path.join(out_dir, split, track)))
      assert files == sorted(s + ".wav" for s in stems.STEM_NAMES)
  assert found == {t["track"]: t["split"] for t in tracks}
  assert set(found.values()) == set(minislakh.SPLITS)  # every split holds a track
  assert len({t["corpus_path"] for t in tracks}) == NUM_PIECES
  for track in tracks:
    infos = [sf.info(p) for p in _stem_paths(out_dir, track).values()]
    assert {(i.samplerate, i.channels, i.subtype, i.format) for i in infos} == {
        (stems.SAMPLE_RATE, 1, "PCM_16", "WAV")}
    assert {i.frames for i in infos} == {track["num_samples"]}
    assert track["score_seconds"] <= MAX_SECONDS
    for stem, (low, high) in minislakh.GM_PROGRAMS.items():
      assert low <= track["programs"][stem] <= high
    assert minislakh.TEMPO_BPM[0] <= track["bpm"] <= minislakh.TEMPO_BPM[1]


def test_every_stem_sounds(rendered):
  out_dir, manifest = rendered
  for track in manifest["tracks"]:
    for stem, path in _stem_paths(out_dir, track).items():
      rms = np.sqrt(np.mean(_read(path) ** 2))
      assert rms > 3e-3, f"{track['track']}/{stem} is (nearly) silent: rms {rms:.2e}"


def test_drum_onsets_on_the_beat_grid(rendered):
  import librosa  # pylint: disable=g-import-not-at-top
  out_dir, manifest = rendered
  for track in manifest["tracks"]:
    assert track["time_signatures"] == ["4/4"], "the test assumes simple meters"
    drums = _read(_stem_paths(out_dir, track)["drums"])
    beat = 60.0 / track["bpm"]
    hop = 64
    strength = librosa.onset.onset_strength(y=drums, sr=stems.SAMPLE_RATE, hop_length=hop)
    onsets = librosa.onset.onset_detect(onset_envelope=strength, sr=stems.SAMPLE_RATE,
                                        hop_length=hop, units="time", backtrack=False)
    onsets = onsets[onsets < track["score_seconds"]]
    assert len(onsets) >= track["score_seconds"] / beat, "too few drum onsets"
    # Hits are on the sixteenth-note grid of the score (time 0 = the first written note).
    # Not the hit at time 0: with no sound before it, the detector places it ~50 ms late (and
    # in three short pieces that one is over a tenth of the onsets); `jump` skips it too.
    sixteenth = beat / 4
    later = onsets[onsets >= sixteenth / 2]
    off_grid = np.abs(later / sixteenth - np.round(later / sixteenth)) * sixteenth
    assert np.mean(off_grid < 0.03) >= 0.9, off_grid
    # Energy jumps at the beats (hits) and not a 32nd note later (between hits).
    window = int(0.02 * stems.SAMPLE_RATE)

    def jump(times):
      starts = np.round(times * stems.SAMPLE_RATE).astype(int)
      after = np.mean([np.mean(drums[i:i + window] ** 2) for i in starts])
      before = np.mean([np.mean(drums[i - window:i] ** 2) for i in starts])
      return after / before

    beats = np.arange(beat, track["score_seconds"] - beat, beat)
    assert jump(beats) > 10, jump(beats)
    assert jump(beats + beat / 8) < 2, jump(beats + beat / 8)


def test_release_tails_are_kept(rendered):
  out_dir, manifest = rendered
  for track in manifest["tracks"]:
    score_end = int(track["score_seconds"] * stems.SAMPLE_RATE)
    assert track["num_samples"] > score_end + stems.SAMPLE_RATE // 10
    for stem, path in _stem_paths(out_dir, track).items():
      audio = _read(path)
      peak = np.max(np.abs(audio))
      if stem != "drums":
        # The final chord lasts to the score's end: its release sounds after it.
        tail = audio[score_end:score_end + stems.SAMPLE_RATE // 5]
        assert np.max(np.abs(tail)) > 1e-3 * peak, f"{track['track']}/{stem}: no tail"
      assert np.max(np.abs(audio[-200:])) < 0.01 * peak, (
          f"{track['track']}/{stem} ends before its sound has died away")


def test_same_seed_same_bytes_for_any_worker_count(rendered, tmp_path):
  # Its subject is rendering, so it renders its own copy, with another worker count than
  # the data stage's one per CPU.
  out_dir, manifest = rendered
  _render(tmp_path, workers=1 if (os.cpu_count() or 1) > 1 else 2)
  with open(tmp_path / minislakh.MANIFEST_NAME) as f:
    again = json.load(f)
  assert again["tracks"] == manifest["tracks"]
  for track in manifest["tracks"]:
    first, second = _stem_paths(out_dir, track), _stem_paths(tmp_path, track)
    for stem in stems.STEM_NAMES:
      with open(first[stem], "rb") as a, open(second[stem], "rb") as b:
        assert a.read() == b.read(), f"{track['track']}/{stem} differs between runs"


def test_second_call_uses_the_cache(rendered, mini_dataset, tmp_path):
  _, manifest = rendered
  # A copy, which also shows that a rendering moved elsewhere is still found complete.
  out_dir = mini_dataset.copy_rendering_to(tmp_path)
  paths = [p for t in manifest["tracks"] for p in _stem_paths(out_dir, t).values()]
  mtimes = [os.stat(p).st_mtime_ns for p in paths]
  summary = _render(out_dir, workers=4)  # the worker count is not a setting
  assert summary["cached"]
  assert summary["num_tracks"] == NUM_PIECES
  assert summary["tracks_per_split"] == {
      s: sum(t["split"] == s for t in manifest["tracks"]) for s in minislakh.SPLITS}
  assert [os.stat(p).st_mtime_ns for p in paths] == mtimes


def test_other_settings_into_a_rendered_dir_fail(rendered, tmp_path):
  out_dir, _ = rendered  # Refused before anything is written into it.
  with pytest.raises(ValueError, match=r"seed=0, asked 1"):
    _render(out_dir, seed=1)
  (tmp_path / "stray.txt").write_text("not a data set")
  with pytest.raises(ValueError, match=r"not empty and holds no minislakh.json"):
    _render(tmp_path)


def test_splits_are_by_piece_and_never_empty():
  for n in range(3, 40):
    paths = [f"bach/bwv{i}.mxl" for i in range(n)]
    splits = minislakh.assign_splits(paths, seed=5)
    assert set(splits) == set(minislakh.SPLITS)
    assert splits == minislakh.assign_splits(paths, seed=5)
  variants = ["bach/bwv248.9-1.mxl", "bach/bwv248.9-s.mxl", "bach/bwv1.mxl", "bach/bwv2.mxl",
              "bach/bwv3.mxl"]
  splits = minislakh.assign_splits(variants, seed=0)
  assert splits[0] == splits[1] and set(splits) == set(minislakh.SPLITS)


@pytest.mark.parametrize("numerator,denominator", [(3, 4), (12, 8), (3, 2)])
def test_drum_part_follows_other_meters(numerator, denominator):
  bar = drum_patterns.Bar(0.0, 0.0, 0.0, numerator, denominator)
  full = bar.full_length
  bars = [drum_patterns.Bar(i * full, full, 0.0, numerator, denominator) for i in range(8)]
  hits = drum_patterns.drum_part(bars, fermatas=[2 * full + bar.beat], final_onset=8 * full - full,
                                 rng=np.random.default_rng(0))
  kicks_on_downbeats = {h.time for h in hits if h.pitch == drum_patterns.KICK} >= {
      i * full for i in range(7)}
  assert kicks_on_downbeats
  grid = bar.beat / 3 if bar.compound else 0.25
  assert all(abs(h.time / grid - round(h.time / grid)) < 1e-6 for h in hits)
  assert max(h.time for h in hits) == pytest.approx(7 * full)
  assert any(h.pitch == drum_patterns.CRASH and h.time == pytest.approx(3 * full) for h in hits)


def test_missing_tools_are_named(monkeypatch, tmp_path):
  with pytest.raises(FileNotFoundError, match="nothing.sf2"):
    minislakh.find_soundfont(str(tmp_path / "nothing.sf2"))
  monkeypatch.setenv("PATH", str(tmp_path))  # A PATH without fluidsynth on it.
  with pytest.raises(FileNotFoundError, match="bash setup.sh"):
    minislakh.check_fluidsynth()


def test_command_line(tmp_path, repo_root):
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.data.minislakh", f"--out_dir={tmp_path}",
       "--num_pieces=1", "--max_seconds=3", "--workers=1"],
      cwd=repo_root, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.path.isfile(tmp_path / "train" / "Track00001" / "drums.wav")
