r"""Builds a TFDS dataset of stem-aligned tracks from a folder, skipping (and naming) bad input.

  python -m msldm_jax.data.build --layout={stems,slakh_raw} --source_dir=SRC --data_dir=DIR \
      [--name=NAME] [--min_duration=15] [--max_duration=640]

The source holds SRC/{train,validation,test}/TRACK/ folders (an absent split folder is a split
not built) in one of two layouts:

  stems      TRACK/{bass,drums,guitar,piano}.wav, 22050 Hz mono: MSDM's conversion of Slakh2100
             and the mini dataset (default name "stems").
  slakh_raw  the Slakh2100 release, TRACK/metadata.yaml + TRACK/stems/SNN.flac at 44.1 kHz,
             grouped into the four stems as slakh_raw.py documents (default name "slakh2100").

The result is DIR/NAME/1.0.0/: one example per track in the format of track_features.py, in track-id
order within each split, readable later without this code by `tfds.builder_from_directory`.
`build_report.json` in the same folder lists the tracks kept per split, the tracks skipped with
the file at fault and why, and the conversions applied. Building again into the same DIR and
NAME reuses the dataset (TFDS's behaviour); asking for other filter settings there is an error.

Track filter (reference §2): a track is kept when every stem has one duration (in seconds at
22050 Hz) in [min_duration, max_duration). Bad input never stops a build and never enters it:

  defect                                    what happens
  ----------------------------------------  -----------------------------------------------
  unreadable file / text named .wav         track skipped ("not a readable audio file")
  truncated file (WAV or FLAC)              track skipped ("truncated ...")
  zero-length file, header with 0 frames    track skipped ("file is empty", "no audio samples")
  several channels                          kept: averaged to mono, logged and reported
  rate other than the layout's              kept: resampled (soxr HQ), logged and reported
                                            (slakh_raw expects 44.1 kHz, stems 22050 Hz)
  stems of different lengths                track skipped; slakh_raw tolerates 1 sample at
                                            22050 Hz (rounding when rates differ), trimmed
  missing stem file                         stems: track skipped; slakh_raw: a class without
                                            stems is silence, a rendered stem without file
                                            skips the track
  NaN / Inf samples                         track skipped
  every stem silent (peak <= 1e-5)          track skipped
  metadata.yaml missing/invalid/wrong type  track skipped (slakh_raw)
  duration outside the filter               track skipped
  no usable track in the whole source       NoUsableTrackError naming the folder

A split whose tracks are all skipped is not built. Each skip is logged when it happens and
again, all together, in one summary at the end. data/README.md has the same, for users.
"""

import dataclasses
import json
import os
import re
import sys
import tempfile
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.data import audio_files
from msldm_jax.data import track_features
from msldm_jax.data import slakh_raw

REPORT_FILE = "build_report.json"
# Below one 16-bit step (3.05e-5), so only digital silence: a stem whose peak is at or under it
# is "not present", and a track where every stem is gets skipped.
SILENCE_PEAK = 1e-5
STEM_SUFFIX = ".wav"  # stems layout

_DATASET_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

Plan = dict[str, list[audio_files.AudioInfo]]  # stem name -> files summed into it


class NoUsableTrackError(ValueError):
  """The source folder yielded no track at all that passes the checks."""


