"""What partial generation is given: which stems to generate, and the given stems' audio.

`config.sample.generate` names the stems to sample ("bass,drums"); every other stem must be
given as `{stem}.wav` in `config.sample.condition_dir`. Empty `generate` (or all four stems)
is total generation.

Given stems are read as the data stage reads stems (`data/audio_files.py`): several channels
are averaged to mono, another rate is resampled to the model's (soxr HQ), and broken files
(missing, empty, truncated, NaN/Inf) raise an error naming the file. Then each is fitted to
the diffusion chunk (`config.data.chunks.samples`, 14.86 s at the paper's size), the only
length the model was trained on:
  - longer: the FIRST chunk is kept, the rest dropped (logged with the seconds dropped);
  - shorter: zero-padded at the end (logged); the new stems are then generated against
    silence there, as the model saw at the ends of training tracks.
The given stems need not share one length; each is fitted on its own (a warning says so).

A longer piece could be accompanied chunk by chunk: fit the given stems' chunk k, generate,
and take the next chunk with its overlap to the previous one also given (the previously
generated stems' tail as known latents), so consecutive chunks continue each other. That
outer loop is not implemented here; one chunk per run is.
"""

import dataclasses
import os

from absl import logging
import numpy as np

from msldm_jax import stems as stems_lib
from msldm_jax.data import audio_files


@dataclasses.dataclass(frozen=True)
class GivenStems:
  """The given stems of partial generation, each fitted to the chunk.

  Attributes:
    waveforms: stem name → float32 [num_samples], the ORIGINAL audio (mono, model rate,
      cropped/padded): what the output mixture uses for these stems.
    files: stem name → the file read.
    original_samples: stem name → its length before fitting (at the model's rate).
  """
  waveforms: dict[str, np.ndarray]
  files: dict[str, str]
  original_samples: dict[str, int]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(s for s in stems_lib.STEM_NAMES if s in self.waveforms)

  def stacked(self) -> np.ndarray:
    """[1, stems, samples] in stem order, zeros for the stems that are not given."""
    num_samples = len(next(iter(self.waveforms.values())))
    out = np.zeros((1, stems_lib.NUM_STEMS, num_samples), np.float32)
    for name, waveform in self.waveforms.items():
      out[0, stems_lib.stem_index(name)] = waveform
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


def fit_to_length(waveform: np.ndarray, num_samples: int) -> np.ndarray:
  """The first `num_samples` samples, zero-padded at the end when shorter."""
  waveform = np.asarray(waveform, np.float32)[:num_samples]
  return np.pad(waveform, (0, num_samples - len(waveform)))


def read_given_stems(condition_dir: str, given_stems, num_samples: int,
                     sample_rate: int = stems_lib.SAMPLE_RATE,
                     key: str = "config.sample.condition_dir") -> GivenStems:
  """Reads `{condition_dir}/{stem}.wav` for each given stem, fitted to `num_samples`.

  Raises:
    FileNotFoundError: the folder, or any given stem's file, is missing; names every one.
    audio_files.BadAudioError: a file is broken (names the file and the defect).
  """
  given_stems = tuple(given_stems)
  if not condition_dir:
    raise ValueError(f"partial generation needs {key}: a folder holding the given stems "
                     + ", ".join(f"{s}.wav" for s in given_stems))
  if not os.path.isdir(condition_dir):
    raise FileNotFoundError(f"{key}={condition_dir!r} is not a folder")
  paths = {stem: os.path.join(condition_dir, f"{stem}.wav") for stem in given_stems}
  missing = [path for path in paths.values() if not os.path.isfile(path)]
  if missing:
    raise FileNotFoundError(
        f"partial generation of {', '.join(s for s in stems_lib.STEM_NAMES if s not in paths)}"
        f" needs every other stem in {key}={condition_dir!r}; missing: {', '.join(missing)}")
  for stem in stems_lib.STEM_NAMES:
    extra = os.path.join(condition_dir, f"{stem}.wav")
    if stem not in paths and os.path.exists(extra):
      logging.info("%s is not used: %s is generated", extra, stem)

  waveforms, original_samples = {}, {}
  seconds = num_samples / sample_rate
  for stem, path in paths.items():
    info = audio_files.probe(path)
    for note in audio_files.describe_conversions(info, sample_rate):
      logging.info("given stem: %s", note)
    audio = audio_files.read_mono(info, sample_rate)
    original_samples[stem] = len(audio)
    if len(audio) > num_samples:
      logging.warning("given stem %s: %.2f s, longer than the %.2f s chunk; keeping the first "
                      "%.2f s (%.2f s dropped)", path, len(audio) / sample_rate, seconds,
                      seconds, (len(audio) - num_samples) / sample_rate)
    elif len(audio) < num_samples:
      logging.warning("given stem %s: %.2f s, shorter than the %.2f s chunk; zero-padded at "
                      "the end", path, len(audio) / sample_rate, seconds)
    waveforms[stem] = fit_to_length(audio, num_samples)
  if len(set(original_samples.values())) > 1:
    logging.warning("given stems differ in length (samples at %d Hz: %s); each was fitted to "
                    "the chunk on its own", sample_rate, original_samples)
  return GivenStems(waveforms=waveforms, files=paths, original_samples=original_samples)
