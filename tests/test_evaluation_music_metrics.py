"""Music metrics and the statistics embedding on inputs with a known answer."""

import numpy as np
import pytest

from msldm_jax.evaluation import statistics_embedding
from msldm_jax.evaluation import music_metrics as mm

SR = 22050


def _tone(freq, seconds=2.0, sr=SR, amplitude=0.3):
  t = np.arange(int(seconds * sr)) / sr
  return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_silence_rule_exact_at_threshold():
  n = 1024
  # One non-zero sample c: ||x||_2 / N = c / N, exact for a power-of-two N. At exactly the
  # threshold the window is not silent (the rule is a strict <).
  at = np.zeros(n)
  at[0] = mm.SILENCE_THRESHOLD * n
  assert mm.is_silent(at[None])[0] == np.False_
  at[0] = np.nextafter(at[0], 0.0)
  assert mm.is_silent(at)
  assert mm.is_silent(np.zeros(n))


def test_empty_stem_rates():
  audio = np.zeros((2, 4, 3000), np.float32)
  audio[0, 0] = 0.1
  audio[1, 0] = 0.1
  audio[1, 2] = 0.1
  rates = mm.empty_stem_rates(audio, sample_rate=1000)
  assert rates == {"bass": 0.0, "drums": 1.0, "guitar": 0.5, "piano": 1.0, "all": 5 / 8}


def test_empty_stems_judged_per_window_not_per_chunk():
  rate, seconds = 1000, 15
  quiet = np.zeros((1, 4, rate * seconds), np.float32)
  # One audible second in fifteen: the whole-chunk norm / N is 15x smaller than the second's
  # own, under the threshold, but the stem plays.
  level = 4 * mm.SILENCE_THRESHOLD * np.sqrt(rate)
  quiet[0, :, 2 * rate:3 * rate] = level
  assert mm.is_silent(quiet[0]).all()
  assert not mm.empty_stems(quiet, sample_rate=rate).any()
  # With a share: a stem silent in 14 of 15 windows is empty when 90 % suffices.
  assert mm.empty_stems(quiet, sample_rate=rate, empty_share=0.9).all()
  with pytest.raises(ValueError, match="shorter than one"):
    mm.empty_stems(quiet[..., :10], sample_rate=rate)


def test_levels_db():
  audio = np.stack([np.full(100, 0.5), np.zeros(100)])
  levels = mm.levels_db(audio)
  assert levels[0] == pytest.approx(20 * np.log10(0.5))
  assert levels[1] == -np.inf


def test_chroma_agreement_identical_and_orthogonal():
  a = _tone(220.0) + _tone(330.0)  # A3 and E4.
  assert mm.chroma_agreement(a, 0.5 * a) == pytest.approx(1.0, abs=1e-6)
  assert mm.chroma_agreement(a, _tone(440.0)) > 0.5  # Shares pitch class A.
  c_sharp = _tone(277.18)  # C#4: no pitch class in common with A and E.
  assert mm.chroma_agreement(a, c_sharp) < 0.05
  assert np.isnan(mm.chroma_agreement(a, np.zeros_like(a)))


def test_harmonic_chroma_agreement_pairs():
  a = _tone(110.0)
  piece = np.stack([a, np.zeros_like(a), _tone(220.0), _tone(440.0)])
  scores = mm.harmonic_chroma_agreement(piece[None])
  assert set(scores) == {"bass-guitar", "bass-piano", "guitar-piano", "mean"}
  assert scores["mean"] > 0.9


def _clicks(times, seconds=4.0, sr=SR, freq=None):
  """Noise bursts (drum hits), or decaying tones (bass notes) when `freq` is given."""
  x = np.zeros(int(seconds * sr), np.float32)
  if freq is None:
    burst = np.random.default_rng(0).normal(size=int(0.03 * sr)).astype(np.float32)
    burst *= np.exp(-np.arange(burst.size) / (0.008 * sr)).astype(np.float32)
  else:
    burst = _tone(freq, 0.3, sr, 1.0)
    burst *= np.exp(-np.arange(burst.size) / (0.04 * sr)).astype(np.float32)
  for t in times:
    start = int(t * sr)
    x[start:start + burst.size] += burst
  return x


