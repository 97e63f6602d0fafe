"""SourceVAE: a DAC codec with a Gaussian bottleneck, one per stem or shared (reference §3).

Public layout (what the rest of the project sees):
  waveforms  [batch, stems, samples]
  latents    [batch, stems, latent_dim, frames]   channel-major per stem, as the joint latent
  (single-stem path: waveforms [batch, samples], latents [batch, latent_dim, frames])
Inside, activations are channels-last [batch, time, channels] (faster convolutions on XLA:CPU).

Shared or per-source parameters, one code path. Every parameter of `encoder` and `decoder`
carries a leading "parameter group" axis of size P: P = 1 when one VAE serves every stem (the
paper), P = num_stems when each stem has its own VAE (`per_source=True`). The stem axis of the
input is regrouped to [P, stems/P · batch] and the networks are `nn.vmap`-ed over P, so with
P = 1 all stems simply share one batch, and with P = num_stems each stem meets its own
parameters. The single-stem path (`encode_stem`/`decode_stem`, for VAE training windows
that each carry a stem index) runs every group on the whole batch and keeps each example's
own group: free when P = 1, P× the compute when per-source. The VAE trainer trains a
per-source model at 1× cost on one-stem batches instead, through `one_group`.

Parameter names mirror the reference's module tree (see msldm_jax/models/source_vae_import.py
for the key-by-key map to the released PyTorch checkpoint).
"""

import math
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msldm_jax import stems as stems_lib
from msldm_jax.models import audio_layers

Array = jax.Array

# The posterior's log-variance range (the reference's DiagonalGaussianDistribution).
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def model_config(variant: str = "paper") -> ml_collections.ConfigDict:
  """SourceVAE presets: 'paper' (the release, 61.05 M parameters) or 'tiny' (tests)."""
  if variant == "paper":
    config = dict(encoder_width=64, encoder_strides=(2, 4, 5, 8), decoder_width=1536,
                  decoder_strides=(8, 5, 4, 2), latent_dim=80)
  elif variant == "tiny":
    config = dict(encoder_width=8, encoder_strides=(2, 4), decoder_width=16,
                  decoder_strides=(4, 2), latent_dim=8)
  else:
    raise ValueError(f"unknown SourceVAE variant {variant!r} (paper, tiny)")
  config.update(
      dilations=(1, 3, 9),
      # Ours: no decoder block narrower than this (0: each block halves the width, as the
      # release's). The last blocks run at the highest rates and make the upper harmonics;
      # the halving leaves configs/demo.py's decoder 16 and 8 channels there. At 32 the
      # study's pitched stems learned no better per step, at 2.3× the cost per step
      # (benchmarks/RESULTS.md, "A wider latent, a wider decoder").
      decoder_min_width=0,
      # Compute dtype; parameters are always float32.
      dtype="float32",
      # False: one VAE for every stem (the paper). True: one VAE per stem.
      per_source=False,
      num_stems=stems_lib.NUM_STEMS,
  )
  return ml_collections.ConfigDict(config)


def hop_length(strides: Sequence[int]) -> int:
  return math.prod(strides)


def encoded_length(samples: int, encoder_strides: Sequence[int]) -> int:
  """Latent frames for `samples` input samples (PyTorch conv arithmetic, block by block)."""
  length = samples  # k7/p3 input conv and every residual unit keep the length.
  for s in encoder_strides:
    length = (length + 2 * math.ceil(s / 2) - 2 * s) // s + 1
  return length  # the k3/p1 output conv keeps it.


def decoded_length(frames: int, decoder_strides: Sequence[int]) -> int:
  """Output samples for `frames` latent frames (320·T − 8 at the paper's strides)."""
  length = frames
  for s in decoder_strides:
    length = audio_layers.conv_transpose_output_length(length, 2 * s, s, math.ceil(s / 2))
  return length


