"""What partial generation is given: which stems to generate, and the given stems' audio.

`config.sample.generate` names the stems to sample ("bass,drums"); every other stem is given,
by one of:
  - `config.sample.condition` (`--condition=bass=FILE,piano=FILE`): a file per stem; with
    `generate` empty, the stems it does not name are the ones generated;
  - `config.sample.condition_dir` (`--condition_dir=DIR`): `{stem}.wav` (or .flac, .ogg,
    .mp3) in DIR for each given stem.
Empty `generate` without `condition` (or all four stems) is total generation.

A given stem may be a user's own recording: any format `soundfile` reads (WAV, FLAC, OGG,
MP3), any rate (resampled to the model's with soxr HQ, as the data stage does), several
channels (averaged to mono), any length. Broken files (missing, empty, truncated, NaN/Inf)
raise an error naming the file (`data/audio_files.py`). The given stems must be equally long
(within one sample at the model's rate): files of different lengths are an error naming each
file's seconds, unless `config.sample.pad` (`--pad`) pads the shorter ones with silence at
the end to the longest.

The generated stems are written at the given stems' length, and at their rate when they share
one (`GivenStems.output_rate`): a user's 44.1 kHz recording gets 44.1 kHz stems back. A piece
longer than the model's window is generated window by window (`long_form.py`).
"""

import dataclasses
import os

from absl import logging
import numpy as np

from msldm_jax import stems as stems_lib
from msldm_jax.data import audio_files

# What `condition_dir` is searched for, per given stem, in this order of preference.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")


@dataclasses.dataclass(frozen=True)
class GivenStems:
  """The given stems of partial generation, at the model's rate, all one length.

  Attributes:
    waveforms: stem name → float32 [num_samples], mono at the model's rate (padded with
      silence to the longest when `padded` names any).
    files: stem name → the file read.
    original_samples: stem name → its length before padding (at the model's rate).
    source_rates: stem name → the file's own sample rate.
    source_frames: stem name → the file's own length in frames (at its own rate).
    padded: the stems that were padded with silence (`config.sample.pad`).
  """
  waveforms: dict[str, np.ndarray]
  files: dict[str, str]
  original_samples: dict[str, int]
  source_rates: dict[str, int] = dataclasses.field(default_factory=dict)
  source_frames: dict[str, int] = dataclasses.field(default_factory=dict)
  padded: tuple[str, ...] = ()

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s for s in stems_lib.STEM_NAMES if s in self.waveforms)

  @property
  def num_samples(self) -> int:
    return len(next(iter(self.waveforms.values())))

  def output_rate(self, model_rate: int) -> int:
    """The rate outputs are written at: the files' own when they share one, else the
    model's."""
    rates = set(self.source_rates.values())
    return rates.pop() if len(rates) == 1 else int(model_rate)

  def output_length(self, model_rate: int) -> int:
    """Samples per output stem at `output_rate`: the (longest) given file's length."""
    rate = self.output_rate(model_rate)
    if rate == model_rate or not self.source_frames:
      return self.num_samples
    return max(frames for name, frames in self.source_frames.items()
               if self.source_rates[name] == rate)

  def stacked(self, num_samples: int | None = None) -> np.ndarray:
    """[1, stems, samples] in stem order, zeros for the stems that are not given; fitted
    to `num_samples` (cropped or zero-padded) when given."""
    length = self.num_samples if num_samples is None else int(num_samples)
    out = np.zeros((1, stems_lib.NUM_STEMS, length), np.float32)
    for name, waveform in self.waveforms.items():
      out[0, stems_lib.stem_index(name)] = fit_to_length(waveform, length)
    return out


def parse_generate(generate: str, key: str = "config.sample.generate") -> tuple[str, ...]:
  """The stems to generate, in canonical order; empty means all (total generation).

  Raises:
    ValueError naming `key`, its value and the unknown stem.
  """
  if not str(generate).strip():
    return stems_lib.STEM_NAMES
  try:
    return stems_lib.parse_stem_list(str(generate))
  except ValueError as e:
    raise ValueError(f"{key}={generate!r}: {e}") from None