def test_onset_f_measure_matching():
  assert mm.onset_f_measure([1.0, 2.0], [1.04, 2.0]) == 1.0
  assert mm.onset_f_measure([1.0, 2.0], [1.2, 2.2]) == 0.0
  assert mm.onset_f_measure([1.0, 2.0], [1.0]) == pytest.approx(2 / 3)
  assert mm.onset_f_measure([], []) == 1.0


def test_peak_picking_is_librosas_greedy_rule():
  # librosa.onset.onset_detect's windows at 22.05 kHz, hop 256: max over 2 frames before and
  # the frame itself, mean over 8 before and 8 after, delta 0.07, 2 frames' wait.
  settings = dict(pre_max=2, post_max=1, pre_avg=8, post_avg=9, delta=0.07, wait=2)
  x = np.zeros(40)
  x[5], x[6] = 1.0, 0.9  # 6 is neither a maximum nor past the wait
  x[20], x[21] = 0.5, 0.6  # 20 is the maximum of its window (which ends at it); 21 waits
  x[30] = 0.05  # a maximum, but not delta above its window's mean
  np.testing.assert_array_equal(mm.peak_pick(x, **settings), [5, 20])
  # Compared with librosa 0.11's onset_detect on 300 random envelopes (uniform, heavy-tailed
  # and with plateaus, at 22.05, 16 and 44.1 kHz): the same onsets every time.
  times = mm.onset_times(np.concatenate([np.zeros(4096), np.ones(4096) * 0.5]), 22050)
  assert len(times) == 1 and abs(times[0] - 4096 / 22050) < 0.03, times


def test_drum_bass_alignment_aligned_vs_shifted():
  times = np.arange(0.5, 3.6, 0.5)
  drums = _clicks(times)
  aligned = _clicks(times, freq=80.0)
  shifted = _clicks(times[:-1] + 0.2, freq=80.0)
  found = mm.onset_times(drums)
  assert mm.onset_f_measure(times, found) == 1.0
  silent = np.zeros_like(drums)
  aligned_piece = np.stack([aligned, drums, silent, silent])[None]
  shifted_piece = np.stack([shifted, drums, silent, silent])[None]
  assert mm.drum_bass_onset_alignment(aligned_piece) == 1.0
  assert mm.drum_bass_onset_alignment(shifted_piece) < 0.2


def _pieces(rng, count, joint):
  """Four-stem pieces, each with its rhythm and pitch class; with `joint` the stems of a piece
  share them (bass on the drums' hits, every harmonic stem in one pitch class), otherwise
  every stem draws its own."""
  def draw():
    return np.sort(rng.choice(np.arange(0.3, 3.4, 0.25), 6, replace=False)), rng.integers(12)
  pieces = []
  for _ in range(count):
    (times, pitch_class), draws = draw(), [draw() for _ in range(3)]
    if joint:
      draws = [(times, pitch_class)] * 3
    drums = _clicks(times)
    bass = _clicks(draws[0][0], freq=110.0 * 2 ** (draws[0][1] / 12))
    guitar = _tone(220.0 * 2 ** (draws[1][1] / 12), 4.0, amplitude=0.1)
    piano = _tone(440.0 * 2 ** (draws[2][1] / 12), 4.0, amplitude=0.1)
    pieces.append(np.stack([bass, drums, guitar, piano]))
  return np.stack(pieces)


def test_cross_stem_dependence_of_joint_and_of_independent_stems():
  rng = np.random.default_rng(0)
  joint = mm.cross_stem_dependence(_pieces(rng, 8, joint=True), SR, bootstrap_samples=100)
  independent = mm.cross_stem_dependence(_pieces(rng, 8, joint=False), SR,
                                         bootstrap_samples=100)
  for name in (mm.HARMONIC_CHROMA, mm.DRUM_BASS_ONSETS):
    scores = joint[name]
    assert scores["same pieces"] > 0.75
    assert scores["dependence"] == pytest.approx(scores["same pieces"] - scores["other pieces"])
    # Stems that belong together: their own piece's partner beats any other piece's.
    assert 0.4 < scores["low"] <= scores["dependence"] <= scores["high"]
    # Stems drawn each on their own: about as related within a piece as across pieces
    # (8 pieces: a 95 % interval may miss 0 by chance, so the bound is on the value).
    assert abs(independent[name]["dependence"]) < 0.15 < scores["low"]
  # The existing measures are the "same pieces" values.
  pieces = _pieces(np.random.default_rng(1), 3, joint=True)
  scores = mm.cross_stem_dependence(pieces, SR, bootstrap_samples=10)
  assert scores[mm.HARMONIC_CHROMA]["same pieces"] == pytest.approx(
      mm.harmonic_chroma_agreement(pieces, SR)["mean"])
  assert scores[mm.DRUM_BASS_ONSETS]["same pieces"] == pytest.approx(
      mm.drum_bass_onset_alignment(pieces, SR))
  single = mm.cross_stem_dependence(pieces[:1], SR, bootstrap_samples=10)
  assert single[mm.DRUM_BASS_ONSETS]["same pieces"] == 1.0
  assert np.isnan(single[mm.DRUM_BASS_ONSETS]["dependence"])


