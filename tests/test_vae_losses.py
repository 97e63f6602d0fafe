"""STFT and mel (msldm_jax.audio.spectral), VAE losses and metrics, and the discriminators."""

import warnings

import jax
import jax.numpy as jnp
import librosa
import ml_collections
import numpy as np
import pytest
import scipy.signal

from msldm_jax.audio import spectral
from msldm_jax.losses import vae_losses
from msldm_jax.models import discriminators

SR = 22050

# Jitted once per shape: eager op-by-op dispatch of seven STFT scales is far slower on CPU.
_mel_loss = jax.jit(vae_losses.multiscale_mel_loss)
_mel_distance = jax.jit(vae_losses.multiscale_mel_distance)


def _signals(batch=2, samples=4000, seed=0):
  """Music-like test signals: a few partials plus noise, different per example."""
  rng = np.random.default_rng(seed)
  t = np.arange(samples) / SR
  out = []
  for _ in range(batch):
    freqs = rng.uniform(80, 4000, size=4)
    x = sum(rng.uniform(0.1, 0.5) * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in freqs)
    out.append(x + 0.05 * rng.standard_normal(samples))
  return np.stack(out).astype(np.float32)


# ----------------------------------------------------------------------------- spectral


@pytest.mark.parametrize("sr,n_fft,n_mels,fmax", [
    (22050, 2048, 320, None), (22050, 32, 5, None), (22050, 256, 40, None),
    (16000, 512, 80, None), (44100, 1024, 128, 8000.0)])