def plan_stems_track(track_dir: str) -> Plan:
  """stems layout: TRACK/{bass,drums,guitar,piano}.wav, one file per stem, all required."""
  missing = [name + STEM_SUFFIX for name in stems.STEM_NAMES
             if not os.path.exists(os.path.join(track_dir, name + STEM_SUFFIX))]
  if missing:
    raise audio_files.BadAudioError(track_dir, f"missing stem file(s): {', '.join(missing)}")
  return {name: [audio_files.probe(os.path.join(track_dir, name + STEM_SUFFIX))]
          for name in stems.STEM_NAMES}


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one source layout is read."""
  name: str
  default_dataset_name: str
  source_rate: int            # the rate its files should have; others are resampled, with a note
  length_tolerance: int       # samples (at the target rate) by which stems may differ
  plan: Callable[[str], Plan]
  description: str


LAYOUTS = {
    "stems": Layout(
        name="stems", default_dataset_name=workdir_layout.DEFAULT_DATASET_NAMES["stems"],
        source_rate=stems.SAMPLE_RATE,
        # MSDM's files were written at one length per track: any difference is a defect.
        length_tolerance=0, plan=plan_stems_track,
        description="SPLIT/TRACK/{bass,drums,guitar,piano}.wav at 22050 Hz mono"),
    "slakh_raw": Layout(
        name="slakh_raw", default_dataset_name=workdir_layout.DEFAULT_DATASET_NAMES["slakh_raw"],
        source_rate=slakh_raw.SOURCE_RATE,
        # The stems of one Slakh track share one length; 1 sample at 22050 Hz absorbs the
        # ceil() of resampling a length one 44.1 kHz sample off (or a stem at another rate).
        length_tolerance=1, plan=slakh_raw.plan_track,
        description="the Slakh2100 release, SPLIT/TRACK/metadata.yaml + stems/SNN.flac"),
}


def get_layout(layout: str) -> Layout:
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
  return LAYOUTS[layout]


@dataclasses.dataclass
class TrackAudio:
  audio: np.ndarray          # float32 [NUM_STEMS, num_samples], stems in STEM_NAMES order
  stem_present: np.ndarray   # bool [NUM_STEMS]
  notes: list[str]           # conversions applied (downmix, resampling)


def _common_length(track_dir: str, plan: Plan, sample_rate: int, tolerance: int) -> int:
  lengths = {info.path: info.num_samples_at(sample_rate)
             for infos in plan.values() for info in infos}
  if not lengths:
    raise audio_files.BadAudioError(track_dir, "no stem audio")
  shortest, longest = min(lengths.values()), max(lengths.values())
  if longest - shortest > tolerance:
    listed = ", ".join(f"{os.path.relpath(p, track_dir)} {n}" for p, n in lengths.items())
    raise audio_files.BadAudioError(
        track_dir, f"stems differ in length ({listed} samples at {sample_rate} Hz); the track "
        "filter needs one duration for every stem")
  return shortest


def read_track(track_dir: str, layout: Layout, min_duration: float, max_duration: float,
               sample_rate: int = stems.SAMPLE_RATE) -> TrackAudio:
  """Reads one track and applies every check; raises BadAudioError to skip it.

  The headers are checked (and the duration filter applied) before any file is decoded, so a
  track outside the filter costs no decoding.
  """
  plan = layout.plan(track_dir)
  num_samples = _common_length(track_dir, plan, sample_rate, layout.length_tolerance)
  seconds = num_samples / sample_rate
  if not min_duration <= seconds < max_duration:
    raise audio_files.BadAudioError(
        track_dir, f"duration {seconds:.3f} s is outside the filter "
        f"[{min_duration:g}, {max_duration:g}) s")
  notes = [note for infos in plan.values() for info in infos
           for note in audio_files.describe_conversions(info, layout.source_rate)]
  audio = np.zeros((stems.NUM_STEMS, num_samples), np.float32)
  for index, name in enumerate(stems.STEM_NAMES):
    for info in plan[name]:
      samples = audio_files.read_mono(info, sample_rate)
      if samples.shape[0] < num_samples:  # The header promised more; read_mono checks that too.
        raise audio_files.BadAudioError(
            info.path, f"decoded {samples.shape[0]} samples, expected {num_samples}")
      audio[index] += samples[:num_samples]
  peaks = np.max(np.abs(audio), axis=1)
  if not np.isfinite(peaks).all():  # Finite files can still overflow float32 when summed.
    raise audio_files.BadAudioError(
        track_dir, "stems overflow float32 once resampled and summed (non-finite result)")
  stem_present = peaks > SILENCE_PEAK
  if not stem_present.any():
    raise audio_files.BadAudioError(
        track_dir, f"every stem is silent (peak amplitude <= {SILENCE_PEAK:g})")
  return TrackAudio(audio=audio, stem_present=stem_present, notes=notes)


@dataclasses.dataclass
class SkippedTrack:
  split: str
  track_id: str
  path: str       # the file (or folder) at fault
  reason: str


@dataclasses.dataclass
class TrackNote:
  split: str
  track_id: str
  note: str


@dataclasses.dataclass
class BuildReport:
  """What a build kept and skipped; saved as build_report.json in the dataset's folder."""
  name: str
  layout: str
  source_dir: str
  dataset_dir: str
  sample_rate: int
  min_duration: float
  max_duration: float
  kept: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # split -> track ids
  skipped: list[SkippedTrack] = dataclasses.field(default_factory=list)
  notes: list[TrackNote] = dataclasses.field(default_factory=list)  # conversions on kept tracks
  absent_splits: list[str] = dataclasses.field(default_factory=list)  # no folder in the source

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, data: dict) -> "BuildReport":
    data = dict(data)
    data["skipped"] = [SkippedTrack(**s) for s in data.get("skipped", [])]
    data["notes"] = [TrackNote(**n) for n in data.get("notes", [])]
    return cls(**data)

  def summary(self) -> str:
    kept = ", ".join(f"{split} {len(self.kept.get(split, []))}" for split in track_features.SPLITS)
    lines = [f"dataset {self.name!r} (layout {self.layout}) from {self.source_dir}: "
             f"tracks kept: {kept}; skipped: {len(self.skipped)}"]
    if self.absent_splits:
      lines.append(f"  split folders absent: {', '.join(self.absent_splits)}")
    for s in self.skipped:
      lines.append(f"  skipped {s.split}/{s.track_id}: {s.path}: {s.reason}")
    for n in self.notes:
      lines.append(f"  converted {n.split}/{n.track_id}: {n.note}")
    return "\n".join(lines)