class EncoderBlock(nn.Module):
  """Three residual units at half width, Snake, strided WNConv(k=2s, pad ⌈s/2⌉) → `features`."""
  features: int
  stride: int
  dilations: Sequence[int] = (1, 3, 9)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i, dilation in enumerate(self.dilations):
      x = audio_layers.ResidualUnit(dilation, dtype=self.dtype, name=f"residual_{i}")(x)
    x = audio_layers.Snake(dtype=self.dtype, name="snake")(x)
    return audio_layers.WNConv1d(self.features, 2 * self.stride, stride=self.stride,
                                 padding=math.ceil(self.stride / 2), dtype=self.dtype,
                                 name="conv")(x)


class Encoder(nn.Module):
  """WNConv(1→width, k7) → EncoderBlocks (width doubling) → Snake → WNConv(k3) to `features`.

  [batch, samples, 1] → [batch, frames, features] (channels-last).
  """
  width: int
  strides: Sequence[int]
  features: int
  dilations: Sequence[int] = (1, 3, 9)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = audio_layers.WNConv1d(self.width, 7, padding=3, dtype=self.dtype, name="conv_in")(x)
    width = self.width
    for i, stride in enumerate(self.strides):
      width *= 2
      x = EncoderBlock(width, stride, self.dilations, dtype=self.dtype, name=f"block_{i}")(x)
    x = audio_layers.Snake(dtype=self.dtype, name="snake_out")(x)
    return audio_layers.WNConv1d(self.features, 3, padding=1, dtype=self.dtype,
                                 name="conv_out")(x)


class DecoderBlock(nn.Module):
  """Snake, WNConvTranspose(k=2s, stride s, pad ⌈s/2⌉) to `features`, three residual units."""
  features: int
  stride: int
  dilations: Sequence[int] = (1, 3, 9)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = audio_layers.Snake(dtype=self.dtype, name="snake")(x)
    x = audio_layers.WNConvTranspose1d(self.features, 2 * self.stride, stride=self.stride,
                                       padding=math.ceil(self.stride / 2), dtype=self.dtype,
                                       name="conv_transpose")(x)
    for i, dilation in enumerate(self.dilations):
      x = audio_layers.ResidualUnit(dilation, dtype=self.dtype, name=f"residual_{i}")(x)
    return x


