r"""A joint denoiser with ISLDM's per-stem capacity: one DiT stream per stem, coupled.

MSLDM's DiT (`models/dit.py`) puts all stems of a patch in one token of `width` features, so
each stem gets about a quarter of the width; ISLDM gives each stem a DiT of its own and no
way to see the others. On the study's chorales the two compared badly for the paper's claim:
isldm denoised each stem better at equal CPU time, and msldm took only 1-2 % of its loss
from the other stems (benchmarks/RESULTS.md, "What the denoisers take from the other
stems"). This network separates "joint" from "a quarter of the width":

  - S streams, one per stem, each exactly an ISLDM stem's DiT (patch embedding, noise
    embedding, `depth` blocks, final layer and, with `patch_skip`, the gated linear path),
    parameters stacked on a leading stem axis and vmapped (one jitted program);
  - after every block, a *stem mixer* that lets each stem read the others at the same token
    (time patch): each stream's tokens are normalised and modulated by its own noise
    conditioning, the S streams' `width` features are concatenated, passed through a shared
    MLP (S·width → `stem_mixer_hidden` → S·width) and added back to each stream through an
    adaLN-Zero gate. Time context comes from each stream's own attention; what the other
    stems do reaches a stem only through the mixers.

The gates start at zero, so a fresh network is exactly ISLDM (with the same per-stem
parameters) and every cross-stem dependence it shows was learned. The mixer costs
2·S·width·stem_mixer_hidden multiply-adds per token and block, against about 12·S·width²
for the S streams' blocks (hidden = width: a sixth more; 9 % more FLOPs in all for the
study's tiny streams on 1024 frames).

Selected by the DiT setting `stem_streams` = S > 0 (`ldm.model.stem_streams=4`); the
recorded config carries it, so checkpoints rebuild it like any DiT (`models/denoisers.py`).
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from msldm_jax.models import dit


def _per_stem(module_cls, num_stems: int, methods=None):
  """`module_cls` with its parameters stacked on a leading stem axis, vmapped over axis 0
  of every argument."""
  return nn.vmap(module_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=0, out_axes=0, axis_size=num_stems, methods=methods)


class _StemInput(nn.Module):
  """One stream's input: its patches embedded (plus positions) and its noise embedding."""
  width: int
  freq_dim: int
  noise_embed_scale: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, tokens, c_noise):
    h = dit.dense(self.width, self.dtype, self.param_dtype, "patch_embed")(
        tokens.astype(self.dtype)).astype(jnp.float32)
    h = h + dit.sinusoidal_embedding(jnp.arange(h.shape[1]), self.width)[None]
    cond = dit.NoiseEmbedder(self.width, self.freq_dim, self.noise_embed_scale,
                             param_dtype=self.param_dtype, name="noise_embed")(c_noise)
    return h, cond


class _StemOutput(nn.Module):
  """One stream's output patches: the final layer, plus the gated linear path."""
  width: int
  out_features: int
  patch_skip: bool
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, h, cond, tokens):
    final = dit.FinalLayer(self.width, self.out_features, dtype=self.dtype,
                           param_dtype=self.param_dtype, name="final")
    out = final(h, final.modulation(cond)).astype(jnp.float32)
    if self.patch_skip:
      gate = dit.dense(self.out_features, jnp.float32, self.param_dtype, "skip_gate",
                        kernel_init=nn.initializers.zeros)(nn.silu(cond))
      skip = dit.dense(self.out_features, self.dtype, self.param_dtype, "skip",
                        kernel_init=dit.identity_init)
      out = out + gate[:, None, :] * skip(tokens.astype(self.dtype)).astype(jnp.float32)
    return out