def read_build_report(dataset_dir: str) -> BuildReport:
  path = os.path.join(dataset_dir, REPORT_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {REPORT_FILE} in {dataset_dir}: not built by this module?")
  with open(path, encoding="utf-8") as f:
    return BuildReport.from_json(json.load(f))


def _list_tracks(split_dir: str) -> list[str]:
  """Track folders of a split, sorted by name (the track id) for a deterministic build."""
  return [os.path.join(split_dir, entry) for entry in sorted(os.listdir(split_dir))
          if not entry.startswith(".") and os.path.isdir(os.path.join(split_dir, entry))]


class StemTracksBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One builder class for every stem dataset; the dataset's name is a constructor argument.

  Not registered with TFDS (the name varies): the built dataset is read back with
  `tfds.builder_from_directory(workdir_layout.dataset_path(data_dir, name))`.
  """

  VERSION = tfds.core.Version(workdir_layout.DATASET_VERSION)
  RELEASE_NOTES = {
      workdir_layout.DATASET_VERSION: "Whole tracks, four stems stem-major, float32 at 22050 Hz."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Pass the source folder as the manual dir. It holds train/, validation/ and test/ (any may be
  absent), each with one folder per track, in the layout given to the builder:
    stems:     TrackNNNNN/{bass,drums,guitar,piano}.wav (22050 Hz mono)
    slakh_raw: TrackNNNNN/metadata.yaml and TrackNNNNN/stems/SNN.flac (the Slakh2100 release)
  """

  def __init__(self, *, name: str, layout: str, min_duration: float, max_duration: float,
               sample_rate: int = stems.SAMPLE_RATE, **kwargs):
    # An instance attribute, as tfds.core.ReadOnlyBuilder does: one class, many dataset names.
    self.name = name
    self._layout = get_layout(layout)
    self._min_duration = float(min_duration)
    self._max_duration = float(max_duration)
    self._sample_rate = int(sample_rate)
    super().__init__(**kwargs)
    self.report = BuildReport(
        name=name, layout=layout, source_dir="", dataset_dir=os.fspath(self.data_path),
        sample_rate=self._sample_rate, min_duration=self._min_duration,
        max_duration=self._max_duration)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"Stem-aligned tracks ({', '.join(stems.STEM_NAMES)}), one whole track per "
            f"example, built from {self._layout.description}; every stem one duration in "
            f"[{self._min_duration:g}, {self._max_duration:g}) s."),
        features=track_features.features_dict(),
        # Examples stay in the order written: track-id order within each split.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            layout=self._layout.name, sample_rate=self._sample_rate,
            min_duration=self._min_duration, max_duration=self._max_duration,
            stem_names=list(stems.STEM_NAMES)),
    )

  def _read(self, split: str, track_dir: str):
    """(key, example) for a usable track; None (recorded in the report) for a bad one."""
    track_id = os.path.basename(track_dir)
    try:
      track = read_track(track_dir, self._layout, self._min_duration, self._max_duration,
                         self._sample_rate)
    except audio_files.BadAudioError as e:
      logging.warning("Skipping track %s/%s: %s", split, track_id, e)
      self.report.skipped.append(SkippedTrack(split, track_id, e.path, e.reason))
      return None
    for note in track.notes:
      logging.warning("Track %s/%s: %s", split, track_id, note)
      self.report.notes.append(TrackNote(split, track_id, note))
    self.report.kept.setdefault(split, []).append(track_id)
    return track_id, {
        track_features.TRACK_ID: track_id,
        track_features.AUDIO: track.audio,
        track_features.NUM_SAMPLES: track.audio.shape[1],
        track_features.STEM_PRESENT: track.stem_present,
    }

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    source_dir = os.fspath(dl_manager.manual_dir)
    self.report.source_dir = source_dir
    generators = {}
    for split in track_features.SPLITS:
      split_dir = os.path.join(source_dir, split)
      if not os.path.isdir(split_dir):
        logging.info("No %s folder in %s: split %r not built", split, source_dir, split)
        self.report.absent_splits.append(split)
        continue
      track_dirs = _list_tracks(split_dir)
      # TFDS refuses a split that yields no example, and only reading tells a good track from
      # a bad one: read up to the first good track now, and start its split with it.
      for index, track_dir in enumerate(track_dirs):
        first = self._read(split, track_dir)
        if first is not None:
          generators[split] = self._generate_examples(split, track_dirs, index, first)
          break
      else:
        logging.warning("No usable track among %d in %s: split %r not built",
                        len(track_dirs), split_dir, split)
    if not generators:
      logging.error("%s", self.report.summary())
      reasons = "; ".join(f"{s.split}/{s.track_id}: {s.reason}" for s in self.report.skipped[:5])
      raise NoUsableTrackError(
          f"no usable track in {source_dir} (layout {self._layout.name}): "
          f"{len(self.report.skipped)} track folders found under "
          f"{'/'.join(track_features.SPLITS)}, all skipped"
          + (f"; first reasons: {reasons}" if reasons else ""))
    return generators

  def _generate_examples(self, split: str, track_dirs: list[str], first_index: int, first):
    with tqdm.tqdm(total=len(track_dirs), initial=first_index + 1, unit="track",
                   desc=f"{self.name} {split}") as progress:
      yield first
      for track_dir in track_dirs[first_index + 1:]:
        example = self._read(split, track_dir)
        progress.update(1)
        if example is not None:
          yield example

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager=dl_manager, download_config=download_config)
    # self.data_dir is TFDS's temporary folder here, renamed into place only when everything
    # succeeded: the report appears together with the dataset, never without it.
    with open(os.path.join(self.data_dir, REPORT_FILE), "w", encoding="utf-8") as f:
      json.dump(self.report.to_json(), f, indent=1)


