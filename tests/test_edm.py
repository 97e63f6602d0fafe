"""EDM preconditioning, the stable training loss and the training noise levels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax.diffusion import edm

SIGMAS = jnp.array([1e-4, 1e-2, 0.1, 0.4, 1.0, 3.0, 80.0])


def _toy_network(variables, x_in, c_noise):
  """A fixed nonlinear F that depends on both inputs, standing in for the DiT."""
  w = variables["w"]
  return jnp.tanh(x_in * w + c_noise[:, None, None]) * 2.0 - 0.3 * x_in


def test_preconditioning_values_and_lambda_c_out_squared_is_one():
  sd = edm.SIGMA_DATA
  assert sd == 0.4
  np.testing.assert_allclose(edm.c_skip(sd), 0.5, rtol=1e-6)
  np.testing.assert_allclose(edm.c_out(sd), sd / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(edm.c_in(sd), 1 / (sd * np.sqrt(2)), rtol=1e-6)
  np.testing.assert_allclose(edm.c_noise(jnp.exp(2.0)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(edm.loss_weight(SIGMAS) * edm.c_out(SIGMAS)**2, 1.0, rtol=1e-5)
  # c_in scales a σ-noisy sample of σ_data-std data to unit variance.
  np.testing.assert_allclose(edm.c_in(SIGMAS)**2 * (SIGMAS**2 + sd**2), 1.0, rtol=1e-5)


@pytest.mark.parametrize("sigma", [1e-6, 1e-9, 0.0])
def test_denoiser_returns_its_input_as_sigma_goes_to_zero_for_any_network(sigma):
  x = jax.random.normal(jax.random.key(0), (3, 8, 16))
  huge = 1e4 * jax.random.normal(jax.random.key(1), x.shape)
  seen = {}

  def wild_network(variables, x_in, c_noise):
    seen["c_noise"] = c_noise
    return huge

  denoised = edm.denoise(wild_network, {}, x, sigma)
  assert bool(jnp.all(jnp.isfinite(seen["c_noise"])))
  if sigma == 0.0:
    np.testing.assert_array_equal(denoised, x)  # c_out = 0 exactly, c_skip = 1 exactly.
  else:
    # c_out(σ) ≤ σ: the network's contribution vanishes with σ, however large F is.
    bound = sigma * float(jnp.max(jnp.abs(huge))) + 1e-6
    assert float(jnp.max(jnp.abs(denoised - x))) <= bound


def test_denoise_broadcasts_per_example_sigma_and_zero_network_gives_c_skip():
  x = jax.random.normal(jax.random.key(0), (3, 4, 5))
  sigma = jnp.array([0.1, 1.0, 3.0])
  denoised = edm.denoise(lambda v, x_in, c: jnp.zeros_like(x_in), {}, x, sigma)
  np.testing.assert_allclose(denoised, edm.c_skip(sigma)[:, None, None] * x, rtol=1e-6)
  # The network sees c_in·x and c_noise per example.
  def echo(variables, x_in, c_noise):
    assert c_noise.shape == (3,)
    np.testing.assert_allclose(c_noise, jnp.log(sigma) / 4, rtol=1e-6)
    np.testing.assert_allclose(x_in, edm.c_in(sigma)[:, None, None] * x, rtol=1e-6)
    return x_in
  edm.denoise(echo, {}, x, sigma)


def test_stable_loss_equals_weighted_denoising_loss():
  batch = 6
  x = 0.5 * jax.random.normal(jax.random.key(0), (batch, 8, 32))
  noise = jax.random.normal(jax.random.key(1), x.shape)
  sigma = jnp.array([0.05, 0.2, 0.4, 1.0, 2.0, 3.0])
  variables = {"w": 1.7}
  losses = edm.training_loss(_toy_network, variables, x, sigma, noise)
  assert losses.shape == (batch,) and losses.dtype == jnp.float32
  denoised = edm.denoise(_toy_network, variables, x + sigma[:, None, None] * noise, sigma)
  weighted = edm.loss_weight(sigma) * jnp.mean((denoised - x)**2, axis=(1, 2))
  np.testing.assert_allclose(losses, weighted, rtol=2e-3)
  # The cancellation-free target is the definitional (x − c_skip·x_noisy)/c_out.
  s = sigma[:, None, None]
  definitional = (x - edm.c_skip(s) * (x + s * noise)) / edm.c_out(s)
  np.testing.assert_allclose(edm.training_target(x, noise, s), definitional,
                             rtol=1e-4, atol=1e-5)


def test_loss_is_zero_for_the_ideal_network_output_and_differentiable():
  x = jax.random.normal(jax.random.key(0), (2, 4, 8))
  noise = jax.random.normal(jax.random.key(1), x.shape)
  sigma = jnp.array([0.3, 2.0])
  target = edm.training_target(x, noise, sigma[:, None, None])
  oracle = lambda variables, x_in, c_noise: target * variables["scale"]
  np.testing.assert_allclose(edm.training_loss(oracle, {"scale": 1.0}, x, sigma, noise), 0.0,
                             atol=1e-10)
  grad = jax.grad(lambda v: edm.training_loss(oracle, v, x, sigma, noise).mean())(
      {"scale": 2.0})
  assert float(grad["scale"]) > 0


def test_sigma_sampling_ranges():
  key = jax.random.key(0)
  uniform = edm.sample_sigma(key, (100_000,))
  assert float(uniform.min()) >= edm.SIGMA_FLOOR and float(uniform.max()) <= 3.0
  np.testing.assert_allclose(float(uniform.mean()), 1.5, atol=0.02)
  lognormal = edm.sample_sigma(key, (100_000,), distribution="lognormal", p_mean=-3.0,
                               p_std=1.0)
  assert float(lognormal.min()) > 0
  np.testing.assert_allclose(float(jnp.log(lognormal).mean()), -3.0, atol=0.02)
  np.testing.assert_allclose(float(jnp.log(lognormal).std()), 1.0, atol=0.02)
  with pytest.raises(ValueError, match="gamma"):
    edm.sample_sigma(key, (2,), distribution="gamma")
  with pytest.raises(ValueError, match="sigma_min"):
    edm.sample_sigma(key, (2,), sigma_min=0.0)
