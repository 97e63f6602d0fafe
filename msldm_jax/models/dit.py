r"""A diffusion transformer (DiT, Peebles & Xie 2023) over the joint latent [batch, 320, T].

The network F of the EDM denoiser (`diffusion/edm.py`): it takes c_in·x and c_noise and
returns a tensor of x's shape. The latent's frames are cut into patches of `patch_size`
frames (all 320 channels of all four sources in one token, so attention mixes sources and
time alike), embedded linearly, given fixed sinusoidal positions (length-agnostic), and run
through `depth` blocks conditioned on c_noise by adaLN-Zero. The modulation and the output
projection start at zero, so a fresh model is F ≡ 0 (D = c_skip·x) and every block starts
as the identity.

Precision: parameters in `param_dtype` (float32); matmuls in `dtype` (bfloat16 for the
paper sizes); the residual stream, LayerNorm statistics, the modulation and the output stay
float32, and `jax.nn.dot_product_attention` takes its softmax in float32.

Print the parameter counts of all variants:

  python -m msldm_jax.models.dit
"""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msldm_jax import joint_latent
from msldm_jax import stems

IN_CHANNELS = stems.NUM_STEMS * joint_latent.LATENT_DIM  # 320
NUM_FRAMES = 1024  # Latent frames of one diffusion chunk (reference §2).

# Sizes of the release's U-Nets (reference §5), which `base` and `large` are sized to match.
PARAM_TARGETS = {"small": 137e6, "base": 364e6, "large": 441e6}

_VARIANTS = {
    # width, depth, num_heads, patch_size, dtype
    "tiny": (64, 2, 4, 4, "float32"),
    "small": (768, 12, 12, 16, "bfloat16"),
    "base": (1024, 19, 16, 16, "bfloat16"),
    "large": (1152, 18, 18, 16, "bfloat16"),
}
VARIANTS = tuple(_VARIANTS)


def model_config(variant: str = "base", **overrides) -> ml_collections.ConfigDict:
  """The DiT's settings for a named size; keyword arguments override single keys.

  Variants (patch 16 gives 64 tokens for T = 1024, as the release's U-Net's patching):
    tiny   width 64, depth 2, heads 4, patch 4 (tests; float32)
    small  width 768, depth 12, heads 12 (≈ 137 M)
    base   width 1024, depth 19, heads 16 (≈ 373 M, the release's U-Net: 364 M)
    large  width 1152, depth 18, heads 18 (≈ 446 M, the release's Large: 441 M)
  """
  if variant not in _VARIANTS:
    raise ValueError(f"unknown DiT variant {variant!r}; variants: {', '.join(_VARIANTS)}")
  width, depth, num_heads, patch_size, dtype = _VARIANTS[variant]
  config = ml_collections.ConfigDict(dict(
      width=width,
      depth=depth,
      num_heads=num_heads,
      mlp_ratio=4.0,
      patch_size=patch_size,
      in_channels=IN_CHANNELS,
      dtype=dtype,
      param_dtype="float32",
      freq_dim=256,
      noise_embed_scale=250.0,
      remat=False,
  ))
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f"model_config({variant!r}): unknown key {key!r}; keys: "
                       + ", ".join(sorted(config)))
    config[key] = value
  return config


def build_model(config) -> "DiT":
  """The DiT of a `model_config`."""
  return DiT(**dict(config))


def sinusoidal_embedding(positions, dim: int, max_period: float = 10000.0):
  """[n] -> float32 [n, dim]: cos and sin at periods geometric from 2π to max_period."""
  if dim % 2:
    raise ValueError(f"sinusoidal embedding needs an even dim, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  angles = jnp.asarray(positions, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def patchify(x_bct, patch_size: int):
  """[batch, channels, frames] -> [batch, frames/p, p·channels]; token n = frames n·p….

  Features within a token are ordered (frame in patch, channel).
  """
  batch, channels, frames = x_bct.shape
  if frames % patch_size:
    raise ValueError(f"latent length {frames} is not a multiple of patch_size {patch_size}")
  return jnp.swapaxes(x_bct, 1, 2).reshape(batch, frames // patch_size,
                                           patch_size * channels)


def unpatchify(tokens, patch_size: int, channels: int):
  """Inverse of `patchify`: [batch, n, p·channels] -> [batch, channels, n·p]."""
  batch, num_tokens, _ = tokens.shape
  return jnp.swapaxes(tokens.reshape(batch, num_tokens * patch_size, channels), 1, 2)


def _modulate(h, shift, scale):
  return h * (1.0 + scale[:, None, :]) + shift[:, None, :]


def _layer_norm():
  # No affine: adaLN supplies the scale and shift. float32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32)


_xavier = nn.initializers.xavier_uniform()


class NoiseEmbedder(nn.Module):
  """c_noise [batch] -> conditioning [batch, width]: sinusoidal features, then an MLP.

  c_noise = ln σ / 4 spans only about [−2.3, 0.3] for σ in [1e-4, 3]; scaling it by
  `noise_embed_scale` (250) spreads it over a range like DiT's timesteps (0–1000), so the
  fixed frequencies resolve noise levels as finely as DiT's resolve steps.
  """
  width: int
  freq_dim: int = 256
  noise_embed_scale: float = 250.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c_noise):
    features = sinusoidal_embedding(c_noise * self.noise_embed_scale, self.freq_dim)
    dense = lambda name: nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                                  kernel_init=nn.initializers.normal(0.02), name=name)
    h = nn.silu(dense("dense_0")(features))
    return dense("dense_1")(h).astype(jnp.float32)


