"""EDM preconditioning, training loss and training noise levels (Karras et al. 2022, §5).

The network F never sees raw noisy latents: the denoiser is

  D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ)),

with the reference's σ_data = 0.4 (reference §5). The functions below are pure and take σ
either as a scalar or per example ([batch]); latents are [batch, ...] of any rank.

`apply_fn(variables, x_in, c_noise, **kwargs) -> F` is a Flax `Module.apply` (or anything with
that signature): `x_in` has the latents' shape and `c_noise` is [batch].
"""

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.4  # Standard deviation of the data the preconditioning assumes (release).

# Training σ ~ Uniform(SIGMA_FLOOR, SIGMA_MAX_TRAIN): the release samples Uniform(0, 3); the
# floor keeps σ = 0 (probability zero in theory, but reachable in float32) away, where
# c_noise = ln σ / 4 = −∞ and λ(σ) = ∞. At 1e-4 the target is already ≈ −n to 1e-8, so the
# floor removes nothing the model could learn.
SIGMA_FLOOR = 1e-4
SIGMA_MAX_TRAIN = 3.0

# Noise levels by bucket, for the trainer's loss per bucket and the evaluation's per-σ
# measures: 6 log-spaced buckets over the sampler's range [σ_min, σ_max] = [0.01, 3]; the
# outer buckets also take σ below 0.01 (uniform training draws down to the floor) and above
# 3 (log-normal draws).
SIGMA_BUCKET_EDGES = tuple(float(e) for e in np.geomspace(0.01, 3.0, 7))

# σ below this is treated as this when computing c_noise only, so that σ = 0 gives D = x
# exactly (c_out = 0 times a finite F) instead of 0·F(−∞) = NaN.
_C_NOISE_SIGMA_MIN = 1e-20


def c_skip(sigma, sigma_data: float = SIGMA_DATA):
  return sigma_data**2 / (sigma**2 + sigma_data**2)


def c_out(sigma, sigma_data: float = SIGMA_DATA):
  return sigma * sigma_data / jnp.sqrt(sigma**2 + sigma_data**2)


def c_in(sigma, sigma_data: float = SIGMA_DATA):
  return 1.0 / jnp.sqrt(sigma**2 + sigma_data**2)


def c_noise(sigma):
  return jnp.log(sigma) / 4.0


def noise_condition(sigma):
  """c_noise as the denoiser computes it: σ = 0 is taken as a tiny σ (finite c_noise)."""
  return c_noise(jnp.maximum(sigma, _C_NOISE_SIGMA_MIN))


def loss_weight(sigma, sigma_data: float = SIGMA_DATA):
  """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out²: makes the loss on F unit-weighted."""
  return (sigma**2 + sigma_data**2) / (sigma * sigma_data)**2


def _per_example(sigma, x):
  """σ (scalar or [batch]) -> ([batch] for c_noise, [batch, 1, ...] broadcasting against x)."""
  batch = x.shape[0]
  sigma_b = jnp.broadcast_to(jnp.asarray(sigma, dtype=x.dtype), (batch,))
  return sigma_b, sigma_b.reshape((batch,) + (1,) * (x.ndim - 1))


def denoise(apply_fn: Callable[..., Any], params, x_noisy, sigma, *,
            sigma_data: float = SIGMA_DATA, **apply_kwargs):
  """D(x; σ) = c_skip·x + c_out·F(c_in·x, c_noise): the preconditioned denoiser.

  Args:
    apply_fn: the network, called as `apply_fn(params, x_in, c_noise, **apply_kwargs)`.
    params: the network's variables (e.g. `{"params": ...}` for a Flax module).
    x_noisy: [batch, ...] noisy latents.
    sigma: noise level, scalar or [batch]; σ = 0 returns x_noisy exactly.
    sigma_data: σ_data of the preconditioning.
    **apply_kwargs: passed to `apply_fn`.

  Returns:
    Denoised latents, x_noisy's shape and dtype. Not clamped: latents are unbounded (±5).
  """
  sigma_b, sigma_x = _per_example(sigma, x_noisy)
  noise_cond = noise_condition(sigma_b)
  f = apply_fn(params, c_in(sigma_x, sigma_data) * x_noisy, noise_cond, **apply_kwargs)
  chex.assert_equal_shape([f, x_noisy])
  f = f.astype(x_noisy.dtype)
  return c_skip(sigma_x, sigma_data) * x_noisy + c_out(sigma_x, sigma_data) * f