class Decoder(nn.Module):
  """WNConv(→width, k7) → DecoderBlocks (width halving) → Snake → WNConv(k7) to 1 channel.

  `min_width` > 0 stops the halving there (ours; 0, the release's decoder).

  No final tanh (the release removed DAC's). [batch, frames, latent] → [batch, samples, 1].
  """
  width: int
  strides: Sequence[int]
  out_features: int = 1
  dilations: Sequence[int] = (1, 3, 9)
  dtype: Any = jnp.float32
  min_width: int = 0

  @nn.compact
  def __call__(self, x):
    x = audio_layers.WNConv1d(self.width, 7, padding=3, dtype=self.dtype, name="conv_in")(x)
    for i, stride in enumerate(self.strides):
      width = max(self.width // 2**(i + 1), self.min_width)
      x = DecoderBlock(width, stride, self.dilations, dtype=self.dtype, name=f"block_{i}")(x)
    x = audio_layers.Snake(dtype=self.dtype, name="snake_out")(x)
    return audio_layers.WNConv1d(self.out_features, 7, padding=3, dtype=self.dtype,
                                 name="conv_out")(x)


def _grouped(module_cls, num_groups: int):
  """`module_cls` with a leading parameter-group axis on params, inputs and outputs."""
  return nn.vmap(module_cls, in_axes=0, out_axes=0, variable_axes={"params": 0},
                 split_rngs={"params": True}, axis_size=num_groups)


class SourceVAE(nn.Module):
  """The SourceVAE. Build it with `SourceVAE.from_config(model_config(...))`.

  Methods (call through `apply(variables, ..., method=...)`):
    encode(waveforms_bst) -> (mean_bsct, logvar_bsct)
    decode(latents_bsct) -> waveforms_bst
    encode_stem(waveforms_bt, stem_index_b) -> (mean_bct, logvar_bct)
    decode_stem(latents_bct, stem_index_b) -> waveforms_bt
    __call__(waveforms_bst) -> (reconstruction_bst, mean_bsct, logvar_bsct), for init.
  """
  encoder_width: int = 64
  encoder_strides: tuple[int, ...] = (2, 4, 5, 8)
  decoder_width: int = 1536
  decoder_strides: tuple[int, ...] = (8, 5, 4, 2)
  decoder_min_width: int = 0
  latent_dim: int = 80
  dilations: tuple[int, ...] = (1, 3, 9)
  dtype: str = "float32"
  per_source: bool = False
  num_stems: int = stems_lib.NUM_STEMS

  @classmethod
  def from_config(cls, config) -> "SourceVAE":
    return cls(encoder_width=int(config.encoder_width),
               encoder_strides=tuple(int(s) for s in config.encoder_strides),
               decoder_width=int(config.decoder_width),
               decoder_strides=tuple(int(s) for s in config.decoder_strides),
               decoder_min_width=int(config.get("decoder_min_width", 0)),
               latent_dim=int(config.latent_dim),
               dilations=tuple(int(d) for d in config.dilations),
               dtype=str(config.dtype),
               per_source=bool(config.per_source),
               num_stems=int(config.get("num_stems", stems_lib.NUM_STEMS)))

  @property
  def num_groups(self) -> int:
    """P: how many parameter sets the networks hold (1 shared, num_stems per-source)."""
    return self.num_stems if self.per_source else 1

  def setup(self):
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"SourceVAE: dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    dtype = jnp.dtype(self.dtype)
    self.encoder = _grouped(Encoder, self.num_groups)(
        self.encoder_width, self.encoder_strides, 2 * self.latent_dim, self.dilations,
        dtype=dtype)
    self.decoder = _grouped(Decoder, self.num_groups)(
        self.decoder_width, self.decoder_strides, 1, self.dilations, dtype=dtype,
        min_width=self.decoder_min_width)

  # -- stem axis <-> parameter groups --------------------------------------------------------

  def _to_groups(self, x_bs):
    """[batch, stems, ...] → [P, stems/P · batch, ...] (stem-major inside a group)."""
    chex.assert_axis_dimension(x_bs, 1, self.num_stems)
    x_sb = jnp.swapaxes(x_bs, 0, 1)
    return x_sb.reshape((self.num_groups, -1) + x_sb.shape[2:])

  def _from_groups(self, x_gn, batch):
    x_sb = x_gn.reshape((self.num_stems, batch) + x_gn.shape[2:])
    return jnp.swapaxes(x_sb, 0, 1)

  def _select_group(self, y_gb, stem_index_b):
    """Each example's own group's output: [P, batch, ...] → [batch, ...]."""
    if self.num_groups == 1:
      return y_gb[0]
    # A gather, not a one-hot product: another group's inf/NaN must not leak in as 0·inf.
    return y_gb[stem_index_b, jnp.arange(y_gb.shape[1])]

  # -- encoder ---------------------------------------------------------------------------------

  def _moments(self, features_nft):
    """Encoder output [..., frames, 2·latent] → (mean, logvar) [..., latent, frames], float32."""
    features = jnp.swapaxes(features_nft.astype(jnp.float32), -1, -2)
    mean, logvar = jnp.split(features, 2, axis=-2)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

  def encode(self, waveforms_bst):
    """Waveforms [batch, stems, samples] → (mean, logvar), each [batch, stems, latent, frames]."""
    chex.assert_rank(waveforms_bst, 3)
    batch, _, samples = waveforms_bst.shape
    features = self.encoder(self._to_groups(waveforms_bst)[..., None])
    mean, logvar = self._moments(self._from_groups(features, batch))
    frames = encoded_length(samples, self.encoder_strides)
    chex.assert_shape((mean, logvar), (batch, self.num_stems, self.latent_dim, frames))
    return mean, logvar

  def encode_stem(self, waveforms_bt, stem_index_b):
    """Single-stem windows [batch, samples] + stem indices [batch] → (mean, logvar).

    Returns (mean, logvar), each [batch, latent, frames]. Shared mode ignores the index;
    per-source mode costs P× the compute (see the module docstring).
    """
    chex.assert_rank(waveforms_bt, 2)
    chex.assert_shape(stem_index_b, (waveforms_bt.shape[0],))
    x = jnp.broadcast_to(waveforms_bt[None, ..., None],
                         (self.num_groups,) + waveforms_bt.shape + (1,))
    features = self._select_group(self.encoder(x), stem_index_b)
    return self._moments(features)

  # -- decoder ---------------------------------------------------------------------------------

  def decode(self, latents_bsct):
    """Latents [batch, stems, latent, frames] → waveforms [batch, stems, 320·frames − 8]."""
    chex.assert_rank(latents_bsct, 4)
    batch, _, channels, frames = latents_bsct.shape
    chex.assert_equal(channels, self.latent_dim)
    x = jnp.swapaxes(self._to_groups(latents_bsct), -1, -2)  # [P, N, frames, latent]
    y = self.decoder(x)[..., 0]
    waveforms = self._from_groups(y, batch).astype(jnp.float32)
    chex.assert_shape(waveforms, (batch, self.num_stems,
                                  decoded_length(frames, self.decoder_strides)))
    return waveforms

  def decode_stem(self, latents_bct, stem_index_b):
    """Single-stem latents [batch, latent, frames] + stem indices [batch] → [batch, samples]."""
    chex.assert_rank(latents_bct, 3)
    chex.assert_shape(stem_index_b, (latents_bct.shape[0],))
    x_btc = jnp.swapaxes(latents_bct, -1, -2)
    x = jnp.broadcast_to(x_btc[None], (self.num_groups,) + x_btc.shape)
    y = self._select_group(self.decoder(x)[..., 0], stem_index_b)
    return y.astype(jnp.float32)

  def __call__(self, waveforms_bst):
    mean, logvar = self.encode(waveforms_bst)
    return self.decode(mean), mean, logvar


def one_group(model: SourceVAE, variables, group: Array) -> tuple[SourceVAE, Any]:
  """(a shared SourceVAE, its variables): group `group` of a per-source model's parameters.

  For one-stem batches of a per-source VAE (`vae_windows(stem_batches=True)`): the batch
  then runs through its stem's parameters alone, at 1× the compute of a shared VAE, where
  `encode_stem`/`decode_stem` would run every group on the whole batch. `group` may be
  traced (the batch's stem index); the slice is differentiable, so gradients land in that
  group's parameters and are zero for the others.
  """
  if model.num_groups == 1:
    return model, variables
  sliced = jax.tree.map(lambda p: jax.lax.dynamic_slice_in_dim(p, group, 1, axis=0),
                        variables)
  return model.clone(per_source=False), sliced


def encode_sources(model: SourceVAE, variables, waveforms_bst: Array) -> tuple[Array, Array]:
  """`model.encode` of [batch, stems, samples], a per-source model's stems one parameter set
  at a time (`_each_group`): the same (mean, logvar), each [batch, stems, latent, frames].

  Why not the vmapped groups `encode` runs: XLA:CPU lowers them to grouped convolutions,
  which took 2.6 s where the four networks one after another took 1.4 s (encode + decode of
  a 14.86 s chunk, the study's VAE, 2 CPU cores; benchmarks/RESULTS.md, "Per-source VAE
  inference").
  """
  if model.num_groups == 1:
    return model.apply(variables, waveforms_bst, method=model.encode)
  return _each_group(model, variables, waveforms_bst, "encode_stem")


def decode_sources(model: SourceVAE, variables, latents_bsct: Array,
                   stem_indices: Sequence[int] | None = None) -> Array:
  """`model.decode` of [batch, stems, latent, frames], a per-source model's stems one
  parameter set at a time (see `encode_sources`): float32 [batch, stems, samples].

  `stem_indices` (default: every stem) picks the stems to decode, in that order; a
  per-source model runs only their parameter sets (partial generation of one stem costs
  one stem's decoding, not four).
  """
  all_stems = tuple(range(latents_bsct.shape[1]))
  stem_indices = all_stems if stem_indices is None else tuple(int(i) for i in stem_indices)
  if model.num_groups == 1:
    waveforms = model.apply(variables, latents_bsct, method=model.decode)
    return waveforms if stem_indices == all_stems else waveforms[:, list(stem_indices)]
  return _each_group(model, variables, latents_bsct, "decode_stem", stem_indices)


def _each_group(model: SourceVAE, variables, inputs_bs: Array, method: str,
                groups: Sequence[int] | None = None):
  """`method` (encode_stem or decode_stem) of each stem's slice of `inputs_bs` through that
  stem's own parameter set, for the stems `groups` (default: all, in stem order); the
  outputs stacked on axis 1, the stems' axis.

  A `lax.map` over the groups: one network traced and compiled, run once per group, where
  a Python loop traced and compiled it once per group. The same operations in the same
  order (equal outputs), at the same speed; the study's VAE, encode + decode of a 14.86 s
  chunk: trace 2.0 → 0.6 s, compile 5.4 → 1.8 s (benchmarks/RESULTS.md, "Per-source VAE
  inference").
  """
  chex.assert_axis_dimension(inputs_bs, 1, model.num_stems)
  groups = tuple(range(model.num_groups)) if groups is None else tuple(int(g) for g in groups)
  for group in groups:
    if not 0 <= group < model.num_groups:
      raise ValueError(f"stem index {group} is outside the VAE's {model.num_groups} "
                       "per-source parameter sets")
  if groups != tuple(range(model.num_groups)):
    variables = jax.tree.map(lambda p: p[np.asarray(groups)], variables)
    inputs_bs = inputs_bs[:, np.asarray(groups)]
  one = model.clone(per_source=False)
  zero = jnp.zeros(inputs_bs.shape[:1], jnp.int32)

  def run(group_and_inputs):
    params, inputs = group_and_inputs
    # A shared model's parameters keep a group axis of 1 (`one_group`).
    params = jax.tree.map(lambda p: p[None], params)
    return one.apply(params, inputs, zero, method=getattr(one, method))

  outputs = jax.lax.map(run, (variables, jnp.moveaxis(inputs_bs, 1, 0)))
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), outputs)