def parse_condition(condition: str, key: str = "config.sample.condition") -> dict[str, str]:
  """'bass=FILE,drums=FILE' → {stem: path} in canonical stem order.

  Raises:
    ValueError naming `key` and the entry at fault: no '=', an unknown stem, a stem twice,
      an empty path.
  """
  paths = {}
  for entry in (e.strip() for e in str(condition).split(",")):
    if not entry:
      continue
    if "=" not in entry:
      raise ValueError(f"{key}={condition!r}: entry {entry!r} is not STEM=FILE")
    stem, path = (part.strip() for part in entry.split("=", 1))
    try:
      stems_lib.stem_index(stem)
    except ValueError as e:
      raise ValueError(f"{key}={condition!r}: {e}") from None
    if stem in paths:
      raise ValueError(f"{key}={condition!r}: stem {stem!r} is given twice")
    if not path:
      raise ValueError(f"{key}={condition!r}: no file for stem {stem!r}")
    paths[stem] = path
  return {s: paths[s] for s in stems_lib.STEM_NAMES if s in paths}


def find_in_dir(condition_dir: str, given_stems, key: str = "config.sample.condition_dir"
                ) -> dict[str, str]:
  """The file of each given stem in `condition_dir`: `{stem}` + one of AUDIO_EXTENSIONS.

  Raises:
    FileNotFoundError naming the folder and every missing stem; ValueError for a stem with
      files of several formats (which one is meant is unclear).
  """
  given_stems = tuple(given_stems)
  if not condition_dir:
    raise ValueError(f"partial generation needs {key}: a folder holding the given stems "
                     + ", ".join(f"{s}.wav" for s in given_stems)
                     + " (or config.sample.condition / --condition=STEM=FILE,...)")
  if not os.path.isdir(condition_dir):
    raise FileNotFoundError(f"{key}={condition_dir!r} is not a folder")
  paths, missing = {}, []
  for stem in stems_lib.STEM_NAMES:
    found = [os.path.join(condition_dir, stem + ext) for ext in AUDIO_EXTENSIONS
             if os.path.isfile(os.path.join(condition_dir, stem + ext))]
    if stem not in given_stems:
      for path in found:
        logging.info("%s is not used: %s is generated", path, stem)
      continue
    if not found:
      missing.append(os.path.join(condition_dir, f"{stem}.wav"))
    elif len(found) > 1:
      raise ValueError(f"{key}={condition_dir!r}: several files for stem {stem!r} "
                       f"({', '.join(found)}); keep one")
    else:
      paths[stem] = found[0]
  if missing:
    raise FileNotFoundError(
        f"partial generation of {', '.join(s for s in stems_lib.STEM_NAMES if s not in given_stems)}"
        f" needs every other stem in {key}={condition_dir!r}; missing: {', '.join(missing)} "
        f"(or .flac, .ogg, .mp3)")
  return paths


def fit_to_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
  """The first `num_samples` samples of [..., samples], zero-padded at the end when
  shorter (float32)."""
  audio = np.asarray(audio, np.float32)[..., :num_samples]
  return np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, num_samples - audio.shape[-1])])


def read_given_stems(paths: dict[str, str], sample_rate: int = stems_lib.SAMPLE_RATE,
                     pad: bool = False, key: str = "config.sample.pad") -> GivenStems:
  """Reads each given stem's file to mono at `sample_rate`; all must be equally long.

  Every file is probed before any is decoded, so a broken one fails before work is spent.

  Raises:
    audio_files.BadAudioError: a file is missing or broken (names the file and the defect).
    ValueError: the files differ in length and `pad` is off (names each file's seconds).
  """
  infos = {stem: audio_files.probe(path) for stem, path in paths.items()}
  waveforms, original_samples = {}, {}
  for stem, info in infos.items():
    for note in audio_files.describe_conversions(info, sample_rate):
      logging.info("given stem: %s", note)
    audio = audio_files.read_mono(info, sample_rate)
    if not len(audio):
      raise audio_files.BadAudioError(info.path, "holds no audio samples")
    waveforms[stem] = audio
    original_samples[stem] = len(audio)
  longest = max(original_samples.values())
  # Resampling rounds each length up on its own: one sample apart is one length.
  short = tuple(s for s, n in original_samples.items() if longest - n > 1)
  if short and not pad:
    raise ValueError(
        "the given stems differ in length: "
        + ", ".join(f"{infos[s].path} {infos[s].seconds():.3f} s" for s in infos)
        + f"; give equally long files, or set {key}=True (--pad) to pad the shorter ones "
        "with silence at the end")
  for stem in short:
    logging.warning("given stem %s: %.2f s, padded with silence to %.2f s (%s)",
                    infos[stem].path, original_samples[stem] / sample_rate,
                    longest / sample_rate, key)
  waveforms = {stem: fit_to_length(audio, longest) for stem, audio in waveforms.items()}
  return GivenStems(
      waveforms=waveforms, files={s: info.path for s, info in infos.items()},
      original_samples=original_samples,
      source_rates={s: info.sample_rate for s, info in infos.items()},
      source_frames={s: info.frames for s, info in infos.items()}, padded=short)
