"""Samplers on Gaussian toys whose exact denoiser is known.

For data ~ N(μ, s²) per dimension, D(x, σ) = (s²·x + σ²·μ)/(s² + σ²) exactly, and the
probability-flow ODE maps the σ-marginal N(μ, s² + σ²) to the data by
x_0 − μ = (x_σ − μ)·s/√(s² + σ²). So:
  - deterministic samplers (Heun, DPM++2M) are affine maps whose gain is compared, without
    sampling noise, to the exact ODE's;
  - Euler with churn is affine plus Gaussian noise per step, so its output's exact mean and
    variance follow from a scalar recursion; samples are compared to that, and the recursion
    to the data distribution (Euler's own discretisation bias at 150 steps).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax.diffusion import samplers

MU = jnp.array([-1.0, 0.3, 2.0, 0.0])
S = jnp.array([0.5, 0.2, 1.0, 0.05])
SIGMA_MAX = samplers.SIGMA_MAX
NUM_SAMPLES = 16384


def gaussian_denoiser(x, sigma):
  return (S**2 * x + sigma**2 * MU) / (S**2 + sigma**2)


@functools.lru_cache(maxsize=None)
def _compiled(name, config_items, shape, denoiser):
  """One compiled sampler per setting, so tests that share a setting share the compile."""
  sampler = samplers.get_sampler(name, dict(config_items))
  return jax.jit(lambda key, x_init, inpaint: sampler(denoiser, key, shape, x_init=x_init,
                                                      inpaint=inpaint))


def _sample(name, key, shape=None, config=None, x_init=None, inpaint=None,
            denoiser=gaussian_denoiser):
  config_items = tuple(sorted((config or {}).items()))
  return _compiled(name, config_items, shape, denoiser)(key, x_init, inpaint)


def _exact_marginal(key, n=NUM_SAMPLES):
  return MU + jnp.sqrt(S**2 + SIGMA_MAX**2) * jax.random.normal(key, (n, MU.shape[0]))


def _euler_churn_moments(v0, m0, s, num_steps=150, s_churn=20.0):
  """Exact variance and mean offset (from μ) of the Euler-churn output, in float64."""
  sigmas = np.asarray(samplers.karras_sigmas(num_steps), np.float64)
  gamma = min(s_churn / num_steps, math.sqrt(2) - 1)
  v, m = v0, m0
  for i in range(num_steps):
    sigma_hat = sigmas[i] * (1 + gamma)
    # x̂ − μ gains noise of variance σ̂² − σ_i²; the Euler step scales x̂ − μ by k.
    k = 1 + (sigmas[i + 1] - sigma_hat) * sigma_hat / (s**2 + sigma_hat**2)
    v = k**2 * (v + sigma_hat**2 - sigmas[i]**2)
    m = k * m
  return v, m


def test_karras_schedule():
  sigmas = np.asarray(samplers.karras_sigmas(150))
  assert sigmas.shape == (151,)
  np.testing.assert_allclose(sigmas[[0, -2, -1]], [3.0, 0.01, 0.0], rtol=1e-6)
  assert np.all(np.diff(sigmas) < 0)
  # Evenly spaced in σ^(1/ρ).
  steps = np.diff(sigmas[:-1].astype(np.float64)**(1 / 7))
  np.testing.assert_allclose(steps, steps[0], rtol=1e-3)
  np.testing.assert_allclose(samplers.karras_sigmas(1), [3.0, 0.0])


@pytest.mark.parametrize("name", ["heun", "dpmpp_2m"])
def test_deterministic_samplers_follow_the_exact_ode(name):
  # Row 0 sits one marginal std above μ: the samplers are exactly affine, so it measures
  # the gain with no sampling noise (the exact ODE maps it to one data std above μ).
  x_init = _exact_marginal(jax.random.key(1)).at[0].set(MU + jnp.sqrt(S**2 + SIGMA_MAX**2))
  out = _sample(name, jax.random.key(0), x_init=x_init)
  gain = (out[0] - MU) / S
  print(f"{name}, default steps: gain / exact gain = {np.asarray(gain)}")
  # Heun 40 steps, DPM++2M 25: within 2% (the last step, σ_min = 0.01 to 0, dominates for
  # the narrowest dimension, s = 0.05).
  np.testing.assert_allclose(gain, 1.0, atol=0.02)
  # From the exact σ_max marginal the samples have the data's moments.
  standard_error = S / math.sqrt(NUM_SAMPLES)
  np.testing.assert_array_less(jnp.abs(out.mean(0) - MU), 5 * standard_error + 0.01 * S)
  np.testing.assert_allclose(out.var(0) / S**2, 1.0, atol=0.05 + 5 * math.sqrt(2 / NUM_SAMPLES))


def test_deterministic_sampler_from_sigma_max_noise_shrinks_the_mean_as_the_ode_says():
  # x = σ_max·ε is not the σ_max marginal (mean μ is missing); the ODE carries that offset
  # to the output scaled by s/√(s² + σ_max²). Euler-churn's noise corrects it (below).
  out = _sample("heun", jax.random.key(0), shape=(NUM_SAMPLES, 4))
  gain = S / jnp.sqrt(S**2 + SIGMA_MAX**2)
  np.testing.assert_allclose(out.mean(0), MU * (1 - gain), atol=0.01)
  np.testing.assert_allclose(out.var(0), (gain * SIGMA_MAX)**2 * 1.0,
                             rtol=0.05 + 5 * math.sqrt(2 / NUM_SAMPLES))


@pytest.mark.parametrize("start", ["exact_marginal", "sigma_max_noise"])
def test_euler_churn_matches_its_exact_moments(start):
  if start == "exact_marginal":
    out = _sample("euler_churn", jax.random.key(0), x_init=_exact_marginal(jax.random.key(1)))
    v0, m0 = np.asarray(S)**2 + SIGMA_MAX**2, 0.0 * np.asarray(MU)
  else:
    out = _sample("euler_churn", jax.random.key(0), shape=(NUM_SAMPLES, 4))
    v0, m0 = SIGMA_MAX**2, -np.asarray(MU)
  variance, mean_offset = _euler_churn_moments(v0, m0, np.asarray(S, np.float64))
  print(f"euler_churn from {start}: expected var/s² {variance / np.asarray(S)**2}, "
        f"sampled {np.asarray(out.var(0) / S**2)}")
  standard_error = np.sqrt(variance / NUM_SAMPLES)
  np.testing.assert_array_less(np.abs(np.asarray(out.mean(0)) - (MU + mean_offset)),
                               5 * standard_error)
  np.testing.assert_allclose(out.var(0), variance, rtol=5 * math.sqrt(2 / NUM_SAMPLES))
  # Euler's first-order bias at 150 steps: within 15% of the data variance, mean exact.
  np.testing.assert_allclose(variance / np.asarray(S)**2, 1.0, atol=0.15)
  np.testing.assert_allclose(mean_offset, 0.0, atol=0.01)


def test_same_key_same_output_different_key_different_output():
  for name in ("euler_churn", "dpmpp_2m"):
    a = _sample(name, jax.random.key(7), shape=(8, 4), config={"num_steps": 10})
    b = _sample(name, jax.random.key(7), shape=(8, 4), config={"num_steps": 10})
    c = _sample(name, jax.random.key(8), shape=(8, 4), config={"num_steps": 10})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c), name


def test_churn_draws_fresh_noise_given_the_same_start():
  x_init = _exact_marginal(jax.random.key(1), n=8)
  a = _sample("euler_churn", jax.random.key(0), x_init=x_init, config={"num_steps": 10})
  b = _sample("euler_churn", jax.random.key(1), x_init=x_init, config={"num_steps": 10})
  assert not np.allclose(a, b)
  c = _sample("heun", jax.random.key(0), x_init=x_init, config={"num_steps": 10})
  d = _sample("heun", jax.random.key(1), x_init=x_init, config={"num_steps": 10})
  np.testing.assert_array_equal(c, d)  # No churn: deterministic given the start.


@pytest.mark.parametrize("name,resample_steps,expected", [
    ("euler_churn", 1, 10), ("heun", 1, 19), ("euler_churn", 3, 30)])
def test_network_evaluations(name, resample_steps, expected):
  calls = []

  def counting_denoiser(x, sigma):
    jax.debug.callback(lambda: calls.append(1))
    return gaussian_denoiser(x, sigma)

  inpaint = samplers.Inpaint(jnp.zeros((2, 4)), jnp.array([True, False, False, False]),
                             resample_steps)
  sampler = samplers.get_sampler(name, {"num_steps": 10})
  jax.block_until_ready(sampler(counting_denoiser, jax.random.key(0), (2, 4), inpaint=inpaint))
  jax.effects_barrier()
  assert len(calls) == expected


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
@pytest.mark.parametrize("churn", [{}, {"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 1.0}])
def test_evaluation_sigmas_are_the_noise_levels_each_sampler_evaluates(name, churn):
  seen = []

  def recording_denoiser(x, sigma):
    jax.debug.callback(lambda s: seen.append(float(s)), sigma)
    return gaussian_denoiser(x, sigma)

  # The churn window, where the sampler takes it, moves some of the levels.
  settings = {"num_steps": 12, **{key: value for key, value in churn.items()
                                  if key in samplers.sampler_config(name)}}
  jax.block_until_ready(samplers.get_sampler(name, settings)(
      recording_denoiser, jax.random.key(0), (2, 4)))
  jax.effects_barrier()
  table = np.asarray(samplers.evaluation_sigmas(name, settings))
  assert len(seen) == {"heun": 23}.get(name, 12)
  # Every evaluation's σ is in the table, to the last bit, and the table holds no others.
  np.testing.assert_array_equal(np.sort(np.unique(seen)), np.sort(np.unique(table)))


# A joint Gaussian of two unit-variance "stems" with correlation 0.9: given stem 0 = 1.5,
# stem 1 is N(1.35, 0.19); unconditionally it is N(0, 1).
RHO = 0.9
COVARIANCE = jnp.array([[1.0, RHO], [RHO, 1.0]])
KNOWN_VALUE = 1.5


def correlated_denoiser(x, sigma):
  gain = COVARIANCE @ jnp.linalg.inv(COVARIANCE + sigma**2 * jnp.eye(2))
  return x @ gain.T


def _inpaint(name, resample_steps, n=4096):
  x_known = jnp.broadcast_to(jnp.array([KNOWN_VALUE, 123.0]), (n, 2))  # 123: ignored.
  inpaint = samplers.Inpaint(x_known, jnp.array([True, False]), resample_steps)
  return _sample(name, jax.random.key(0), shape=(n, 2), inpaint=inpaint,
                 denoiser=correlated_denoiser)


@pytest.mark.parametrize("name", list(samplers.SAMPLERS))
def test_partial_generation_keeps_known_exactly_and_conditions_the_rest(name):
  out = _inpaint(name, 1)
  assert np.all(np.asarray(out[:, 0]) == np.float32(KNOWN_VALUE))  # Bitwise.
  unknown_mean = float(out[:, 1].mean())
  print(f"{name}: unknown mean {unknown_mean:.3f} (conditional {RHO * KNOWN_VALUE}, "
        f"unconditional 0)")
  # The replacement method is biased, but clearly conditioned on the known stem.
  assert 0.3 < unknown_mean < RHO * KNOWN_VALUE + 0.1


def test_repaint_resampling_moves_closer_to_the_conditional():
  conditional_mean = RHO * KNOWN_VALUE
  one_pass = _inpaint("euler_churn", 1)
  three_passes = _inpaint("euler_churn", 3)
  assert np.all(np.asarray(three_passes[:, 0]) == np.float32(KNOWN_VALUE))
  error_1 = abs(float(one_pass[:, 1].mean()) - conditional_mean)
  error_3 = abs(float(three_passes[:, 1].mean()) - conditional_mean)
  assert error_3 < error_1
  np.testing.assert_allclose(float(three_passes[:, 1].mean()), conditional_mean, atol=0.15)
  np.testing.assert_allclose(float(three_passes[:, 1].var()), 1 - RHO**2, atol=0.1)


def test_progress_hook_reports_every_step():
  seen = []
  sampler = samplers.get_sampler("dpmpp_2m", {"num_steps": 5})
  jax.block_until_ready(sampler(gaussian_denoiser, jax.random.key(0), (2, 4),
                                progress=lambda step, total: seen.append((step, total))))
  jax.effects_barrier()
  assert sorted(seen) == [(i, 5) for i in range(1, 6)]
  logger = samplers.make_progress_logger(every=2)
  for step in range(1, 6):
    logger(step, 5)


def test_registry():
  assert samplers.DEFAULT_SAMPLER == "euler_churn"
  # The release's settings (reference §6), read from euler_churn's signature.
  assert samplers.sampler_config("euler_churn") == dict(
      num_steps=150, sigma_min=0.01, sigma_max=3.0, rho=7.0, s_churn=20.0, s_tmin=0.0,
      s_tmax=math.inf, s_noise=1.0)
  assert samplers.sampler_config("heun") == dict(
      samplers.sampler_config("euler_churn"), num_steps=40, s_churn=0.0)
  assert samplers.sampler_config("dpmpp_2m") == dict(
      num_steps=25, sigma_min=0.01, sigma_max=3.0, rho=7.0)
  assert samplers.SETTING_KEYS == ("num_steps", "sigma_min", "sigma_max", "rho", "s_churn",
                                   "s_tmin", "s_tmax", "s_noise")
  config = samplers.sampler_config()
  config["num_steps"] = 3  # A copy: the defaults are unchanged.
  assert samplers.sampler_config()["num_steps"] == 150
  with pytest.raises(ValueError, match="ddim"):
    samplers.get_sampler("ddim")
  with pytest.raises(ValueError, match="s_churn"):
    samplers.get_sampler("dpmpp_2m", {"s_churn": 20.0})
  with pytest.raises(ValueError, match="x_init"):  # What a call samples is no setting.
    samplers.get_sampler("euler_churn", {"x_init": None})
  with pytest.raises(ValueError, match="s_noise"):
    samplers.evaluation_sigmas("dpmpp_2m", {"s_noise": 0.0})
  short = samplers.get_sampler("heun", {"num_steps": 3})
  out = jax.eval_shape(lambda key: short(gaussian_denoiser, key, (2, 4)), jax.random.key(0))
  assert out.shape == (2, 4)