def test_mel_filterbank_equals_librosa(sr, n_fft, n_mels, fmax):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # librosa warns about the empty filters of 320 mels.
    expected = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmax=fmax)
  got = spectral.mel_filterbank(sr, n_fft, n_mels, fmax=fmax)
  assert got.shape == (n_mels, n_fft // 2 + 1) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_hann_window_is_periodic_hann():
  for n in (32, 2048):
    np.testing.assert_allclose(spectral.hann_window(n), scipy.signal.get_window("hann", n),
                               atol=1e-7)


@pytest.mark.parametrize("n_fft,hop", [(32, 8), (512, 128), (2048, 512), (100, 30)])
def test_stft_equals_librosa_centred_reflect(n_fft, hop):
  x = _signals(samples=5000)
  # librosa >= 0.10 pads with zeros by default; torch.stft(center=True) reflects.
  expected = librosa.stft(x, n_fft=n_fft, hop_length=hop, window="hann", center=True,
                          pad_mode="reflect")
  got = np.asarray(spectral.stft(x, n_fft, hop))
  expected = np.swapaxes(expected, -1, -2)  # ours is [..., frames, bins]
  assert got.shape == expected.shape
  assert got.shape[-2] == spectral.num_frames(5000, n_fft, hop)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


def test_stft_match_stride_is_audiotools_alignment():
  x = _signals(batch=1, samples=5000)
  n_fft, hop = 512, 128
  # audiotools: reflect-pad ((n_fft - hop)//2, same + round-up), centred STFT, drop 2 + 2.
  right = int(np.ceil(5000 / hop)) * hop - 5000
  pad = (n_fft - hop) // 2
  padded = np.pad(x, ((0, 0), (pad, pad + right)), mode="reflect")
  expected = librosa.stft(padded, n_fft=n_fft, hop_length=hop, window="hann", center=True,
                          pad_mode="reflect")[..., 2:-2]
  got = np.asarray(spectral.stft(x, n_fft, hop, match_stride=True))
  assert got.shape[-2] == int(np.ceil(5000 / hop)) == spectral.num_frames(
      5000, n_fft, hop, match_stride=True)
  np.testing.assert_allclose(got, np.swapaxes(expected, -1, -2), rtol=0,
                             atol=1e-4 * np.abs(expected).max())


def test_magnitude_gradient_is_zero_not_nan_at_silence():
  grad = jax.grad(lambda s: jnp.sum(spectral.magnitude(spectral.stft(s, 64, 16))))(
      jnp.zeros((1, 256)))
  assert np.all(np.isfinite(grad))  # the whole loss at silence: see the generator-loss test


# ----------------------------------------------------------------------------- mel loss


def _mel_loss_numpy(estimate, reference):
  total = 0.0
  for w, m in zip(vae_losses.MEL_WINDOW_LENGTHS, vae_losses.MEL_N_MELS):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      filters = librosa.filters.mel(sr=SR, n_fft=w, n_mels=m)
    logs = []
    for x in (estimate, reference):
      mag = np.abs(librosa.stft(x.astype(np.float64), n_fft=w, hop_length=w // 4,
                                window="hann", center=True, pad_mode="reflect"))
      logs.append(np.log10(np.maximum(filters.astype(np.float64) @ mag, 1e-5)))
    total += np.mean(np.abs(logs[0] - logs[1]))
  return total


def test_mel_loss_is_zero_for_identical_inputs():
  x = jnp.asarray(_signals(samples=4410))
  assert float(_mel_loss(x, x)) == 0.0


def test_mel_loss_equals_librosa_reimplementation():
  reference = _signals(samples=4410, seed=1)
  estimate = 0.7 * reference + 0.02 * np.random.default_rng(2).standard_normal(
      reference.shape).astype(np.float32)
  got = float(_mel_loss(estimate, reference))
  np.testing.assert_allclose(got, _mel_loss_numpy(estimate, reference), rtol=1e-4)
  per_example = np.asarray(_mel_distance(estimate, reference))
  assert per_example.shape == (2,)
  np.testing.assert_allclose(per_example.mean(), got, rtol=1e-6)
  np.testing.assert_allclose(
      per_example[1], _mel_loss_numpy(estimate[1], reference[1]), rtol=1e-4)


# ----------------------------------------------------------------------------- GAN losses


def _constant_outputs(logit_values, feature_values):
  return [discriminators.DiscriminatorOutput(
      [jnp.full((2, 3, 4, 5), f) for f in feats], jnp.full((2, 6, 1, 1), logit))
          for logit, feats in zip(logit_values, feature_values)]


def test_least_squares_gan_losses():
  d_fake = _constant_outputs([0.5, -1.0], [[0.0, 1.0], [2.0]])
  d_real = _constant_outputs([0.8, 1.0], [[0.5, 1.0], [-1.0]])
  # Σ mean(fake²) + mean((1 − real)²) = (0.25 + 0.04) + (1 + 0).
  np.testing.assert_allclose(vae_losses.discriminator_loss(d_fake, d_real), 1.29, rtol=1e-6)
  # Σ mean((1 − fake)²) = 0.25 + 4.
  np.testing.assert_allclose(vae_losses.generator_adversarial_loss(d_fake), 4.25, rtol=1e-6)


def test_feature_matching_loss_value_and_stop_gradient():
  d_fake = _constant_outputs([0.0, 0.0], [[0.0, 1.0], [2.0]])
  d_real = _constant_outputs([9.0, 9.0], [[0.5, 1.0], [-1.0]])
  # |0 − 0.5| + |1 − 1| + |2 − (−1)|; the logits (9 vs 0) are not features.
  np.testing.assert_allclose(vae_losses.feature_matching_loss(d_fake, d_real), 3.5, rtol=1e-6)
  grad_fake, grad_real = jax.grad(vae_losses.feature_matching_loss, argnums=(0, 1))(
      d_fake, d_real)
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree_util.tree_leaves(grad_real))
  np.testing.assert_allclose(grad_fake[1].features[0], 1.0 / 120)
  with pytest.raises(ValueError, match="same discriminator"):
    vae_losses.feature_matching_loss(d_fake, d_real[:1])


