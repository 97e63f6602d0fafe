"""benchmarks/latent_levels.py: sampled latents' loudness against the data's, checked where the
exact denoiser is known (Gaussian latents at σ_data: F = 0)."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from benchmarks import latent_levels
from msldm_jax.evaluation import latent_dependence
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


def test_frame_spread_finds_collapse_and_a_missing_tail():
  rng = np.random.default_rng(0)
  real = rng.standard_t(3, size=(40, 2, 4, 32)).astype(np.float32)
  same = latent_levels.frame_spread(real, real)
  np.testing.assert_allclose(same, [[0.1, 1.0, 1.0]] * 2, atol=0.01)
  # Every frame halfway to the mean frame: distances a quarter, far more frames "close".
  shrunk = latent_levels.frame_spread(0.5 * real, real)
  assert np.all(shrunk[:, 0] > 0.3)
  np.testing.assert_allclose(shrunk[:, 1:], 0.25, atol=0.05)
  # The heavy tail clipped (the largest tenth of the values): the median frame stays, the
  # 90th percentile falls.
  limit = np.percentile(np.abs(real), 90)
  spread = latent_levels.frame_spread(np.clip(real, -limit, limit), real)
  np.testing.assert_allclose(spread[:, 1], 1.0, atol=0.05)
  assert np.all(spread[:, 2] < 0.6)


def test_samples_are_read_from_a_sampling_runs_pieces(tmp_path):
  for i in range(3):
    (tmp_path / f"piece_{i:03d}").mkdir()
    np.save(tmp_path / f"piece_{i:03d}" / "latents.npy", np.full((8, 5), i, np.float32))
  latents = latent_levels.read_samples(str(tmp_path), (2, 4, 5))
  assert latents.shape == (3, 2, 4, 5) and latents[2].min() == 2.0
  with pytest.raises(app.UsageError, match="latents of shape"):
    latent_levels.read_samples(str(tmp_path), (4, 4, 5))
  with pytest.raises(app.UsageError, match="no piece_"):
    latent_levels.read_samples(str(tmp_path / "piece_000"), (2, 4, 5))


def _gaussian_latents(count=48, frames=128):
  rng = np.random.default_rng(1)
  return (edm.SIGMA_DATA * rng.standard_normal((count, 2, 4, frames))).astype(np.float32)


def test_the_exact_denoiser_is_calibrated_and_keeps_the_posteriors_energy():
  latents = _gaussian_latents()
  table = latent_levels.calibration(loading.Loaded(_Scaled(0.0), {}, {}), latents,
                                    batch_size=20)  # 48 chunks: the last batch padded
  assert table.shape == (len(latent_dependence.SIGMAS), 2, 2)
  sigmas = np.asarray(latent_dependence.SIGMAS)[:, None]
  # The gain's sampling error: <x, σn>/<x, x> has standard deviation σ/(σ_d·√N) over N
  # values (48 chunks × 4 channels × 128 frames × 2 noise draws per stem); four of them.
  tolerance = 4 * 20 / np.log(10) * sigmas / (edm.SIGMA_DATA * np.sqrt(48 * 4 * 128 * 2))
  assert np.all(np.abs(table[..., 0]) < tolerance), (table[..., 0], tolerance)
  # D = σ_d²/(σ_d² + σ²)·y: its energy over x's is σ_d²/(σ_d² + σ²).
  expected = 10 * np.log10(edm.SIGMA_DATA**2 / (edm.SIGMA_DATA**2 + sigmas**2))
  np.testing.assert_allclose(table[..., 1], np.broadcast_to(expected, (len(sigmas), 2)),
                             atol=0.15)


def test_calibration_tells_an_estimate_shrunk_from_one_too_loud():
  latents = _gaussian_latents()
  shrunk = latent_levels.calibration(loading.Loaded(_Scaled(-0.5), {}, {}), latents)
  loud = latent_levels.calibration(loading.Loaded(_Scaled(0.5), {}, {}), latents)
  # Where the network's share of D matters (c_out·c_in is largest at σ near σ_data).
  middle = np.abs(np.log(np.asarray(latent_dependence.SIGMAS) / edm.SIGMA_DATA)) < 1.5
  assert np.all(shrunk[middle, :, 0] > 0.5) and np.all(loud[middle, :, 0] < -0.5)
  assert np.all(shrunk[..., 1] < loud[..., 1])


def test_restarts_from_noised_chunks_find_the_noise_levels_that_lose_energy():
  """`--from_sigmas`: the exact denoiser brings noised chunks back at their level from any σ;
  one that removes too much loses more the higher it starts."""
  chunks = _gaussian_latents(count=32, frames=64)

  def change(k, sigma):
    restarted = latent_levels.restart_latents(loading.Loaded(_Scaled(k), {}, {}), "dpmpp_2m",
                                              {"num_steps": 25}, chunks, sigma, seed=0)
    assert restarted.shape == chunks.shape
    return latent_levels.levels_db(restarted) - latent_levels.levels_db(chunks)

  for sigma in (0.05, 0.5, 3.0):
    np.testing.assert_allclose(change(0.0, sigma), 0.0, atol=0.3)
  low, high = change(-0.5, 0.05), change(-0.5, 2.0)
  assert np.all(low > -1.0) and np.all(high < low - 3.0), (low, high)