class StemMixer(nn.Module):
  """h [S, batch, tokens, width] -> h plus, per stem, a gated MLP of all stems' tokens.

  The modulation (shift, scale, gate) is each stem's own, from its noise conditioning
  [S, batch, width]; the gate's projection starts at zero, so the mixer starts as the
  identity.
  """
  num_stems: int
  width: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h, cond):
    num_stems, batch, num_tokens, width = h.shape
    modulation = _per_stem(nn.Dense, num_stems)(
        3 * width, param_dtype=self.param_dtype, kernel_init=nn.initializers.zeros,
        name="adaLN_modulation")(nn.silu(cond))
    shift, scale, gate = jnp.split(modulation, 3, axis=-1)  # [S, batch, width] each
    normed = dit.layer_norm()(h)  # over each token's width, stem by stem
    normed = normed * (1.0 + scale[:, :, None]) + shift[:, :, None]
    joint = normed.transpose(1, 2, 0, 3).reshape(batch, num_tokens, num_stems * width)
    m = dit.dense(self.hidden, self.dtype, self.param_dtype, "fc1")(
        joint.astype(self.dtype))
    m = nn.gelu(m, approximate=True).astype(self.dtype)
    m = dit.dense(num_stems * width, self.dtype, self.param_dtype, "fc2")(m)
    m = m.astype(jnp.float32).reshape(batch, num_tokens, num_stems, width).transpose(2, 0, 1, 3)
    return h + gate[:, :, None, :] * m


class CoupledStemsDiT(nn.Module):
  """F(c_in·x, c_noise): [batch, in_channels, T], [batch] -> float32 [batch, in_channels, T],
  with `stem_streams` streams of in_channels / stem_streams channels each (module docstring).

  The fields are the DiT's (`dit.model_config`), `width` and `num_heads` per stream.
  """
  width: int
  depth: int
  num_heads: int
  stem_streams: int
  stem_mixer_hidden: int = 0  # 0: the stream width
  mlp_ratio: float = 4.0
  patch_size: int = 16
  in_channels: int = dit.IN_CHANNELS
  dtype: str | jnp.dtype = "float32"
  param_dtype: str | jnp.dtype = "float32"
  freq_dim: int = 256
  noise_embed_scale: float = 250.0
  remat: bool = False
  patch_skip: bool = False

  @property
  def frame_multiple(self) -> int:
    return self.patch_size

  def inference_params(self, params):
    """Cast once for sampling, as `DiT.inference_params` (same module names)."""
    return dit.cast_for_inference(params, self.dtype)

  @nn.compact
  def __call__(self, x_bct, c_noise):
    chex.assert_rank(x_bct, 3)
    batch, channels, frames = x_bct.shape
    streams = self.stem_streams
    if streams < 1 or channels != self.in_channels or channels % streams:
      raise ValueError(f"stem-coupled DiT of {streams} streams expects {self.in_channels} "
                       f"latent channels (a multiple of stem_streams), got input of shape "
                       f"{x_bct.shape}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    per_stem_channels = channels // streams
    c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (batch,))

    x_sbdt = x_bct.astype(jnp.float32).reshape(batch, streams, per_stem_channels, frames)
    tokens = jax.vmap(dit.patchify, in_axes=(1, None))(x_sbdt, self.patch_size)
    h, cond = _per_stem(_StemInput, streams)(
        self.width, self.freq_dim, self.noise_embed_scale, dtype, param_dtype,
        name="stem_input")(tokens, jnp.broadcast_to(c_noise, (streams, batch)))

    block_cls = nn.remat(dit.DiTBlock) if self.remat else dit.DiTBlock
    hidden = int(self.stem_mixer_hidden) or self.width
    for i in range(self.depth):
      block = _per_stem(block_cls, streams, methods=["__call__", "modulation"])(
          self.width, self.num_heads, self.mlp_ratio, dtype=dtype, param_dtype=param_dtype,
          name=f"block_{i}")
      h = block(h, block.modulation(cond))
      h = StemMixer(streams, self.width, hidden, dtype=dtype, param_dtype=param_dtype,
                    name=f"mixer_{i}")(h, cond)

    out = _per_stem(_StemOutput, streams)(
        self.width, self.patch_size * per_stem_channels, self.patch_skip, dtype,
        param_dtype, name="stem_output")(h, cond, tokens)
    out_bsdt = jax.vmap(dit.unpatchify, in_axes=(0, None, None), out_axes=1)(
        out, self.patch_size, per_stem_channels)
    out_bct = out_bsdt.reshape(batch, channels, frames)
    chex.assert_shape(out_bct, (batch, channels, frames))
    return out_bct


def build_model(config) -> CoupledStemsDiT:
  """The stem-coupled DiT of a `dit.model_config` with stem_streams > 0."""
  return CoupledStemsDiT(**dict(config))
