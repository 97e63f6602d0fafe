"""TFDS builds from stem folders: both layouts, the track filter, and every bad-input case.

The fixtures write tiny source trees (well under a second per track) with numpy + soundfile;
each tree is built once per module and the tests read the result.
"""

import os
import subprocess
import sys
import zlib

import librosa
import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from msldm_jax import config_loading
from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.data import audio_files
from msldm_jax.data import build
from msldm_jax.data import prepare

SR = stems.SAMPLE_RATE
SLAKH_SR = 44100
MIN_S, MAX_S = 0.5, 2.0   # The filter used by these tests' builds.


def _noise(num_samples, seed, channels=None):
  rng = np.random.default_rng(seed)
  shape = (num_samples,) if channels is None else (num_samples, channels)
  return (0.1 * rng.standard_normal(shape)).astype(np.float32)


def _write_stems_track(track_dir, seconds=0.6, seed=0, **overrides):
  """Writes TRACK/{stem}.wav as float32 (exact round trip); returns {stem: samples}."""
  os.makedirs(track_dir, exist_ok=True)
  written = {}
  for index, name in enumerate(stems.STEM_NAMES):
    samples = overrides.get(name)
    if samples is None:
      samples = _noise(int(round(seconds * SR)), seed * 10 + index)
    if isinstance(samples, str) and samples == "absent":
      continue
    sf.write(os.path.join(track_dir, name + ".wav"), samples, SR, subtype="FLOAT")
    written[name] = samples
  return written


def _truncate(path):
  data = open(path, "rb").read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _examples(dataset_dir, split):
  builder = tfds.builder_from_directory(dataset_dir)
  return {ex["track_id"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split=split))}


# --------------------------------------------------------------------------- stems layout

# track id -> (file at fault, relative to the track folder or '' for the folder, reason part)
STEMS_BAD = {
    "Track00010": ("bass.wav", "truncated WAV"),
    "Track00011": ("drums.wav", "file is empty (0 bytes)"),
    "Track00012": ("guitar.wav", "not a readable audio file"),
    "Track00013": ("piano.wav", "holds no audio samples"),
    "Track00014": ("", "stems differ in length"),
    "Track00015": ("", "missing stem file(s): piano.wav"),
    "Track00016": ("drums.wav", "non-finite samples (NaN/Inf)"),
    "Track00017": ("", "every stem is silent"),
    "Track00018": ("", "duration 0.400 s is outside the filter [0.5, 2)"),
    "Track00019": ("", "duration 2.000 s is outside the filter [0.5, 2)"),
    "Track00202": ("", "missing stem file(s): bass.wav"),
}


@pytest.fixture(scope="module")
def stems_source(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("stems_source"))
  train = os.path.join(root, "train")
  written = {}
  written["Track00001"] = _write_stems_track(os.path.join(train, "Track00001"), seed=1)
  written["Track00002"] = _write_stems_track(
      os.path.join(train, "Track00002"), seed=2, piano=np.zeros(13230, np.float32))
  stereo = _noise(13230, 30, channels=2)
  written["Track00003"] = _write_stems_track(os.path.join(train, "Track00003"), seed=3,
                                             guitar=stereo)
  # Drums at 44.1 kHz, as long as the others: resampled with a note.
  drums_44k = _noise(2 * 13230, 40)
  written["Track00004"] = _write_stems_track(os.path.join(train, "Track00004"), seed=4,
                                             drums="absent")
  sf.write(os.path.join(train, "Track00004", "drums.wav"), drums_44k, SLAKH_SR, subtype="FLOAT")
  written["Track00004"]["drums"] = drums_44k
  written["Track00005"] = _write_stems_track(os.path.join(train, "Track00005"), seconds=MIN_S,
                                             seed=5)

  _write_stems_track(os.path.join(train, "Track00010"), seed=10)
  _truncate(os.path.join(train, "Track00010", "bass.wav"))
  _write_stems_track(os.path.join(train, "Track00011"), seed=11)
  open(os.path.join(train, "Track00011", "drums.wav"), "wb").close()
  _write_stems_track(os.path.join(train, "Track00012"), seed=12)
  with open(os.path.join(train, "Track00012", "guitar.wav"), "w") as f:
    f.write("this is a text file, not audio\n" * 20)
  _write_stems_track(os.path.join(train, "Track00013"), seed=13,
                     piano=np.zeros(0, np.float32))
  _write_stems_track(os.path.join(train, "Track00014"), seconds=0.7, seed=14,
                     bass=_noise(13230, 140))
  _write_stems_track(os.path.join(train, "Track00015"), seed=15, piano="absent")
  nan_drums = _noise(13230, 160)
  nan_drums[100] = np.nan
  nan_drums[200] = np.inf
  _write_stems_track(os.path.join(train, "Track00016"), seed=16, drums=nan_drums)
  silence = np.zeros(13230, np.float32)
  _write_stems_track(os.path.join(train, "Track00017"), bass=silence, drums=silence,
                     guitar=silence, piano=silence)
  _write_stems_track(os.path.join(train, "Track00018"), seconds=0.4, seed=18)
  _write_stems_track(os.path.join(train, "Track00019"), seconds=MAX_S, seed=19)
  # Not tracks: a hidden folder and a stray file.
  os.makedirs(os.path.join(train, ".cache"))
  open(os.path.join(train, "notes.txt"), "w").close()

  written["Track00101"] = _write_stems_track(os.path.join(root, "validation", "Track00101"),
                                             seed=101)
  written["Track00201"] = _write_stems_track(os.path.join(root, "test", "Track00201"), seed=201)
  _write_stems_track(os.path.join(root, "test", "Track00202"), seed=202, bass="absent")
  return root, written