def test_stems_of_other_pieces_are_paired_cyclically():
  times = [np.arange(0.5, 3.6, 0.5), np.arange(0.75, 3.6, 0.5)]
  pieces = np.stack([np.stack([_clicks(t, freq=80.0), _clicks(t), 0 * _clicks(t),
                               0 * _clicks(t)]) for t in times])
  assert mm.drum_bass_onset_values(pieces, SR).tolist() == [1.0, 1.0]
  assert mm.drum_bass_onset_values(pieces, SR, partner_offset=1).tolist() == [0.0, 0.0]
  assert mm.drum_bass_onset_values(pieces, SR, partner_offset=2).tolist() == [1.0, 1.0]


def test_reconstruction_quality():
  rng = np.random.default_rng(1)
  reference = rng.normal(size=(2, 4, SR // 2)).astype(np.float32) * 0.1
  reference[:, 3] = 0.0  # A silent stem is skipped.
  noisy = reference + 0.01 * rng.normal(size=reference.shape).astype(np.float32)
  scores = mm.reconstruction_quality(noisy, reference)
  assert scores["bass"]["si_sdr"] == pytest.approx(20.0, abs=0.5)
  assert scores["bass"]["mel_distance"] > 0
  assert np.isnan(scores["piano"]["si_sdr"])
  exact = mm.reconstruction_quality(reference, reference)
  assert exact["drums"]["mel_distance"] == pytest.approx(0.0, abs=1e-6)
  assert exact["drums"]["level_change_db"] == pytest.approx(0.0, abs=1e-6)
  # Half the amplitude: SI-SDR does not see it, the level change does (20·log10 0.5).
  quiet = mm.reconstruction_quality(0.5 * reference, reference)
  assert quiet["bass"]["si_sdr"] > 60
  assert quiet["bass"]["level_change_db"] == pytest.approx(-6.02, abs=0.01)
  assert np.isnan(quiet["piano"]["level_change_db"])
  silent = mm.reconstruction_quality(np.zeros_like(reference), reference)
  assert silent["guitar"]["level_change_db"] == -np.inf


def test_reconstruction_quality_scores_the_same_a_few_pieces_at_a_time():
  # The study's reference set in one call needed 34 GB; the scores come in fixed-size calls
  # (the last one padded), and are those of one call over all the pieces.
  rng = np.random.default_rng(2)
  reference = rng.normal(size=(5, 4, SR // 4)).astype(np.float32) * 0.1
  reference[1, 2] = 0.0
  reconstructed = reference + 0.03 * rng.normal(size=reference.shape).astype(np.float32)
  together = mm.reconstruction_quality(reconstructed, reference, pieces_per_call=5)
  for size in (1, 2):
    apart = mm.reconstruction_quality(reconstructed, reference, pieces_per_call=size)
    for stem, scores in together.items():
      for name, value in scores.items():
        assert apart[stem][name] == pytest.approx(value, rel=1e-5), (size, stem, name)


def test_statistics_embedding():
  x = _tone(220.0, 3.5)
  emb = statistics_embedding.embed(x)
  assert emb.shape == (3, statistics_embedding.EMBEDDING_DIM)
  assert np.all(np.isfinite(emb))
  assert np.all(np.isfinite(statistics_embedding.embed(np.zeros(SR))))
  assert not np.allclose(emb[0], statistics_embedding.embed(_tone(330.0, 1.0))[0])
  # The chroma means peak at pitch class A (9).
  chroma_mean = emb[0, 2 * (statistics_embedding.N_MELS + statistics_embedding.N_MFCC):][:12]
  assert np.argmax(chroma_mean) == 9
  with pytest.raises(ValueError, match="shorter"):
    statistics_embedding.embed(np.zeros(100))
