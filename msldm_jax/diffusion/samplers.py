"""Samplers for the EDM denoiser, each one compiled program (a `lax.scan` over steps).

A sampler takes `denoise_fn(x, sigma) -> denoised` (σ a scalar shared by the batch; see
`edm.make_denoise_fn`), an explicit PRNG key and the output shape, and returns samples at
σ = 0. They are pure and traceable: wrap the call in `jax.jit` with the network's parameters
as an argument, e.g.

  sample = jax.jit(lambda params, key: euler_churn(
      edm.make_denoise_fn(model.apply, params), key, (batch, 320, 1024)))

Randomness: the key is split once into the initial noise's key and one key per step; a step
splits its own key further. The same key therefore gives the same samples, whatever the
platform's scheduling.

Samplers (all on the Karras σ schedule, reference §6):
  euler_churn  the release's default: Euler with churn at every step, N evaluations.
  heun         Karras et al. Algorithm 2 (optional churn), 2N − 1 evaluations.
  dpmpp_2m     DPM-Solver++(2M) (Lu et al. 2022) in the σ parameterisation, N evaluations;
               deterministic and accurate at few (≈ 25) steps.
A sampler's settings are its keyword-only arguments with a default (`num_steps`, the schedule,
the churn's `s_churn`, `s_tmin`, `s_tmax`, `s_noise`); `sampler_config(name)` and
`get_sampler(name, config)` read them from the signature, so that is where defaults change.

Partial generation (reference §7) is built into the same drivers through `inpaint`: the known
channels are re-noised to the current σ before every step (before the churn), optionally with
RePaint-style resampling, and replaced by the known latents after the last step.

Progress: a compiled scan has no Python loop to print from; pass `progress=` (for instance
`make_progress_logger()`) to get a host callback after each step. Off by default, since the
callback synchronises host and device once per step.
"""

import inspect
import math
import time
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from absl import logging

DenoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
ProgressFn = Callable[[int, int], None]