def test_weighted_generator_loss():
  terms = {"mel": jnp.float32(2.0), "feature_matching": jnp.float32(3.0),
           "adversarial": jnp.float32(5.0), "kl": jnp.float32(0.5),
           "waveform": jnp.float32(0.25), "mel_magnitude": jnp.float32(7.0)}
  # The paper's weights leave the waveform and mel magnitude terms out.
  total, logged = vae_losses.weighted_generator_loss(terms, vae_losses.DEFAULT_LOSS_WEIGHTS)
  np.testing.assert_allclose(total, 15 * 2 + 2 * 3 + 1 * 5 + 10 * 0.5, rtol=1e-6)
  assert set(logged) == set(vae_losses.LOSS_TERMS) and float(logged["kl"]) == 0.5
  weights = ml_collections.ConfigDict(
      {"mel": 1.0, "feature_matching": 0.0, "adversarial": 2.0, "kl": 4.0, "waveform": 8.0,
       "mel_magnitude": 0.5})
  total, _ = vae_losses.weighted_generator_loss(terms, weights)
  np.testing.assert_allclose(total, 2 + 10 + 2 + 2 + 3.5, rtol=1e-6)
  with pytest.raises(ValueError, match="missing.*'kl'.*unknown.*'kld'"):
    vae_losses.weighted_generator_loss(
        terms, {"mel": 1.0, "feature_matching": 1.0, "adversarial": 1.0, "kld": 1.0,
                "waveform": 0.0, "mel_magnitude": 0.0})


def test_waveform_l1_sees_phase_that_mel_does_not():
  t = np.arange(22050) / 22050.0
  reference = np.sin(2 * np.pi * 220 * t)[None].astype(np.float32)
  shifted = np.sin(2 * np.pi * 220 * t + np.pi / 2)[None].astype(np.float32)
  quieter = 0.5 * reference
  assert float(vae_losses.waveform_l1(reference, reference)) == 0.0
  # The mel loss ranks a quarter-period shift as closer than a 6 dB level error; the
  # waveform term ranks it as much farther. (One program for both: the multi-scale mel
  # distance op by op is ~190 small compiles.)
  mel_loss = jax.jit(vae_losses.multiscale_mel_loss)
  assert float(mel_loss(shifted, reference)) < float(mel_loss(quieter, reference))
  assert (float(vae_losses.waveform_l1(shifted, reference))
          > 2 * float(vae_losses.waveform_l1(quieter, reference)))


def test_the_magnitude_half_sees_a_missing_kick_that_the_log_half_hardly_does():
  # A loud 55 Hz tone (a kick's thump) under quiet broadband noise. The log half ranks
  # dropping the tone (a few low mel bins, nearly all the energy) about as bad as halving
  # the noise (every bin by 6 dB, little energy): 1.92 against 1.65. The magnitude half,
  # which weighs bins by their magnitude, ranks it 18 times worse.
  rng = np.random.default_rng(0)
  t = np.arange(22050) / 22050.0
  tone = 0.5 * np.sin(2 * np.pi * 55 * t)
  noise = 0.01 * rng.standard_normal(t.shape)
  reference = (tone + noise)[None].astype(np.float32)
  no_kick = noise[None].astype(np.float32)
  quieter_noise = (tone + 0.5 * noise)[None].astype(np.float32)
  terms = jax.jit(vae_losses.mel_loss_terms)
  missing, halved = terms(no_kick, reference), terms(quieter_noise, reference)
  assert float(missing["mel_magnitude"]) > 10 * float(halved["mel_magnitude"])
  assert float(missing["mel"]) < 1.5 * float(halved["mel"])
  # The two halves are the distance's, from the same STFTs.
  log_distance, magnitude_distance = vae_losses.multiscale_mel_terms(no_kick, reference)
  np.testing.assert_allclose(
      vae_losses.multiscale_mel_distance(no_kick, reference, log_weight=2.0, mag_weight=3.0),
      2.0 * log_distance + 3.0 * magnitude_distance, rtol=1e-6)
  np.testing.assert_allclose(missing["mel"], log_distance.mean(), rtol=1e-6)


# ----------------------------------------------------------------------------- SI-SDR


def test_si_sdr_known_values():
  rng = np.random.default_rng(3)
  reference = rng.standard_normal((3, 22050)).astype(np.float32)
  assert np.all(np.asarray(vae_losses.si_sdr(2.5 * reference, reference)) > 80)
  # Noise orthogonal to the (zero-mean) reference at exactly 10 dB gives exactly 10 dB.
  ref = reference - reference.mean(-1, keepdims=True)
  noise = rng.standard_normal(ref.shape)
  noise -= noise.mean(-1, keepdims=True)
  noise -= (np.sum(noise * ref, -1, keepdims=True) / np.sum(ref * ref, -1, keepdims=True)) * ref
  noise *= np.sqrt(np.sum(ref ** 2, -1, keepdims=True) / np.sum(noise ** 2, -1, keepdims=True)
                   / 10.0)
  got = np.asarray(vae_losses.si_sdr((ref + noise).astype(np.float32), ref))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, 10.0, atol=1e-3)
  # Plain white noise at 20 dB SNR: SI-SDR within 0.1 dB of it.
  noise = rng.standard_normal(reference.shape) * np.sqrt(np.mean(reference ** 2) / 100.0)
  got = np.asarray(vae_losses.si_sdr((reference + noise).astype(np.float32), reference))
  np.testing.assert_allclose(got, 20.0, atol=0.1)


