"""The pure generation program: sampler and VAE decoding in one compiled function.

One call of `generate_batch` takes a batch of per-piece PRNG keys from σ_max·ε to waveforms:
it runs the sampler on the joint latent [batch, stems·latent_dim, frames] (reference §6),
splits it with `joint_latent.split_sources` and decodes the generated stems with the frozen
SourceVAE. Partial generation (reference §7) is the same program with the known stems'
latents (`encode_given`, the posterior mean) held by the sampler's `Inpaint`.

Keys: piece i of a run with seed s is sampled from `fold_in(key(s), i)` alone (`piece_keys`);
the sampler is vmapped over the pieces of a batch, so a piece's randomness does not depend on
the batch it falls in, nor on how many pieces the run makes.

Everything the program is specialised on (the two modules, sizes, sampler settings, which
stems are generated) is one hashable `GenerationSpec`, a static argument of the module-level
`jax.jit`: equal specs reuse one compiled program across calls (tests, repeated batches), and
model code stays free of sharding: a batch of keys placed over a mesh's data axis
(`place_keys`) splits the pieces over its devices, with the parameters replicated.
"""

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from msldm_jax import joint_latent
from msldm_jax import stems as stems_lib
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import mixture_guidance
from msldm_jax.diffusion import samplers
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib

# The keys of `config.sample` that are sampler settings (the rest is the stage's): every
# setting some sampler takes, read from the samplers' signatures.
SAMPLER_KEYS = samplers.SETTING_KEYS


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
  """What one compiled generation program is specialised on (hashable: a jit static arg).

  Attributes:
    vae: the SourceVAE module (frozen; its parameters are an argument).
    denoiser: the network F of the EDM denoiser, e.g. the DiT, called as
      `denoiser.apply(params, c_in·x, c_noise)`.
    num_frames: latent frames of one piece.
    sampler_name: a `samplers.SAMPLERS` name.
    sampler_settings: (key, value) pairs passed to `samplers.get_sampler`.
    sigma_data: σ_data of the EDM preconditioning the denoiser was trained with.
    generate_stems: the stems to sample, in canonical order; the others are given.
    sources: what the joint latent stacks, in order: the four stems (msldm, isldm), or the
      mixture alone (mixldm: `stems.latent_sources`), which is then the one source sampled.
    resample_steps: RePaint passes per step for partial generation.
    progress_every: log the sampler's steps/s and ETA every this many steps (0: off). An
      int, not a callback: a fresh callback would be a new static key, and recompile.
    latent_scale: per source, what the denoiser's training divided the VAE's latents by
      (`ldm.latent_scale`; the denoiser's record), or () for none. The sampler works in the
      denoiser's scale: the given stems' encodings are divided by it, and the sampled
      latents multiplied by it before decoding.
  """
  vae: source_vae.SourceVAE
  denoiser: nn.Module
  num_frames: int
  sampler_name: str = samplers.DEFAULT_SAMPLER
  sampler_settings: tuple[tuple[str, Any], ...] = ()
  sigma_data: float = edm.SIGMA_DATA
  generate_stems: tuple[str, ...] = stems_lib.STEM_NAMES
  resample_steps: int = 1
  progress_every: int = 0
  sources: tuple[str, ...] = stems_lib.STEM_NAMES
  latent_scale: tuple[float, ...] = ()

  def __post_init__(self):
    if self.sources not in (stems_lib.STEM_NAMES, (stems_lib.MIXTURE,)):
      raise ValueError(f"sources {self.sources}: the four stems {stems_lib.STEM_NAMES} or "
                       f"the mixture ({stems_lib.MIXTURE!r},)")
    if self.is_mixture:
      if tuple(self.generate_stems) != self.sources:
        raise ValueError(f"a mixture latent generates the mixture alone, not "
                         f"{self.generate_stems}")
    else:
      stems_lib.parse_stem_list(self.generate_stems)  # Names each unknown stem.
      if tuple(self.generate_stems) != stems_lib.parse_stem_list(self.generate_stems):
        raise ValueError(f"generate_stems {self.generate_stems} must be unique and in the "
                         f"canonical order {stems_lib.STEM_NAMES}")
    if self.vae.num_stems != stems_lib.NUM_STEMS:
      raise ValueError(f"the SourceVAE has num_stems={self.vae.num_stems}, generation "
                       f"needs the {stems_lib.NUM_STEMS} stems {stems_lib.STEM_NAMES}")
    if self.resample_steps < 1:
      raise ValueError(f"resample_steps must be >= 1, got {self.resample_steps}")
    if self.progress_every < 0:
      raise ValueError(f"progress_every must be >= 0, got {self.progress_every}")
    if self.latent_scale and (len(self.latent_scale) != len(self.sources)
                              or not all(s > 0 for s in self.latent_scale)):
      raise ValueError(f"latent_scale {self.latent_scale}: one positive scale per source of "
                       f"{self.sources}, or none")
    # Fails early, naming the setting, for a sampler that does not take one.
    samplers.get_sampler(self.sampler_name, dict(self.sampler_settings))

  def progress(self) -> samplers.ProgressFn | None:
    """The sampler's host callback for this program (one per trace, not part of the key)."""
    if self.progress_every <= 0:
      return None
    return samplers.make_progress_logger(self.progress_every)

  @property
  def is_mixture(self) -> bool:
    return self.sources == (stems_lib.MIXTURE,)

  @property
  def channels(self) -> int:
    return len(self.sources) * self.vae.latent_dim

  @property
  def given_stems(self) -> tuple[str, ...]:
    return tuple(s for s in self.sources if s not in self.generate_stems)

  @property
  def is_partial(self) -> bool:
    return bool(self.given_stems)

  @property
  def num_samples(self) -> int:
    """Decoded samples per stem (320·frames − 8 at the paper's strides)."""
    return source_vae.decoded_length(self.num_frames, self.vae.decoder_strides)


