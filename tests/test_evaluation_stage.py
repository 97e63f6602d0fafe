"""`--mode=all` on a tiny config: every stage in order, ending in the evaluation tables."""

import json

import numpy as np
import pytest

from msldm_jax import main
from msldm_jax.evaluation import latent_dependence


# Every stage, three times over: minutes on 2 CPU cores.
@pytest.mark.slow
def test_mode_all_runs_every_stage_then_skips_them(mini_dataset, tmp_path):
  config = mini_dataset.config()
  # The data stage still runs and builds; it finds the session's rendering in WORKDIR/minislakh
  # instead of rendering the same pieces again.
  mini_dataset.copy_rendering_to(tmp_path)
  # 72 latent frames: chunks just over the statistics embedding's 1 s window. (musicnn
  # needs 3 s patches, longer than the mini dataset's one 6 s test track has twice; the
  # main job in CI scores the demo with it, and tests/test_musicnn.py tests it.)
  config.data.chunks.samples = 320 * 72 - 8
  config.evaluate.embedding = "statistics"
  config.vae.train.num_steps = 2
  config.vae.train.checkpoint_every = 2
  config.vae.train.eval_every = 2
  config.ldm.train.num_steps = 2
  config.ldm.train.checkpoint_every = 2
  config.ldm.train.sample_every = 100
  config.sample.num_steps = 4
  config.sample.num_pieces = 2
  workdir = str(tmp_path)
  results = main.run("all", config, workdir)
  assert list(results) == list(main.ALL_STAGES)
  metrics = results["evaluate"]

  out = tmp_path / "evaluation"
  for name in ("total_generation.md", "total_generation.csv", "total_generation.png",
               "music_measures.md", "levels.md", "instrument_tags.md",
               "vae_reconstruction.md", "metrics.json"):
    assert (out / name).is_file(), name
  assert metrics["num_generated"] == 2
  assert metrics["embedding"] == "stats-logmel-mfcc-chroma"
  assert set(metrics["total_generation"]) == {"mixture", "bass", "drums", "guitar", "piano"}
  for row in metrics["total_generation"].values():
    kad, fd = row[""]["KAD ×100"], row[""]["FD"]
    # Every KAD has its interval and floor; FD of 2 one-window pieces is refused (2 < 192).
    assert np.isfinite([kad["value"], kad["low"], kad["high"], kad["floor"]]).all()
    assert kad["generated_windows"] == 2 and kad["reference_windows"] == metrics[
        "num_reference"]
    assert fd["value"] is None and "refused" in fd["note"]
  markdown = (out / "total_generation.md").read_text()
  assert "Embedding: stats-logmel-mfcc-chroma" in markdown and "floor" in markdown
  stored = json.loads((out / "metrics.json").read_text())
  assert stored["num_reference"] >= 1
  assert stored["num_reference"] <= stored["reference_split_chunks"]
  for side in ("generated", "real"):
    rates = metrics["music_measures"][side]
    assert 0.0 <= rates["empty stem rate (all)"] <= 1.0
    # Each cross-stem measure on stems of other pieces too, and the difference with its
    # interval (2 generated pieces: each pairs with the other).
    for name, scores in metrics["cross_stem_dependence"][side].items():
      np.testing.assert_equal(rates[f"{name}, dependence (own − other pieces)"],
                              scores["dependence"])
      np.testing.assert_allclose(scores["dependence"],
                                 scores["same pieces"] - scores["other pieces"], equal_nan=True)
  assert (out / "cross_stem_dependence.md").is_file()
  # The real chunks through the VAE too: the dependence a generator can reach through it.
  reconstructed = metrics["cross_stem_dependence"]["reconstructed"]
  assert set(reconstructed) == set(metrics["cross_stem_dependence"]["real"])
  for scores in reconstructed.values():
    np.testing.assert_allclose(scores["dependence"],
                               scores["same pieces"] - scores["other pieces"], equal_nan=True)
  assert "(reconstructed)" in (out / "cross_stem_dependence.md").read_text()
  # The same question asked of the denoiser in latents: a row per stem and σ, and all stems.
  information = metrics["cross_stem_information"]
  assert len(information) == 5 * len(latent_dependence.SIGMAS)
  for row in information.values():
    assert np.isfinite([row["own"], row["swapped"], row["low"], row["high"]]).all()
    np.testing.assert_allclose(row["information"], row["swapped"] - row["own"], rtol=1e-6,
                               atol=1e-9)
  assert "| piano at σ=" in (out / "cross_stem_information.md").read_text()
  assert set(metrics["levels"]) == {"bass", "drums", "guitar", "piano"}
  # Chunks shorter than the tagger's 3 s patch: nothing to tag, said so, not a crash.
  assert metrics["instrument_tags"]["real"]["piano"]["stems"] == 0
  # The 14 partial-generation rows, each scored as a mixture and as the generated stems.
  partial = metrics["partial_generation"]
  assert len(partial) == 14 and metrics["partial"]["partial_chunks"] == 2
  assert set(partial["bass+drums"]) == {"mixture", "generated stems"}
  assert all(np.isfinite(column["KAD ×100"]["value"])
             for row in partial.values() for column in row.values())
  assert "conditioning ones included" in (out / "partial_generation.md").read_text()
  assert (out / "partial_generation.md").read_text().count("| bass") == 7  # rows with bass first
  piece = out / "partial" / "drums+guitar+piano"
  assert (piece / "mix.wav").is_file() and (piece / "piece.json").is_file()
  assert json.loads((piece / "piece.json").read_text())["given"] == ["bass"]

  # Run again: every stage finished under this config, so nothing runs.
  assert main.run("all", config, workdir) == {}
  # Another config: every stage runs again, each resuming from what it already holds
  # (trainings are complete, latents are reused), and sampling and evaluation redo.
  config.sample.num_steps = 5
  assert list(main.run("all", config, workdir)) == list(main.ALL_STAGES)