def posterior_sample(mean: Array, logvar: Array, rng: Array) -> Array:
  """z = mean + exp(logvar / 2) · ε, ε ~ N(0, I) (any layout; mean and logvar alike)."""
  chex.assert_equal_shape((mean, logvar))
  epsilon = jax.random.normal(rng, mean.shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * epsilon


def kl_divergence(mean: Array, logvar: Array) -> Array:
  """KL(q ‖ N(0, I)) as the release computes it.

  0.5 · mean over (channels, frames) of μ² + σ² − 1 − log σ², then the mean over every
  leading axis (batch, and stems if present).

  A mean, not a sum, as in the reference; `mean`/`logvar` are [..., channels, frames].
  """
  chex.assert_equal_shape((mean, logvar))
  per_example = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar,
                               axis=(-2, -1))
  return jnp.mean(per_example)


def init_params(model: SourceVAE, rng: Array, samples: int = 4096):
  """Random parameters ({'params': ...}) for `model` (traced on a short dummy input).

  Jitted, at XLA's lowest backend optimisation level: op-by-op initialisation is slow, and
  the optimiser spends most of a default compile (tens of seconds on 2 cores) on the
  unrolled random-number code of ~100 parameter initialisers, which run once.
  """
  dummy = jnp.zeros((1, model.num_stems, samples), jnp.float32)
  init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
  return init(rng, dummy)


def abstract_params(model: SourceVAE, samples: int = 4096):
  """The parameters' shapes and dtypes without allocating them (jax.eval_shape)."""
  dummy = jax.ShapeDtypeStruct((1, model.num_stems, samples), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)
