"""SourceVAE: shapes, sizes, the posterior maths, shared vs per-source parameters (fast, CPU).

Real computation uses the tiny preset; the paper preset is checked through jax.eval_shape
only, so nothing of its size is allocated.
"""

import functools
import math

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax.models import audio_layers
from msldm_jax.models import loading
from msldm_jax.models import source_vae as sv


def _model(variant="tiny", **overrides):
  config = sv.model_config(variant)
  config.update(overrides)
  return sv.SourceVAE.from_config(config)


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
  return jax.jit(lambda variables, *args: model.apply(variables, *args, method=method))


def _apply(model, variables, *args, method):
  """model.apply, jitted (op-by-op dispatch of the vmapped networks is slow)."""
  return _jitted(model, method)(variables, *args)


def _count(tree):
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def tiny():
  model = _model()
  return model, sv.init_params(model, jax.random.key(0), samples=64)


@pytest.fixture(scope="module")
def tiny_per_source():
  model = _model(per_source=True)
  return model, sv.init_params(model, jax.random.key(1), samples=64)


# -- The paper's sizes, without allocation ----------------------------------------------------


def test_paper_lengths():
  model = _model("paper")
  params = sv.abstract_params(model)

  def shapes(method, shape):
    return jax.eval_shape(lambda p, x: model.apply(p, x, method=method), params,
                          jax.ShapeDtypeStruct(shape, jnp.float32))

  mean, logvar = shapes(sv.SourceVAE.encode, (1, 4, 327672))
  assert mean.shape == logvar.shape == (1, 4, 80, 1024)
  assert shapes(sv.SourceVAE.decode, (1, 4, 80, 1024)).shape == (1, 4, 327672)
  mean, _ = shapes(sv.SourceVAE.encode, (2, 4, 22050))
  assert mean.shape == (2, 4, 80, 68)
  assert sv.encoded_length(327672, model.encoder_strides) == 1024
  assert sv.encoded_length(22050, model.encoder_strides) == 68
  for frames in (1, 7, 68, 1024):
    assert sv.decoded_length(frames, model.decoder_strides) == 320 * frames - 8


def test_paper_parameter_counts():
  params = sv.abstract_params(_model("paper"))["params"]
  total, encoder, decoder = _count(params), _count(params["encoder"]), _count(params["decoder"])
  # Reference §3: 61.05 M = encoder 18.9 M + decoder 42.2 M.
  assert round(total / 1e6, 2) == 61.05
  assert round(encoder / 1e6, 1) == 18.9
  assert round(decoder / 1e6, 1) == 42.2
  per_source = sv.abstract_params(_model("paper", per_source=True))["params"]
  assert _count(per_source) == 4 * total


def test_decoder_min_width_floors_the_halving():
  """Each decoder block halves the width (the release's) unless `decoder_min_width` floors it;
  the record a checkpoint keeps rebuilds the same network."""

  def block_widths(model):
    decoder = sv.abstract_params(model)["params"]["decoder"]
    return [decoder[f"block_{i}"]["conv_transpose"]["bias"].shape[-1]
            for i in range(len(model.decoder_strides))]

  demo = dict(encoder_width=16, decoder_width=128, latent_dim=16)
  assert block_widths(_model("paper", **demo)) == [64, 32, 16, 8]
  floored = _model("paper", decoder_min_width=32, **demo)
  assert block_widths(floored) == [64, 32, 32, 32]
  record = loading.vae_record(floored)
  assert loading.vae_from_config(record["config"], "test record") == floored
  # A record written before the setting existed rebuilds the halving decoder.
  del record["config"]["decoder_min_width"]
  assert loading.vae_from_config(record["config"], "old record").decoder_min_width == 0


# -- Layers ---------------------------------------------------------------------------------