# The release's sampling settings (reference §6).
SIGMA_MIN = 0.01
SIGMA_MAX = 3.0
RHO = 7.0
S_CHURN = 20.0


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> jax.Array:
  """Karras et al. (2022) eq. 5: σ_max … σ_min evenly spaced in σ^(1/ρ), then a final 0.

  Returns:
    float32 [num_steps + 1], decreasing, sigmas[0] = σ_max, sigmas[-2] = σ_min, sigmas[-1] = 0.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  if not 0 < sigma_min <= sigma_max:
    raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, "
                     f"sigma_max={sigma_max}")
  ramp = jnp.linspace(0.0, 1.0, num_steps) if num_steps > 1 else jnp.zeros((1,))
  inv_rho = 1.0 / rho
  sigmas = (sigma_max**inv_rho + ramp * (sigma_min**inv_rho - sigma_max**inv_rho))**rho
  return jnp.concatenate([sigmas, jnp.zeros((1,))]).astype(jnp.float32)


@flax.struct.dataclass
class Inpaint:
  """What partial generation keeps fixed.

  Attributes:
    x_known: latents whose masked channels are kept (x's shape, or broadcastable to it); the
      other channels' values are ignored.
    mask: True (or 1) on the known channels, broadcastable to x's shape, e.g.
      `joint_latent.source_mask(...)` of shape [channels, 1].
    resample_steps: RePaint resampling: each step is taken this many times, re-noising from
      σ_{i+1} back to σ_i in between. 1 (the release's setting) is one pass per step.
  """
  x_known: jax.Array
  mask: jax.Array
  resample_steps: int = flax.struct.field(pytree_node=False, default=1)


def make_progress_logger(every: int = 10) -> ProgressFn:
  """A `progress` hook that logs step, steps/s and ETA every `every` steps (absl logging)."""
  start = [None]

  def progress(step: int, num_steps: int):
    now = time.perf_counter()
    if start[0] is None or step <= 1:
      start[0] = now
    if step % every and step != num_steps:
      return
    elapsed = now - start[0]
    rate = (step - 1) / elapsed if elapsed > 0 and step > 1 else float("nan")
    eta = (num_steps - step) / rate if rate > 0 else float("nan")
    logging.info("sampling step %d/%d, %.2f steps/s, ETA %.1f s", step, num_steps, rate, eta)

  return progress


def _churn_gamma(sigma, num_steps, s_churn, s_tmin, s_tmax):
  """Karras et al.'s γ_i: min(S_churn/N, √2 − 1) inside [S_tmin, S_tmax], else 0.

  The √2 − 1 cap keeps the added noise at most the current noise level. With the default
  window [0, ∞) the churn is applied at every step, as in the release.
  """
  gamma = min(s_churn / num_steps, math.sqrt(2.0) - 1.0)
  return jnp.where((sigma >= s_tmin) & (sigma <= s_tmax), gamma, 0.0)


def _add_churn(x, sigma, gamma, key, s_noise):
  """σ̂ = σ(1 + γ), x̂ = x + √(σ̂² − σ²)·S_noise·ε: raise the noise level before a step."""
  sigma_hat = sigma * (1.0 + gamma)
  epsilon = jax.random.normal(key, x.shape, x.dtype)
  x_hat = x + jnp.sqrt(sigma_hat**2 - sigma**2) * s_noise * epsilon
  return x_hat, sigma_hat


def _denoise(denoise_fn, x, sigma):
  return denoise_fn(x, sigma.astype(x.dtype)).astype(x.dtype)


def _inject_known(x, inpaint: Inpaint, sigma, key):
  """x ← m·(x_known + σ·ε') + (1 − m)·x: known channels re-noised to the current σ."""
  epsilon = jax.random.normal(key, x.shape, x.dtype)
  return jnp.where(inpaint.mask, inpaint.x_known + sigma * epsilon, x)


def _split_run_key(key, num_steps):
  """(initial noise key, one key per step): how a sampler's key is used."""
  init_key, steps_key = jax.random.split(key)
  return init_key, jax.random.split(steps_key, num_steps)


def _split_pass_key(key):
  """(inpainting noise key, the step's own key) of one pass of a step."""
  inject_key, step_key = jax.random.split(key)
  return inject_key, step_key


def drawn_noise(key: jax.Array, shape: Sequence[int], num_steps: int,
                dtype=jnp.float32) -> dict[str, jax.Array]:
  """The standard normal draws `euler_churn(…, key, shape, num_steps=…)` makes, one pass per
  step: "init" (x = σ_max·init), "churn" [N, *shape] (step i's ε) and "inject" [N, *shape]
  (step i's ε' for the known channels; drawn, and used only under inpainting).

  For feeding another implementation the same noise (tests/test_unet1d_parity.py runs the
  release's sampler on it and compares every step).
  """
  init_key, step_keys = _split_run_key(key, num_steps)
  pass_keys = jax.vmap(_split_pass_key)(step_keys)
  draw = jax.vmap(lambda k: jax.random.normal(k, tuple(shape), dtype))
  return {"init": jax.random.normal(init_key, tuple(shape), dtype),
          "churn": draw(pass_keys[1]), "inject": draw(pass_keys[0])}


def _run(step_fn, init_state, key, shape, sigmas, *, x_init, inpaint, progress, dtype,
         trajectory=False):
  """The shared driver: initial noise, a scan over steps, inpainting and resampling.

  `step_fn(x, i, key, state) -> (x_next, state_next)` takes x from sigmas[i] to sigmas[i+1];
  `state` carries what a multistep method remembers (fixed structure; () for none).
  With `trajectory`, returns (samples, x after every step [N, *shape]).
  """
  num_steps = sigmas.shape[0] - 1
  init_key, step_keys = _split_run_key(key, num_steps)
  if x_init is None:
    if shape is None:
      raise ValueError("give the output shape or x_init")
    x = sigmas[0] * jax.random.normal(init_key, tuple(shape), dtype)
  else:
    x = jnp.asarray(x_init, dtype)
    if shape is not None and tuple(shape) != x.shape:
      raise ValueError(f"x_init has shape {x.shape}, but shape={tuple(shape)}")
  if inpaint is not None:
    if inpaint.resample_steps < 1:
      raise ValueError(f"resample_steps must be >= 1, got {inpaint.resample_steps}")
    # Bool mask: jnp.where keeps known channels bitwise, where m·a + (1 − m)·b would not.
    inpaint = inpaint.replace(
        x_known=jnp.broadcast_to(jnp.asarray(inpaint.x_known, dtype), x.shape),
        mask=jnp.broadcast_to(jnp.asarray(inpaint.mask).astype(bool), x.shape))
  state = init_state(x)

  def one_pass(x, i, key, state):
    inject_key, step_key = _split_pass_key(key)
    if inpaint is not None:
      x = _inject_known(x, inpaint, sigmas[i], inject_key)
    return step_fn(x, i, step_key, state)

  def scan_body(carry, inputs):
    x, state = carry
    i, step_key = inputs
    if inpaint is None or inpaint.resample_steps == 1:
      x, new_state = one_pass(x, i, step_key, state)
    else:
      resample_steps = inpaint.resample_steps

      def resample_body(r, x_and_state):
        x, _ = x_and_state
        pass_key, renoise_key = jax.random.split(jax.random.fold_in(step_key, r))
        # Every pass starts from the same multistep state: it is a retry of the same step.
        x, new_state = one_pass(x, i, pass_key, state)
        renoise = jnp.sqrt(sigmas[i]**2 - sigmas[i + 1]**2) * jax.random.normal(
            renoise_key, x.shape, x.dtype)
        x = jnp.where(r < resample_steps - 1, x + renoise, x)
        return x, new_state

      x, new_state = jax.lax.fori_loop(0, resample_steps, resample_body, (x, state))
    if progress is not None:
      jax.debug.callback(lambda step: progress(int(step), num_steps), i + 1)
    return (x, new_state), (x if trajectory else None)

  (x, _), xs = jax.lax.scan(scan_body, (x, state), (jnp.arange(num_steps), step_keys))
  if inpaint is not None:
    x = jnp.where(inpaint.mask, inpaint.x_known, x)
  return (x, xs) if trajectory else x


def euler_churn(denoise_fn: DenoiseFn, key: jax.Array, shape: Sequence[int] | None, *,
                num_steps: int = 150, sigma_min: float = SIGMA_MIN,
                sigma_max: float = SIGMA_MAX, rho: float = RHO, s_churn: float = S_CHURN,
                s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                x_init: jax.Array | None = None, inpaint: Inpaint | None = None,
                progress: ProgressFn | None = None, dtype=jnp.float32,
                trajectory: bool = False) -> jax.Array:
  """Euler with churn, the release's sampler (reference §6).

  Per step: σ̂ = σ_i(1 + γ); x̂ = x + √(σ̂² − σ_i²)·ε; d = (x̂ − D(x̂, σ̂))/σ̂;
  x ← x̂ + (σ_{i+1} − σ̂)·d. Starts from x = σ_max·ε; N network evaluations.

  Args:
    denoise_fn: `denoise_fn(x, sigma) -> denoised`, σ a scalar.
    key: PRNG key for the initial noise, the churn and the inpainting noise.
    shape: output shape (or None when x_init is given).
    num_steps: N.
    sigma_min, sigma_max, rho: the Karras schedule.
    s_churn, s_tmin, s_tmax, s_noise: Karras et al.'s churn settings; the defaults give the
      release's γ = min(20/N, √2 − 1) at every step.
    x_init: optional start at σ_max instead of σ_max·ε (e.g. a draw from the exact marginal).
    inpaint: optional partial generation (see `Inpaint`).
    progress: optional host callback `progress(step, num_steps)` after each step.
    dtype: dtype of the sampler's state.
    trajectory: also return x after every step, [N, *shape] (inpainted channels as the
      sampler holds them: re-noised, not yet replaced by the known latents).

  Returns:
    Samples of `shape` (with `trajectory`: (samples, trajectory)). The draws behind them:
    `drawn_noise`.
  """
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)

  def step(x, i, key, state):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    gamma = _churn_gamma(sigma, num_steps, s_churn, s_tmin, s_tmax)
    x_hat, sigma_hat = _add_churn(x, sigma, gamma, key, s_noise)
    d = (x_hat - _denoise(denoise_fn, x_hat, sigma_hat)) / sigma_hat
    return x_hat + (sigma_next - sigma_hat) * d, state

  return _run(step, lambda x: (), key, shape, sigmas, x_init=x_init,
              inpaint=inpaint, progress=progress, dtype=dtype, trajectory=trajectory)


def heun(denoise_fn: DenoiseFn, key: jax.Array, shape: Sequence[int] | None, *,
         num_steps: int = 40, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
         rho: float = RHO, s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = math.inf, s_noise: float = 1.0, x_init: jax.Array | None = None,
         inpaint: Inpaint | None = None, progress: ProgressFn | None = None,
         dtype=jnp.float32, trajectory: bool = False) -> jax.Array:
  """Heun's 2nd-order method, Karras et al. (2022) Algorithm 2, with optional churn.

  The step to σ = 0 is a plain Euler step (the correction would divide by σ = 0), so N steps
  cost 2N − 1 network evaluations. Arguments as for `euler_churn`; churn is off by default
  (the deterministic sampler).
  """
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)

  def step(x, i, key, state):
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    gamma = _churn_gamma(sigma, num_steps, s_churn, s_tmin, s_tmax)
    x_hat, sigma_hat = _add_churn(x, sigma, gamma, key, s_noise)
    d = (x_hat - _denoise(denoise_fn, x_hat, sigma_hat)) / sigma_hat
    x_euler = x_hat + (sigma_next - sigma_hat) * d

    def correct():
      d_next = (x_euler - _denoise(denoise_fn, x_euler, sigma_next)) / sigma_next
      return x_hat + (sigma_next - sigma_hat) * 0.5 * (d + d_next)

    # A real branch (σ_{i+1} is a scalar), so the last step skips the second evaluation.
    return jax.lax.cond(sigma_next > 0, correct, lambda: x_euler), state

  return _run(step, lambda x: (), key, shape, sigmas, x_init=x_init,
              inpaint=inpaint, progress=progress, dtype=dtype, trajectory=trajectory)


def dpmpp_2m(denoise_fn: DenoiseFn, key: jax.Array, shape: Sequence[int] | None, *,
             num_steps: int = 25, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
             rho: float = RHO, x_init: jax.Array | None = None,
             inpaint: Inpaint | None = None, progress: ProgressFn | None = None,
             dtype=jnp.float32, trajectory: bool = False) -> jax.Array:
  """DPM-Solver++(2M), the multistep data-prediction solver, for the VE/EDM ODE.

  With t = −ln σ and h = t_{i+1} − t_i, the exact solution of the probability-flow ODE
  through a denoised estimate D' is x_{i+1} = (σ_{i+1}/σ_i)·x_i + (1 − σ_{i+1}/σ_i)·D'.
  D' = D_i on the first step and on the last (σ_{i+1} = 0, h = ∞); otherwise the second-order
  extrapolation D' = (1 + 1/(2r))·D_i − 1/(2r)·D_{i−1} with r = h_{i−1}/h_i.
  N network evaluations, deterministic (the key only draws the initial noise and inpainting
  noise). Arguments as for `euler_churn`.
  """
  sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho)

  def step(x, i, key, old_denoised):
    del key
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    sigma_prev = sigmas[jnp.maximum(i - 1, 0)]
    denoised = _denoise(denoise_fn, x, sigma)
    second_order = (i > 0) & (sigma_next > 0)
    # Safe placeholders where the logs would be ±∞; those branches use first order.
    h = jnp.log(sigma) - jnp.log(jnp.where(second_order, sigma_next, sigma / math.e))
    h_last = jnp.log(jnp.where(second_order, sigma_prev, sigma * math.e)) - jnp.log(sigma)
    half_inv_r = 0.5 * h / h_last
    denoised_d = jnp.where(second_order,
                           (1.0 + half_inv_r) * denoised - half_inv_r * old_denoised,
                           denoised)
    ratio = sigma_next / sigma
    return ratio * x + (1.0 - ratio) * denoised_d, denoised

  return _run(step, jnp.zeros_like, key, shape, sigmas, x_init=x_init,
              inpaint=inpaint, progress=progress, dtype=dtype, trajectory=trajectory)


