"""The VAE's own score (`--mode=evaluate_vae`, evaluation/vae_quality.py): reconstruction
measures and instrument tags of reconstructions against the real stems."""

import numpy as np
import pytest

from msldm_jax import stems
from msldm_jax.evaluation import instrument_tags
from msldm_jax.evaluation import musicnn
from msldm_jax.evaluation import vae_quality
from msldm_jax.models import loading

SAMPLES = stems.SAMPLE_RATE  # one second
# A stand-in tagger that hears the instrument in the pitch: the tag of the sine's frequency.
PITCH_TAGS = {200: "guitar", 400: "piano", 800: "drums"}
LABELS = ["rock", *instrument_tags.INSTRUMENT_TAGS]


def _sine(hz: float) -> np.ndarray:
  return 0.3 * np.sin(2 * np.pi * hz * np.arange(SAMPLES) / stems.SAMPLE_RATE)


def _pitch_tagger(waveforms):
  spectrum = np.abs(np.fft.rfft(np.asarray(waveforms), axis=-1))
  peaks = np.argmax(spectrum, axis=-1) * stems.SAMPLE_RATE / waveforms.shape[-1]
  probabilities = np.zeros((len(waveforms), 1, len(LABELS)), np.float32)
  for i, hz in enumerate(peaks):
    tag = PITCH_TAGS.get(int(round(hz)), "flute")
    probabilities[i, 0, LABELS.index(tag)] = 1.0
  return probabilities, LABELS


def test_reconstructions_are_tagged_beside_the_real_stems():
  # Stems in stems.STEM_NAMES order (bass, drums, guitar, piano); two chunks.
  real = np.stack([np.stack([_sine(100), _sine(800), _sine(200), _sine(400)])] * 2)
  real[1, 2] = 0.0  # an empty guitar stem: nothing to recognise, left out of its share
  reconstructed = real.copy()
  reconstructed[:, 3] = _sine(1000)  # the piano comes back at another pitch
  reconstructed[0, 1] *= 0.5  # the drums come back quieter, same instrument

  scores = vae_quality.reconstruction_scores(reconstructed, real, stems.STEM_NAMES,
                                             _pitch_tagger)

  right, real_right = vae_quality.TAGGED_RECONSTRUCTED, vae_quality.TAGGED_REAL
  assert scores["guitar"][right] == 1.0 and scores["guitar"][real_right] == 1.0
  assert scores["drums"][right] == 1.0
  assert scores["piano"][right] == 0.0 and scores["piano"][real_right] == 1.0
  assert np.isnan(scores["bass"][right]) and np.isnan(scores["bass"][real_right])
  # The measures beside them: exact for the guitar, none of the piano's signal kept.
  assert scores["guitar"]["si_sdr"] > 60 and scores["guitar"]["mel_distance"] < 1e-3
  assert scores["piano"]["si_sdr"] < -20 and scores["piano"]["mel_distance"] > 1.0
  assert scores["drums"]["si_sdr"] > 60  # SI-SDR does not see the level


def test_a_mixture_vae_has_no_tags_to_check():
  real = np.stack([_sine(200)[None], _sine(400)[None]])
  called = []
  scores = vae_quality.reconstruction_scores(real * 0.9, real, (stems.MIXTURE,),
                                             lambda w: called.append(w))
  assert not called and list(scores) == [stems.MIXTURE]
  assert np.isnan(scores[stems.MIXTURE][vae_quality.TAGGED_RECONSTRUCTED])
  assert scores[stems.MIXTURE]["si_sdr"] > 60


def test_no_vae_is_one_clear_error(tmp_path, mini_dataset):
  config = mini_dataset.config()
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "nothing")):
    vae_quality.run(config, str(tmp_path / "nothing"))


def test_a_reference_is_decoded_once_per_vae(monkeypatch):
  # The study evaluates its systems that share a VAE against one reference set in one
  # process: the second evaluation gets the first one's reconstructions, read-only; another
  # VAE (by its parameters' hash) or other chunks are decoded again.
  calls = []

  def fake_reconstruct(vae, reference, sources):
    calls.append(vae.identity.get("params_sha256"))
    return reference * 0.5

  monkeypatch.setattr(vae_quality, "_reconstruct", fake_reconstruct)
  real = np.stack([np.stack([_sine(100), _sine(800), _sine(200), _sine(400)])] * 2)
  vae = loading.Loaded("module", {}, {"params_sha256": "a"})
  first = vae_quality.reconstruct(vae, real)
  again = vae_quality.reconstruct(loading.Loaded("module", {}, {"params_sha256": "a"}),
                                  real.copy())
  assert again is first and calls == ["a"]
  np.testing.assert_array_equal(first, real * 0.5)
  with pytest.raises(ValueError, match="read-only"):
    first[0, 0, 0] = 1.0
  other_chunks = real.copy()
  other_chunks[1, 0, 5] += 0.1
  vae_quality.reconstruct(vae, other_chunks)
  vae_quality.reconstruct(loading.Loaded("module", {}, {"params_sha256": "b"}), real)
  assert calls == ["a", "a", "b"]
  # The last two are kept (the study's mixture VAE comes between two systems of the stems').
  assert vae_quality.reconstruct(vae, other_chunks) is not first and calls == ["a", "a", "b"]
  vae_quality.reconstruct(vae, real)
  assert calls == ["a", "a", "b", "a"]
  unnamed = loading.Loaded("module", {}, {})
  vae_quality.reconstruct(unnamed, real)
  vae_quality.reconstruct(unnamed, real)
  assert calls == ["a", "a", "b", "a", None, None]


def test_the_tagger_does_not_tag_the_same_waveforms_twice(monkeypatch):
  # An evaluation tags the real stems for its instrument table and again for its VAE's
  # reconstruction table; the study's systems that share a VAE tag the same stems again.
  tagged = []

  def fake_tag_batch(loaded, waveforms, sample_rate):
    tagged.append(len(waveforms))
    labels = musicnn.LABELS[musicnn.TAGGER]
    probabilities, ours = _pitch_tagger(waveforms)
    # The stand-in's tags in the tagger's label order.
    return np.stack([probabilities[..., ours.index(tag)] if tag in ours
                     else np.zeros(probabilities.shape[:2], np.float32) for tag in labels], -1)

  monkeypatch.setattr(instrument_tags.musicnn, "load", lambda model: "tagger")
  monkeypatch.setattr(instrument_tags.musicnn, "tag_batch", fake_tag_batch)
  real = np.stack([np.stack([_sine(100), _sine(800), _sine(200), _sine(400)])] * 2)
  audible = np.ones((2, 4), bool)
  first = instrument_tags.recognition(real, instrument_tags.musicnn_tagger(16000), audible)
  again = instrument_tags.recognition(real.copy(), instrument_tags.musicnn_tagger(16000),
                                      audible)
  assert again == first and tagged == [2, 2, 2]  # guitar, piano, drums once each
  assert first["guitar"]["recognised"] == 1.0
  instrument_tags.recognition(real, instrument_tags.musicnn_tagger(22050), audible)
  other = real.copy()
  other[:, 2] *= 0.5
  instrument_tags.recognition(other, instrument_tags.musicnn_tagger(16000), audible)
  assert tagged == [2] * 7  # another rate: all three again; other guitars: the guitar
