"""The joint latent: per-source latents stacked stem-major into one channel axis.

This is the ONE place that knows the layout (reference §4): source s of S, each with
`latent_dim` channels, occupies channels [s·latent_dim, (s+1)·latent_dim) of the joint latent.
With the release's numbers, (4, 80, T) becomes (320, T): bass 0–79, drums 80–159,
guitar 160–239, piano 240–319. Stacking, splitting, the partial-generation mask and the
per-source scale of `ldm.latent_scale` all live here so that the diffusion model, the latent
builder and the decoder cannot disagree.

The functions are plain reshapes, so they accept NumPy and JAX arrays alike and run under jit.
"""

from collections.abc import Sequence

import chex
import numpy as np

from msldm_jax import stems

LATENT_DIM = 80  # Channels per source of the release's SourceVAE (reference §3).


def stack_sources(latents_bsct):
  """[batch, source, channel, time] -> [batch, source·channel, time], stem-major.

  A reshape of adjacent axes, so no data moves: channel c of source s lands at joint channel
  s·channel + c.
  """
  chex.assert_rank(latents_bsct, 4)
  batch, num_sources, latent_dim, frames = latents_bsct.shape
  return latents_bsct.reshape(batch, num_sources * latent_dim, frames)


def split_sources(latents_bct, num_sources: int = stems.NUM_STEMS):
  """[batch, source·channel, time] -> [batch, source, channel, time]; inverse of stack."""
  chex.assert_rank(latents_bct, 3)
  batch, channels, frames = latents_bct.shape
  if channels % num_sources:
    raise ValueError(f"joint latent has {channels} channels, not a multiple of "
                     f"num_sources={num_sources}")
  return latents_bct.reshape(batch, num_sources, channels // num_sources, frames)


def _source_indices(known_stems, num_sources: int) -> list[int]:
  """Stem names ('bass,drums' or a sequence of names) or indices -> sorted unique indices."""
  if isinstance(known_stems, str):
    known_stems = [n.strip() for n in known_stems.split(",") if n.strip()]
  indices = set()
  for stem in known_stems:
    index = stems.stem_index(stem) if isinstance(stem, str) else int(stem)
    if not 0 <= index < num_sources:
      raise ValueError(f"known stem {stem!r} (index {index}) is outside the "
                       f"{num_sources} sources of the joint latent")
    indices.add(index)
  return sorted(indices)


def source_mask(known_stems: str | Sequence[str | int],
                latent_dim: int = LATENT_DIM,
                num_sources: int = stems.NUM_STEMS) -> np.ndarray:
  """Partial-generation mask: True on the known stems' channels of the joint latent.

  Args:
    known_stems: stem names ("bass,drums", ["bass", "drums"]) or source indices; may be empty
      (total generation: nothing known).
    latent_dim: channels per source.
    num_sources: sources in the joint latent.

  Returns:
    bool array [num_sources·latent_dim, 1]: broadcasts against [batch, channels, time]
    latents. Built by stacking a per-source mask, so it follows `stack_sources`' layout.
  """
  per_source = np.zeros((1, num_sources, latent_dim, 1), dtype=bool)
  per_source[:, _source_indices(known_stems, num_sources)] = True
  return stack_sources(per_source)[0]


# `ldm.latent_scale`: how the stored latents are scaled before the diffusion model sees them.
LATENT_SCALES = ("none", "per_source")


def source_scales(mean: Sequence[float], std: Sequence[float], num_sources: int,
                  sigma_data: float) -> tuple[float, ...]:
  """Per source, the divisor that gives its latents an RMS of `sigma_data`.

  Args:
    mean, std: per joint channel over the train split (the latent store's statistics).
    num_sources: sources in the joint latent.
    sigma_data: the EDM preconditioning's σ_data, the scale it assumes of the data.

  Returns:
    (num_sources,) floats: source s's RMS (over its channels: sqrt(mean² + std²)) / σ_data.
  """
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  if mean.shape != std.shape or mean.ndim != 1 or mean.size % num_sources:
    raise ValueError(f"latent statistics of {mean.shape} means and {std.shape} stds do not "
                     f"split into {num_sources} sources")
  power = (mean**2 + std**2).reshape(num_sources, -1).mean(axis=1)
  if not np.all(np.isfinite(power)) or np.any(power <= 0):
    raise ValueError(f"latent statistics give per-source powers {power.tolist()}: a scale "
                     "needs finite, positive ones")
  return tuple(float(np.sqrt(p) / sigma_data) for p in power)


def scale_sources(latents_bsct, scales: Sequence[float]):
  """[batch, source, channel, time] latents times each source's scale (() leaves them)."""
  if not len(scales):
    return latents_bsct
  factors = np.asarray(scales, np.float32)
  if factors.shape != (latents_bsct.shape[1],):
    raise ValueError(f"{factors.shape[0]} latent scales for {latents_bsct.shape[1]} sources")
  return latents_bsct * factors[None, :, None, None]


def unscale_sources(latents_bsct, scales: Sequence[float]):
  """The inverse of `scale_sources`: each source's latents divided by its scale."""
  if not len(scales):
    return latents_bsct
  return scale_sources(latents_bsct, tuple(1.0 / float(s) for s in scales))
