"""Music-specific metrics of generated stems: emptiness, cross-stem coherence, VAE quality.

Layout: multi-stem audio is `[pieces, stems, samples]` in `stems.STEM_NAMES` order (or
`[stems, samples]` for one piece); time is the last axis, as everywhere in the project.
"""

import functools
import itertools
from typing import Sequence

import jax
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


def harmonic_chroma_values(audio, sample_rate: int = stems.SAMPLE_RATE,
                           stem_names: Sequence[str] = stems.STEM_NAMES,
                           harmonic_stems: Sequence[str] = HARMONIC_STEMS, *,
                           partner_offset: int = 0) -> dict[str, np.ndarray]:
  """Per pair "a-b" of harmonic stems, `[pieces]`: the chroma agreement of each piece's stem
  a with stem b of the piece `partner_offset` places on (cyclically).

  Offset 0 pairs a piece's own stems; any other pairs stems of two different pieces, which
  gives the measure's value for stems that share nothing (`cross_stem_dependence`). NaN
  where the pair has no jointly non-silent frame.
  """
  audio = stems.as_pieces(audio, stem_names)
  missing = [s for s in harmonic_stems if s not in stem_names]
  if missing:
    raise ValueError(f"harmonic stems {missing} are not among the stems {tuple(stem_names)}")
  count = len(audio)
  values = {}
  for a, b in itertools.combinations(harmonic_stems, 2):
    ia, ib = stem_names.index(a), stem_names.index(b)
    values[f"{a}-{b}"] = np.array(
        [chroma_agreement(audio[i, ia], audio[(i + partner_offset) % count, ib], sample_rate)
         for i in range(count)], np.float64)
  return values


def _finite_mean(values) -> float:
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  return float(finite.mean()) if finite.size else float("nan")


def _chroma_summary(values: dict[str, np.ndarray], pieces=slice(None)) -> dict[str, float]:
  """Each pair's mean over `pieces` (where finite) and their "mean" over pairs."""
  scores = {pair: _finite_mean(v[pieces]) for pair, v in values.items()}
  scores["mean"] = _finite_mean(list(scores.values()))
  return scores


def harmonic_chroma_agreement(audio, sample_rate: int = stems.SAMPLE_RATE,
                              stem_names: Sequence[str] = stems.STEM_NAMES,
                              harmonic_stems: Sequence[str] = HARMONIC_STEMS
                              ) -> dict[str, float]:
  """Chroma agreement of each pair of harmonic stems, mean over pieces, plus their "mean"
  (`harmonic_chroma_values`).

  Pieces where a pair has no jointly non-silent frame do not count for that pair (NaN if
  none counts).
  """
  return _chroma_summary(harmonic_chroma_values(audio, sample_rate, stem_names,
                                                harmonic_stems))


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


def peak_pick(x: np.ndarray, *, pre_max: int, post_max: int, pre_avg: int, post_avg: int,
              delta: float, wait: int) -> np.ndarray:
  """librosa.util.peak_pick's greedy rule, in numpy: frame n is a peak when x[n] is the
  maximum of x[n - pre_max : n + post_max], at least the mean of x[n - pre_avg :
  n + post_avg] plus delta, and more than `wait` frames after the previous peak (the first
  frame's windows start at it). Returns the peaks' frame indices.

  librosa runs this as a numba gufunc cached on disk in its package folder; after a test
  run (pytest-xdist workers and the stages' subprocesses compiling it at once) that cache
  crashed every later process that loaded it with SIGSEGV, so the evaluation does not
  depend on it."""
  x = np.asarray(x, np.float64)
  frames = x.shape[0]
  peaks = []
  n = 0
  while n < frames:
    # The mean only where the maximum holds, as librosa's loop does.
    if (x[n] == x[max(0, n - pre_max):min(n + post_max, frames)].max() and
        x[n] >= x[max(0, n - pre_avg):min(n + post_avg, frames)].mean() + delta):
      peaks.append(n)
      n += wait + 1
    else:
      n += 1
  return np.asarray(peaks, np.int64)


