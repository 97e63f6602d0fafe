"""The Slakh2100 release layout, and how its instrument stems become our four sources.

One track of the release (44.1 kHz mono FLAC throughout):

  TrackNNNNN/metadata.yaml     per stem: inst_class, is_drum, audio_rendered, program_num, ...
  TrackNNNNN/stems/SNN.flac    one file per rendered instrument
  TrackNNNNN/mix.flac          the sum of all stems (not read: see below)

Grouping (the four classes MSDM kept; reference §2):

  drums   every stem with `is_drum: true`, whatever its inst_class
  bass    inst_class "Bass"    (program_num 32-39, 0-based General MIDI)
  guitar  inst_class "Guitar"  (program_num 24-31)
  piano   inst_class "Piano"   (program_num 0-7: acoustic and electric pianos, harpsichord,
          clavinet)

  * Every other class is left out: "Chromatic Percussion" (celesta, vibraphone, ...) and
    "Organ" are their own General MIDI classes, not pianos, and MSDM's conversion dropped them
    with Strings, Ensemble, Brass, Reed, Pipe, Synth Lead/Pad/Effects, Ethnic, Percussive and
    Sound Effects. Their files are not even opened, so their defects do not matter.
  * Several stems of one class are summed (two guitars make one guitar stem).
  * A class without any rendered stem is a silent stem (the builder marks it stem_present False).
  * A stem with `audio_rendered: false` has no file and is skipped.
  * inst_class is compared case-insensitively, after stripping spaces.
  * mix.flac is not read: it also holds the left-out classes, so it is not the sum of our four.

Defects raise `audio_files.BadAudioError` naming the file: metadata.yaml missing, not YAML, or
without the keys and types below (`stems` a non-empty mapping; per stem `inst_class` a string,
`is_drum` and `audio_rendered` booleans); a stem listed as rendered whose file is missing or
broken; a track with no rendered stem of the four classes.
"""

import dataclasses
import os
import re

from absl import logging
import yaml

from msldm_jax import stems
from msldm_jax.data import audio_files

SOURCE_RATE = 44100           # the release's rate; the builder resamples to stems.SAMPLE_RATE
METADATA_FILE = "metadata.yaml"
STEMS_FOLDER = "stems"
STEM_SUFFIX = ".flac"

# Lower-cased inst_class -> our stem. Drums come from is_drum, not from this table.
INST_CLASS_TO_STEM = {"bass": "bass", "guitar": "guitar", "piano": "piano"}

# A stem id becomes a file name: no separators or dots may slip in from a hand-edited file.
_STEM_ID = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclasses.dataclass(frozen=True)
class StemMetadata:
  stem_id: str        # e.g. 'S03', also the file's name in stems/
  inst_class: str     # General MIDI class, e.g. 'Guitar'
  is_drum: bool
  audio_rendered: bool


def stem_of(meta: StemMetadata) -> str | None:
  """Which of our four stems a Slakh stem belongs to; None when it is left out."""
  if meta.is_drum:
    return "drums"
  return INST_CLASS_TO_STEM.get(meta.inst_class.strip().lower())


def _type_name(value) -> str:
  return type(value).__name__


def read_metadata(track_dir: str) -> list[StemMetadata]:
  """Parses and checks TRACK/metadata.yaml; the stems sorted by id."""
  path = os.path.join(track_dir, METADATA_FILE)
  if not os.path.isfile(path):
    raise audio_files.BadAudioError(path, f"{METADATA_FILE} is missing")
  try:
    with open(path, encoding="utf-8") as f:
      document = yaml.safe_load(f)
  except (yaml.YAMLError, UnicodeDecodeError) as e:
    reason = " ".join(str(e).split())  # YAML errors span several lines.
    raise audio_files.BadAudioError(path, f"not valid YAML ({reason})") from None
  except OSError as e:
    raise audio_files.BadAudioError(path, f"cannot be read ({e})") from None
  if not isinstance(document, dict):
    raise audio_files.BadAudioError(
        path, f"the top level is a {_type_name(document)}, expected a mapping with key 'stems'")
  if "stems" not in document:
    raise audio_files.BadAudioError(path, "missing key 'stems'")
  entries = document["stems"]
  if not isinstance(entries, dict) or not entries:
    raise audio_files.BadAudioError(
        path, f"'stems' must be a non-empty mapping of stem ids (S00, S01, ...), got "
        f"{entries!r:.60}")
  stem_list = []
  for stem_id, entry in entries.items():
    if not isinstance(stem_id, str) or not _STEM_ID.match(stem_id):
      raise audio_files.BadAudioError(
          path, f"stems: invalid stem id {stem_id!r} (expected a name like 'S00')")
    if not isinstance(entry, dict):
      raise audio_files.BadAudioError(
          path, f"stems.{stem_id} is a {_type_name(entry)}, expected a mapping")
    for key, expected in (("inst_class", str), ("is_drum", bool), ("audio_rendered", bool)):
      if key not in entry:
        raise audio_files.BadAudioError(path, f"stems.{stem_id}: missing key '{key}'")
      value = entry[key]
      if not isinstance(value, expected) or (expected is str and not value.strip()):
        wanted = "true or false" if expected is bool else "a non-empty string"
        raise audio_files.BadAudioError(
            path, f"stems.{stem_id}.{key}: expected {wanted}, got {value!r} ({_type_name(value)})")
    stem_list.append(StemMetadata(stem_id=stem_id, inst_class=entry["inst_class"],
                                  is_drum=entry["is_drum"],
                                  audio_rendered=entry["audio_rendered"]))
  return sorted(stem_list, key=lambda s: s.stem_id)


def plan_track(track_dir: str) -> dict[str, list[audio_files.AudioInfo]]:
  """Which files make up each of our stems: {stem name: files to sum} for every STEM_NAMES.

  Reads only metadata.yaml and the headers of the files it will use; an empty list is a class
  the track lacks (a silent stem).
  """
  plan = {name: [] for name in stems.STEM_NAMES}
  left_out = []
  for meta in read_metadata(track_dir):
    target = stem_of(meta)
    if target is None:
      left_out.append(f"{meta.stem_id} ({meta.inst_class})")
      continue
    if not meta.audio_rendered:
      logging.debug("%s: stem %s (%s) was not rendered; skipped", track_dir, meta.stem_id,
                    meta.inst_class)
      continue
    path = os.path.join(track_dir, STEMS_FOLDER, meta.stem_id + STEM_SUFFIX)
    if not os.path.exists(path):
      raise audio_files.BadAudioError(
          path, f"stem {meta.stem_id} ({meta.inst_class}) has audio_rendered: true in "
          f"{METADATA_FILE} but its file is missing")
    plan[target].append(audio_files.probe(path))
  if not any(plan.values()):
    raise audio_files.BadAudioError(
        track_dir, "no rendered stem of the four classes (Bass, Guitar, Piano, is_drum); "
        f"left out: {', '.join(left_out) or 'none'}")
  if left_out:
    logging.debug("%s: left out %s", track_dir, ", ".join(left_out))
  return plan