# ----------------------------------------------------------------------------- discriminators


def test_full_discriminator_shapes_and_parameter_count():
  model = discriminators.make_discriminator("full")
  one_second = jax.ShapeDtypeStruct((2, SR), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), one_second)
  counts = {name: sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(sub))
            for name, sub in variables["params"].items()}
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(variables))
  # 5 × 8,221,154 (period) + 3 × 471,330 (complex STFT), weight_g and weight_v both counted.
  assert [counts[f"discriminators_{k}"] for k in range(8)] == [8_221_154] * 5 + [471_330] * 3
  assert sum(counts.values()) == 42_519_760

  outputs = jax.eval_shape(model.apply, variables, one_second)
  assert len(outputs) == 8
  for period, out in zip(discriminators.PERIODS, outputs[:5]):
    assert len(out.features) == 5
    # 22050 samples + a whole extra period (DAC's padding), folded, then one stride of 3.
    rows = (SR + period - SR % period) // period
    assert out.features[0].shape == (2, (rows - 1) // 3 + 1, period, 32)
    assert out.features[-1].shape[1:] == out.logits.shape[1:3] + (1024,)
    assert out.logits.shape[-1] == 1
  for window, out in zip(discriminators.FFT_SIZES, outputs[5:]):
    assert len(out.features) == 25  # 5 bands × 5 convs
    frames = -(-SR // (window // 4))
    edges = discriminators.band_edges(window)
    assert out.features[0].shape == (2, frames, edges[0][1] - edges[0][0], 32)
    assert out.logits.shape[:2] == (2, frames) and out.logits.shape[-1] == 1
  assert discriminators.band_edges(2048) == [(0, 102), (102, 256), (256, 512), (512, 768),
                                             (768, 1025)]


@pytest.fixture(scope="module")
def tiny():
  model = discriminators.make_discriminator("tiny")
  x = jnp.asarray(_signals(batch=2, samples=3000, seed=4))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  return model, jax.jit(model.apply), variables, x


def test_discriminator_ignores_offset_and_level(tiny):
  _, apply, variables, x = tiny
  base, moved = apply(variables, x), apply(variables, 2.5 * x + 0.3)
  assert [len(o.features) for o in base] == [5, 5, 25]  # tiny: periods 2, 3; one STFT size
  for a, b in zip(jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(moved)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(a).max()))


def test_discriminator_bfloat16_compute_keeps_float32_params(tiny):
  _, apply, variables, x = tiny
  model = discriminators.make_discriminator("tiny", dtype="bfloat16")
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(
      jax.eval_shape(model.init, jax.random.key(0), x)))
  outputs = jax.jit(model.apply)(variables, x)
  assert all(o.logits.dtype == jnp.bfloat16 and o.features[0].dtype == jnp.bfloat16
             for o in outputs)
  for a, b in zip(outputs, apply(variables, x)):
    np.testing.assert_allclose(np.asarray(a.logits, np.float32), b.logits, rtol=0.1,
                               atol=0.05 * float(jnp.abs(b.logits).max()))
  with pytest.raises(ValueError, match="unknown discriminator option"):
    discriminators.make_discriminator("tiny", channels=3)