def onset_times(signal, sample_rate: int = stems.SAMPLE_RATE, *, hop_length: int = 256,
                n_fft: int = 1024) -> np.ndarray:
  """Onset times in seconds: `onset_envelope` peak-picked as librosa.onset.onset_detect does
  by default (the envelope scaled to [0, 1]; windows of 30 ms before and one frame after for
  the maximum, 100 ms either side for the mean, delta 0.07, 30 ms between onsets)."""
  envelope = onset_envelope(signal, sample_rate, n_fft=n_fft, hop_length=hop_length)
  if envelope.max() <= 0 or not np.isfinite(envelope).all():
    return np.zeros(0)
  envelope = envelope - envelope.min()
  envelope = envelope / (envelope.max() + np.finfo(envelope.dtype).tiny)

  def frames_per(seconds):  # librosa's rounding: floor division, then ceil
    return int(np.ceil(seconds * sample_rate // hop_length))

  peaks = peak_pick(envelope, pre_max=frames_per(0.03), post_max=frames_per(0.0) + 1,
                    pre_avg=frames_per(0.10), post_avg=frames_per(0.10) + 1, delta=0.07,
                    wait=frames_per(0.03))
  return peaks * hop_length / float(sample_rate)


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


def _onset_times_of_stem(audio: np.ndarray, index: int, sample_rate: int) -> list:
  """Onset times of stem `index` of each piece of `[pieces, stems, samples]` (None where the
  stem is silent)."""
  return [None if is_silent(piece[index]) else onset_times(piece[index], sample_rate)
          for piece in audio]


def _paired_onset_f(drum_times: list, bass_times: list, partner_offset: int,
                    tolerance: float) -> np.ndarray:
  count = len(drum_times)
  values = []
  for i in range(count):
    drums, bass = drum_times[i], bass_times[(i + partner_offset) % count]
    values.append(float("nan") if drums is None or bass is None
                  else onset_f_measure(drums, bass, tolerance))
  return np.array(values, np.float64)


def drum_bass_onset_values(audio, sample_rate: int = stems.SAMPLE_RATE,
                           stem_names: Sequence[str] = stems.STEM_NAMES,
                           tolerance: float = ONSET_TOLERANCE_SECONDS, *,
                           partner_offset: int = 0) -> np.ndarray:
  """`[pieces]`: the F-measure of the bass onsets of the piece `partner_offset` places on
  (cyclically; 0: the same piece) matched to each piece's drum onsets (±tolerance); NaN
  where either stem is silent."""
  audio = stems.as_pieces(audio, stem_names)
  drums = _onset_times_of_stem(audio, stem_names.index("drums"), sample_rate)
  bass = _onset_times_of_stem(audio, stem_names.index("bass"), sample_rate)
  return _paired_onset_f(drums, bass, partner_offset, tolerance)


def drum_bass_onset_alignment(audio, sample_rate: int = stems.SAMPLE_RATE,
                              stem_names: Sequence[str] = stems.STEM_NAMES,
                              tolerance: float = ONSET_TOLERANCE_SECONDS) -> float:
  """Mean over pieces of the F-measure of bass onsets matched to drum onsets (±tolerance)
  (`drum_bass_onset_values`).

  Pieces whose bass or drums are silent are skipped (NaN if all are).
  """
  return _finite_mean(drum_bass_onset_values(audio, sample_rate, stem_names, tolerance))


# The cross-stem measures `cross_stem_dependence` reports.
HARMONIC_CHROMA = "harmonic chroma agreement"
DRUM_BASS_ONSETS = "drum-bass onset F-measure"


def cross_stem_dependence(audio, sample_rate: int = stems.SAMPLE_RATE,
                          stem_names: Sequence[str] = stems.STEM_NAMES, *,
                          bootstrap_samples: int = 200, confidence: float = 0.95,
                          seed: int = 0) -> dict[str, dict[str, float]]:
  """How much more a piece's own stems agree than stems of different pieces do.

  A cross-stem measure's level alone says little: stems that share nothing score well
  above 0 on both (chorales keep one key and beat grid), and generated stems that are noisy
  or dense in onsets can score above the real ones. The same measure on stems of different
  pieces (each piece's partner half the set away, so that real chunks of one chorale rarely
  meet) is its value without dependence; the difference is the dependence: real stems show
  what a joint model should reach, independently generated ones (isldm) score 0 up to noise.

  Returns, for HARMONIC_CHROMA and DRUM_BASS_ONSETS: "same pieces", "other pieces",
  "dependence" (their difference) and its percentile bootstrap interval "low", "high" over
  pieces (paired: a resample draws pieces with both their values). With one piece, every
  value but "same pieces" is NaN.
  """
  audio = stems.as_pieces(audio, stem_names)
  count = len(audio)
  # One piece has no other to pair with: its "other pieces" values are NaN, and so is the
  # dependence.
  offsets = (0, count // 2) if count > 1 else (0,)
  chroma = [harmonic_chroma_values(audio, sample_rate, stem_names, partner_offset=o)
            for o in offsets]
  drums = _onset_times_of_stem(audio, stem_names.index("drums"), sample_rate)
  bass = _onset_times_of_stem(audio, stem_names.index("bass"), sample_rate)
  onsets = [_paired_onset_f(drums, bass, o, ONSET_TOLERANCE_SECONDS) for o in offsets]
  if count < 2:
    chroma.append({pair: np.full(count, np.nan) for pair in chroma[0]})
    onsets.append(np.full(count, np.nan))
  statistics = {
      HARMONIC_CHROMA: lambda pieces: [_chroma_summary(v, pieces)["mean"] for v in chroma],
      DRUM_BASS_ONSETS: lambda pieces: [_finite_mean(v[pieces]) for v in onsets],
  }
  draws = np.random.default_rng(seed).integers(0, count, (bootstrap_samples, count))
  tail = 100.0 * (1.0 - confidence) / 2.0
  results = {}
  for name, statistic in statistics.items():
    same, other = statistic(slice(None))
    resampled = np.array([np.subtract(*statistic(pieces)) for pieces in draws])
    resampled = resampled[np.isfinite(resampled)]
    low, high = (np.percentile(resampled, [tail, 100.0 - tail]) if resampled.size
                 else (float("nan"),) * 2)
    results[name] = {"same pieces": same, "other pieces": other, "dependence": same - other,
                     "low": float(low), "high": float(high)}
  return results


@functools.partial(jax.jit, static_argnames=("sample_rate",))
def _sdr_and_mel(reconstructed: jax.Array, reference: jax.Array, *, sample_rate: int
                 ) -> tuple[jax.Array, jax.Array]:
  # One program: op by op, the seven mel scales' ~150 small operations each compiled on
  # their own (~7 s of XLA:CPU per new shape of pieces).
  return (vae_losses.si_sdr(reconstructed, reference),
          vae_losses.multiscale_mel_distance(reconstructed, reference, sample_rate=sample_rate))


def _sdr_and_mel_by_pieces(reconstructed: np.ndarray, reference: np.ndarray, *,
                           sample_rate: int, pieces_per_call: int
                           ) -> tuple[np.ndarray, np.ndarray]:
  """`_sdr_and_mel` over `pieces_per_call` pieces at a time: the mel scales' intermediates
  take about 6 MB per second of one stem, so the study's 94 reference chunks (4 stems of
  14.9 s) in one call asked for 34 GB. The last call is padded with its own first piece
  (dropped after), so that every call has the one compiled shape."""
  size = max(1, min(pieces_per_call, len(reconstructed)))
  sdr, mel = [], []
  for start in range(0, len(reconstructed), size):
    batch = [reconstructed[start:start + size], reference[start:start + size]]
    rows = len(batch[0])
    batch = [np.concatenate([x, np.repeat(x[:1], size - rows, axis=0)]) for x in batch]
    scores = _sdr_and_mel(jnp.asarray(batch[0]), jnp.asarray(batch[1]),
                          sample_rate=sample_rate)
    sdr.append(np.asarray(scores[0])[:rows])
    mel.append(np.asarray(scores[1])[:rows])
  return np.concatenate(sdr), np.concatenate(mel)


def reconstruction_quality(reconstructed, reference, sample_rate: int = stems.SAMPLE_RATE,
                           stem_names: Sequence[str] = stems.STEM_NAMES,
                           pieces_per_call: int = 4) -> dict[str, dict[str, float]]:
  """VAE reconstruction quality per stem: mean SI-SDR (dB), multi-scale mel distance and the
  level change (median over pieces of the reconstruction's dB RMS minus the reference's).

  `{stem: {"si_sdr": ..., "mel_distance": ..., "level_change_db": ...}}` over pieces whose
  reference stem is not silent (SI-SDR of silence is meaningless); NaN for a stem silent in
  every piece. SI-SDR ignores gain and the mel distance compares log magnitudes, so a
  decoder that plays everything several dB quiet shows only in the level change (and then
  in every generated piece's level, which the decoder makes).
  """
  reconstructed = stems.as_pieces(reconstructed, stem_names)
  reference = stems.as_pieces(reference, stem_names)
  if reconstructed.shape != reference.shape:
    raise ValueError(f"reconstructed {reconstructed.shape} and reference {reference.shape} "
                     "shapes differ")
  sdr, mel = _sdr_and_mel_by_pieces(np.asarray(reconstructed), np.asarray(reference),
                                    sample_rate=sample_rate, pieces_per_call=pieces_per_call)
  audible = ~is_silent(reference)
  with np.errstate(invalid="ignore"):  # −inf − −inf on silent stems, never kept
    level_change = levels_db(reconstructed) - levels_db(reference)
  scores = {}
  for i, name in enumerate(stem_names):
    keep = audible[:, i]
    scores[name] = {
        "si_sdr": float(sdr[keep, i].mean()) if keep.any() else float("nan"),
        "mel_distance": float(mel[keep, i].mean()) if keep.any() else float("nan"),
        # The median: a reconstruction decoded to silence is −inf dB.
        "level_change_db": (float(np.median(level_change[keep, i])) if keep.any()
                            else float("nan")),
    }
  return scores