@pytest.fixture(scope="module")
def stems_built(stems_source, tmp_path_factory):
  root, written = stems_source
  data_dir = str(tmp_path_factory.mktemp("stems_tfds"))
  path = build.build_dataset("stems", root, data_dir, name="stems_test", min_duration=MIN_S,
                             max_duration=MAX_S)
  return path, root, written, data_dir


def test_stems_splits_order_and_loading(stems_built):
  path, _, _, data_dir = stems_built
  assert path == workdir_layout.dataset_path(data_dir, "stems_test")
  assert path.endswith(os.path.join("stems_test", "1.0.0"))
  builder = tfds.builder_from_directory(path)
  assert set(builder.info.splits.keys()) == {"train", "validation", "test"}
  ids = [ex["track_id"].decode()
         for ex in tfds.as_numpy(builder.as_dataset(split="train"))]
  assert ids == ["Track00001", "Track00002", "Track00003", "Track00004", "Track00005"]
  assert builder.info.metadata["layout"] == "stems"
  assert builder.info.metadata["stem_names"] == list(stems.STEM_NAMES)


def test_stems_values_round_trip(stems_built):
  path, _, written, _ = stems_built
  examples = {**_examples(path, "train"), **_examples(path, "validation"),
              **_examples(path, "test")}
  for track_id in ("Track00001", "Track00002", "Track00005", "Track00101", "Track00201"):
    ex = examples[track_id]
    expected = np.stack([written[track_id][name] for name in stems.STEM_NAMES])
    assert ex["audio"].dtype == np.float32
    np.testing.assert_array_equal(ex["audio"], expected)  # Also checks the stem order.
    assert ex["num_samples"] == expected.shape[1]
  assert examples["Track00005"]["num_samples"] == int(MIN_S * SR)  # The inclusive bound.
  np.testing.assert_array_equal(examples["Track00001"]["stem_present"], [True] * 4)
  np.testing.assert_array_equal(examples["Track00002"]["stem_present"], [True, True, True, False])


def test_stems_conversions_are_applied_and_reported(stems_built):
  path, _, written, _ = stems_built
  examples = _examples(path, "train")
  guitar = examples["Track00003"]["audio"][stems.stem_index("guitar")]
  np.testing.assert_allclose(guitar, written["Track00003"]["guitar"].mean(axis=1), atol=1e-7)
  drums = examples["Track00004"]["audio"][stems.stem_index("drums")]
  expected = librosa.resample(written["Track00004"]["drums"], orig_sr=SLAKH_SR, target_sr=SR,
                              res_type="soxr_hq")
  np.testing.assert_allclose(drums, expected, atol=1e-6)
  notes = {(n.track_id, n.note.split(": ", 1)[1]) for n in build.read_build_report(path).notes}
  assert ("Track00003", "2 channels downmixed to mono (channel mean)") in notes
  assert ("Track00004", "44100 Hz (expected 22050 Hz), resampled") in notes
  assert len(notes) == 2