def test_generator_and_discriminator_losses_with_gradients(tiny):
  model, _, variables, reference = tiny
  # The second example is silent: gradients must stay finite through |STFT| and the
  # discriminator's peak normalisation.
  estimate = jnp.stack([0.9 * reference[0] + 0.01, jnp.zeros_like(reference[1])])

  def losses(params, estimate):
    # Fake and real through the discriminator as one batch, as a trainer may do.
    batch = reference.shape[0]
    outputs = model.apply({"params": params}, jnp.concatenate([estimate, reference]))
    d_fake = [([f[:batch] for f in o.features], o.logits[:batch]) for o in outputs]
    d_real = [([f[batch:] for f in o.features], o.logits[batch:]) for o in outputs]
    g_total, terms = vae_losses.generator_loss(estimate, reference, d_fake, d_real,
                                               kl=jnp.float32(0.1))
    return g_total, (vae_losses.discriminator_loss(d_fake, d_real), terms)

  (g_total, (d_loss, terms)), (grad_params, grad_estimate) = jax.jit(
      jax.value_and_grad(losses, argnums=(0, 1), has_aux=True))(variables["params"], estimate)
  assert np.isfinite(float(g_total)) and np.isfinite(float(d_loss))
  np.testing.assert_allclose(
      g_total, 15 * terms["mel"] + 2 * terms["feature_matching"] + terms["adversarial"] + 1.0,
      rtol=1e-5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad_params))
  assert np.all(np.isfinite(grad_estimate)) and float(jnp.abs(grad_estimate).sum()) > 0


def _conv2d_nchw(x, weight, bias, stride, padding):
  x = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
  windows = np.lib.stride_tricks.sliding_window_view(x, weight.shape[2:], axis=(2, 3))
  windows = windows[:, :, ::stride[0], ::stride[1]]
  return np.einsum("ncijab,ocab->noij", windows, weight) + bias[None, :, None, None]


def test_wnconv2d_matches_pytorch_weight_norm_semantics():
  rng = np.random.default_rng(5)
  weight_v = rng.standard_normal((6, 3, 3, 9)).astype(np.float32)  # torch [out, in, kh, kw]
  weight_g = rng.uniform(0.5, 2, (6, 1, 1, 1)).astype(np.float32)
  bias = rng.standard_normal(6).astype(np.float32)
  x = rng.standard_normal((2, 3, 7, 20)).astype(np.float32)  # torch NCHW
  state = {"module.discriminators.5.band_convs.0.1.0.parametrizations.weight.original0": weight_g,
           "module.discriminators.5.band_convs.0.1.0.parametrizations.weight.original1": weight_v,
           "module.discriminators.5.band_convs.0.1.0.bias": bias}
  params = discriminators.params_from_torch(state)["discriminators_5"]["band_convs_0_1"]
  old_style = {k.replace("module.", "").replace("parametrizations.weight.original0", "weight_g")
               .replace("parametrizations.weight.original1", "weight_v"): v
               for k, v in state.items()}  # torch.nn.utils.weight_norm's names
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      np.array_equal, discriminators.params_from_torch(old_style),
      discriminators.params_from_torch(state)))
  conv = discriminators.WNConv2d(6, (3, 9), (1, 2), (1, 4))
  got = conv.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  kernel = weight_g * weight_v / np.sqrt(np.sum(weight_v ** 2, axis=(1, 2, 3), keepdims=True))
  expected = _conv2d_nchw(x, kernel, bias, (1, 2), (1, 4))
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=1e-4,
                             atol=1e-4)
  # PyTorch's init: weight_v, bias ~ U(±1/√fan_in); weight_g = ‖weight_v‖ (kernel = weight_v).
  init = conv.init(jax.random.key(0), jnp.zeros((1, 7, 20, 3)))["params"]
  assert init["weight_v"].shape == (6, 3, 3, 9) and init["weight_g"].shape == (6, 1, 1, 1)
  np.testing.assert_allclose(init["weight_g"], np.sqrt(np.sum(
      np.asarray(init["weight_v"]) ** 2, axis=(1, 2, 3), keepdims=True)), rtol=1e-6)
  bound = 1 / np.sqrt(3 * 3 * 9)
  for name in ("weight_v", "bias"):
    values = np.asarray(init[name])
    assert np.all(np.abs(values) <= bound) and np.abs(values).max() > 0.5 * bound
  assert not np.allclose(init["bias"], np.asarray(init["weight_v"]).reshape(-1)[:6])
  with pytest.raises(ValueError, match="unexpected discriminator state-dict key"):
    discriminators.params_from_torch({"generator.conv.weight": weight_v})