class Attention(nn.Module):
  """Multi-head self-attention through `jax.nn.dot_product_attention` (fused where available)."""
  width: int
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    batch, num_tokens, _ = h.shape
    head_dim = self.width // self.num_heads
    qkv = nn.Dense(3 * self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=_xavier, name="qkv")(h)
    # [batch, tokens, 3, heads, head_dim]: the BTNH layout dot_product_attention expects.
    qkv = qkv.reshape(batch, num_tokens, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(query, key, value, implementation=None)
    out = out.reshape(batch, num_tokens, self.width)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_xavier, name="proj")(out)


class Mlp(nn.Module):
  width: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=_xavier, name="fc1")(h)
    h = nn.gelu(h, approximate=True)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=_xavier, name="fc2")(h)


class DiTBlock(nn.Module):
  """Pre-norm attention and MLP, each modulated (shift, scale) and gated by the conditioning.

  adaLN-Zero: the modulation's projection starts at zero, so gates are 0 and the block is
  the identity at initialisation.
  """
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    modulation = nn.Dense(6 * self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, name="adaLN_modulation")(
                              nn.silu(cond)).astype(jnp.float32)
    (shift_msa, scale_msa, gate_msa,
     shift_mlp, scale_mlp, gate_mlp) = jnp.split(modulation, 6, axis=-1)
    h = _modulate(_layer_norm()(x), shift_msa, scale_msa)
    h = Attention(self.width, self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="attn")(h.astype(self.dtype))
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
    h = _modulate(_layer_norm()(x), shift_mlp, scale_mlp)
    h = Mlp(self.width, int(self.width * self.mlp_ratio), dtype=self.dtype,
            param_dtype=self.param_dtype, name="mlp")(h.astype(self.dtype))
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class FinalLayer(nn.Module):
  """adaLN (shift, scale) then a zero-initialised projection to the patch features."""
  out_features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    width = x.shape[-1]
    modulation = nn.Dense(2 * width, dtype=self.dtype, param_dtype=self.param_dtype,
                          kernel_init=nn.initializers.zeros, name="adaLN_modulation")(
                              nn.silu(cond)).astype(jnp.float32)
    shift, scale = jnp.split(modulation, 2, axis=-1)
    h = _modulate(_layer_norm()(x), shift, scale)
    out = nn.Dense(self.out_features, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=nn.initializers.zeros, name="linear")(h.astype(self.dtype))
    return out.astype(jnp.float32)


class DiT(nn.Module):
  """F(c_in·x, c_noise): [batch, in_channels, T], [batch] -> float32 [batch, in_channels, T].

  T must be a multiple of `patch_size`; any such T works (the positions are computed, not
  learned). `dtype`/`param_dtype` may be names ("bfloat16") or dtypes.
  """
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  patch_size: int = 16
  in_channels: int = IN_CHANNELS
  dtype: str | jnp.dtype = "float32"
  param_dtype: str | jnp.dtype = "float32"
  freq_dim: int = 256
  noise_embed_scale: float = 250.0
  remat: bool = False  # Recompute each block in the backward pass (activation memory).

  @nn.compact
  def __call__(self, x_bct, c_noise):
    chex.assert_rank(x_bct, 3)
    batch, channels, frames = x_bct.shape
    if channels != self.in_channels:
      raise ValueError(f"DiT expects {self.in_channels} latent channels, got input of shape "
                       f"{x_bct.shape}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    c_noise = jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (batch,))

    tokens = patchify(x_bct.astype(jnp.float32), self.patch_size)
    x = nn.Dense(self.width, dtype=dtype, param_dtype=param_dtype, kernel_init=_xavier,
                 name="patch_embed")(tokens.astype(dtype)).astype(jnp.float32)
    x = x + sinusoidal_embedding(jnp.arange(x.shape[1]), self.width)[None]
    cond = NoiseEmbedder(self.width, self.freq_dim, self.noise_embed_scale, dtype=dtype,
                         param_dtype=param_dtype, name="noise_embed")(c_noise)

    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    for i in range(self.depth):
      x = block_cls(self.width, self.num_heads, self.mlp_ratio, dtype=dtype,
                    param_dtype=param_dtype, name=f"block_{i}")(x, cond)
    out = FinalLayer(self.patch_size * channels, dtype=dtype, param_dtype=param_dtype,
                     name="final")(x, cond)
    out_bct = unpatchify(out, self.patch_size, channels)
    chex.assert_shape(out_bct, (batch, channels, frames))
    return out_bct


def count_params(config, num_frames: int = NUM_FRAMES) -> int:
  """Parameters of the DiT of `config`, from abstract shapes only (no memory allocated)."""
  model = build_model(config)
  x = jax.ShapeDtypeStruct((1, config.in_channels, num_frames), jnp.float32)
  c_noise = jax.ShapeDtypeStruct((1,), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), x, c_noise)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(variables["params"]))


def main():
  for variant in VARIANTS:
    config = model_config(variant)
    count = count_params(config)
    target = PARAM_TARGETS.get(variant)
    versus = f" (target {target / 1e6:.0f} M, {100 * (count / target - 1):+.1f}%)" if target else ""
    print(f"{variant:6s} width {config.width:5d} depth {config.depth:3d} heads "
          f"{config.num_heads:3d} patch {config.patch_size:3d}: "
          f"{count:,} parameters{versus}")


if __name__ == "__main__":
  main()