def test_snake_formula_and_init():
  x = jnp.linspace(-3.0, 3.0, 24).reshape(1, 4, 6)
  variables = audio_layers.Snake().init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["params"]["alpha"], np.ones(6))
  alpha = np.linspace(0.5, 2.0, 6).astype(np.float32)
  y = audio_layers.Snake().apply({"params": {"alpha": alpha}}, x)
  expected = x + np.sin(alpha * x) ** 2 / (alpha + 1e-9)
  np.testing.assert_allclose(y, expected, rtol=1e-6, atol=1e-6)


def test_sin_squared_polynomial_is_accurate():
  z = np.concatenate([np.linspace(-60.0, 60.0, 100001), [0.0, np.pi / 2, -np.pi, 1e3]])
  z = z.astype(np.float32)
  exact = np.sin(z.astype(np.float64)) ** 2
  np.testing.assert_allclose(audio_layers.sin_squared(jnp.asarray(z)), exact, atol=5e-7)
  # The rounding is piecewise constant, so the gradient is sin(2z) as it should be (training).
  z = jnp.linspace(-20.0, 20.0, 1001)
  grad = jax.vmap(jax.grad(audio_layers.sin_squared))(z)
  np.testing.assert_allclose(grad, np.sin(2 * np.asarray(z, np.float64)), atol=2e-6)


def test_weight_norm_starts_at_v_and_uses_first_axis():
  conv = audio_layers.WNConv1d(5, 3, padding=1)
  params = conv.init(jax.random.key(0), jnp.zeros((1, 8, 4)))["params"]
  assert params["weight_v"].shape == (5, 4, 3) and params["weight_g"].shape == (5, 1, 1)
  np.testing.assert_allclose(audio_layers.weight_norm(params["weight_v"], params["weight_g"]),
                             params["weight_v"], rtol=1e-6)
  transposed = audio_layers.WNConvTranspose1d(5, 4, stride=2, padding=1)
  params = transposed.init(jax.random.key(0), jnp.zeros((1, 8, 3)))["params"]
  # PyTorch's ConvTranspose1d weight is [in, out, k]; weight_norm's g follows the first axis.
  assert params["weight_v"].shape == (3, 5, 4) and params["weight_g"].shape == (3, 1, 1)


@pytest.mark.parametrize("stride", [2, 3, 4, 5, 8])
def test_conv_transpose_polyphase_matches_dilated(stride):
  x = jax.random.normal(jax.random.key(stride), (2, 11, 3))
  kwargs = dict(features=4, kernel_size=2 * stride, stride=stride,
                padding=math.ceil(stride / 2))
  layer = audio_layers.WNConvTranspose1d(**kwargs)
  variables = layer.init(jax.random.key(0), x)
  y = layer.apply(variables, x)
  y_dilated = audio_layers.WNConvTranspose1d(**kwargs, implementation="dilated").apply(
      variables, x)
  assert y.shape == (2, (11 - 1) * stride - 2 * math.ceil(stride / 2) + 2 * stride, 4)
  np.testing.assert_allclose(y, y_dilated, rtol=1e-5, atol=1e-5)


# -- The model on tiny shapes ---------------------------------------------------------------


def test_tiny_shapes_and_lengths(tiny):
  model, variables = tiny
  waveforms = jax.random.normal(jax.random.key(2), (2, 4, 100))
  mean, logvar = _apply(model, variables, waveforms, method=sv.SourceVAE.encode)
  frames = sv.encoded_length(100, model.encoder_strides)
  chex.assert_shape((mean, logvar), (2, 4, 8, frames))
  decoded = _apply(model, variables, mean, method=sv.SourceVAE.decode)
  chex.assert_shape(decoded, (2, 4, sv.decoded_length(frames, model.decoder_strides)))
  stems = jnp.array([0, 3])
  mean_stem, _ = _apply(model, variables, waveforms[:, 0], stems,
                        method=sv.SourceVAE.encode_stem)
  chex.assert_shape(mean_stem, (2, 8, frames))
  decoded_stem = _apply(model, variables, mean_stem, stems, method=sv.SourceVAE.decode_stem)
  chex.assert_shape(decoded_stem, (2, sv.decoded_length(frames, model.decoder_strides)))


