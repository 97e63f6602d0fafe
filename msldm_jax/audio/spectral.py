"""Short-time Fourier transform and mel spectrograms in JAX: the project's one STFT.

Every spectral quantity in the project (the VAE's multi-scale mel loss, the complex-STFT
discriminator, evaluation metrics) goes through this module, so that "the STFT" means one
thing everywhere. The conventions are the reference's (PyTorch `torch.stft(center=True)` as
called by descript-audiotools, which the MSLDM release trains with):

- window: periodic Hann of length `n_fft` (`torch.hann_window`, `scipy.signal.get_window
  ('hann', n)`, librosa's 'hann'), no normalisation;
- centring: reflect padding of `n_fft // 2` on both sides (torch's `center=True` default pad
  mode; note librosa >= 0.10 defaults to zero padding, so comparisons with librosa must pass
  `pad_mode='reflect'`);
- one-sided spectrum: `n_fft // 2 + 1` bins.

Layout: time on the last axis of a signal (`[..., samples]`); spectrograms are time-major,
`[..., frames, bins]` (librosa and torch return `[..., bins, frames]`): frames-then-bins makes
the mel projection a plain matmul and is the (height, width) order the 2-D convolutions of the
discriminator want.

Mel filterbanks equal librosa's default (`librosa.filters.mel(htk=False, norm='slaney')`). They
are re-derived here in numpy rather than imported from librosa, which pulls in numba at
import time; tests assert equality with librosa.
"""

import functools
import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np


def hann_window(window_length: int) -> np.ndarray:
  """Periodic Hann window, float32 `[window_length]` (as `torch.hann_window`)."""
  n = np.arange(window_length, dtype=np.float64)
  return (0.5 - 0.5 * np.cos(2.0 * np.pi * n / window_length)).astype(np.float32)


def num_frames(num_samples: int, n_fft: int, hop_length: int, *, center: bool = True,
               match_stride: bool = False) -> int:
  """Number of STFT frames `stft` returns for a signal of `num_samples` samples."""
  if match_stride:
    return math.ceil(num_samples / hop_length)
  if center:
    num_samples += 2 * (n_fft // 2)
  if num_samples < n_fft:
    raise ValueError(
        f"signal of {num_samples} samples (after padding) is shorter than n_fft={n_fft}")
  return 1 + (num_samples - n_fft) // hop_length


def _pad_time(signal: jax.Array, left: int, right: int, mode: str) -> jax.Array:
  pad_width = [(0, 0)] * (signal.ndim - 1) + [(left, right)]
  return jnp.pad(signal, pad_width, mode=mode)


def frame(signal: jax.Array, frame_length: int, hop_length: int) -> jax.Array:
  """Overlapping frames of the last axis: `[..., samples]` -> `[..., frames, frame_length]`.

  No padding: the last frame ends at or before the signal's end (like `librosa.util.frame`).
  """
  length = signal.shape[-1]
  if length < frame_length:
    raise ValueError(f"signal of {length} samples is shorter than one frame ({frame_length})")
  count = 1 + (length - frame_length) // hop_length
  if frame_length % hop_length == 0:
    # When the hop divides the frame (hop = n_fft / 4 throughout the project), frames are
    # concatenations of consecutive hop-sized blocks: slices and a reshape, which differentiate
    # into cheap pads, where a gather would differentiate into a scatter-add.
    ratio = frame_length // hop_length
    num_blocks = count + ratio - 1
    blocks = signal[..., :num_blocks * hop_length].reshape(
        signal.shape[:-1] + (num_blocks, hop_length))
    return jnp.concatenate([blocks[..., i:i + count, :] for i in range(ratio)], axis=-1)
  index = (hop_length * np.arange(count)[:, None] + np.arange(frame_length)[None, :])
  return signal[..., index]


def stft(signal: jax.Array, n_fft: int, hop_length: int, *, center: bool = True,
         pad_mode: str = "reflect", match_stride: bool = False) -> jax.Array:
  """Complex one-sided STFT with a periodic Hann window of length `n_fft`.

  Args:
    signal: real `[..., samples]`; computed in float32 whatever its dtype.
    n_fft: FFT and window length.
    hop_length: frame step in samples.
    center: pad `n_fft // 2` on both sides first, so that frame t is centred on sample
      t * hop_length (torch.stft(center=True), librosa.stft(center=True)).
    pad_mode: `jnp.pad` mode of that centring; 'reflect' as torch.stft.
    match_stride: descript-audiotools' `match_stride=True` alignment, used by DAC's (and so
      the reference's) complex-STFT discriminator: reflect-pad by (n_fft - hop) // 2 on the
      left and as much plus the round-up to a whole hop on the right, take the centred STFT of
      that, and drop its first and last two frames. Frame t is then centred on sample
      (t + 1/2)·hop and there are exactly ceil(samples / hop) frames, as with a strided conv.
      Requires hop_length == n_fft // 4 (as audiotools does).

  Returns:
    complex64 `[..., frames, n_fft // 2 + 1]`.
  """
  signal = jnp.asarray(signal, jnp.float32)
  if match_stride:
    if hop_length != n_fft // 4:
      raise ValueError(
          f"match_stride needs hop_length == n_fft // 4; got n_fft={n_fft}, "
          f"hop_length={hop_length}")
    length = signal.shape[-1]
    right_pad = math.ceil(length / hop_length) * hop_length - length
    pad = (n_fft - hop_length) // 2
    signal = _pad_time(signal, pad, pad + right_pad, "reflect")
    spectrum = stft(signal, n_fft, hop_length, center=True, pad_mode="reflect")
    return spectrum[..., 2:-2, :]
  if center:
    signal = _pad_time(signal, n_fft // 2, n_fft // 2, pad_mode)
  frames = frame(signal, n_fft, hop_length) * hann_window(n_fft)
  return jnp.fft.rfft(frames, n=n_fft, axis=-1)


def magnitude(spectrum: jax.Array) -> jax.Array:
  """|spectrum| with a zero (not NaN) gradient where the spectrum is exactly zero.

  `jnp.abs` of a complex zero differentiates to NaN (z̄/|z|); torch defines that gradient as
  0. Silent frames (zero-padded or muted stems) are common in music, so the torch convention
  is kept: the double `where` keeps the NaN branch out of the backward pass.
  """
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  nonzero = power > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, power, 1.0)), 0.0)