def test_stems_bad_tracks_reported(stems_built):
  path, root, _, _ = stems_built
  report = build.read_build_report(path)
  assert report.kept == {"train": ["Track00001", "Track00002", "Track00003", "Track00004",
                                   "Track00005"],
                         "validation": ["Track00101"], "test": ["Track00201"]}
  skipped = {s.track_id: s for s in report.skipped}
  assert set(skipped) == set(STEMS_BAD)
  for track_id, (file_name, reason) in STEMS_BAD.items():
    split = "test" if track_id == "Track00202" else "train"
    track_dir = os.path.join(root, split, track_id)
    entry = skipped[track_id]
    assert entry.split == split
    assert reason in entry.reason, (track_id, entry.reason)
    assert entry.path == (os.path.join(track_dir, file_name) if file_name else track_dir)
  assert report.absent_splits == []
  # The summary names every skipped track with its reason.
  summary = report.summary()
  for track_id, (_, reason) in STEMS_BAD.items():
    assert track_id in summary


def test_rebuild_reuses_and_refuses_other_settings(stems_built):
  path, root, _, data_dir = stems_built
  assert build.build_dataset("stems", root, data_dir, name="stems_test", min_duration=MIN_S,
                             max_duration=MAX_S) == path
  with pytest.raises(ValueError, match="min_duration=0.5 \\(asked 0.6\\)"):
    build.build_dataset("stems", root, data_dir, name="stems_test", min_duration=0.6,
                        max_duration=MAX_S)


# --------------------------------------------------------------------------- slakh_raw layout

def _stem_yaml(stem_id, inst_class, is_drum=False, rendered=True):
  return (f"  {stem_id}:\n    audio_rendered: {str(rendered).lower()}\n"
          f"    inst_class: {inst_class}\n    is_drum: {str(is_drum).lower()}\n"
          "    program_num: 0\n")


def _write_slakh_track(track_dir, stem_specs, metadata=None):
  """stem_specs: (stem_id, inst_class, is_drum, rendered, frames or None for no file)."""
  os.makedirs(os.path.join(track_dir, "stems"), exist_ok=True)
  if metadata is None:
    metadata = "UUID: abc\naudio_dir: stems\nstems:\n" + "".join(
        _stem_yaml(sid, cls, drum, rendered) for sid, cls, drum, rendered, _ in stem_specs)
  if metadata is not False:
    with open(os.path.join(track_dir, "metadata.yaml"), "w") as f:
      f.write(metadata)
  audio = {}
  for index, (sid, _, _, _, frames) in enumerate(stem_specs):
    if frames is None:
      continue
    samples = _noise(frames, zlib.crc32(f"{track_dir}/{sid}".encode()))
    path = os.path.join(track_dir, "stems", sid + ".flac")
    sf.write(path, samples, SLAKH_SR, subtype="PCM_16")
    audio[sid], _ = sf.read(path, dtype="float32")  # The 16-bit values actually stored.
  return audio


N44 = int(0.6 * SLAKH_SR)

SLAKH_BAD = {
    "Track00003": ("metadata.yaml", "not valid YAML"),
    "Track00004": ("metadata.yaml", "stems.S00: missing key 'inst_class'"),
    "Track00005": ("metadata.yaml", "stems.S00.is_drum: expected true or false, got 'maybe'"),
    "Track00006": ("stems/S01.flac", "has audio_rendered: true in metadata.yaml but its file"),
    "Track00007": ("", "stems differ in length"),
    "Track00008": ("stems/S00.flac", "truncated"),
    "Track00009": ("metadata.yaml", "metadata.yaml is missing"),
    "Track00010": ("metadata.yaml", "the top level is a list"),
    "Track00011": ("", "no rendered stem of the four classes"),
    "Track00101": ("metadata.yaml", "'stems' must be a non-empty mapping"),
}


