"""The SourceVAE's GAN discriminators: multi-period and multi-band complex-STFT (DAC's).

The reference (the MSLDM release) trains its VAE against DAC's `Discriminator` with
`rates=[]`, periods (2, 3, 5, 7, 11), FFT sizes (2048, 1024, 512) and bands
[0, .1, .25, .5, .75, 1], at 22050 Hz: five period discriminators ("MPD") and three complex-STFT
discriminators ("MRD"), eight sub-discriminators in all. Every conv is weight-normalised with
a bias and followed by LeakyReLU(0.1), except each sub-discriminator's last ("post") conv,
which gives the logits.

Layout: flax's channels-last. A waveform is `[batch, samples]`; the 2-D maps are
`[batch, height, width, channels]` where PyTorch has `[batch, channels, height, width]`:
(rows of `period` samples, period) for the MPD, (STFT frames, frequency bins) for the MRD.
Parameters are float32 in PyTorch's layout, named as PyTorch's weight-norm parameters (see
`WNConv2d` and `params_from_torch`); `dtype` sets the compute dtype (float32 or bfloat16).

Behaviours of DAC kept on purpose, so that the two compute the same function:
- inputs are DC-removed and peak-normalised to 0.8 first (`preprocess`);
- the MPD pads `period − samples % period` samples, i.e. a whole extra period when the
  length is already a multiple (22050 samples → 22052 at period 2);
- the MRD's STFT uses audiotools' `match_stride=True` alignment (ceil(samples / hop) frames;
  see `spectral.stft`), and its band edges are `int(fraction · (window // 2 + 1))` bins.
"""

import math
import re
from typing import Any, Mapping, NamedTuple, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax.audio import spectral
from msldm_jax.models import audio_layers

