"""Distance tables on synthetic pieces: known ordering, 14 partial rows, files written."""

import csv

import numpy as np
import pytest

from msldm_jax.evaluation import distance_scores
from msldm_jax.evaluation import tables

KAD, FD = distance_scores.KAD, distance_scores.FD
PROTOCOL = distance_scores.Protocol(bootstrap_samples=50)


def _embed_one(waveform):
  # A cheap stand-in embedding: per 0.1 s window, log energy in 4 coarse FFT bands + mean.
  windows = np.asarray(waveform).reshape(-1, 200)
  spectrum = np.abs(np.fft.rfft(windows, axis=-1)) ** 2
  bands = np.log(np.stack([b.sum(-1) for b in np.array_split(spectrum, 4, axis=-1)], -1)
                 + 1e-6)
  return np.concatenate([bands, windows.mean(-1, keepdims=True)], axis=-1)


_embed = tables.per_waveform(_embed_one)


@pytest.fixture(scope="module")
def audio():
  rng = np.random.default_rng(0)
  t = np.arange(2000) / 2000.0
  pieces = []
  for _ in range(8):
    freqs = rng.uniform([20, 100, 300, 600], [40, 150, 400, 800])
    pieces.append(np.stack([np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs]))
  return np.asarray(pieces, np.float32)


def _real(audio):
  # Another draw of the same distribution of pieces.
  rng = np.random.default_rng(10)
  t = np.arange(audio.shape[-1]) / 2000.0
  return np.asarray([np.stack([np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in
                               rng.uniform([20, 100, 300, 600], [40, 150, 400, 800])])
                     for _ in range(len(audio))], np.float32)


def test_proper_subsets():
  subsets = tables.proper_subsets()
  assert len(subsets) == 14
  assert subsets[0] == ("bass",) and subsets[-1] == ("drums", "guitar", "piano")


def test_total_generation_ordering(audio):
  same = tables.total_generation_scores(_real(audio), audio, _embed, PROTOCOL)
  assert set(same) == {"mixture", "bass", "drums", "guitar", "piano"}
  noise = np.random.default_rng(1).normal(size=audio.shape).astype(np.float32)
  far = tables.total_generation_scores(noise, audio, _embed, PROTOCOL)
  for row in same:
    # Noise is clearly worse than another sample of the real distribution, whose interval
    # reaches down to the floor's.
    assert far[row][KAD].low > same[row][KAD].high
    assert same[row][KAD].low <= same[row][KAD].floor_high
    # 8 pieces × 10 windows = 80 windows against 5 dimensions: FD is computed.
    assert far[row][FD].value > same[row][FD].value
    assert far[row][KAD].generated_windows == 80


def test_total_generation_through_the_vae_and_its_column(audio, tmp_path):
  # A codec that returns noise: each row's ceiling far above its floor (halves of 4 pieces,
  # so the floor's own interval is wide).
  noisy = np.random.default_rng(1).normal(size=audio.shape).astype(np.float32)
  scores = tables.total_generation_scores(_real(audio), audio, _embed, PROTOCOL,
                                          reconstructed=noisy)
  for row in scores.values():
    assert row[KAD].through_vae_low > row[KAD].floor
  # The mixture's ceiling is that of the reconstructed stems' sum.
  mixture = distance_scores.score(
      tables.embed_pieces(_real(audio).sum(axis=1), _embed),
      tables.embed_pieces(audio.sum(axis=1), _embed), PROTOCOL,
      tables.embed_pieces(noisy.sum(axis=1), _embed))
  assert scores["mixture"][KAD] == mixture[KAD]
  tables.write_distance_table(str(tmp_path), "total", {r: {"": s} for r, s in scores.items()},
                              "toy")
  markdown = (tmp_path / "total.md").read_text()
  assert f"| {KAD} through the VAE |" in markdown and "Through the VAE:" in markdown
  with open(tmp_path / "total.csv") as f:
    rows = list(csv.DictReader(f))
  assert all(float(r["through_vae"]) > float(r["floor"]) for r in rows if r["measure"] == KAD)
  with pytest.raises(ValueError, match="must have the reference's shape"):
    tables.total_generation_scores(audio, audio, _embed, PROTOCOL, reconstructed=audio[:4])


