"""Mono at a given rate: how every audio embedding (VGGish, musicnn) is fed.

The pretrained embeddings take mono audio at 16 kHz; the project's audio is at 44.1 kHz and may
have a channel axis. The conversion lives here, once, so that two embeddings of the same
waveform see the same 16 kHz signal:

- channels are averaged (not summed: a mono signal duplicated on both channels is unchanged);
- another rate is resampled with soxr's high-quality band-limited resampler through librosa
  (`res_type='soxr_hq'`, librosa's default, and what `librosa.load(sr=...)` uses, which is how
  the musicnn package reads its audio). The output length is ceil(n · target / source).

librosa is imported only when a resampling is needed: it pulls in numba, slow to import.
"""

import numpy as np

# librosa's default resampler: soxr 'HQ', band-limited.
RESAMPLER = "soxr_hq"


def resample(waveform, source_rate: int, target_rate: int) -> np.ndarray:
  """float32 `waveform` resampled along its last axis (each row on its own)."""
  waveform = np.asarray(waveform, np.float32)
  if int(source_rate) == int(target_rate) or waveform.shape[-1] == 0:
    return waveform
  import librosa  # pylint: disable=g-import-not-at-top
  return np.asarray(librosa.resample(waveform, orig_sr=int(source_rate),
                                     target_sr=int(target_rate), res_type=RESAMPLER,
                                     axis=-1), np.float32)


def to_mono(waveform, source_rate: int, target_rate: int, *, user: str = "this embedding"
            ) -> np.ndarray:
  """float32 mono `[samples]` at `target_rate` from `[samples]` or `[channels, samples]`.

  Time is the last axis, as everywhere in the project. `user` names the caller in the error a
  wrong rank raises.
  """
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim == 2:
    waveform = waveform.mean(axis=0)
  if waveform.ndim != 1:
    raise ValueError(f"{user} takes [samples] or [channels, samples]; got {waveform.shape}")
  return resample(waveform, source_rate, target_rate)
