"""Losses of the SourceVAE's GAN training, and its validation metrics.

The reference (the MSLDM release, built on DAC's training code and descript-audiotools)
trains the VAE's generator on

    15 · mel + 2 · feature_matching + 1 · adversarial + 10 · KL,

and the discriminator on a least-squares GAN loss. The KL term belongs to the model
(`models/source_vae.py`); this module only weighs it in. Two more terms are off at the
paper's weights (0): the waveform's mean absolute error (ours: mel, feature-matching and
adversarial terms are all blind to phase, so only it asks the decoder for the input's phase,
which SI-SDR measures), and the mel loss's magnitude half (audiotools' `mag_weight`, which
DAC sets to 0: the log half weighs every mel bin alike, so a decoder can drop a loud low band
at little cost to it).

Discriminator outputs are taken as a sequence with one `(features, logits)` pair per
sub-discriminator (`models.discriminators.DiscriminatorOutput` is such a pair); `features` are
the intermediate activations (not the logits), as DAC's feature maps minus their last entry.

All losses are computed in float32, whatever the compute dtype of their inputs.
"""

from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp

from msldm_jax import stems
from msldm_jax.audio import spectral

# The reference's multi-scale mel loss (SourceVAE/configs.json): 7 scales, hop = window / 4.
MEL_WINDOW_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)
MEL_N_MELS = (5, 10, 20, 40, 80, 160, 320)
MEL_CLAMP_EPS = 1e-5

# The generator's loss terms and the reference's weights for them ("lambdas" of configs.json).
LOSS_TERMS = ("mel", "feature_matching", "adversarial", "kl", "waveform", "mel_magnitude")
DEFAULT_LOSS_WEIGHTS = {"mel": 15.0, "feature_matching": 2.0, "adversarial": 1.0, "kl": 10.0,
                        "waveform": 0.0, "mel_magnitude": 0.0}

# One (features, logits) pair per sub-discriminator.
DiscriminatorOutputs = Sequence[tuple[Sequence[jax.Array], jax.Array]]


