"""Reading one audio file into float32 mono at a target rate, refusing every defect.

Dataset builds read thousands of files that someone else wrote; any of them may be broken. Each
defect this module can see raises `BadAudioError(path, reason)`, so that a builder can skip the
track, name the file and say why, and go on. What is checked, and when:

  `probe(path)` (header only, cheap; run on every file before any is decoded):
    missing file, a folder in its place, a 0-byte file, a file libsndfile cannot open (a text
    file named .wav, a header cut short), a header declaring no samples, and a RIFF/WAVE file
    whose data chunk declares more bytes than the file holds (a truncated WAV: libsndfile
    itself quietly returns the shorter audio).
  `read_mono(info, sample_rate)` (decodes):
    a decoder error part-way (e.g. a truncated FLAC: "lost sync"), fewer frames decoded than the
    header declares, and any NaN/Inf sample.

Two conversions are not defects and are done here, leaving it to the caller to log or record
them (see `describe_conversions`): several channels are averaged to mono, and a rate other than
the target is resampled with soxr's high-quality band-limited resampler (librosa's default).
"""

import dataclasses
import math
import os

import numpy as np
import soundfile as sf

from msldm_jax.audio import resampling


class BadAudioError(Exception):
  """An input that cannot go into a dataset: `path` is the file (or folder) at fault."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path}: {reason}")
    self.path = str(path)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class AudioInfo:
  """What an audio file's header says."""
  path: str
  sample_rate: int
  channels: int
  frames: int

  def num_samples_at(self, sample_rate: int) -> int:
    """Length after `read_mono(self, sample_rate)`."""
    return resampled_length(self.frames, self.sample_rate, sample_rate)

  def seconds(self) -> float:
    return self.frames / self.sample_rate


def resampled_length(frames: int, source_rate: int, target_rate: int) -> int:
  """Number of samples librosa.resample returns (the same float formula, so they agree)."""
  if source_rate == target_rate:
    return frames
  return int(math.ceil(frames * (float(target_rate) / source_rate)))


def _wav_truncation(path: str, file_size: int) -> str | None:
  """Why a RIFF/WAVE file is truncated, or None when it is whole (or not a plain RIFF WAV).

  libsndfile opens a WAV whose data chunk runs past the end of the file and reports only the
  frames present, so a cut-short stem would pass as a shorter, valid one.
  """
  with open(path, "rb") as f:
    header = f.read(12)
    if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
      return None  # RF64, RIFX, W64...: left to libsndfile.
    position = 12
    while position + 8 <= file_size:
      f.seek(position)
      chunk = f.read(8)
      chunk_id, size = chunk[:4], int.from_bytes(chunk[4:8], "little")
      if chunk_id == b"data":
        # Streamed writers leave the size at 0 or 0xFFFFFFFF: unknown, not truncated.
        if size in (0, 0xFFFFFFFF):
          return None
        present = file_size - position - 8
        if size > present:
          return (f"truncated WAV: its data chunk declares {size} bytes but only {present} "
                  "are in the file")
        return None
      position += 8 + size + (size & 1)  # RIFF chunks are padded to an even size.
  return None


def probe(path: str) -> AudioInfo:
  """Reads and checks a file's header; raises BadAudioError naming the defect."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise BadAudioError(path, "file is missing")
  if not os.path.isfile(path):
    raise BadAudioError(path, "is not a regular file")
  file_size = os.path.getsize(path)
  if file_size == 0:
    raise BadAudioError(path, "file is empty (0 bytes)")
  try:
    info = sf.info(path)
  except (sf.SoundFileError, RuntimeError, OSError) as e:
    raise BadAudioError(path, f"not a readable audio file ({e})") from None
  if info.frames <= 0:
    raise BadAudioError(path, "holds no audio samples (0 frames)")
  if info.samplerate <= 0 or info.channels <= 0:
    raise BadAudioError(
        path, f"invalid header: {info.samplerate} Hz, {info.channels} channels")
  truncation = _wav_truncation(path, file_size)
  if truncation:
    raise BadAudioError(path, truncation)
  return AudioInfo(path=path, sample_rate=int(info.samplerate), channels=int(info.channels),
                   frames=int(info.frames))


def describe_conversions(info: AudioInfo, expected_rate: int) -> list[str]:
  """Human-readable notes for what `read_mono` will change (empty when nothing)."""
  notes = []
  if info.channels > 1:
    notes.append(f"{info.path}: {info.channels} channels downmixed to mono (channel mean)")
  if info.sample_rate != expected_rate:
    notes.append(f"{info.path}: {info.sample_rate} Hz (expected {expected_rate} Hz), resampled")
  return notes


def read_mono(path_or_info: str | AudioInfo, sample_rate: int) -> np.ndarray:
  """Decodes a file to float32 mono at `sample_rate`, shape [num_samples].

  Accepts a path or the AudioInfo `probe` returned (then the header is not read again).
  Raises BadAudioError for any defect (see the module docstring).
  """
  info = path_or_info if isinstance(path_or_info, AudioInfo) else probe(path_or_info)
  try:
    audio, _ = sf.read(info.path, dtype="float32", always_2d=True)
  except (sf.SoundFileError, RuntimeError, OSError, ValueError) as e:
    raise BadAudioError(info.path, f"unreadable or truncated audio data ({e})") from None
  if audio.shape[0] < info.frames:
    raise BadAudioError(
        info.path, f"truncated: the header declares {info.frames} frames but only "
        f"{audio.shape[0]} could be decoded")
  finite = np.isfinite(audio)
  if not finite.all():
    bad = np.size(finite) - np.count_nonzero(finite)
    first = int(np.argmin(finite.all(axis=1)))
    raise BadAudioError(
        info.path, f"{bad} non-finite samples (NaN/Inf), the first at frame {first}")
  # Averaging, not summing, keeps a mono signal duplicated on both channels unchanged.
  mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1, dtype=np.float32)
  if info.sample_rate != sample_rate:
    # soxr 'HQ', band-limited, as every resampling in the project; the output length is
    # ceil(n * target / source) (`resampled_length`).
    mono = resampling.resample(mono, info.sample_rate, sample_rate)
  return np.ascontiguousarray(mono, dtype=np.float32)
