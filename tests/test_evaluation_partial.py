"""The evaluation's partial-generation runs: one program for every subset of given stems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax import joint_latent
from msldm_jax.evaluation import partial_generation
from msldm_jax.diffusion import generation_program
from msldm_jax.generation import stage
from msldm_jax.models import dit
from msldm_jax.models import source_vae


@pytest.fixture(scope="module")
def setup():
  config = config_loading.load_config("configs/demo.py:variant=tiny")
  config.sample.num_steps = 4
  vae = source_vae.SourceVAE.from_config(config.vae.model)
  vae_params = source_vae.init_params(vae, jax.random.key(0))
  channels = 4 * config.vae.model.latent_dim
  config.ldm.model.in_channels = channels  # What the trainer resolves 0 to.
  denoiser = dit.build_model(config.ldm.model)
  variables = jax.jit(denoiser.init)(jax.random.key(1), jnp.zeros((1, channels, 32)),
                                     jnp.zeros((1,)))
  rng = np.random.default_rng(0)
  leaves, treedef = jax.tree.flatten(variables)
  denoiser_params = jax.tree.unflatten(treedef, [
      leaf + rng.normal(scale=0.05, size=leaf.shape).astype(np.float32) for leaf in leaves])
  spec = stage.make_spec(config, vae, denoiser)
  samples = int(config.data.chunks.samples)
  chunks = 0.3 * rng.standard_normal((2, 4, samples)).astype(np.float32)
  return config, spec, vae_params, denoiser_params, chunks


def test_runs_keep_given_stems_and_generate_the_subset(setup):
  _, spec, vae_params, denoiser_params, chunks = setup
  subsets = [("bass",), ("drums", "guitar", "piano")]
  runs = partial_generation.partial_generation_runs(
      spec, vae_params, denoiser_params, chunks, seed=0, batch_size=3, subsets=subsets)
  assert list(runs) == ["bass", "drums+guitar+piano"]
  bass = runs["bass"]
  assert bass.shape == chunks.shape
  np.testing.assert_array_equal(bass[:, 1:], chunks[:, 1:])  # Given: the originals.
  assert not np.allclose(bass[:, 0], chunks[:, 0])
  assert float(np.std(bass[:, 0])) > 0
  upper = runs["drums+guitar+piano"]
  np.testing.assert_array_equal(upper[:, 0], chunks[:, 0])
  # Same seed, same runs; the batch size does not change a piece.
  again = partial_generation.partial_generation_runs(
      spec, vae_params, denoiser_params, chunks, seed=0, batch_size=2, subsets=subsets)
  np.testing.assert_allclose(again["bass"], bass, rtol=1e-5, atol=1e-6)


def test_inpaint_batch_holds_each_pieces_own_given_latents(setup):
  _, spec, vae_params, denoiser_params, chunks = setup
  x_known = np.concatenate([np.asarray(generation_program.encode_given(vae_params, chunks[k:k + 1],
                                                             vae=spec.vae)) for k in range(2)])
  known = np.array([[False, True, True, True], [True, True, False, False]])
  latents, waveforms = generation_program.inpaint_batch(
      vae_params, denoiser_params, generation_program.piece_keys(0, [0, 1]), jnp.asarray(x_known),
      jnp.asarray(known), spec=spec)
  assert waveforms.shape[:2] == (2, 4)
  split_out = joint_latent.split_sources(np.asarray(latents))
  split_known = joint_latent.split_sources(x_known)
  for i in range(2):
    for s in range(4):
      if known[i, s]:
        np.testing.assert_array_equal(split_out[i, s], split_known[i, s])
      else:
        assert not np.allclose(split_out[i, s], split_known[i, s])


def test_errors_name_the_problem(setup):
  config, spec, vae_params, denoiser_params, chunks = setup
  with pytest.raises(ValueError, match="expected \\[chunks, 4 stems"):
    partial_generation.partial_generation_runs(spec, vae_params, denoiser_params,
                                               chunks[:, :2], seed=0, batch_size=1)
  partial_spec = stage.make_spec(config, spec.vae, spec.denoiser, ("bass",))
  with pytest.raises(ValueError, match="known values as data"):
    generation_program.inpaint_batch(vae_params, denoiser_params,
                                     generation_program.piece_keys(0, [0]),
                                     jnp.zeros((1, spec.channels, spec.num_frames)),
                                     jnp.ones((1, 4), bool), spec=partial_spec)