def _f32(x: jax.Array) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def multiscale_mel_terms(estimate: jax.Array, reference: jax.Array, *,
                         sample_rate: int = stems.SAMPLE_RATE,
                         window_lengths: Sequence[int] = MEL_WINDOW_LENGTHS,
                         n_mels: Sequence[int] = MEL_N_MELS,
                         clamp_eps: float = MEL_CLAMP_EPS, power: float = 1.0
                         ) -> tuple[jax.Array, jax.Array]:
  """The two halves of DAC's / audiotools' `MelSpectrogramLoss` per example, from one STFT
  per scale: `[..., samples]` pair -> (log distance `[...]`, magnitude distance `[...]`).

  For each scale (window w, hop w/4, centred Hann STFT, |STFT| through Slaney mel filters):
  log: mean|log10(max(mel_est, eps)^power) − log10(max(mel_ref, eps)^power)|;
  magnitude: mean|mel_est − mel_ref|; the means over (frames, mels), then the sum over
  scales, with the reference's settings (pow 1, clamp_eps 1e-5, fmin 0, fmax sr/2).

  The log half weighs every mel bin alike, whatever its energy; the magnitude half weighs
  bins by their magnitude, so it is the one that sees a loud low band (a kick drum's) go
  missing. audiotools' `mag_weight` (default 1) weighs the second; DAC and the release set
  it to 0 (here: the generator's `mel_magnitude` term).
  """
  chex.assert_equal_shape([estimate, reference])
  if len(window_lengths) != len(n_mels):
    raise ValueError(f"window_lengths {tuple(window_lengths)} and n_mels {tuple(n_mels)} "
                     "must have the same length (one n_mels per scale)")
  estimate, reference = _f32(estimate), _f32(reference)
  log_total = jnp.zeros(estimate.shape[:-1], jnp.float32)
  magnitude_total = jnp.zeros(estimate.shape[:-1], jnp.float32)
  for window_length, mels in zip(window_lengths, n_mels):
    kwargs = dict(sample_rate=sample_rate, n_fft=window_length,
                  hop_length=window_length // 4, n_mels=mels)
    # One STFT of both signals stacked: half the ops to trace and compile of two calls.
    mel_est, mel_ref = spectral.mel_spectrogram(jnp.stack([estimate, reference]), **kwargs)
    # log10(clamp(m)^p) = p·log10(clamp(m)): the clamp before the power, as audiotools.
    log_est = power * jnp.log10(jnp.maximum(mel_est, clamp_eps))
    log_ref = power * jnp.log10(jnp.maximum(mel_ref, clamp_eps))
    log_total += jnp.mean(jnp.abs(log_est - log_ref), axis=(-2, -1))
    magnitude_total += jnp.mean(jnp.abs(mel_est - mel_ref), axis=(-2, -1))
  return log_total, magnitude_total


def multiscale_mel_distance(estimate: jax.Array, reference: jax.Array, *,
                            log_weight: float = 1.0, mag_weight: float = 0.0,
                            **kwargs: Any) -> jax.Array:
  """Multi-scale mel L1 distance per example: `[..., samples]` pair -> `[...]`,
  log_weight · log distance + mag_weight · magnitude distance (`multiscale_mel_terms`,
  which takes the other keyword arguments). At the defaults this is DAC's / audiotools'
  `MelSpectrogramLoss` with the reference's settings (mag_weight 0): its `nn.L1Loss` takes
  the mean of each scale, and the scales are summed. The mean over examples of this distance
  is that loss (every example has the same number of elements).
  """
  log_distance, magnitude_distance = multiscale_mel_terms(estimate, reference, **kwargs)
  return log_weight * log_distance + mag_weight * magnitude_distance


def multiscale_mel_loss(estimate: jax.Array, reference: jax.Array, **kwargs: Any) -> jax.Array:
  """The generator's mel loss: `multiscale_mel_distance` averaged over examples (a scalar)."""
  return jnp.mean(multiscale_mel_distance(estimate, reference, **kwargs))


def mel_loss_terms(estimate: jax.Array, reference: jax.Array, **kwargs: Any
                   ) -> dict[str, jax.Array]:
  """The generator's two mel terms, averaged over examples: {"mel": the log distance (the
  release's mel loss), "mel_magnitude": the magnitude distance}."""
  log_distance, magnitude_distance = multiscale_mel_terms(estimate, reference, **kwargs)
  return {"mel": jnp.mean(log_distance), "mel_magnitude": jnp.mean(magnitude_distance)}


def _check_pairs(d_fake: DiscriminatorOutputs, d_real: DiscriminatorOutputs) -> None:
  if len(d_fake) != len(d_real):
    raise ValueError(f"{len(d_fake)} fake and {len(d_real)} real discriminator outputs: "
                     "both must come from the same discriminator")


def discriminator_loss(d_fake: DiscriminatorOutputs, d_real: DiscriminatorOutputs) -> jax.Array:
  """Least-squares GAN loss of the discriminator: Σ_k mean(D_k(fake)²) + mean((1 − D_k(real))²).

  Pass the discriminator's outputs on `jax.lax.stop_gradient(fake)` (as the reference's
  `fake.clone().detach()`) when the generator's parameters are also being differentiated.
  """
  _check_pairs(d_fake, d_real)
  loss = jnp.zeros((), jnp.float32)
  for (_, logits_fake), (_, logits_real) in zip(d_fake, d_real):
    loss += jnp.mean(_f32(logits_fake) ** 2) + jnp.mean((1.0 - _f32(logits_real)) ** 2)
  return loss


def generator_adversarial_loss(d_fake: DiscriminatorOutputs) -> jax.Array:
  """Least-squares GAN loss of the generator: Σ_k mean((1 − D_k(fake))²)."""
  loss = jnp.zeros((), jnp.float32)
  for _, logits_fake in d_fake:
    loss += jnp.mean((1.0 - _f32(logits_fake)) ** 2)
  return loss


def feature_matching_loss(d_fake: DiscriminatorOutputs,
                          d_real: DiscriminatorOutputs) -> jax.Array:
  """Σ over sub-discriminators and their feature maps of mean|f_fake − f_real|.

  The logits are not feature maps. f_real is a constant here (stop-gradient, as the reference's
  `.detach()`): the generator is pulled towards the real activations, the activations of real
  audio are not pulled towards the fake ones through the discriminator.
  """
  _check_pairs(d_fake, d_real)
  loss = jnp.zeros((), jnp.float32)
  for k, ((features_fake, _), (features_real, _)) in enumerate(zip(d_fake, d_real)):
    if len(features_fake) != len(features_real):
      raise ValueError(f"sub-discriminator {k}: {len(features_fake)} fake and "
                       f"{len(features_real)} real feature maps")
    for f_fake, f_real in zip(features_fake, features_real):
      chex.assert_equal_shape([f_fake, f_real])
      loss += jnp.mean(jnp.abs(_f32(f_fake) - jax.lax.stop_gradient(_f32(f_real))))
  return loss


def waveform_l1(estimate: jax.Array, reference: jax.Array) -> jax.Array:
  """Mean absolute sample error (float32 scalar): the one generator term that sees phase."""
  chex.assert_equal_shape([estimate, reference])
  return jnp.mean(jnp.abs(_f32(estimate) - _f32(reference)))


def weighted_generator_loss(terms: Mapping[str, jax.Array], loss_weights: Mapping[str, Any]
                            ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Σ_k loss_weights[k] · terms[k] over `LOSS_TERMS`; returns (total, {term: value}).

  `loss_weights` is a dict or ConfigDict with exactly the keys of `LOSS_TERMS` (mel,
  feature_matching, adversarial, kl, waveform, mel_magnitude): a missing or unknown key is
  an error naming it, so that a misspelt weight cannot silently switch a term off. The
  returned dict holds the unweighted terms (float32 scalars), for logging.
  """
  weight_keys, term_keys = set(loss_weights.keys()), set(terms.keys())
  expected = set(LOSS_TERMS)
  if weight_keys != expected:
    raise ValueError(
        f"loss_weights has keys {sorted(weight_keys)}; expected exactly {list(LOSS_TERMS)} "
        f"(missing {sorted(expected - weight_keys)}, unknown {sorted(weight_keys - expected)})")
  if term_keys != expected:
    raise ValueError(
        f"loss terms {sorted(term_keys)}; expected exactly {list(LOSS_TERMS)} "
        f"(missing {sorted(expected - term_keys)}, unknown {sorted(term_keys - expected)})")
  values = {}
  for name in LOSS_TERMS:
    chex.assert_shape(terms[name], ())
    values[name] = _f32(terms[name])
  total = sum(loss_weights[name] * values[name] for name in LOSS_TERMS)
  return total, values


def loss_weights_by_stem(loss_weights: Mapping[str, Any], by_stem: Mapping[str, Any], *,
                         key: str = "loss_weights_by_stem",
                         stem_names: Sequence[str] = stems.STEM_NAMES
                         ) -> dict[str, float | tuple[float, ...]]:
  """`loss_weights` with per-stem overrides `by_stem` ({stem: {term: weight}}): a term that
  some stem overrides becomes a tuple of weights, one per `stem_names` entry (the others keep
  the common weight); the rest stay floats. `weights_for_stem` picks a batch's.

  Why per stem: a term's best weight differs between stems' VAEs (the mel magnitude term
  brings back a kick drum's low band and costs a guitar what the log mel taught it). An
  unknown stem or term is an error naming `key`.
  """
  weights = {name: float(value) for name, value in loss_weights.items()}
  for stem, overrides in by_stem.items():
    if stem not in stem_names:
      raise ValueError(f"config key {key}.{stem}: unknown stem (one of {list(stem_names)})")
    for name, value in overrides.items():
      if name not in LOSS_TERMS:
        raise ValueError(f"config key {key}.{stem}.{name}: unknown loss term (one of "
                         f"{list(LOSS_TERMS)})")
      current = weights[name]
      per_stem = list(current) if isinstance(current, tuple) else [current] * len(stem_names)
      per_stem[list(stem_names).index(stem)] = float(value)
      weights[name] = tuple(per_stem)
  return weights


def weights_for_stem(weights: Mapping[str, float | tuple[float, ...]], stem: jax.Array
                     ) -> dict[str, Any]:
  """The weights of a batch of stem index `stem` (an int32 scalar, traced or not) from
  `loss_weights_by_stem`'s result: a tuple's entry for that stem, a float as it is."""
  return {name: jnp.asarray(value, jnp.float32)[stem] if isinstance(value, tuple) else value
          for name, value in weights.items()}


def generator_loss(estimate: jax.Array, reference: jax.Array, d_fake: DiscriminatorOutputs,
                   d_real: DiscriminatorOutputs, kl: jax.Array,
                   loss_weights: Mapping[str, Any] = DEFAULT_LOSS_WEIGHTS, *,
                   sample_rate: int = stems.SAMPLE_RATE
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The VAE generator's loss: weighted mel, feature matching, adversarial, KL, waveform and
  mel magnitude terms.

  Args:
    estimate: the decoder's waveform `[batch, samples]`.
    reference: the input waveform, same shape.
    d_fake: discriminator outputs on `estimate` (gradients flow into the generator).
    d_real: discriminator outputs on `reference`.
    kl: the model's KL term (a scalar, batch-averaged).
    loss_weights: see `weighted_generator_loss`.
    sample_rate: for the mel filters.

  Returns:
    (total, {'mel', 'feature_matching', 'adversarial', 'kl', 'waveform', 'mel_magnitude'}:
    unweighted terms).
  """
  chex.assert_rank(estimate, 2)
  terms = {
      **mel_loss_terms(estimate, reference, sample_rate=sample_rate),
      "feature_matching": feature_matching_loss(d_fake, d_real),
      "adversarial": generator_adversarial_loss(d_fake),
      "kl": kl,
      "waveform": waveform_l1(estimate, reference),
  }
  return weighted_generator_loss(terms, loss_weights)


def si_sdr(estimate: jax.Array, reference: jax.Array, *, zero_mean: bool = True,
           eps: float = 1e-8) -> jax.Array:
  """Scale-invariant signal-to-distortion ratio in dB per example: `[..., samples]` -> `[...]`.

  SI-SDR = 10·log10(‖α·s‖² / ‖ŝ − α·s‖²) with α = ⟨ŝ, s⟩ / ‖s‖² (Le Roux et al. 2019), means
  removed first when `zero_mean`. `eps` keeps silent pairs finite (both silent: 0 dB).
  """
  chex.assert_equal_shape([estimate, reference])
  estimate, reference = _f32(estimate), _f32(reference)
  if zero_mean:
    estimate = estimate - jnp.mean(estimate, axis=-1, keepdims=True)
    reference = reference - jnp.mean(reference, axis=-1, keepdims=True)
  alpha = (jnp.sum(estimate * reference, axis=-1, keepdims=True)
           / (jnp.sum(reference ** 2, axis=-1, keepdims=True) + eps))
  target = alpha * reference
  distortion = estimate - target
  return 10.0 * jnp.log10((jnp.sum(target ** 2, axis=-1) + eps)
                          / (jnp.sum(distortion ** 2, axis=-1) + eps))