def make_denoise_fn(apply_fn: Callable[..., Any], params, *,
                    sigma_data: float = SIGMA_DATA,
                    **apply_kwargs) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Binds a network to `denoise_fn(x, sigma) -> denoised`, the samplers' interface."""

  def denoise_fn(x, sigma):
    return denoise(apply_fn, params, x, sigma, sigma_data=sigma_data, **apply_kwargs)

  return denoise_fn


def training_target(x, noise, sigma, sigma_data: float = SIGMA_DATA):
  """(x − c_skip·x_noisy)/c_out for x_noisy = x + σ·n, in a cancellation-free form.

  Expanding c_skip and c_out gives (σ/σ_d·x − σ_d·n)/√(σ² + σ_d²): the same value without
  subtracting two nearly equal numbers at small σ (where c_skip → 1 and c_out → 0).
  `sigma` must broadcast against x.
  """
  return (sigma / sigma_data * x - sigma_data * noise) / jnp.sqrt(sigma**2 + sigma_data**2)


def training_loss(apply_fn: Callable[..., Any], params, x, sigma, noise, *,
                  sigma_data: float = SIGMA_DATA, **apply_kwargs):
  """Per-example EDM loss λ(σ)·mean‖D(x + σn; σ) − x‖², as the plain MSE on F.

  Since D − x = c_out·(F − target) and λ = 1/c_out², the weighted denoising loss equals
  mean (F − target)² with target = (x − c_skip·x_noisy)/c_out: no large weights at small σ.

  Args:
    apply_fn: the network, as for `denoise`.
    params: its variables.
    x: [batch, ...] clean latents.
    sigma: [batch] (or scalar) noise levels, > 0.
    noise: standard normal noise, x's shape.
    sigma_data: σ_data of the preconditioning.
    **apply_kwargs: passed to `apply_fn`.

  Returns:
    float32 [batch]: the mean over each example's elements, so the trainer can average them
    or bucket them by σ.
  """
  chex.assert_equal_shape([x, noise])
  sigma_b, sigma_x = _per_example(sigma, x)
  x_noisy = x + sigma_x * noise
  f = apply_fn(params, c_in(sigma_x, sigma_data) * x_noisy, c_noise(sigma_b), **apply_kwargs)
  chex.assert_equal_shape([f, x])
  target = training_target(x, noise, sigma_x, sigma_data)
  squared_error = jnp.square(f.astype(jnp.float32) - target.astype(jnp.float32))
  return jnp.mean(squared_error, axis=tuple(range(1, x.ndim)))


def sample_sigma(key, shape, *, distribution: str = "uniform",
                 sigma_min: float = SIGMA_FLOOR, sigma_max: float = SIGMA_MAX_TRAIN,
                 p_mean: float = -1.2, p_std: float = 1.2):
  """Training noise levels.

  Args:
    key: PRNG key.
    shape: output shape, usually (batch,).
    distribution: "uniform": σ ~ Uniform(sigma_min, sigma_max), the release's Uniform(0, 3)
      with a floor against σ = 0 (see SIGMA_FLOOR). "lognormal": ln σ ~ N(p_mean, p_std²),
      EDM's choice (its defaults −1.2, 1.2; MSDM used −3, 1); always > 0, so no floor.
    sigma_min, sigma_max: the uniform range.
    p_mean, p_std: the log-normal's parameters.

  Returns:
    float32 array of `shape`.
  """
  if distribution == "uniform":
    if not 0 < sigma_min < sigma_max:
      raise ValueError(f"sample_sigma: need 0 < sigma_min < sigma_max, got sigma_min="
                       f"{sigma_min}, sigma_max={sigma_max}")
    return jax.random.uniform(key, shape, minval=sigma_min, maxval=sigma_max)
  if distribution == "lognormal":
    return jnp.exp(p_mean + p_std * jax.random.normal(key, shape))
  raise ValueError(f"unknown sigma distribution {distribution!r}; "
                   "expected 'uniform' or 'lognormal'")
