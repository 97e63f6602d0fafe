"""Cross-stem information in latents (evaluation/latent_dependence.py): zero where the network
cannot use the other stems, positive where it does and the data pairs them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msldm_jax.diffusion import edm
from msldm_jax.evaluation import latent_dependence
from msldm_jax.evaluation import stage as evaluation_stage
from msldm_jax.latents import store
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import loading

import network_helpers  # pylint: disable=g-bad-import-order

DIM, FRAMES, SIGMA = 4, 8, 0.3


class _ChannelMix(nn.Module):
  """F(x_in) = W·x_in over channels: the best linear denoiser of a known Gaussian model."""
  kernel: tuple

  @nn.compact
  def __call__(self, x, c_noise):
    del c_noise
    return jnp.einsum("oc,bct->bot", jnp.asarray(self.kernel, jnp.float32), x)


def _copies_of_one_stem(count: int, seed: int = 0) -> np.ndarray:
  """[count, 2, DIM, FRAMES]: two stems that are the same N(0, σ_d²) signal."""
  z = np.random.default_rng(seed).normal(0.0, edm.SIGMA_DATA, (count, 1, DIM, FRAMES))
  return np.repeat(z, 2, axis=1).astype(np.float32)


def _two_copy_denoiser(use_other: bool) -> loading.Loaded:
  """For stems that are copies: the least-squares F at σ from both stems' inputs (each
  stem's target correlates with the other's input, not with its own), or an F that reads
  its own stem's input alone."""
  k2 = 1.0 / (SIGMA**2 + edm.SIGMA_DATA**2)
  own_cov, cross_cov = 1.0, k2 * edm.SIGMA_DATA**2  # of the inputs c_in·(x + σn)
  target_own, target_other = 0.0, k2 * SIGMA * edm.SIGMA_DATA  # target's covariances
  if use_other:
    alpha, beta = np.linalg.solve([[own_cov, cross_cov], [cross_cov, own_cov]],
                                  [target_own, target_other])
  else:
    # Any weight on its own input: the loss then depends on nothing else.
    alpha, beta = 0.5, 0.0
  eye = np.eye(DIM)
  kernel = np.block([[alpha * eye, beta * eye], [beta * eye, alpha * eye]])
  module = _ChannelMix(tuple(map(tuple, kernel.tolist())))
  return loading.Loaded(module, {}, {})


def test_derangement_pairs_every_chunk_with_another():
  for count in (2, 3, 17):
    partner = latent_dependence.derangement(count, seed=count)
    assert sorted(partner) == list(range(count))
    assert np.all(partner != np.arange(count))
  with pytest.raises(ValueError, match="at least 2 chunks"):
    latent_dependence.derangement(1, seed=0)


def test_a_network_that_reads_the_other_stem_gains_from_it():
  latents = _copies_of_one_stem(64)
  rows = latent_dependence.cross_stem_information(
      _two_copy_denoiser(use_other=True), latents, stem_names=("a", "b"), sigmas=(SIGMA,),
      noise_draws=4, bootstrap_samples=100)
  row = rows[f"a at σ={SIGMA:.3g}"]
  # Swapping in another chunk's copy turns the network's best clue into noise.
  assert row["low"] > 0 and row["relative"] > 0.2
  assert rows[f"all stems at σ={SIGMA:.3g}"]["low"] > 0


def test_a_network_that_ignores_the_other_stem_gains_nothing():
  latents = _copies_of_one_stem(32)
  rows = latent_dependence.cross_stem_information(
      _two_copy_denoiser(use_other=False), latents, stem_names=("a", "b"), sigmas=(SIGMA,))
  for row in rows.values():
    assert row["information"] == 0.0 and row["own"] == row["swapped"]


def test_the_independent_stems_network_has_exactly_none():
  """isldm: each stem's network sees its stem alone, so swapping the others changes nothing
  in any stem's loss, at any σ; a joint DiT of the same size does read them."""
  stems, channels = 4, 4 * DIM
  config = dit.model_config("tiny", in_channels=channels, dtype="float32")
  latents = np.random.default_rng(1).normal(0, 0.4, (6, stems, DIM, 16)).astype(np.float32)
  names = ("bass", "drums", "guitar", "piano")
  for independent, expect_zero in ((stems, True), (0, False)):
    model = denoisers.build(denoisers.DIT, config, independent)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, channels, 16)),
                                 jnp.zeros((1,)))
    # Random norm scales and output layers too: a fresh DiT's zero-initialised output
    # would ignore every input.
    params = network_helpers.perturbed(params, jax.random.key(1))
    rows = latent_dependence.cross_stem_information(
        loading.Loaded(model, params, {}), latents, stem_names=names, sigmas=(0.1, 1.0),
        batch_size=4, bootstrap_samples=20)
    assert len(rows) == 2 * (stems + 1)
    differences = np.array([row["information"] for row in rows.values()])
    if expect_zero:
      np.testing.assert_allclose(differences, 0.0, atol=1e-6)
    else:
      assert np.all(np.abs(differences[:-1]) > 1e-4)


def test_held_out_latents_come_from_the_denoisers_store_in_its_scale(tmp_path):
  rng = np.random.default_rng(2)
  splits = {name: rng.normal(size=(count, 2, DIM, FRAMES)).astype(np.float32)
            for name, count in (("train", 3), ("validation", 2), ("test", 1))}
  directory = str(tmp_path / "latents")
  store.write_latents(directory, splits, vae_identity={"params_sha256": "x"},
                      settings={"stems": ["a", "b"]})
  record = {"latents": {"latents_dir": directory, "sources": ["a", "b"], "scale": [2.0, 0.5]}}
  denoiser = loading.Loaded(_two_copy_denoiser(use_other=False).module, {}, record)
  latents, sources = latent_dependence.held_out_latents(denoiser, ("validation", "test"))
  assert sources == ("a", "b")
  expected = np.concatenate([splits["validation"], splits["test"]]) / np.array(
      [2.0, 0.5], np.float32)[None, :, None, None]
  np.testing.assert_allclose(latents, expected, rtol=1e-6)

  # The evaluation leaves the table out, with a warning, where it cannot pair chunks or the
  # store lacks a split; an import records no store at all.
  config = ml_collections.ConfigDict(dict(
      evaluate=dict(reference_split="test", max_reference_chunks=0, seed=0,
                    bootstrap_samples=10), ldm=dict(sigma_data=0.4)))
  assert evaluation_stage.latent_information_table(config, denoiser, str(tmp_path)) == {}
  config.evaluate.reference_split = "holdout"
  assert evaluation_stage.latent_information_table(config, denoiser, str(tmp_path)) == {}
  imported = loading.Loaded(denoiser.module, {}, {"format": "imported"})
  assert evaluation_stage.latent_information_table(config, imported, str(tmp_path)) == {}
  assert not (tmp_path / "cross_stem_information.md").exists()
  config.evaluate.reference_split = "validation"
  rows = evaluation_stage.latent_information_table(config, denoiser, str(tmp_path))
  assert len(rows) == 3 * len(latent_dependence.SIGMAS)
  assert "| a at σ=0.0161 |" in (tmp_path / "cross_stem_information.md").read_text()
