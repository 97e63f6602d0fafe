"""Music-specific metrics of generated stems: emptiness, cross-stem coherence, VAE quality.

Layout: multi-stem audio is `[pieces, stems, samples]` in `stems.STEM_NAMES` order (or
`[stems, samples]` for one piece); time is the last axis, as everywhere in the project.
"""

import itertools
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from msldm_jax import stems
from msldm_jax.audio import spectral
from msldm_jax.evaluation import statistics_embedding
from msldm_jax.losses import vae_losses

# The reference's silence rule (msldm-reference.md §2): a window x of N samples is silent
# when ||x||_2 / N < 1.5e-5.
SILENCE_THRESHOLD = 1.5e-5
HARMONIC_STEMS = ("bass", "guitar", "piano")
ONSET_TOLERANCE_SECONDS = 0.05
# Emptiness is judged per window of this length (the training data's VAE window, 1 s).
EMPTY_WINDOW_SECONDS = 1.0


def is_silent(audio, threshold: float = SILENCE_THRESHOLD) -> np.ndarray:
  """bool `[...]`: ||x||_2 / N < threshold for each x = audio[..., :] of N samples.

  The numpy twin of `msldm_jax.data.windows.is_silent` (TensorFlow, training data); keep the
  two formulas identical.
  """
  audio = np.asarray(audio, np.float64)
  return np.linalg.norm(audio, axis=-1) / audio.shape[-1] < threshold


def silent_windows(audio, sample_rate: int = stems.SAMPLE_RATE,
                   window_seconds: float = EMPTY_WINDOW_SECONDS) -> np.ndarray:
  """bool `[..., windows]`: the silence rule on each whole `window_seconds` window.

  The rule is the training data's (per window of the length it was made for), so a quiet
  but playing stem is not judged empty by the norm of a whole 14.86 s chunk, which divides
  by N and so flags anything quiet over a long span.
  """
  audio = np.asarray(audio, np.float32)
  window = int(round(window_seconds * sample_rate))
  count = audio.shape[-1] // window
  if count == 0:
    raise ValueError(f"audio of {audio.shape[-1]} samples is shorter than one "
                     f"{window_seconds} s window at {sample_rate} Hz")
  windows = audio[..., :count * window].reshape(audio.shape[:-1] + (count, window))
  return is_silent(windows)


def empty_stems(audio, stem_names: Sequence[str] = stems.STEM_NAMES, *,
                sample_rate: int = stems.SAMPLE_RATE,
                window_seconds: float = EMPTY_WINDOW_SECONDS,
                empty_share: float = 1.0) -> np.ndarray:
  """bool `[pieces, stems]`: a stem is empty when at least `empty_share` of its windows are
  silent (1.0: all of them)."""
  if not 0.0 < empty_share <= 1.0:
    raise ValueError(f"empty_share must be in (0, 1]; got {empty_share}")
  silent = silent_windows(stems.as_pieces(audio, stem_names), sample_rate, window_seconds)
  return silent.mean(axis=-1) >= empty_share - 1e-9


def empty_stem_rates(audio, stem_names: Sequence[str] = stems.STEM_NAMES, *,
                     sample_rate: int = stems.SAMPLE_RATE,
                     window_seconds: float = EMPTY_WINDOW_SECONDS,
                     empty_share: float = 1.0) -> dict[str, float]:
  """Share of empty stems (`empty_stems`): per stem name and over all stems ("all")."""
  empty = empty_stems(audio, stem_names, sample_rate=sample_rate,
                      window_seconds=window_seconds, empty_share=empty_share)
  rates = {name: float(empty[:, i].mean()) for i, name in enumerate(stem_names)}
  rates["all"] = float(empty.mean())
  return rates


def levels_db(audio) -> np.ndarray:
  """RMS level in dB full scale `[...]` of each signal `audio[..., :]` (−inf for zeros)."""
  audio = np.asarray(audio, np.float64)
  with np.errstate(divide="ignore"):
    return 20.0 * np.log10(np.sqrt(np.mean(audio * audio, axis=-1)))