@pytest.fixture(scope="module")
def slakh_built(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("slakh_source"))
  train = os.path.join(root, "train")
  audio = {}
  audio["Track00001"] = _write_slakh_track(os.path.join(train, "Track00001"), [
      ("S00", "Guitar", False, True, N44),
      ("S01", "Guitar", False, True, N44),
      ("S02", "Strings", False, True, N44),        # Left out.
      ("S03", "Bass", False, False, None),         # Not rendered: no file; bass is silent.
      ("S04", "Drums", True, True, N44),
      ("S05", "Piano", False, True, N44),
  ])
  # One stem a source sample longer (within the 1-sample tolerance at 22050 Hz), lower case.
  audio["Track00002"] = _write_slakh_track(os.path.join(train, "Track00002"), [
      ("S00", "bass", False, True, N44 + 1),
      ("S01", "Drums", True, True, N44),
      ("S02", "Organ", False, True, N44),
  ])
  _write_slakh_track(os.path.join(train, "Track00003"), [("S00", "Bass", False, True, N44)],
                     metadata="stems:\n  S00: [unclosed\n")
  _write_slakh_track(os.path.join(train, "Track00004"), [("S00", "Bass", False, True, N44)],
                     metadata="stems:\n  S00:\n    audio_rendered: true\n    is_drum: false\n")
  _write_slakh_track(os.path.join(train, "Track00005"), [("S00", "Bass", False, True, N44)],
                     metadata="stems:\n  S00:\n    audio_rendered: true\n    inst_class: Bass\n"
                     "    is_drum: maybe\n")
  _write_slakh_track(os.path.join(train, "Track00006"), [
      ("S00", "Bass", False, True, N44), ("S01", "Guitar", False, True, None)])
  _write_slakh_track(os.path.join(train, "Track00007"), [
      ("S00", "Bass", False, True, N44), ("S01", "Guitar", False, True, N44 + 4410)])
  _write_slakh_track(os.path.join(train, "Track00008"), [
      ("S00", "Bass", False, True, N44), ("S01", "Guitar", False, True, N44)])
  _truncate(os.path.join(train, "Track00008", "stems", "S00.flac"))
  _write_slakh_track(os.path.join(train, "Track00009"), [("S00", "Bass", False, True, N44)],
                     metadata=False)
  _write_slakh_track(os.path.join(train, "Track00010"), [("S00", "Bass", False, True, N44)],
                     metadata="- S00\n- S01\n")
  _write_slakh_track(os.path.join(train, "Track00011"), [
      ("S00", "Strings", False, True, N44), ("S01", "Synth Pad", False, True, N44)])
  # The only validation track is bad: that split is not built. No test folder at all.
  _write_slakh_track(os.path.join(root, "validation", "Track00101"),
                     [("S00", "Bass", False, True, N44)], metadata="stems: {}\n")
  data_dir = str(tmp_path_factory.mktemp("slakh_tfds"))
  path = build.build_dataset("slakh_raw", root, data_dir, min_duration=MIN_S,
                             max_duration=MAX_S)
  return path, root, audio


def _resampled(samples):
  return librosa.resample(samples, orig_sr=SLAKH_SR, target_sr=SR, res_type="soxr_hq")


def test_slakh_grouping(slakh_built):
  path, _, audio = slakh_built
  assert path.endswith(os.path.join("slakh2100", "1.0.0"))  # The layout's default name.
  assert set(tfds.builder_from_directory(path).info.splits.keys()) == {"train"}
  examples = _examples(path, "train")
  assert sorted(examples) == ["Track00001", "Track00002"]
  ex = examples["Track00001"]
  n = int(np.ceil(N44 * SR / SLAKH_SR))
  assert ex["audio"].shape == (4, n) and ex["num_samples"] == n
  np.testing.assert_array_equal(ex["stem_present"], [False, True, True, True])
  np.testing.assert_array_equal(ex["audio"][stems.stem_index("bass")], np.zeros(n))
  track = audio["Track00001"]
  np.testing.assert_allclose(ex["audio"][stems.stem_index("guitar")],
                             _resampled(track["S00"] + track["S01"]), atol=1e-5)
  np.testing.assert_allclose(ex["audio"][stems.stem_index("drums")], _resampled(track["S04"]),
                             atol=1e-6)
  np.testing.assert_allclose(ex["audio"][stems.stem_index("piano")], _resampled(track["S05"]),
                             atol=1e-6)

  ex = examples["Track00002"]
  assert ex["num_samples"] == n  # Trimmed to the shortest stem.
  np.testing.assert_array_equal(ex["stem_present"], [True, True, False, False])
  np.testing.assert_allclose(ex["audio"][0], _resampled(audio["Track00002"]["S00"])[:n],
                             atol=1e-6)


def test_slakh_bad_tracks_reported(slakh_built):
  path, root, _ = slakh_built
  report = build.read_build_report(path)
  assert report.kept == {"train": ["Track00001", "Track00002"]}
  assert report.absent_splits == ["test"]
  assert report.notes == []  # 44.1 kHz is expected: no resampling note.
  skipped = {s.track_id: s for s in report.skipped}
  assert set(skipped) == set(SLAKH_BAD)
  for track_id, (file_name, reason) in SLAKH_BAD.items():
    split = "validation" if track_id == "Track00101" else "train"
    track_dir = os.path.join(root, split, track_id)
    assert skipped[track_id].split == split
    assert reason in skipped[track_id].reason, (track_id, skipped[track_id].reason)
    expected_path = os.path.join(track_dir, file_name) if file_name else track_dir
    assert skipped[track_id].path == expected_path