SAMPLERS: dict[str, Callable[..., jax.Array]] = {
    "euler_churn": euler_churn,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
}

DEFAULT_SAMPLER = "euler_churn"


def network_evaluations(name: str, num_steps: int) -> int:
  """Denoiser evaluations per piece of `num_steps` steps of the sampler `name`."""
  _check_name(name)
  return 2 * num_steps - 1 if name == "heun" else num_steps


def steps_for_evaluations(name: str, evaluations: int) -> int:
  """The most steps of sampler `name` that cost at most `evaluations` network evaluations
  (heun: (E + 1) // 2 steps, 2N − 1 evaluations); at least one step."""
  _check_name(name)
  if evaluations < 1:
    raise ValueError(f"evaluations={evaluations} must be >= 1")
  return max(1, (evaluations + 1) // 2) if name == "heun" else int(evaluations)


# Keyword arguments of a sampler that say what one call samples, not how: not settings.
_CALL_ARGUMENTS = frozenset({"x_init", "inpaint", "progress", "dtype", "trajectory"})


def _signature_settings(function: Callable[..., jax.Array]) -> dict[str, Any]:
  """A sampler's settings and their defaults: its keyword-only arguments with a default."""
  return {name: parameter.default
          for name, parameter in inspect.signature(function).parameters.items()
          if parameter.kind is inspect.Parameter.KEYWORD_ONLY
          and parameter.default is not inspect.Parameter.empty
          and name not in _CALL_ARGUMENTS}


# Each sampler's settings with their defaults, read from its signature so that the function
# is the one place they are written (heun's 40 steps without churn, dpmpp_2m's 25 steps and
# no churn settings at all, ...). Read-only; `sampler_config` gives a copy.
DEFAULT_CONFIGS: Mapping[str, Mapping[str, Any]] = types.MappingProxyType({
    name: types.MappingProxyType(_signature_settings(function))
    for name, function in SAMPLERS.items()})

# Every setting some sampler takes, in first-seen order: the sampler keys a config may give.
SETTING_KEYS: tuple[str, ...] = tuple(dict.fromkeys(
    key for settings in DEFAULT_CONFIGS.values() for key in settings))


def sampler_config(name: str = DEFAULT_SAMPLER) -> dict[str, Any]:
  """A copy of a sampler's default settings (its keyword-only arguments' defaults)."""
  _check_name(name)
  return dict(DEFAULT_CONFIGS[name])


def _settings(name: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
  """The defaults of sampler `name` overridden by `config`, whose keys it must take."""
  _check_name(name)
  settings = sampler_config(name)
  for key, value in dict(config or {}).items():
    if key not in settings:
      raise ValueError(f"sampler {name!r} takes no setting {key!r}; its settings: "
                       + ", ".join(sorted(settings)))
    settings[key] = value
  return settings


def evaluation_sigmas(name: str = DEFAULT_SAMPLER,
                      config: Mapping[str, Any] | None = None) -> jax.Array:
  """Every noise level at which sampler `name` with `config` evaluates the denoiser.

  The schedule, and hence these levels, are fixed before sampling starts: whatever depends
  on σ alone (a DiT's conditioning) can be computed for all of them in one batched call
  outside the sampler's loop. Same arithmetic as the samplers' steps, so the values match
  the σ of each evaluation.

  Returns:
    float32 [E]: euler_churn σ̂_i (E = N); heun σ̂_i and the correction's σ_{i+1} > 0
    (E = 2N − 1); dpmpp_2m σ_i (E = N). RePaint resampling repeats these, adds none.
  """
  settings = _settings(name, config)
  num_steps = int(settings["num_steps"])
  sigmas = karras_sigmas(num_steps, settings["sigma_min"], settings["sigma_max"],
                         settings["rho"])
  if name == "dpmpp_2m":
    return sigmas[:-1]
  gamma = _churn_gamma(sigmas[:-1], num_steps, settings["s_churn"], settings["s_tmin"],
                       settings["s_tmax"])
  sigma_hats = sigmas[:-1] * (1.0 + gamma)
  if name == "euler_churn":
    return sigma_hats
  return jnp.concatenate([sigma_hats, sigmas[1:-1]])  # heun


def _check_name(name):
  if name not in SAMPLERS:
    raise ValueError(f"unknown sampler {name!r}; samplers: {', '.join(SAMPLERS)}")


def get_sampler(name: str = DEFAULT_SAMPLER,
                config: Mapping[str, Any] | None = None) -> Callable[..., jax.Array]:
  """The sampler `name` with its defaults overridden by `config`.

  Returns:
    `sample(denoise_fn, key, shape, *, x_init=None, inpaint=None, progress=None,
    dtype=float32) -> samples`.

  Raises:
    ValueError: for an unknown sampler, or a config key that sampler does not take (naming
      both), e.g. s_churn for the deterministic dpmpp_2m.
  """
  settings = _settings(name, config)
  function = SAMPLERS[name]

  def sample(denoise_fn: DenoiseFn, key: jax.Array, shape: Sequence[int] | None, **kwargs):
    return function(denoise_fn, key, shape, **settings, **kwargs)

  sample.__name__ = name
  sample.__doc__ = function.__doc__
  return sample