def _frame_silence(signal: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
  # The silence rule on each STFT frame's samples, centred as spectral.stft centres them.
  padded = np.pad(np.asarray(signal, np.float32), [(0, 0)] * (signal.ndim - 1)
                  + [(n_fft // 2, n_fft // 2)])
  return is_silent(np.asarray(spectral.frame(jnp.asarray(padded), n_fft, hop_length)))


def chroma_agreement(stem_a, stem_b, sample_rate: int = stems.SAMPLE_RATE, *,
                     n_fft: int = statistics_embedding.N_FFT,
                     hop_length: int = statistics_embedding.HOP_LENGTH) -> float:
  """Mean cosine similarity of frame-wise chroma of two mono stems `[samples]`.

  Over frames where neither stem is silent; NaN when there is no such frame.
  """
  pair = np.stack([np.asarray(stem_a, np.float32), np.asarray(stem_b, np.float32)])
  chroma = statistics_embedding.chromagram(pair, sample_rate, n_fft=n_fft,
                               hop_length=hop_length).astype(np.float64)
  active = ~_frame_silence(pair, n_fft, hop_length).any(axis=0)
  norms = np.linalg.norm(chroma, axis=-1)
  active &= (norms > 0).all(axis=0)
  if not active.any():
    return float("nan")
  cosine = np.sum(chroma[0] * chroma[1], axis=-1) / np.maximum(norms[0] * norms[1], 1e-30)
  return float(cosine[active].mean())


def harmonic_chroma_agreement(audio, sample_rate: int = stems.SAMPLE_RATE,
                              stem_names: Sequence[str] = stems.STEM_NAMES,
                              harmonic_stems: Sequence[str] = HARMONIC_STEMS
                              ) -> dict[str, float]:
  """Chroma agreement of each pair of harmonic stems, mean over pieces, plus their "mean".

  Pieces where a pair has no jointly non-silent frame do not count for that pair (NaN if
  none counts).
  """
  audio = stems.as_pieces(audio, stem_names)
  missing = [s for s in harmonic_stems if s not in stem_names]
  if missing:
    raise ValueError(f"harmonic stems {missing} are not among the stems {tuple(stem_names)}")
  scores = {}
  for a, b in itertools.combinations(harmonic_stems, 2):
    ia, ib = stem_names.index(a), stem_names.index(b)
    values = [chroma_agreement(piece[ia], piece[ib], sample_rate) for piece in audio]
    values = [v for v in values if np.isfinite(v)]
    scores[f"{a}-{b}"] = float(np.mean(values)) if values else float("nan")
  finite = [v for v in scores.values() if np.isfinite(v)]
  scores["mean"] = float(np.mean(finite)) if finite else float("nan")
  return scores


def onset_envelope(signal, sample_rate: int = stems.SAMPLE_RATE, *, n_fft: int = 1024,
                   hop_length: int = 256) -> np.ndarray:
  """Spectral-flux onset strength `[frames]` of a mono signal `[samples]`.

  Half-wave rectified frame-to-frame increase of log(1 + 100·|STFT|), summed over bins; the
  first frame is 0. Frame t is centred on sample t·hop_length.
  """
  del sample_rate  # Frame times only depend on the hop; kept for a uniform signature.
  spectrum_mag = np.asarray(spectral.magnitude(spectral.stft(
      jnp.asarray(signal, jnp.float32), n_fft, hop_length)), np.float64)
  log_mag = np.log1p(100.0 * spectrum_mag)
  flux = np.maximum(np.diff(log_mag, axis=0), 0.0).sum(axis=-1)
  return np.concatenate([[0.0], flux])


def onset_times(signal, sample_rate: int = stems.SAMPLE_RATE, *, hop_length: int = 256,
                n_fft: int = 1024) -> np.ndarray:
  """Onset times in seconds, by librosa's peak picking of `onset_envelope`."""
  import librosa  # Imported here: librosa pulls in numba, slow to import.

  envelope = onset_envelope(signal, sample_rate, n_fft=n_fft, hop_length=hop_length)
  if envelope.max() <= 0:
    return np.zeros(0)
  return librosa.onset.onset_detect(onset_envelope=envelope, sr=sample_rate,
                                    hop_length=hop_length, units="time", backtrack=False)


def onset_f_measure(reference_times, estimated_times,
                    tolerance: float = ONSET_TOLERANCE_SECONDS) -> float:
  """F-measure of one-to-one matches within ±tolerance seconds (1 if both are empty).

  Greedy matching of sorted times is a maximum matching here: both sets lie on a line and
  every match window has the same width.
  """
  reference = np.sort(np.asarray(reference_times, np.float64))
  estimated = np.sort(np.asarray(estimated_times, np.float64))
  if reference.size == 0 and estimated.size == 0:
    return 1.0
  if reference.size == 0 or estimated.size == 0:
    return 0.0
  i = j = matches = 0
  while i < reference.size and j < estimated.size:
    if abs(reference[i] - estimated[j]) <= tolerance:
      matches, i, j = matches + 1, i + 1, j + 1
    elif reference[i] < estimated[j]:
      i += 1
    else:
      j += 1
  precision, recall = matches / estimated.size, matches / reference.size
  return 0.0 if matches == 0 else 2 * precision * recall / (precision + recall)


def drum_bass_onset_alignment(audio, sample_rate: int = stems.SAMPLE_RATE,
                              stem_names: Sequence[str] = stems.STEM_NAMES,
                              tolerance: float = ONSET_TOLERANCE_SECONDS) -> float:
  """Mean over pieces of the F-measure of bass onsets matched to drum onsets (±tolerance).

  Pieces whose bass or drums are silent are skipped (NaN if all are).
  """
  audio = stems.as_pieces(audio, stem_names)
  bass, drums = stem_names.index("bass"), stem_names.index("drums")
  values = []
  for piece in audio:
    if is_silent(piece[bass]) or is_silent(piece[drums]):
      continue
    values.append(onset_f_measure(onset_times(piece[drums], sample_rate),
                                  onset_times(piece[bass], sample_rate), tolerance))
  return float(np.mean(values)) if values else float("nan")


def reconstruction_quality(reconstructed, reference, sample_rate: int = stems.SAMPLE_RATE,
                           stem_names: Sequence[str] = stems.STEM_NAMES
                           ) -> dict[str, dict[str, float]]:
  """VAE reconstruction quality per stem: mean SI-SDR (dB) and multi-scale mel distance.

  `{stem: {"si_sdr": ..., "mel_distance": ...}}` over pieces whose reference stem is not
  silent (SI-SDR of silence is meaningless); NaN for a stem silent in every piece.
  """
  reconstructed = stems.as_pieces(reconstructed, stem_names)
  reference = stems.as_pieces(reference, stem_names)
  if reconstructed.shape != reference.shape:
    raise ValueError(f"reconstructed {reconstructed.shape} and reference {reference.shape} "
                     "shapes differ")
  sdr = np.asarray(vae_losses.si_sdr(jnp.asarray(reconstructed), jnp.asarray(reference)))
  mel = np.asarray(vae_losses.multiscale_mel_distance(
      jnp.asarray(reconstructed), jnp.asarray(reference), sample_rate=sample_rate))
  audible = ~is_silent(reference)
  scores = {}
  for i, name in enumerate(stem_names):
    keep = audible[:, i]
    scores[name] = {
        "si_sdr": float(sdr[keep, i].mean()) if keep.any() else float("nan"),
        "mel_distance": float(mel[keep, i].mean()) if keep.any() else float("nan"),
    }
  return scores
