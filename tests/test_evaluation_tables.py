"""FAD tables on synthetic pieces: known ordering, 14 partial rows, files written."""

import csv

import numpy as np
import pytest

from msldm_jax.evaluation import tables


def _embed(waveform):
  # A cheap stand-in embedding: per 0.1 s window, log energy in 4 coarse FFT bands + mean.
  windows = np.asarray(waveform).reshape(-1, 200)
  spectrum = np.abs(np.fft.rfft(windows, axis=-1)) ** 2
  bands = np.log(np.stack([b.sum(-1) for b in np.array_split(spectrum, 4, axis=-1)], -1)
                 + 1e-6)
  return np.concatenate([bands, windows.mean(-1, keepdims=True)], axis=-1)


@pytest.fixture(scope="module")
def audio():
  rng = np.random.default_rng(0)
  t = np.arange(2000) / 2000.0
  pieces = []
  for _ in range(6):
    freqs = rng.uniform([20, 100, 300, 600], [40, 150, 400, 800])
    pieces.append(np.stack([np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs]))
  return np.asarray(pieces, np.float32)


def test_proper_subsets():
  subsets = tables.proper_subsets()
  assert len(subsets) == 14
  assert subsets[0] == ("bass",) and subsets[-1] == ("drums", "guitar", "piano")


def test_total_generation_ordering(audio):
  same = tables.total_generation_scores(audio, audio, _embed)
  assert set(same) == {"mixture", "bass", "drums", "guitar", "piano"}
  assert all(v == pytest.approx(0.0, abs=1e-6) for v in same.values())
  noise = np.random.default_rng(1).normal(size=audio.shape).astype(np.float32)
  far = tables.total_generation_scores(noise, audio, _embed)
  assert all(v > 1.0 for v in far.values())


def test_partial_generation_rows_and_mapping(audio, tmp_path):
  scores = tables.partial_generation_scores(audio, audio, _embed)
  assert len(scores) == 14 and "bass+drums+guitar" in scores
  assert all(v == pytest.approx(0.0, abs=1e-6) for v in scores.values())
  noise = np.random.default_rng(2).normal(size=audio.shape).astype(np.float32)
  per_run = {label: audio for label in scores}
  per_run["bass"] = noise
  mixed = tables.partial_generation_scores(per_run, audio, _embed)
  assert mixed["bass"] > 1.0 and mixed["drums"] == pytest.approx(0.0, abs=1e-6)
  del per_run["piano"]
  with pytest.raises(KeyError, match="piano"):
    tables.partial_generation_scores(per_run, audio, _embed)

  paths = tables.write_score_table(str(tmp_path), "partial", mixed, "FD (test)")
  with open(paths["csv"]) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["stems", "FD (test)"] and len(rows) == 15
  assert "| bass+drums | " in open(paths["md"]).read()
  assert open(paths["png"], "rb").read(4) == b"\x89PNG"


def test_partial_mixture_scores_include_the_given_stems(audio, tmp_path):
  noise = np.random.default_rng(3).normal(size=audio.shape).astype(np.float32)
  # A run whose generated bass is noise: the bass row is far in both forms.
  per_run = {tables.subset_label(s): audio for s in tables.proper_subsets()}
  bad_bass = audio.copy()
  bad_bass[:, 0] = noise[:, 0]
  per_run["bass"] = bad_bass
  subsets = tables.partial_generation_scores(per_run, audio, _embed)
  mixtures = tables.partial_generation_scores(per_run, audio, _embed, mixture=True)
  assert subsets["bass"] > 1.0 and mixtures["bass"] > 0.01
  assert mixtures["drums"] == pytest.approx(0.0, abs=1e-6)
  # Scoring the mixture: a run that swapped the given stems for noise is penalised even
  # though its generated stem (drums) is perfect, which the subset form cannot see.
  bad_given = noise.copy()
  bad_given[:, 1] = audio[:, 1]
  per_run["drums"] = bad_given
  assert tables.partial_generation_scores(per_run, audio, _embed)["drums"] == pytest.approx(
      0.0, abs=1e-6)
  assert tables.partial_generation_scores(per_run, audio, _embed, mixture=True)["drums"] > 1.0

  table = {label: {"mixture": mixtures[label], "generated stems": subsets[label]}
           for label in subsets}
  paths = tables.write_score_table(str(tmp_path), "partial", table, "FD (test)")
  with open(paths["csv"]) as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["stems", "mixture (FD (test))", "generated stems (FD (test))"]
  assert len(rows) == 15 and float(rows[1][2]) == pytest.approx(subsets["bass"])
  with pytest.raises(ValueError, match="columns"):
    tables.write_score_table(str(tmp_path), "bad", {"a": {"x": 1.0}, "b": {"y": 2.0}}, "FD")
