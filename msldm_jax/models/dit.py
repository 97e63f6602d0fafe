r"""A diffusion transformer (DiT, Peebles & Xie 2023) over the joint latent [batch, 320, T].

The network F of the EDM denoiser (`diffusion/edm.py`): it takes c_in·x and c_noise and
returns a tensor of x's shape. The latent's frames are cut into patches of `patch_size`
frames (all 320 channels of all four sources in one token, so attention mixes sources and
time alike), embedded linearly, given fixed sinusoidal positions (length-agnostic), and run
through `depth` blocks conditioned on c_noise by adaLN-Zero. The modulation and the output
projection start at zero, so a fresh model is F ≡ 0 (D = c_skip·x) and every block starts
as the identity.

Precision: parameters in `param_dtype` (float32); the token matmuls take `dtype` inputs
(bfloat16 for the paper sizes) and accumulate in float32; the residual stream, LayerNorm
statistics, the noise embedding and the modulation (one row per example, see
`_CONDITIONING_MODULES`) and the output stay float32, and `jax.nn.dot_product_attention`
takes its softmax in float32. For sampling, `DiT.inference_params` casts the parameters once.

The width bottleneck, and `patch_skip`. A token carries patch_size·channels numbers (256
for the study's 4 × 16 channels in patches of 4; 5120 for the paper's 320 in patches of 16)
and the linear patch embedding keeps `width` of them. Whatever lies in the embedding's null
space never reaches the output, so F cannot cancel the noise there, and the EDM denoiser
D = c_skip·x + c_out·F keeps c_skip·noise in those directions: whatever the data, the
σ-weighted loss at σ is at least f·c_skip(σ) = f·σ_data²/(σ² + σ_data²), f = 1 − width /
(patch_size·channels) (`width_bottleneck`). The study's control sat on that floor for
width 64 in patches of 4 (f = 0.75: loss 0.50 for σ in 0.17–0.45, the floor 0.51, the
optimum 0.03; benchmarks/RESULTS.md).
`patch_skip` adds a path around it: a linear map of each input patch to its output patch
(patch_size·channels square, identity at init), scaled per output feature by a gate computed
from c_noise (zero at init, so a fresh model is still F ≡ 0). That is the σ-dependent
linear shrinkage the blocks cannot express for what they cannot see, at the cost of one
(patch_size·channels)² matmul per token.

Print the parameter counts of all variants:

  python -m msldm_jax.models.dit
"""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msldm_jax import config_loading
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
      patch_skip=False,
      # > 0: one stream per stem (S = stem_streams), coupled by stem mixers after every
      # block (models/coupled_stems.py); width and heads are then each stream's.
      stem_streams=0,
      stem_mixer_hidden=0,  # The mixers' hidden width; 0: the stream width.
  ))
  return config_loading.update_known(config, overrides, f"dit.model_config({variant!r})")


# The settings of the stem-coupled DiT (models/coupled_stems.py), which the DiT lacks.
COUPLING_KEYS = ("stem_streams", "stem_mixer_hidden")


def build_model(config) -> "DiT":
  """The DiT of a `model_config` without stem streams (`denoisers.build` builds either)."""
  values = dict(config)
  if int(values.get("stem_streams", 0)):
    raise ValueError(f"stem_streams={values['stem_streams']}: that is the stem-coupled DiT "
                     "(models/coupled_stems.py), built by models/denoisers.build")
  return DiT(**{k: v for k, v in values.items() if k not in COUPLING_KEYS})


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


def layer_norm():
  # No affine: adaLN supplies the scale and shift. float32 whatever the compute dtype.
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32)


_xavier = nn.initializers.xavier_uniform()


def identity_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.eye(*shape, dtype=dtype)


def dense(features: int, dtype, param_dtype, name: str, kernel_init=_xavier) -> nn.Dense:
  """A Dense whose matmul takes `dtype` inputs and accumulates and returns float32.

  float32 accumulation is the usual mixed-precision choice, and on XLA:CPU it is also the
  fast path: a bfloat16 × bfloat16 → float32 dot runs on the CPU's bf16 matrix units, about
  2.3× the float32 rate, while the same dot with a bfloat16 output falls back to a path
  5.4× slower (measured on a 2-core Xeon with AMX, [64, 1024] × [1024, 4096]).
  """
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, kernel_init=kernel_init,
                  dot_general=functools.partial(jax.lax.dot_general,
                                                preferred_element_type=jnp.float32),
                  name=name)


# Modules that see the conditioning vector (one row per example), not the tokens. They
# compute in float32 whatever `dtype` is: the modulation sets every block's scale, shift and
# gate, and XLA:CPU runs a one-row bfloat16 matmul (matrix-vector) 6.7× slower than the
# float32 one, while the token matmuls are the other way round.
_CONDITIONING_MODULES = ("noise_embed", "adaLN_modulation", "skip_gate")