def _hz_to_mel_slaney(frequencies: np.ndarray) -> np.ndarray:
  # Slaney's Auditory Toolbox scale (librosa's htk=False): linear below 1 kHz, log above.
  frequencies = np.asarray(frequencies, dtype=np.float64)
  f_sp = 200.0 / 3
  mels = frequencies / f_sp
  min_log_hz = 1000.0
  min_log_mel = min_log_hz / f_sp
  logstep = np.log(6.4) / 27.0
  above = frequencies >= min_log_hz
  return np.where(above, min_log_mel + np.log(np.maximum(frequencies, min_log_hz) / min_log_hz)
                  / logstep, mels)


def _mel_to_hz_slaney(mels: np.ndarray) -> np.ndarray:
  mels = np.asarray(mels, dtype=np.float64)
  f_sp = 200.0 / 3
  freqs = f_sp * mels
  min_log_hz = 1000.0
  min_log_mel = min_log_hz / f_sp
  logstep = np.log(6.4) / 27.0
  return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)),
                  freqs)


@functools.lru_cache(maxsize=None)
def _mel_filterbank_cached(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                           fmax: float) -> np.ndarray:
  fft_freqs = np.fft.rfftfreq(n=n_fft, d=1.0 / sample_rate)
  mel_f = _mel_to_hz_slaney(
      np.linspace(_hz_to_mel_slaney(fmin), _hz_to_mel_slaney(fmax), n_mels + 2))
  fdiff = np.diff(mel_f)
  ramps = np.subtract.outer(mel_f, fft_freqs)
  # Triangles are rounded to float32 before the Slaney area normalisation, in this order, so
  # that the result matches librosa's float32 filterbank bit for bit.
  weights = np.zeros((n_mels, n_fft // 2 + 1), dtype=np.float32)
  for i in range(n_mels):
    lower = -ramps[i] / fdiff[i]
    upper = ramps[i + 2] / fdiff[i + 1]
    weights[i] = np.maximum(0, np.minimum(lower, upper))
  weights *= (2.0 / (mel_f[2:n_mels + 2] - mel_f[:n_mels]))[:, np.newaxis]
  weights.setflags(write=False)
  return weights


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: Optional[float] = None) -> np.ndarray:
  """Slaney-scale, Slaney-normalised mel filters, float32 `[n_mels, n_fft // 2 + 1]`.

  Equal to `librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
  fmax=fmax)` (its defaults htk=False, norm='slaney'). Some filters are all zero when n_mels
  is large for n_fft (e.g. 320 mels of a 2048-point FFT at 22.05 kHz): librosa warns about
  them, the reference trains with them, and so do we. A read-only, cached numpy constant.
  """
  fmax = float(sample_rate) / 2 if fmax is None else float(fmax)
  return _mel_filterbank_cached(int(sample_rate), int(n_fft), int(n_mels), float(fmin), fmax)


def mel_spectrogram(signal: jax.Array, *, sample_rate: int, n_fft: int, hop_length: int,
                    n_mels: int, fmin: float = 0.0, fmax: Optional[float] = None,
                    power: float = 1.0, center: bool = True) -> jax.Array:
  """Mel spectrogram `[..., frames, n_mels]` of a real signal `[..., samples]`.

  `|STFT| ** power` through `mel_filterbank`; power 1 (magnitude) is what the reference's mel
  loss uses (audiotools' `mel_spectrogram`), power 2 is librosa's `melspectrogram` default.
  """
  spectrum_mag = magnitude(stft(signal, n_fft, hop_length, center=center))
  if power != 1.0:
    spectrum_mag = spectrum_mag ** power
  filters = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax))
  # HIGHEST: on GPUs and TPUs the default f32 matmul rounds inputs to tf32/bf16, which would
  # put ~1e-3 relative error into a quantity that the loss takes the log of.
  mel = jnp.einsum("...tf,mf->...tm", spectrum_mag, filters,
                   precision=jax.lax.Precision.HIGHEST)
  chex.assert_shape(mel, signal.shape[:-1] + (mel.shape[-2], n_mels))
  return mel