def test_embedding_shape_errors(audio):
  with pytest.raises(ValueError, match=r"expected \[pieces, windows, d\]"):
    tables.total_generation_scores(audio, audio, lambda w: np.zeros((len(w), 3)), PROTOCOL)
  with pytest.raises(ValueError, match="shorter than one window"):
    tables.total_generation_scores(audio, audio, lambda w: np.zeros((len(w), 0, 3)),
                                   PROTOCOL)


def test_partial_generation_rows_and_mapping(audio, tmp_path):
  real = _real(audio)
  scores = tables.partial_generation_scores(real, audio, _embed, PROTOCOL)
  assert len(scores) == 14 and "bass+drums+guitar" in scores
  noise = np.random.default_rng(2).normal(size=audio.shape).astype(np.float32)
  per_run = {label: real for label in scores}
  per_run["bass"] = noise
  mixed = tables.partial_generation_scores(per_run, audio, _embed, PROTOCOL)
  assert mixed["bass"][KAD].low > mixed["drums"][KAD].high
  assert mixed["drums"][KAD] == scores["drums"][KAD]
  del per_run["piano"]
  with pytest.raises(KeyError, match="piano"):
    tables.partial_generation_scores(per_run, audio, _embed, PROTOCOL)

  table = {label: {"generated stems": s} for label, s in mixed.items()}
  paths = tables.write_distance_table(str(tmp_path), "partial", table, "test-embedding",
                                      notes=["a note"])
  with open(paths["csv"]) as f:
    rows = list(csv.reader(f))
  assert rows[0][:4] == ["stems", "column", "measure", "value"]
  assert len(rows) == 1 + 14 * 2  # a row per subset and measure
  markdown = open(paths["md"]).read()
  assert "Embedding: test-embedding" in markdown and "a note" in markdown
  assert "| bass+drums | " in markdown and "floor" in markdown
  assert f"{mixed['bass'][KAD].value:.2f} [" in markdown
  assert open(paths["png"], "rb").read(4) == b"\x89PNG"


def test_partial_mixture_scores_include_the_given_stems(audio):
  real = _real(audio)
  noise = np.random.default_rng(3).normal(size=audio.shape).astype(np.float32)
  per_run = {tables.subset_label(s): real for s in tables.proper_subsets()}
  # A run that swapped the given stems for noise: its generated stem (drums) is perfect,
  # which the subset form sees, but the mixture form penalises the run.
  bad_given = noise.copy()
  bad_given[:, 1] = real[:, 1]
  per_run["drums"] = bad_given
  subsets = tables.partial_generation_scores(per_run, audio, _embed, PROTOCOL)
  mixtures = tables.partial_generation_scores(per_run, audio, _embed, PROTOCOL, mixture=True)
  assert subsets["drums"][KAD] == tables.partial_generation_scores(
      real, audio, _embed, PROTOCOL)["drums"][KAD]
  assert mixtures["drums"][KAD].low > mixtures["bass"][KAD].high


def test_refused_fd_is_written_as_such(audio, tmp_path):
  # 3 pieces × 1 window of a 5-dimensional embedding: FD refused, KAD reported.
  one_window = tables.per_waveform(lambda w: _embed_one(w)[:1])
  scores = tables.total_generation_scores(audio[:3], audio, one_window, PROTOCOL)
  assert scores["mixture"][FD].value is None and scores["mixture"][KAD].value is not None
  paths = tables.write_distance_table(str(tmp_path), "total",
                                      {r: {"": s} for r, s in scores.items()}, "e")
  assert "refused: 3 windows < 5 dimensions" in open(paths["md"]).read()


def test_plot_takes_intervals_that_miss_the_value(tmp_path):
  # A skewed bootstrap can put the value outside its percentile interval; NaN bounds when
  # no draw was defined. The table and plot are still written.
  skewed = distance_scores.Score(KAD, 5.0, 6.0, 9.0, 0.0, -1.0, 1.0, 2, 2)
  undefined = distance_scores.Score(KAD, 5.0, float("nan"), float("nan"), None, None, None,
                                    2, 2)
  paths = tables.write_distance_table(str(tmp_path), "t", {"a": {"": {KAD: skewed}},
                                                           "b": {"": {KAD: undefined}}}, "e")
  assert open(paths["png"], "rb").read(4) == b"\x89PNG"
  assert "5.00 [6.00, 9.00]" in open(paths["md"]).read()