def cast_for_inference(params, dtype):
  """`params` with every floating leaf outside `_CONDITIONING_MODULES` cast to `dtype`."""
  dtype = jnp.dtype(dtype)

  def cast(path, leaf):
    names = {getattr(entry, "key", None) for entry in path}
    if names & set(_CONDITIONING_MODULES) or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    return leaf.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


def width_bottleneck(config) -> float:
  """f = 1 − width / (patch_size·in_channels) (0 when the width holds a whole patch): the
  share of each patch that the DiT's blocks cannot see (see the module's docstring)."""
  patch_features = int(config.patch_size) * int(config.in_channels)
  return max(0.0, 1.0 - int(config.width) / patch_features)


class NoiseEmbedder(nn.Module):
  """c_noise [batch] -> conditioning [batch, width]: sinusoidal features, then an MLP.

  c_noise = ln σ / 4 spans only about [−2.3, 0.3] for σ in [1e-4, 3]; scaling it by
  `noise_embed_scale` (250) spreads it over a range like DiT's timesteps (0–1000), so the
  fixed frequencies resolve noise levels as finely as DiT's resolve steps.
  """
  width: int
  freq_dim: int = 256
  noise_embed_scale: float = 250.0
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, c_noise):
    features = sinusoidal_embedding(c_noise * self.noise_embed_scale, self.freq_dim)
    layer = lambda name: dense(self.width, jnp.float32, self.param_dtype, name,
                               kernel_init=nn.initializers.normal(0.02))
    h = nn.silu(layer("dense_0")(features))
    return layer("dense_1")(h).astype(jnp.float32)


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
    qkv = dense(3 * self.width, self.dtype, self.param_dtype, "qkv")(h).astype(self.dtype)
    # [batch, tokens, 3, heads, head_dim]: the BTNH layout dot_product_attention expects.
    qkv = qkv.reshape(batch, num_tokens, 3, self.num_heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out = jax.nn.dot_product_attention(query, key, value, implementation=None)
    out = out.reshape(batch, num_tokens, self.width)
    return dense(self.width, self.dtype, self.param_dtype, "proj")(out)


class Mlp(nn.Module):
  width: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    h = dense(self.hidden, self.dtype, self.param_dtype, "fc1")(h)
    h = nn.gelu(h, approximate=True).astype(self.dtype)  # GELU in float32, stored in dtype.
    return dense(self.width, self.dtype, self.param_dtype, "fc2")(h)


class DiTBlock(nn.Module):
  """Pre-norm attention and MLP, each modulated (shift, scale) and gated by the conditioning.

  adaLN-Zero: the modulation's projection starts at zero, so gates are 0 and the block is
  the identity at initialisation. The modulation depends on the noise level only, so it is
  a method of its own (`modulation`): a sampler computes it for all its noise levels at
  once (`DiT.conditioning`), and `__call__` takes it ready-made.
  """
  width: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.adaLN_modulation = dense(6 * self.width, jnp.float32, self.param_dtype,
                                   "adaLN_modulation", kernel_init=nn.initializers.zeros)
    self.attn = Attention(self.width, self.num_heads, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="attn")
    self.mlp = Mlp(self.width, int(self.width * self.mlp_ratio), dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")
    self.norm_msa = layer_norm()
    self.norm_mlp = layer_norm()

  def modulation(self, cond):
    """cond [batch, width] -> float32 [batch, 6·width]: shifts, scales and gates."""
    return self.adaLN_modulation(nn.silu(cond))

  def __call__(self, x, modulation):
    (shift_msa, scale_msa, gate_msa,
     shift_mlp, scale_mlp, gate_mlp) = jnp.split(modulation, 6, axis=-1)
    h = _modulate(self.norm_msa(x), shift_msa, scale_msa)
    h = self.attn(h.astype(self.dtype))
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
    h = _modulate(self.norm_mlp(x), shift_mlp, scale_mlp)
    h = self.mlp(h.astype(self.dtype))
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class FinalLayer(nn.Module):
  """adaLN (shift, scale) then a zero-initialised projection to the patch features."""
  width: int
  out_features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.adaLN_modulation = dense(2 * self.width, jnp.float32, self.param_dtype,
                                   "adaLN_modulation", kernel_init=nn.initializers.zeros)
    self.linear = dense(self.out_features, self.dtype, self.param_dtype, "linear",
                         kernel_init=nn.initializers.zeros)
    self.norm = layer_norm()

  def modulation(self, cond):
    """cond [batch, width] -> float32 [batch, 2·width]: shift and scale."""
    return self.adaLN_modulation(nn.silu(cond))

  def __call__(self, x, modulation):
    shift, scale = jnp.split(modulation, 2, axis=-1)
    h = _modulate(self.norm(x), shift, scale)
    return self.linear(h.astype(self.dtype))


class DiT(nn.Module):
  """F(c_in·x, c_noise): [batch, in_channels, T], [batch] -> float32 [batch, in_channels, T].

  T must be a multiple of `patch_size`; any such T works (the positions are computed, not
  learned). `dtype`/`param_dtype` may be names ("bfloat16") or dtypes.

  The network is split in two so that samplers can hoist what depends on the noise level
  alone out of their loop: `conditioning(c_noise)` (the noise embedding and every block's
  adaLN modulation: a third of the parameters, but one row per example) and
  `__call__(x, c_noise, conditioning=...)`, which then skips that part. A sampler knows its
  noise levels in advance, so it computes all of them in one batched call (see
  `diffusion/generation_program.py`) instead of one matrix-vector product per evaluation.
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
  # A gated linear path from each input patch to its output patch, around the width
  # bottleneck (the module's docstring).
  patch_skip: bool = False

  @property
  def frame_multiple(self) -> int:
    """Latent frames must be a multiple of this (the denoisers' shared contract)."""
    return self.patch_size

  def setup(self):
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    self.patch_embed = dense(self.width, dtype, param_dtype, "patch_embed")
    self.noise_embed = NoiseEmbedder(self.width, self.freq_dim, self.noise_embed_scale,
                                     param_dtype=param_dtype, name="noise_embed")
    block_cls = nn.remat(DiTBlock) if self.remat else DiTBlock
    self.blocks = [block_cls(self.width, self.num_heads, self.mlp_ratio, dtype=dtype,
                             param_dtype=param_dtype, name=f"block_{i}")
                   for i in range(self.depth)]
    patch_features = self.patch_size * self.in_channels
    self.final = FinalLayer(self.width, patch_features, dtype=dtype,
                            param_dtype=param_dtype, name="final")
    if self.patch_skip:
      self.skip_gate = dense(patch_features, jnp.float32, param_dtype, "skip_gate",
                              kernel_init=nn.initializers.zeros)
      self.skip = dense(patch_features, dtype, param_dtype, "skip",
                         kernel_init=identity_init)

  def inference_params(self, params):
    """`params` cast once to the dtypes the model computes in, for sampling.

    Token matmuls cast their kernels to `dtype` on every call anyway (the conditioning
    modules keep float32), so the outputs are bitwise the same; casting once, before a
    sampler's loop, saves re-reading and converting the float32 parameters at every network
    evaluation, and halves the weight traffic in bfloat16.
    """
    return cast_for_inference(params, self.dtype)

  def conditioning(self, c_noise):
    """c_noise [batch] -> the modulations {"blocks": (depth × [batch, 6·width]),
    "final": [batch, 2·width]} and, with `patch_skip`, the gate {"skip": [batch,
    patch_size·in_channels]}, all float32: everything that depends on σ alone."""
    c_noise = jnp.atleast_1d(jnp.asarray(c_noise, jnp.float32))
    cond = self.noise_embed(c_noise)
    conditioning = {"blocks": tuple(block.modulation(cond) for block in self.blocks),
                    "final": self.final.modulation(cond)}
    if self.patch_skip:
      conditioning["skip"] = self.skip_gate(nn.silu(cond))
    return conditioning

  def __call__(self, x_bct, c_noise, conditioning=None):
    """F(x, c_noise); with `conditioning` (from `conditioning(c_noise)`, batch 1 or x's
    batch) c_noise is not used."""
    chex.assert_rank(x_bct, 3)
    batch, channels, frames = x_bct.shape
    if channels != self.in_channels:
      raise ValueError(f"DiT expects {self.in_channels} latent channels, got input of shape "
                       f"{x_bct.shape}")
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
    if conditioning is None:
      conditioning = self.conditioning(
          jnp.broadcast_to(jnp.asarray(c_noise, jnp.float32), (batch,)))

    tokens = patchify(x_bct.astype(jnp.float32), self.patch_size)
    x = self.patch_embed(tokens.astype(jnp.dtype(self.dtype)))
    x = x + sinusoidal_embedding(jnp.arange(x.shape[1]), self.width)[None]
    for block, modulation in zip(self.blocks, conditioning["blocks"], strict=True):
      x = block(x, modulation)
    out = self.final(x, conditioning["final"]).astype(jnp.float32)
    if self.patch_skip:
      out = out + conditioning["skip"][:, None, :] * self.skip(
          tokens.astype(jnp.dtype(self.dtype))).astype(jnp.float32)
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