def test_shared_mode_treats_stems_alike(tiny):
  model, variables = tiny
  waveform = jax.random.normal(jax.random.key(3), (1, 96))
  mean, logvar = _apply(model, variables, jnp.tile(waveform[:, None], (1, 4, 1)),
                             method=sv.SourceVAE.encode)
  for s in range(1, 4):
    np.testing.assert_allclose(mean[:, s], mean[:, 0], rtol=1e-5, atol=1e-6)
  for s in range(4):
    mean_stem, _ = _apply(model, variables, waveform, jnp.array([s]),
                               method=sv.SourceVAE.encode_stem)
    np.testing.assert_allclose(mean_stem, mean[:, 0], rtol=1e-5, atol=1e-6)


def test_per_source_mode_uses_each_stems_parameters(tiny, tiny_per_source):
  shared_model, shared_variables = tiny
  model, variables = tiny_per_source
  assert _count(variables) == 4 * _count(shared_variables)
  waveforms = jax.random.normal(jax.random.key(4), (2, 4, 96))
  latents = jax.random.normal(jax.random.key(5), (2, 4, 8, 12))
  mean, _ = _apply(model, variables, waveforms, method=sv.SourceVAE.encode)
  decoded = _apply(model, variables, latents, method=sv.SourceVAE.decode)

  # Perturb stem 2's parameters only: only stem 2's outputs move.
  perturbed = jax.jit(lambda v: jax.tree.map(lambda p: p.at[2].add(0.1), v))(variables)
  mean_p, _ = _apply(model, perturbed, waveforms, method=sv.SourceVAE.encode)
  decoded_p = _apply(model, perturbed, latents, method=sv.SourceVAE.decode)
  for s in range(4):
    changed_mean = not np.allclose(mean_p[:, s], mean[:, s], atol=1e-6)
    changed_audio = not np.allclose(decoded_p[:, s], decoded[:, s], atol=1e-6)
    assert changed_mean == changed_audio == (s == 2), f"stem {s}"

  # The single-stem path picks each example's own stem's parameters.
  stems = jnp.array([2, 1])
  mean_stem, _ = _apply(model, variables, waveforms[jnp.arange(2), stems], stems,
                             method=sv.SourceVAE.encode_stem)
  np.testing.assert_allclose(mean_stem, mean[jnp.arange(2), stems], rtol=1e-5, atol=1e-6)
  decoded_stem = _apply(model, variables, latents[jnp.arange(2), stems], stems,
                             method=sv.SourceVAE.decode_stem)
  np.testing.assert_allclose(decoded_stem, decoded[jnp.arange(2), stems], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("per_source", [False, True])
def test_encode_and_decode_sources_equal_the_models_own(tiny, tiny_per_source, per_source):
  # One parameter set at a time (a per-source model) or the model's own method (shared):
  # the same moments and waveforms as `encode`/`decode`, each stem through its own set.
  model, variables = tiny_per_source if per_source else tiny
  waveforms = jax.random.normal(jax.random.key(6), (2, 4, 96))
  latents = jax.random.normal(jax.random.key(7), (2, 4, 8, 12))
  mean, logvar = _apply(model, variables, waveforms, method=sv.SourceVAE.encode)
  decoded = _apply(model, variables, latents, method=sv.SourceVAE.decode)
  mean_s, logvar_s = jax.jit(functools.partial(sv.encode_sources, model))(variables, waveforms)
  decoded_s = jax.jit(functools.partial(sv.decode_sources, model))(variables, latents)
  np.testing.assert_allclose(mean_s, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logvar_s, logvar, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(decoded_s, decoded, rtol=1e-5, atol=1e-6)
  assert decoded_s.dtype == jnp.float32
  # Some stems only, in the order asked for: the same waveforms as decoding all of them.
  for stems in ((2,), (3, 0)):
    some = jax.jit(functools.partial(sv.decode_sources, model, stem_indices=stems))(
        variables, latents)
    np.testing.assert_allclose(some, decoded[:, list(stems)], rtol=1e-5, atol=1e-6)
  if per_source:
    # A per-source model runs only the asked stems' networks: a broken set elsewhere
    # does not reach them.
    broken = jax.jit(lambda v: jax.tree.map(lambda p: p.at[1].set(jnp.nan), v))(variables)
    some = jax.jit(functools.partial(sv.decode_sources, model, stem_indices=(2, 0)))(
        broken, latents)
    np.testing.assert_allclose(some, decoded[:, [2, 0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="stem index 4"):
      sv.decode_sources(model, variables, latents, stem_indices=(4,))


def test_logvar_is_clamped(tiny):
  model, variables = tiny
  latent_dim = model.latent_dim
  waveforms = jax.random.normal(jax.random.key(6), (1, 4, 64))
  for shift, bound in ((1e4, sv.LOGVAR_MAX), (-1e4, sv.LOGVAR_MIN)):
    params = flax.core.unfreeze(variables)["params"]
    bias = params["encoder"]["conv_out"]["bias"]
    params["encoder"]["conv_out"]["bias"] = bias.at[:, latent_dim:].add(shift)
    mean, logvar = _apply(model, {"params": params}, waveforms, method=sv.SourceVAE.encode)
    np.testing.assert_array_equal(logvar, np.full(logvar.shape, bound, np.float32))
    # The mean channels are untouched by the shift.
    mean_ref, _ = _apply(model, variables, waveforms, method=sv.SourceVAE.encode)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs(tiny):
  model32, variables = tiny
  model = _model(dtype="bfloat16")
  waveforms = jax.random.normal(jax.random.key(7), (1, 4, 64))
  mean, logvar = _apply(model, variables, waveforms, method=sv.SourceVAE.encode)
  assert mean.dtype == logvar.dtype == jnp.float32
  mean32, _ = _apply(model32, variables, waveforms, method=sv.SourceVAE.encode)
  np.testing.assert_allclose(mean, mean32, rtol=0.1, atol=0.05)


# -- Posterior ------------------------------------------------------------------------------


def test_kl_divergence_known_values():
  shape = (3, 4, 8, 5)
  zeros = jnp.zeros(shape)
  assert float(sv.kl_divergence(zeros, zeros)) == 0.0
  np.testing.assert_allclose(sv.kl_divergence(jnp.ones(shape), zeros), 0.5, rtol=1e-6)
  logvar = jnp.full(shape, math.log(2.0))
  np.testing.assert_allclose(sv.kl_divergence(zeros, logvar),
                             0.5 * (2.0 - 1.0 - math.log(2.0)), rtol=1e-6)
  # Mean over (channels, frames) per example, then over the batch — not a sum.
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(2, 3, 7)).astype(np.float32)
  logvar = rng.normal(size=(2, 3, 7)).astype(np.float32)
  per_example = 0.5 * np.mean(mean**2 + np.exp(logvar) - 1 - logvar, axis=(1, 2))
  np.testing.assert_allclose(sv.kl_divergence(mean, logvar), per_example.mean(), rtol=1e-5)


def test_posterior_sample_statistics():
  mean = jnp.full((4, 8, 2000), 1.5)
  logvar = jnp.full((4, 8, 2000), math.log(0.25))
  z = sv.posterior_sample(mean, logvar, jax.random.key(0))
  np.testing.assert_allclose(jnp.mean(z), 1.5, atol=0.01)
  np.testing.assert_allclose(jnp.std(z), 0.5, atol=0.01)
  z_tight = sv.posterior_sample(mean, jnp.full_like(mean, sv.LOGVAR_MIN), jax.random.key(1))
  np.testing.assert_allclose(z_tight, mean, atol=1e-5)


def test_unknown_variant_and_dtype_are_errors():
  with pytest.raises(ValueError, match="huge"):
    sv.model_config("huge")
  model = _model(dtype="float16")
  with pytest.raises(ValueError, match="float16"):
    sv.init_params(model, jax.random.key(0), samples=64)