def sampler_settings(sample_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(sampler name, its settings) from `config.sample`.

  Settings the chosen sampler does not take are left out (e.g. s_churn for the
  deterministic dpmpp_2m), so that one `sample` section serves every sampler.
  """
  name = str(sample_config["sampler"])
  if name not in samplers.SAMPLERS:
    raise ValueError(f"config.sample.sampler={name!r} is not a sampler; samplers: "
                     + ", ".join(samplers.SAMPLERS))
  defaults = samplers.sampler_config(name)
  # Each value in its default's type (int steps, float σ and churn settings), so that equal
  # settings make equal, hashable specs whichever way the config spelled them.
  settings = {key: type(defaults[key])(sample_config.get(key, defaults[key]))
              for key in SAMPLER_KEYS if key in defaults}
  return name, settings


def latent_frames(num_samples: int, vae: source_vae.SourceVAE, frame_multiple: int = 1,
                  what: str = "config.data.chunks.samples") -> int:
  """Latent frames of `num_samples` audio samples, checked against the denoiser's
  `frame_multiple` (the DiT's patch, the U-Net's patch times its down factors).

  Raises:
    ValueError naming `what` when the frames are not a whole number of patches, or when the
      VAE's decoding of them is shorter than the input (then pieces could not be that long).
  """
  frames = source_vae.encoded_length(num_samples, vae.encoder_strides)
  if frames < 1 or frames % frame_multiple:
    raise ValueError(f"{what}={num_samples} gives {frames} latent frames, not a positive "
                     f"multiple of the denoiser's frame_multiple {frame_multiple}")
  return frames


def piece_keys(seed: int, piece_indices: Sequence[int]) -> jax.Array:
  """Per-piece keys fold_in(key(seed), i): piece i is the same in every run with the seed."""
  base = jax.random.key(int(seed))
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(
      base, jnp.asarray(np.asarray(piece_indices, np.uint32)))


def generation_mesh(batch_size: int, devices=None) -> Mesh:
  """A data-axis mesh over as many local devices as split `batch_size` pieces evenly."""
  devices = list(jax.local_devices() if devices is None else devices)
  return mesh_lib.make_mesh(devices[:math.gcd(batch_size, len(devices))])


def place_keys(keys: jax.Array, mesh: Mesh) -> jax.Array:
  """Keys with their batch axis split over the mesh's data axis."""
  return jax.device_put(keys, mesh_lib.batch_sharding(mesh))


def replicate(tree, mesh: Mesh):
  """Parameters replicated over the mesh (the program then needs no collectives)."""
  return jax.device_put(tree, mesh_lib.replicated(mesh))


@functools.partial(jax.jit, static_argnames=("vae", "latent_scale"))
def encode_given(vae_params, waveforms_bst: jax.Array, *, vae: source_vae.SourceVAE,
                 latent_scale: tuple[float, ...] = ()):
  """Waveforms [batch, stems, samples] → joint latent [batch, stems·latent, frames] (means),
  in the denoiser's scale (divided by `latent_scale`, the spec's: a static tuple).

  Stems that are not given may be zeros: their channels are masked out by the sampler.
  """
  mean, _ = source_vae.encode_sources(vae, vae_params, waveforms_bst)
  return joint_latent.stack_sources(joint_latent.unscale_sources(mean, latent_scale))


def decode_stems(vae: source_vae.SourceVAE, vae_params, latents_bsct: jax.Array,
                 stem_indices: Sequence[int], latent_scale: Sequence[float] = ()
                 ) -> jax.Array:
  """Decodes the stems `stem_indices` of [batch, stems, latent, frames] latents (in the
  denoiser's scale: multiplied by `latent_scale`, the spec's, first).

  Returns:
    float32 [batch, len(stem_indices), samples].

  Only the requested stems are decoded (partial generation of one stem costs one stem's
  decoding, not four): a per-source VAE through their own parameter sets
  (`source_vae.decode_sources`), a shared one as one batch of stems.
  """
  stem_indices = tuple(stem_indices)
  latents_bsct = joint_latent.scale_sources(latents_bsct, latent_scale)
  batch, num_stems, latent_dim, frames = latents_bsct.shape
  if num_stems == vae.num_stems and (stem_indices == tuple(range(num_stems))
                                     or vae.num_groups > 1):
    return source_vae.decode_sources(vae, vae_params, latents_bsct, stem_indices)
  selected = latents_bsct[:, list(stem_indices)].reshape(-1, latent_dim, frames)
  waveforms = vae.apply(vae_params, selected, jnp.zeros((selected.shape[0],), jnp.int32),
                        method=vae.decode_stem)
  return waveforms.reshape(batch, len(stem_indices), -1)


def sampling_denoise_fn(denoiser: nn.Module, denoiser_params, sampler_name: str,
                        sampler_settings: Mapping[str, Any] | None = None, *,
                        sigma_data: float = edm.SIGMA_DATA) -> samplers.DenoiseFn:
  """The sampler's `denoise_fn(x, σ)`, with all that does not change from step to step
  hoisted out of the sampler's loop. The same function as `edm.make_denoise_fn` (equal up
  to the order of float summation in the conditioning), faster:

  - A denoiser with `inference_params` (the DiT) gets its parameters cast once to its
    compute dtype, instead of at every evaluation.
  - A denoiser with a `conditioning` method (the DiT: noise embedding and adaLN
    modulations, a third of its parameters) gets it computed for every noise level the
    sampler will use (`samplers.evaluation_sigmas`) in one batched call; each evaluation
    looks its rows up. A noise level not in that table falls back to computing its own, so
    a sampler evaluating elsewhere stays correct.
  Measured on a 2-core CPU with the DiT `base` in bfloat16: 0.114 → 0.087 s per sampler
  step, for 0.2 s of set-up per piece (benchmarks/RESULTS.md).
  """
  prepare = getattr(denoiser, "inference_params", None)
  params = prepare(denoiser_params) if prepare is not None else denoiser_params
  if not hasattr(denoiser, "conditioning"):
    return edm.make_denoise_fn(denoiser.apply, params, sigma_data=sigma_data)

  table_c_noise = edm.noise_condition(
      samplers.evaluation_sigmas(sampler_name, sampler_settings))
  table = denoiser.apply(params, table_c_noise, method="conditioning")

  def apply_fn(params, x_in, c_noise):
    # Nearest table row per example; the samplers' σ equal the table's to the last bit.
    index = jnp.argmin(jnp.abs(table_c_noise[None, :] - c_noise[:, None]), axis=1)
    found = jnp.all(jnp.abs(table_c_noise[index] - c_noise) <= 1e-6 * (1 + jnp.abs(c_noise)))
    conditioning = jax.lax.cond(
        found, lambda: jax.tree.map(lambda rows: rows[index], table),
        lambda: denoiser.apply(params, c_noise, method="conditioning"))
    return denoiser.apply(params, x_in, c_noise, conditioning=conditioning)

  return edm.make_denoise_fn(apply_fn, params, sigma_data=sigma_data)


@functools.partial(jax.jit, static_argnames=("spec",))
def generate_batch(vae_params, denoiser_params, keys: jax.Array,
                   x_known: jax.Array | None = None, *, spec: GenerationSpec):
  """Samples and decodes one batch of pieces: the whole of generation, compiled once.

  Args:
    vae_params: the SourceVAE's variables.
    denoiser_params: the denoiser network's variables.
    keys: [batch] PRNG keys, one per piece (`piece_keys`).
    x_known: partial generation only: [1, stems·latent, frames] joint latent of the given
      stems (`encode_given` with the spec's latent_scale); shared by every piece of the
      batch.
    spec: the static `GenerationSpec`.

  Returns:
    (latents [batch, stems·latent, frames] at σ = 0, in the denoiser's scale, with the
    given stems' channels equal to x_known exactly; waveforms float32
    [batch, len(spec.generate_stems), spec.num_samples]).
  """
  chex.assert_rank(keys, 1)
  sample = samplers.get_sampler(spec.sampler_name, dict(spec.sampler_settings))
  denoise_fn = sampling_denoise_fn(spec.denoiser, denoiser_params, spec.sampler_name,
                                   dict(spec.sampler_settings), sigma_data=spec.sigma_data)
  shape = (1, spec.channels, spec.num_frames)
  inpaint = None
  if spec.is_partial:
    if x_known is None:
      raise ValueError(f"partial generation of {spec.generate_stems} needs x_known, the "
                       f"latents of the given stems {spec.given_stems}")
    chex.assert_shape(x_known, shape)
    mask = joint_latent.source_mask(spec.given_stems, spec.vae.latent_dim)
    inpaint = samplers.Inpaint(x_known, mask, spec.resample_steps)

  progress = spec.progress()

  def one_piece(key):
    return sample(denoise_fn, key, shape, inpaint=inpaint, progress=progress)[0]

  # vmap, not one batched sampler call: each piece draws from its own key.
  latents_bct = jax.vmap(one_piece)(keys)
  chex.assert_shape(latents_bct, (keys.shape[0],) + shape[1:])
  stem_indices = [spec.sources.index(s) for s in spec.generate_stems]
  waveforms = decode_stems(spec.vae, vae_params,
                           joint_latent.split_sources(latents_bct, len(spec.sources)),
                           stem_indices, spec.latent_scale)
  chex.assert_shape(waveforms, (keys.shape[0], len(stem_indices), spec.num_samples))
  return latents_bct, waveforms


def stem_mask(known_stems: jax.Array, latent_dim: int, num_frames: int) -> jax.Array:
  """Known-value mask [batch, stems·latent, frames] from per-stem flags [batch, stems]."""
  per_source = jnp.broadcast_to(known_stems.astype(bool)[:, :, None, None],
                                known_stems.shape + (latent_dim, num_frames))
  return joint_latent.stack_sources(per_source)


@functools.partial(jax.jit, static_argnames=("spec",))
def inpaint_batch(vae_params, denoiser_params, keys: jax.Array, x_known: jax.Array,
                  known_stems: jax.Array, *, spec: GenerationSpec):
  """Partial generation with each piece's own given stems and given latents, compiled once.

  Where `generate_batch` specialises the program on one choice of given stems, this takes
  the choice as data: piece i keeps the stems where `known_stems[i]` is True at
  `x_known[i]` and samples the others. One program then serves every subset of stems (the
  evaluation's 14 partial-generation runs). Every stem is decoded; the caller keeps the
  generated ones.

  Args:
    vae_params, denoiser_params: the two modules' variables.
    keys: [batch] PRNG keys (`piece_keys`).
    x_known: [batch, stems·latent, frames] joint latents holding each piece's given stems
      (`encode_given`); the other channels are ignored.
    known_stems: bool [batch, stems], True for the given stems of each piece.
    spec: the static `GenerationSpec` (its `generate_stems` must be all stems).

  Returns:
    (latents [batch, stems·latent, frames], waveforms float32 [batch, stems, samples]).
  """
  chex.assert_shape(known_stems, (keys.shape[0], stems_lib.NUM_STEMS))
  known = stem_mask(known_stems, spec.vae.latent_dim, spec.num_frames)
  return _sample_masked(vae_params, denoiser_params, keys, x_known, known, None, spec=spec,
                        guidance=None)


@functools.partial(jax.jit, static_argnames=("spec", "guidance"))
def sample_masked(vae_params, denoiser_params, keys: jax.Array, x_known: jax.Array,
                  known: jax.Array, mixture: jax.Array | None = None, *,
                  spec: GenerationSpec, guidance: mixture_guidance.Guidance | None = None):
  """One window of long-form generation or separation: any known values, as data.

  Piece i keeps `x_known[i]` wherever `known[i]` is True (whole stems for partial
  generation, the first frames of a window for continuing the previous one, or both) and
  samples the rest; with `guidance`, its denoised estimates are also pulled towards
  `mixture[i]` (`mixture_guidance`: separation). Every stem is decoded.

  Args:
    vae_params, denoiser_params: the two modules' variables.
    keys: [batch] PRNG keys (`piece_keys`).
    x_known: [batch, stems·latent, frames]; only its known values are read.
    known: bool [batch, stems·latent, frames].
    mixture: [batch, mixture samples], with `guidance` only.
    spec: the static `GenerationSpec` (its `generate_stems` must be all stems).
    guidance: the separation method (`mixture_guidance.Guidance`), or None.

  Returns:
    (latents [batch, stems·latent, frames], waveforms float32 [batch, stems, samples]);
    samples is the mixture's length under guidance, else `spec.num_samples`. Under Dirac
    guidance the constrained stem's waveform is the mixture minus the others.
  """
  return _sample_masked(vae_params, denoiser_params, keys, x_known, known, mixture,
                        spec=spec, guidance=guidance)


def _sample_masked(vae_params, denoiser_params, keys, x_known, known, mixture, *, spec,
                   guidance):
  if spec.is_partial or spec.is_mixture:
    raise ValueError("a program that takes the known values as data needs a spec with every "
                     f"stem in generate_stems, not {spec.generate_stems}")
  chex.assert_rank(keys, 1)
  batch = keys.shape[0]
  shape = (1, spec.channels, spec.num_frames)
  chex.assert_shape([x_known, known], (batch,) + shape[1:])
  if (guidance is None) != (mixture is None):
    raise ValueError("give a mixture and a guidance together (separation), or neither")
  if mixture is None:
    mixture = jnp.zeros((batch, 1), jnp.float32)  # Unused; keeps one vmap signature.
  chex.assert_rank(mixture, 2)
  sample = samplers.get_sampler(spec.sampler_name, dict(spec.sampler_settings))
  denoise_fn = sampling_denoise_fn(spec.denoiser, denoiser_params, spec.sampler_name,
                                   dict(spec.sampler_settings), sigma_data=spec.sigma_data)
  progress = spec.progress()

  def one_piece(key, x_known, known, mixture):
    piece_denoise_fn = denoise_fn
    if guidance is not None:
      codec = mixture_guidance.vae_codec(spec.vae, vae_params, mixture.shape[-1],
                                         spec.num_frames, spec.latent_scale)
      piece_denoise_fn = mixture_guidance.guided_denoise_fn(denoise_fn, codec, mixture,
                                                            guidance)
    inpaint = samplers.Inpaint(x_known[None], known[None].astype(bool), spec.resample_steps)
    return sample(piece_denoise_fn, key, shape, inpaint=inpaint, progress=progress)[0]

  latents_bct = jax.vmap(one_piece)(keys, x_known, known, mixture)
  waveforms = decode_stems(spec.vae, vae_params, joint_latent.split_sources(latents_bct),
                           range(stems_lib.NUM_STEMS), spec.latent_scale)
  if guidance is not None:
    waveforms = mixture_guidance.fit_length(waveforms, mixture.shape[-1])
    if guidance.method == "dirac":
      waveforms = jax.vmap(mixture_guidance.residual_stem, in_axes=(0, 0, None))(
          waveforms, mixture, guidance.dirac_index)
  return latents_bct, waveforms