def _check_reused(path: str, layout: str, source_dir: str, min_duration: float,
                  max_duration: float):
  """A dataset already at `path` is reused only if it was built with the same settings."""
  try:
    report = read_build_report(path)
  except FileNotFoundError:
    logging.warning("Reusing %s, which has no %s: its build settings are unknown", path,
                    REPORT_FILE)
    return
  wanted = dict(layout=layout, sample_rate=stems.SAMPLE_RATE, min_duration=min_duration,
                max_duration=max_duration)
  differing = {k: (getattr(report, k), v) for k, v in wanted.items() if getattr(report, k) != v}
  if differing:
    listed = ", ".join(f"{k}={old!r} (asked {new!r})" for k, (old, new) in differing.items())
    raise ValueError(
        f"{path} already holds a dataset built with {listed} "
        f"(see {os.path.join(path, REPORT_FILE)}): use another name, or delete it to rebuild")
  if report.source_dir != source_dir:
    logging.warning("Reusing %s, built from %s, not from %s", path, report.source_dir,
                    source_dir)
  logging.info("Reusing the dataset at %s (delete the folder to rebuild)", path)


def build_dataset(layout: str, source_dir: str, data_dir: str, name: str | None = None,
                  min_duration: float = 15.0, max_duration: float = 640.0) -> str:
  """Builds (or reuses) the dataset; returns its folder, for tfds.builder_from_directory.

  Args:
    layout: 'stems' or 'slakh_raw' (see the module docstring).
    source_dir: the folder holding train/, validation/, test/.
    data_dir: the TFDS data dir; the dataset lands in DATA_DIR/NAME/1.0.0.
    name: the dataset's name; None picks the layout's default ('stems', 'slakh2100').
    min_duration, max_duration: the track filter, seconds, [min, max).

  Raises:
    NoUsableTrackError: no track of the source passes the checks.
    FileNotFoundError: source_dir is not a folder.
    ValueError: a bad argument, or a dataset of that name built with other settings.
  """
  spec = get_layout(layout)
  name = name or spec.default_dataset_name
  if not _DATASET_NAME.match(name):
    raise ValueError(f"dataset name {name!r}: use lower-case letters, digits and '_', "
                     "starting with a letter")
  min_duration, max_duration = float(min_duration), float(max_duration)
  if not 0 <= min_duration < max_duration:
    raise ValueError(f"track filter [min_duration={min_duration:g}, "
                     f"max_duration={max_duration:g}) is empty or negative")
  source_dir = os.path.abspath(os.fspath(source_dir))
  if not os.path.isdir(source_dir):
    raise FileNotFoundError(f"source folder {source_dir} does not exist")
  if not any(os.path.isdir(os.path.join(source_dir, s)) for s in track_features.SPLITS):
    raise NoUsableTrackError(
        f"no usable track in {source_dir}: it has none of the split folders "
        f"{', '.join(track_features.SPLITS)}")
  path = workdir_layout.dataset_path(data_dir, name)
  if os.path.isfile(os.path.join(path, "dataset_info.json")):
    _check_reused(path, layout, source_dir, min_duration, max_duration)
    return path

  builder = StemTracksBuilder(name=name, layout=layout, min_duration=min_duration,
                              max_duration=max_duration,
                              data_dir=os.path.abspath(os.fspath(data_dir)))
  logging.info("Building dataset %s (layout %s) from %s into %s", name, layout, source_dir,
               path)
  # Nothing is downloaded: a throw-away download dir keeps DATA_DIR free of TFDS's empty
  # downloads/ folders.
  with tempfile.TemporaryDirectory(prefix="msldm_build_") as download_dir:
    builder.download_and_prepare(
        download_dir=download_dir,
        download_config=tfds.download.DownloadConfig(
            manual_dir=source_dir,
            # Local files only: never look for a hosted copy of a dataset of that name.
            try_download_gcs=False,
            compute_stats=tfds.download.ComputeStatsMode.SKIP))
  logging.info("Build summary:\n%s", builder.report.summary())
  return os.fspath(builder.data_path)


def _define_flags():
  # Defined only when run as a program, so importing this module adds no global flags.
  flags.DEFINE_enum("layout", None, list(LAYOUTS), "Source layout.", required=True)
  flags.DEFINE_string("source_dir", None, "Folder with train/, validation/, test/.",
                      required=True)
  flags.DEFINE_string("data_dir", None, "TFDS data dir to build into.", required=True)
  flags.DEFINE_string("name", None, "Dataset name (default: stems / slakh2100 by layout).")
  flags.DEFINE_float("min_duration", 15.0, "Track filter: shortest duration kept, seconds.")
  flags.DEFINE_float("max_duration", 640.0, "Track filter: durations kept are below this.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  flag_values = flags.FLAGS
  try:
    path = build_dataset(flag_values.layout, flag_values.source_dir, flag_values.data_dir,
                         name=flag_values.name, min_duration=flag_values.min_duration,
                         max_duration=flag_values.max_duration)
  except (NoUsableTrackError, FileNotFoundError) as e:
    # The message names the folder; a traceback would only bury it.
    logging.error("%s", e)
    sys.exit(1)
  logging.info("Dataset ready: %s", path)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