# --------------------------------------------------------------------------- errors, unit level

def test_no_usable_track_is_an_error(tmp_path):
  source = tmp_path / "source"
  _write_stems_track(str(source / "train" / "Track00001"), piano="absent")
  _write_stems_track(str(source / "validation" / "Track00002"), seconds=0.2)
  data_dir = tmp_path / "tfds"
  with pytest.raises(build.NoUsableTrackError, match=f"no usable track in {source}"):
    build.build_dataset("stems", str(source), str(data_dir), min_duration=MIN_S,
                        max_duration=MAX_S)
  assert not os.path.exists(workdir_layout.dataset_path(str(data_dir), "stems"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(build.NoUsableTrackError, match=f"{empty}: it has none of the split"):
    build.build_dataset("stems", str(empty), str(data_dir))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    build.build_dataset("stems", str(tmp_path / "nowhere"), str(data_dir))


@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="mp3"), "unknown layout 'mp3'"),
    (dict(name="Bad-Name"), "dataset name 'Bad-Name'"),
    (dict(min_duration=3.0, max_duration=2.0), "track filter"),
])
def test_bad_arguments(tmp_path, kwargs, message):
  args = dict(layout="stems", source_dir=str(tmp_path), data_dir=str(tmp_path))
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    build.build_dataset(**args)


def test_read_mono_defects(tmp_path):
  good = str(tmp_path / "good.wav")
  sf.write(good, _noise(1000, 0, channels=2), 44100, subtype="FLOAT")
  info = audio_files.probe(good)
  assert (info.sample_rate, info.channels, info.frames) == (44100, 2, 1000)
  assert info.num_samples_at(SR) == 500
  assert audio_files.read_mono(info, SR).shape == (500,)
  with pytest.raises(audio_files.BadAudioError) as error:
    audio_files.probe(str(tmp_path / "missing.wav"))
  assert error.value.path == str(tmp_path / "missing.wav")
  assert error.value.reason == "file is missing"
  flac = str(tmp_path / "cut.flac")
  sf.write(flac, _noise(44100, 1), 44100, subtype="PCM_16")
  _truncate(flac)
  with pytest.raises(audio_files.BadAudioError, match="truncated"):
    audio_files.read_mono(flac, SR)


def test_prepare_data_builds_from_config(stems_source, tmp_path):
  root, written = stems_source
  config = config_loading.load_config("configs/demo.py:variant=tiny")
  config.data.source_dir = root
  config.data.min_duration = MIN_S
  config.data.max_duration = MAX_S
  workdir = str(tmp_path / "work")
  path = prepare.run(config, workdir)
  assert path == workdir_layout.dataset_dir(config, workdir)
  assert path == os.path.join(os.path.abspath(workdir), "tfds", config.data.name, "1.0.0")
  examples = _examples(path, "validation")
  np.testing.assert_array_equal(
      examples["Track00101"]["audio"],
      np.stack([written["Track00101"][name] for name in stems.STEM_NAMES]))
  config.data.tfds_dir = str(tmp_path / "elsewhere")
  assert workdir_layout.dataset_dir(config, workdir) == os.path.join(
      str(tmp_path / "elsewhere"), config.data.name, "1.0.0")
  config.data.source_dir = ""
  config.data.layout = "slakh_raw"
  with pytest.raises(ValueError, match="data.layout='slakh_raw'"):
    prepare.run(config, workdir)


def test_cli(tmp_path, repo_root):
  source = tmp_path / "source"
  written = _write_stems_track(str(source / "test" / "Track00001"), seed=7)
  data_dir = tmp_path / "tfds"
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.data.build", "--layout=stems",
       f"--source_dir={source}", f"--data_dir={data_dir}", "--name=cli_test",
       "--min_duration=0.5", "--max_duration=2"],
      cwd=repo_root, capture_output=True, text=True, timeout=120,
      env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
  assert result.returncode == 0, result.stderr[-3000:]
  examples = _examples(workdir_layout.dataset_path(str(data_dir), "cli_test"), "test")
  np.testing.assert_array_equal(examples["Track00001"]["audio"],
                                np.stack([written[name] for name in stems.STEM_NAMES]))
