"""The evaluation's protocol: which real chunks, which pieces, levels, instrument tags."""

import functools

import numpy as np
import pytest

from msldm_jax.evaluation import instrument_tags
from msldm_jax.evaluation import musicnn
from msldm_jax.evaluation import reference_set
from msldm_jax.evaluation import stage


def test_reference_is_the_whole_split_or_a_seeded_random_sample(mini_dataset):
  config = mini_dataset.config()
  config.data.chunks.samples = 320 * 72 - 8  # 0.52 s: the test track gives 7 chunks
  everything, total = reference_set.read_reference_chunks(
      config, mini_dataset.workdir, "test", max_chunks=1000, seed=0)
  assert len(everything) == total >= 7
  sample, total_again = reference_set.read_reference_chunks(
      config, mini_dataset.workdir, "test", max_chunks=3, seed=0)
  assert total_again == total and len(sample) == 3
  # Each sampled chunk is one of the split's, in split order, and not simply the first 3.
  index = [next(i for i, c in enumerate(everything) if np.array_equal(c, s)) for s in sample]
  assert index == sorted(index) and index != [0, 1, 2]
  again, _ = reference_set.read_reference_chunks(config, mini_dataset.workdir, "test", 3,
                                                 seed=0)
  np.testing.assert_array_equal(again, sample)
  other = [reference_set.read_reference_chunks(config, mini_dataset.workdir, "test", 3,
                                               seed=s)[0] for s in (1, 2, 3)]
  assert any(not np.array_equal(o, sample) for o in other)


def test_several_held_out_splits_make_one_reference(mini_dataset):
  config = mini_dataset.config()
  config.data.chunks.samples = 320 * 72 - 8
  read = functools.partial(reference_set.read_reference_chunks, config,
                           mini_dataset.workdir, max_chunks=1000, seed=0)
  test, in_test = read("test")
  validation, in_validation = read("validation")
  both, in_both = read("validation+test")
  assert in_both == in_validation + in_test
  np.testing.assert_array_equal(both, np.concatenate([validation, test]))
  assert reference_set.split_names("validation+test") == ("validation", "test")
  assert reference_set.splits_label("validation+test") == "the 'validation' and 'test' splits"
  for bad in ("test+test", "validation+", ""):
    with pytest.raises(ValueError, match="evaluate.vae_split"):
      reference_set.split_names(bad, "evaluate.vae_split")
  with pytest.raises(ValueError, match="'tset' is not in the dataset"):
    reference_set.read_reference_chunks(config, mini_dataset.workdir, "test+tset", 10, 0)


def test_non_finite_pieces_are_left_out_and_said_so():
  audio = np.zeros((4, 4, 100), np.float32)
  audio[1, 2, 5] = np.nan
  kept, notes = stage.finite_pieces(audio, "generated pieces")
  assert len(kept) == 3 and notes == [
      "1 of 4 generated pieces have non-finite (NaN/inf) samples and are left out of every "
      "score."]
  assert stage.finite_pieces(audio[[0, 2]], "x")[1] == []
  audio[:, 0, 0] = np.inf
  with pytest.raises(ValueError, match="Fewer than 2 remain"):
    stage.finite_pieces(audio, "generated pieces")


def test_level_table():
  rng = np.random.default_rng(0)
  reference = rng.normal(size=(20, 4, 1000)) * 0.1  # -20 dB
  generated = rng.normal(size=(5, 4, 1000)) * 0.01  # -40 dB: 20 dB too quiet
  audible = np.ones((20, 4), bool)
  rows = stage.level_table(generated, reference, audible[:5], audible)
  assert rows["bass"]["real median dB"] == pytest.approx(-20, abs=0.5)
  assert rows["bass"]["generated median dB"] == pytest.approx(-40, abs=0.5)
  assert rows["bass"]["generated within real 5-95 %"] == 0.0
  assert "reconstructed median dB" not in rows["bass"]
  # The real chunks through a VAE that plays them 6 dB quiet, over the audible ones only.
  reconstructed = 0.5 * reference
  reconstructed[10:, 2] = 0.0
  quiet_guitar = audible.copy()
  quiet_guitar[10:, 2] = False
  rows = stage.level_table(generated, reference, audible[:5], quiet_guitar,
                           reconstructed=reconstructed)
  assert rows["bass"]["reconstructed median dB"] == pytest.approx(-26.0, abs=0.5)
  assert rows["guitar"]["reconstructed median dB"] == pytest.approx(-26.0, abs=0.5)
  quiet = audible.copy()
  quiet[:, 1] = False
  assert np.isnan(stage.level_table(generated, reference, quiet[:5], quiet)["drums"][
      "generated median dB"])


def test_recognition_counts_audible_stems_and_ranks_instrument_tags():
  labels = musicnn.MTT_LABELS
  audio = np.zeros((3, 4, 10), np.float32)

  def tag_fn(waveforms):
    # Every stem "sounds like" a piano, except that 'drums' scores highest overall for
    # the second piece — 'techno' (not an instrument tag) is ignored.
    probabilities = np.zeros((len(waveforms), 2, len(labels)))
    probabilities[..., labels.index("piano")] = 0.6
    probabilities[..., labels.index("techno")] = 0.9
    return probabilities, labels

  audible = np.ones((3, 4), bool)
  audible[0, 3] = False
  result = instrument_tags.recognition(audio, tag_fn, audible)
  assert result["piano"] == {"recognised": 1.0, "stems": 2}
  assert result["guitar"] == {"recognised": 0.0, "stems": 3}
  silent = instrument_tags.recognition(audio, tag_fn, np.zeros((3, 4), bool))
  assert silent["drums"]["stems"] == 0 and np.isnan(silent["drums"]["recognised"])
  assert instrument_tags.top_instruments(
      np.eye(len(labels))[[labels.index("harp")]], labels) == ["harp"]
