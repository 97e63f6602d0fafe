"""benchmarks/latent_levels.py: sampled latents' loudness against the data's, checked where the
exact denoiser is known (Gaussian latents at σ_data: F = 0)."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from benchmarks import latent_levels
from msldm_jax.diffusion import edm
from msldm_jax.models import loading


class _Scaled(nn.Module):
  """F(x_in) = k·x_in. k = 0 is the exact denoiser of N(0, σ_data²) data (D = c_skip·x, the
  posterior mean); k > 0 adds the input back, k < 0 removes more of it than the noise."""
  k: float

  @nn.compact
  def __call__(self, x, c_noise):
    del c_noise
    return self.k * x


def _levels(k: float, sampler: str, steps: int, **settings) -> np.ndarray:
  denoiser = loading.Loaded(_Scaled(k), {}, {})
  latents = latent_levels.sample_latents(denoiser, sampler, {"num_steps": steps, **settings},
                                         pieces=64, seed=0, shape=(8, 64))
  assert latents.shape == (64, 8, 64)
  real_db = 20 * np.log10(edm.SIGMA_DATA)
  return latent_levels.levels_db(latents.reshape(64, 2, 4, 64)) - real_db


# Within sampling noise for the second-order samplers; Euler's first-order steps lose
# ~0.15 dB at 150 steps, and ~0.35 dB with the release's churn (measured here).
@pytest.mark.parametrize("sampler,steps,settings,tolerance", [
    ("heun", 18, {}, 0.15), ("dpmpp_2m", 25, {}, 0.15), ("euler_churn", 150, {}, 0.5),
    ("euler_churn", 150, {"s_churn": 0.0}, 0.3)])
def test_the_exact_denoiser_samples_at_the_datas_level(sampler, steps, settings, tolerance):
  np.testing.assert_allclose(_levels(0.0, sampler, steps, **settings), 0.0, atol=tolerance)


def test_a_denoiser_that_removes_too_much_samples_quiet():
  # F = −0.5·x_in: D below the posterior mean at every σ, so the samples lose energy.
  assert np.all(_levels(-0.5, "heun", 18) < -1.0)


def test_sampler_entries_are_parsed_and_checked():
  assert latent_levels.parse_sampler("euler_churn:150:s_churn=0") == (
      "euler_churn", {"num_steps": 150, "s_churn": 0.0})
  assert latent_levels.parse_sampler("heun:38") == ("heun", {"num_steps": 38})
  for bad in ("heun", "nope:10", "heun:10:s_churn"):
    with pytest.raises(app.UsageError, match="--samplers entry"):
      latent_levels.parse_sampler(bad)


def test_levels_are_per_stem_rms_in_db():
  latents = np.ones((3, 2, 4, 5), np.float32) * jnp.asarray([0.1, 1.0])[None, :, None, None]
  np.testing.assert_allclose(latent_levels.levels_db(np.asarray(latents)), [-20.0, 0.0],
                             atol=1e-6)
