"""A download-free audio embedding: per-window statistics of log-mel, MFCC and chroma.

This is NOT a learned embedding, and a distance over it is not FAD: tables name it
(`EMBEDDING_NAME`) so that nobody compares these numbers with published values. It exists
for tests and for clips shorter than musicnn's 3 s patch (`musicnn.py` is the default;
`vggish.py` gives FAD when the user supplies the VGGish weights).

Per non-overlapping 1 s window, over its STFT frames (`spectral.stft`, centred Hann):
- log-mel: log(mel + 1e-5) of 64 Slaney mel bands (`spectral.mel_spectrogram`), mean and std;
- MFCC: orthonormal DCT-II of that log-mel, first 20 coefficients, mean and std;
- chroma: 12 pitch classes (`chroma_filterbank`), each frame scaled to unit max, mean and std;
giving a `EMBEDDING_DIM` = 2 · (64 + 20 + 12) = 192 vector per window.
"""

import functools

import jax.numpy as jnp
import numpy as np
import scipy.fft

from msldm_jax import stems
from msldm_jax.audio import spectral

EMBEDDING_NAME = "stats-logmel-mfcc-chroma"
N_FFT = 2048
HOP_LENGTH = 512
N_MELS = 64
N_MFCC = 20
N_CHROMA = 12
LOG_EPS = 1e-5
EMBEDDING_DIM = 2 * (N_MELS + N_MFCC + N_CHROMA)
WINDOW_SECONDS = 1.0


@functools.lru_cache(maxsize=None)
def _chroma_filterbank_cached(sample_rate: int, n_fft: int, fmin: float,
                              fmax: float) -> np.ndarray:
  frequencies = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
  weights = np.zeros((N_CHROMA, frequencies.size), np.float32)
  in_band = (frequencies >= fmin) & (frequencies <= fmax)
  # Pitch in semitones above C (C0 = 440 · 2^(-57/12) Hz): pitch class 0 is C, 9 is A.
  pitch = 12.0 * np.log2(frequencies[in_band] / 440.0) + 57.0
  lower = np.floor(pitch)
  frac = pitch - lower
  columns = np.nonzero(in_band)[0]
  # A bin between two semitones is shared linearly between their classes, so that a tone
  # between bins still lands on its own class (a hard rounding would flicker).
  np.add.at(weights, (lower.astype(int) % N_CHROMA, columns), 1.0 - frac)
  np.add.at(weights, ((lower.astype(int) + 1) % N_CHROMA, columns), frac)
  weights.setflags(write=False)
  return weights


def chroma_filterbank(sample_rate: int, n_fft: int, fmin: float = 55.0,
                      fmax: float = 5000.0) -> np.ndarray:
  """Pitch-class folding of STFT bins, float32 `[12, n_fft // 2 + 1]` (class 0 = C).

  Bins outside [fmin, fmax] get no weight: below 55 Hz (A1) the bins of a 2048-point FFT at
  22.05 kHz are wider than a semitone, above 5 kHz there is little pitch information.
  """
  return _chroma_filterbank_cached(int(sample_rate), int(n_fft), float(fmin), float(fmax))


def chromagram(signal, sample_rate: int = stems.SAMPLE_RATE, *, n_fft: int = N_FFT,
               hop_length: int = HOP_LENGTH) -> np.ndarray:
  """Chroma energy `[..., frames, 12]` (unnormalised) of `[..., samples]`."""
  spectrum_mag = spectral.magnitude(spectral.stft(jnp.asarray(signal, jnp.float32), n_fft,
                                                  hop_length))
  filters = jnp.asarray(chroma_filterbank(sample_rate, n_fft))
  return np.asarray(jnp.einsum("...tf,cf->...tc", spectrum_mag ** 2, filters,
                               precision="highest"))


def log_mel(signal, sample_rate: int = stems.SAMPLE_RATE) -> np.ndarray:
  """log(mel + 1e-5) `[..., frames, 64]` with the embedding's STFT settings."""
  mel = spectral.mel_spectrogram(jnp.asarray(signal, jnp.float32), sample_rate=sample_rate,
                                 n_fft=N_FFT, hop_length=HOP_LENGTH, n_mels=N_MELS)
  return np.log(np.asarray(mel, np.float64) + LOG_EPS)


def _windows(waveform: np.ndarray, window: int) -> np.ndarray:
  count = waveform.shape[-1] // window
  if count == 0:
    raise ValueError(f"waveform of {waveform.shape[-1]} samples is shorter than one "
                     f"{WINDOW_SECONDS} s window ({window} samples)")
  return waveform[:count * window].reshape(count, window)


def embed(waveform, sample_rate: int = stems.SAMPLE_RATE) -> np.ndarray:
  """Embeddings `[n_windows, EMBEDDING_DIM]` (float64) of a mono waveform `[samples]`.

  One per whole non-overlapping 1 s window; the trailing partial window is dropped.
  """
  waveform = np.asarray(waveform, np.float32)
  if waveform.ndim != 1:
    raise ValueError(f"embed takes a mono waveform [samples]; got shape {waveform.shape}")
  windows = _windows(waveform, int(round(WINDOW_SECONDS * sample_rate)))
  logmel = log_mel(windows, sample_rate)
  mfcc = scipy.fft.dct(logmel, type=2, norm="ortho", axis=-1)[..., :N_MFCC]
  chroma = chromagram(windows, sample_rate).astype(np.float64)
  # Unit max per frame, as librosa's chroma; silent frames stay 0 rather than 0/0.
  chroma = chroma / np.maximum(chroma.max(axis=-1, keepdims=True), 1e-10)
  parts = []
  for feature in (logmel, mfcc, chroma):
    parts += [feature.mean(axis=-2), feature.std(axis=-2)]
  return np.concatenate(parts, axis=-1)