LEAKY_RELU_SLOPE = 0.1
PEAK_LEVEL = 0.8
PERIODS = (2, 3, 5, 7, 11)
FFT_SIZES = (2048, 1024, 512)
BANDS = ((0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
PERIOD_CHANNELS = (32, 128, 512, 1024, 1024)
STFT_CHANNELS = 32

# Variants for `make_discriminator`: 'full' is the reference's. 'tiny', for fast tests, keeps
# both kinds of sub-discriminator with all their layers, kernels, strides and bands, but few
# channels and three sub-discriminators instead of eight: compile time on CPU grows with the
# number of convs (jitted init + forward: ~5 s CPU for these three, ~11 s for all eight).
VARIANTS = {
    "full": {},
    "tiny": {"periods": (2, 3), "fft_sizes": (512,), "period_channels": (4, 8, 8, 16, 16),
             "stft_channels": 4},
}
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DiscriminatorOutput(NamedTuple):
  """One sub-discriminator's output.

  features: the activations after each LeakyReLU, in order (DAC's feature maps without the
    last entry); channels-last.
  logits: the post conv's output `[batch, height, width, 1]` (DAC's last feature map).
  """
  features: list[jax.Array]
  logits: jax.Array


class WNConv2d(nn.Module):
  """Weight-normalised 2-D convolution with bias (PyTorch `weight_norm(nn.Conv2d)`, dim=0).

  kernel = weight_g · weight_v / ‖weight_v‖, the norm taken per output channel over
  (input channels, height, width): every axis but PyTorch's first (output) one.

  Parameters are float32 in PyTorch's layout, as `audio_layers.WNConv1d`'s, so that a
  PyTorch state dict maps one to one (see `params_from_torch`):
    weight_v `[out, in, kh, kw]`, weight_g `[out, 1, 1, 1]`, bias `[out]`.
  Initialised as PyTorch does: weight_v and bias ~ U(±1/√fan_in) (nn.Conv2d's default), and
  weight_g = ‖weight_v‖ so that the initial kernel is weight_v.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: symmetric zero padding (ph, pw), as PyTorch's `padding=(ph, pw)`.
    dtype: compute dtype; the kernel is formed in float32, then cast.
  """
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    in_features = x.shape[-1]
    kh, kw = self.kernel_size
    shape_v = (self.features, in_features, kh, kw)
    size_v = math.prod(shape_v)
    bound = 1.0 / math.sqrt(in_features * kh * kw)
    draw = None
    if self.is_initializing():
      # One random draw for weight_v and bias together: on CPU the random-bit generator is
      # nearly all of a jitted init's compile time (about 0.1 s per draw, 100+ convs).
      draw = jax.random.uniform(self.make_rng("params"), (size_v + self.features,),
                                jnp.float32, -bound, bound)

    def from_draw(start, shape):
      def init(_):
        if draw is None:  # apply: flax traces initialisers abstractly to check stored shapes
          return jnp.zeros(shape, jnp.float32)
        return draw[start:start + math.prod(shape)].reshape(shape)
      return init

    weight_v = self.param("weight_v", from_draw(0, shape_v))
    weight_g = self.param("weight_g", lambda _: _norm_except_first(weight_v))
    bias = self.param("bias", from_draw(size_v, (self.features,)))
    # [out, in, kh, kw] -> [kh, kw, in, out] (HWIO), once per call, outside the convolution.
    kernel = jnp.transpose(audio_layers.weight_norm(weight_v, weight_g), (2, 3, 1, 0))
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=self.strides,
        padding=[(p, p) for p in self.padding],
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


def _norm_except_first(weight_v: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=(1, 2, 3), keepdims=True))


def preprocess(waveform: jax.Array) -> jax.Array:
  """DC removal and peak normalisation to 0.8, per example, in float32 (as DAC's).

  The discriminator so sees neither offset nor level, only shape: D(a·x + c) = D(x) for a > 0.
  The 1e-9 (DAC's) keeps a silent input at zero instead of dividing by zero.
  """
  waveform = jnp.asarray(waveform, jnp.float32)
  waveform = waveform - jnp.mean(waveform, axis=-1, keepdims=True)
  peak = jnp.max(jnp.abs(waveform), axis=-1, keepdims=True)
  return PEAK_LEVEL * waveform / (peak + 1e-9)


class PeriodDiscriminator(nn.Module):
  """Multi-period sub-discriminator ("MPD") for one period.

  The waveform is reflect-padded, folded into rows of `period` samples `[batch, rows, period,
  1]`, and convolved along the rows only (kernels (k, 1)), so each column sees the samples
  `period` apart: a view on periodic structure that a 1-D conv at stride 1 would blur.

  Attributes:
    period: the fold width.
    channels: output channels of the convs before the post conv; all but the last are strided.
    kernel_size: k of the (k, 1) kernels (padding k // 2).
    stride: row stride of all convs but the last before the post conv.
    dtype: compute dtype.
  """
  period: int
  channels: Sequence[int] = PERIOD_CHANNELS
  kernel_size: int = 5
  stride: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, waveform: jax.Array) -> DiscriminatorOutput:
    chex.assert_rank(waveform, 2)
    batch, samples = waveform.shape
    # DAC pads `period - samples % period`: a whole period when already a multiple. Kept.
    pad = self.period - samples % self.period
    x = jnp.pad(waveform, ((0, 0), (0, pad)), mode="reflect")
    x = x.reshape(batch, (samples + pad) // self.period, self.period, 1).astype(self.dtype)
    features = []
    for i, features_out in enumerate(self.channels):
      stride = self.stride if i < len(self.channels) - 1 else 1
      x = WNConv2d(features_out, (self.kernel_size, 1), (stride, 1),
                   (self.kernel_size // 2, 0), dtype=self.dtype, name=f"convs_{i}")(x)
      x = nn.leaky_relu(x, LEAKY_RELU_SLOPE)
      features.append(x)
    logits = WNConv2d(1, (3, 1), (1, 1), (1, 0), dtype=self.dtype, name="conv_post")(x)
    return DiscriminatorOutput(features, logits)


def band_edges(window_length: int,
               bands: Sequence[tuple[float, float]] = BANDS) -> list[tuple[int, int]]:
  """Frequency-bin ranges [lo, hi) of the bands of a `window_length`-point STFT (as DAC)."""
  num_bins = window_length // 2 + 1
  return [(int(lo * num_bins), int(hi * num_bins)) for lo, hi in bands]


class ComplexSTFTDiscriminator(nn.Module):
  """Multi-band complex-STFT sub-discriminator ("MRD") for one window length.

  Real and imaginary parts of the STFT are two input channels `[batch, frames, bins, 2]`
  (DAC: `view_as_real` then `b 2 t f`). Each frequency band has its own stack of five convs
  (the second to fourth halve the frequency axis), the bands' outputs are concatenated along
  frequency, and one post conv gives the logits.

  Attributes:
    window_length: STFT size (periodic Hann window of that length).
    hop_factor: hop = int(window_length · hop_factor).
    bands: fractions of the `window_length // 2 + 1` bins.
    channels: width of every band conv.
    match_stride: the STFT alignment (see `spectral.stft`); True as DAC.
    dtype: compute dtype (the STFT itself is float32).
  """
  window_length: int
  hop_factor: float = 0.25
  bands: Sequence[tuple[float, float]] = BANDS
  channels: int = STFT_CHANNELS
  match_stride: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, waveform: jax.Array) -> DiscriminatorOutput:
    chex.assert_rank(waveform, 2)
    hop = int(self.window_length * self.hop_factor)
    spectrum = spectral.stft(waveform, self.window_length, hop, match_stride=self.match_stride)
    x = jnp.stack([jnp.real(spectrum), jnp.imag(spectrum)], axis=-1).astype(self.dtype)
    # (kernel, strides, padding) of the five band convs.
    layers = [((3, 9), (1, 1), (1, 4))] + [((3, 9), (1, 2), (1, 4))] * 3 + [
        ((3, 3), (1, 1), (1, 1))]
    features, band_outputs = [], []
    for b, (lo, hi) in enumerate(band_edges(self.window_length, self.bands)):
      h = x[:, :, lo:hi, :]
      for j, (kernel, strides, padding) in enumerate(layers):
        h = WNConv2d(self.channels, kernel, strides, padding, dtype=self.dtype,
                     name=f"band_convs_{b}_{j}")(h)
        h = nn.leaky_relu(h, LEAKY_RELU_SLOPE)
        features.append(h)
      band_outputs.append(h)
    h = jnp.concatenate(band_outputs, axis=2)
    logits = WNConv2d(1, (3, 3), (1, 1), (1, 1), dtype=self.dtype, name="conv_post")(h)
    return DiscriminatorOutput(features, logits)


class Discriminator(nn.Module):
  """All sub-discriminators on one mono waveform `[batch, samples]`.

  Returns a list of `DiscriminatorOutput`, the period discriminators first (in `periods`
  order), then the complex-STFT ones (in `fft_sizes` order), as DAC's `discriminators` list;
  submodule k is named `discriminators_k` after it.

  Attributes:
    periods: one `PeriodDiscriminator` per period.
    fft_sizes: one `ComplexSTFTDiscriminator` per window length.
    bands: the STFT discriminators' frequency bands.
    period_channels: channels of the period discriminators' convs.
    stft_channels: channels of the STFT discriminators' convs.
    match_stride: STFT alignment of the STFT discriminators (True as DAC).
    dtype: compute dtype, float32 or bfloat16; parameters stay float32.
  """
  periods: Sequence[int] = PERIODS
  fft_sizes: Sequence[int] = FFT_SIZES
  bands: Sequence[tuple[float, float]] = BANDS
  period_channels: Sequence[int] = PERIOD_CHANNELS
  stft_channels: int = STFT_CHANNELS
  match_stride: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, waveform: jax.Array) -> list[DiscriminatorOutput]:
    chex.assert_rank(waveform, 2)
    x = preprocess(waveform)
    outputs = []
    for period in self.periods:
      outputs.append(PeriodDiscriminator(
          period, self.period_channels, dtype=self.dtype,
          name=f"discriminators_{len(outputs)}")(x))
    for window_length in self.fft_sizes:
      outputs.append(ComplexSTFTDiscriminator(
          window_length, bands=self.bands, channels=self.stft_channels,
          match_stride=self.match_stride, dtype=self.dtype,
          name=f"discriminators_{len(outputs)}")(x))
    return outputs


def make_discriminator(variant: str = "full", *, dtype: Any = "float32",
                       **overrides: Any) -> Discriminator:
  """A `Discriminator` of a named variant ('full', 'tiny'), with field overrides.

  `dtype` is 'float32', 'bfloat16' or a jnp dtype. Config files can pass their
  `discriminator` section as keyword arguments; an unknown field is an error naming it.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown discriminator variant {variant!r}; known: {sorted(VARIANTS)}")
  fields = set(Discriminator.__dataclass_fields__) - {"parent", "name", "dtype"}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown discriminator option(s) {sorted(unknown)}; known: "
                     f"{sorted(fields)}")
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"discriminator dtype {dtype!r}: expected one of {sorted(_DTYPES)}")
    dtype = _DTYPES[dtype]
  kwargs = {**VARIANTS[variant], **overrides}
  kwargs = {k: tuple(tuple(b) for b in v) if k == "bands" else
            (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
  return Discriminator(dtype=dtype, **kwargs)


# PyTorch state-dict names of one conv's parameters -> ours, for old-style `weight_norm`
# (weight_g / weight_v) and for `torch.nn.utils.parametrizations.weight_norm`.
_TORCH_LEAF = {
    "weight_g": "weight_g", "parametrizations.weight.original0": "weight_g",
    "weight_v": "weight_v", "parametrizations.weight.original1": "weight_v",
    "bias": "bias",
}
_TORCH_CONV = [
    (re.compile(r"^discriminators\.(\d+)\.convs\.(\d+)\.0\.(.+)$"),
     lambda m: (f"discriminators_{m[1]}", f"convs_{m[2]}", m[3])),
    (re.compile(r"^discriminators\.(\d+)\.band_convs\.(\d+)\.(\d+)\.0\.(.+)$"),
     lambda m: (f"discriminators_{m[1]}", f"band_convs_{m[2]}_{m[3]}", m[4])),
    (re.compile(r"^discriminators\.(\d+)\.conv_post\.(.+)$"),
     lambda m: (f"discriminators_{m[1]}", "conv_post", m[2])),
]


def params_from_torch(state_dict: Mapping[str, Any]) -> dict:
  """Our `Discriminator` params from a DAC `Discriminator` state dict (numpy-convertible values).

  Only names change (shapes are PyTorch's on both sides): `discriminators.k.convs.i.0.*` ->
  `discriminators_k/convs_i`, `discriminators.k.band_convs.b.j.0.*` ->
  `discriminators_k/band_convs_b_j`, `discriminators.k.conv_post.*` ->
  `discriminators_k/conv_post`; weight_g / weight_v, or `parametrizations.weight.original0` /
  `original1`, -> weight_g / weight_v. A leading 'module.' (DistributedDataParallel) is
  dropped; a key that is no discriminator conv parameter is an error naming it.
  """
  params: dict = {}
  for key, value in state_dict.items():
    name = key[len("module."):] if key.startswith("module.") else key
    for pattern, to_path in _TORCH_CONV:
      match = pattern.match(name)
      if match:
        disc, conv, leaf = to_path(match)
        break
    else:
      raise ValueError(f"unexpected discriminator state-dict key {key!r}")
    if leaf not in _TORCH_LEAF:
      raise ValueError(f"unexpected parameter {leaf!r} in state-dict key {key!r}")
    params.setdefault(disc, {}).setdefault(conv, {})[_TORCH_LEAF[leaf]] = jnp.asarray(
        np.asarray(value, dtype=np.float32))
  return params
