"""ISLDM, the paper's first baseline: one independent denoiser per stem, as one network.

MSLDM's denoiser sees the joint latent [b, S·D, T] whole, so each stem's prediction depends
on every stem. ISLDM ("independent source latent diffusion models") gives each stem its own
network that sees only that stem's D channels. Here the S networks are one flax module: the
per-stem denoiser (a DiT or U-Net built for D input channels) is `nn.vmap`ped over a stem
axis, with its parameters stacked on a leading axis of size S. So the trainer, samplers,
inpainting, sharding, EMA and checkpoints run it unchanged (same contract,
`apply(params, c_in·x [b, S·D, T], c_noise [b]) -> [b, S·D, T]`), in one jitted program.

Because the network is block-diagonal over stems and every sampler draws independent noise
per channel, a total generation samples each stem alone, and a partial generation by
replacement inpainting generates the missing stems alone: the given stems cannot influence
them (tests/test_independent_stems.py checks both).
"""

import dataclasses

import flax.linen as nn
import jax


class IndependentStems(nn.Module):
  """`num_stems` copies of `per_stem` (built for one stem's channels), parameters stacked."""
  per_stem: nn.Module
  num_stems: int

  @property
  def in_channels(self) -> int:
    return self.num_stems * int(self.per_stem.in_channels)

  @property
  def frame_multiple(self) -> int:
    return int(self.per_stem.frame_multiple)

  def inference_params(self, params):
    """The per-stem network's own cast (it works leaf by leaf, whatever the stacking)."""
    prepare = getattr(self.per_stem, "inference_params", None)
    return prepare(params) if prepare is not None else params

  @nn.compact
  def __call__(self, x_bct: jax.Array, c_noise: jax.Array) -> jax.Array:
    batch, channels, frames = x_bct.shape
    if channels != self.in_channels:
      raise ValueError(f"ISLDM of {self.num_stems} stems × {self.per_stem.in_channels} "
                       f"channels expects {self.in_channels} channels, got input of shape "
                       f"{x_bct.shape}")
    per_stem = self.per_stem
    fields = {f.name: getattr(per_stem, f.name) for f in dataclasses.fields(per_stem)
              if f.init and f.name not in ("parent", "name")}
    stacked = nn.vmap(type(per_stem), variable_axes={"params": 0},
                      split_rngs={"params": True}, in_axes=(0, None), out_axes=0,
                      axis_size=self.num_stems)
    x_sbdt = x_bct.reshape(batch, self.num_stems, -1, frames).transpose(1, 0, 2, 3)
    y_sbdt = stacked(**fields, name="stems")(x_sbdt, c_noise)
    return y_sbdt.transpose(1, 0, 2, 3).reshape(batch, channels, frames)
