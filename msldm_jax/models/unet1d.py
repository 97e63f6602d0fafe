r"""The MSLDM release's denoiser: audio-diffusion-pytorch 0.0.43's `UNet1d`, in flax.

The network F of the EDM denoiser (`diffusion/edm.py`) with the DiT's contract:
`apply(params, c_in·x [b, C, T], c_noise [b]) -> [b, C, T]`, so preconditioning, training,
every sampler, inpainting, sharding, EMA and checkpoints take either (`ldm.denoiser`).

What the release builds (`msldm/exp/train_msldm.yaml` over `get_default_model_kwargs`, which
adds use_context_time=True), and what this port reproduces block for block:
  - time: c_noise → [c_noise, sin(2π·c_noise·w), cos(2π·c_noise·w)] with learned w
    (`channels/2` of them) → Linear → GELU, then two Linear+GELU ("to_mapping"): one mapping
    vector per example that every resnet block turns into a GroupNorm scale and shift;
  - patching ("to_in"): a resnet block to channels/16, then 16 frames folded into channels
    (320 × 1024 → 512 × 64); "to_out" undoes it;
  - down levels: a strided convolution (kernel factor·2+1), resnet blocks and, from level 1,
    a transformer block (pre-LayerNorm self-attention without any positional encoding — the
    convolutions carry position — and a 1×1-convolution feed-forward), each output kept as a
    skip; a bottleneck of resnet, attention (no residual: the package replaces x) and resnet;
  - up levels: one resnet block per skip on [x, skip/√2], the transformer, then a transposed
    convolution (kernel 2·factor) or a 3-tap convolution where the factor is 1; the patcher's
    output is added back before unpatching.

Parameters keep PyTorch's names, so that a released state dict maps key for key: the flax
path of every parameter joined by "." IS the PyTorch key (`torch_keys`,
`models/unet1d_import.py`). They keep PyTorch's layouts too (ConvTranspose1d [in, out, k],
Linear [out, in], GroupNorm weight/bias, LayerNorm g) except the Conv1d weights, stored
[k, in, out] instead of [out, in, k] (`relayout` maps between the two): transposing every
kernel at every call took 2.0 of the 3.1 s of a release-size forward on a 2-core CPU.
Activations run channels-last (XLA:CPU's fast layout). Initialisation is PyTorch's default
(U(±1/√fan_in) for weights and biases, N(0, 1) for the time frequencies), as the release
trains from.

Precision: parameters float32; convolutions, matmuls and attention take `dtype` inputs
(bfloat16 for the paper sizes on accelerators, as the release trains in bf16) and return
float32 where they feed the normalisations, which run in float32 as does the softmax.

Sizes (`model_config`): `release` (364 416 864 parameters, the release's MSLDM), `large`
(441 314 656, its MSLDM-Large), `small` and `tiny` (tests). Print their parameter counts:

  python -m msldm_jax.models.unet1d
"""

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections

from msldm_jax import config_loading
from msldm_jax import joint_latent
from msldm_jax import stems
from msldm_jax.models import audio_layers

Array = jax.Array
Dtype = Any

IN_CHANNELS = stems.NUM_STEMS * joint_latent.LATENT_DIM  # 320

# The package's constants.
NORM_EPSILON = 1e-5  # GroupNorm's and its LayerNorms'
SKIP_SCALE = 2**-0.5  # use_skip_scale=True

# The release's two sizes (XZWY/MSLDM msldm/exp/train_msldm{,_large}.yaml) and two of ours.
_COMMON = dict(in_channels=IN_CHANNELS, patch_blocks=1, patch_factor=16, resnet_groups=8,
               kernel_multiplier_downsample=2, attention_heads=12, attention_multiplier=2,
               use_skip_scale=True, use_attention_bottleneck=True, dtype="float32")
_VARIANTS = {
    "release": dict(channels=512, multipliers=(1, 2, 2, 2, 1, 1, 1), factors=(1, 1, 2, 1, 1, 2),
                    num_blocks=(2, 2, 2, 2, 2, 4),
                    attentions=(False, True, True, True, True, True), attention_features=64),
    "large": dict(channels=512, multipliers=(1, 2, 2, 1, 1, 1, 1, 1, 1),
                  factors=(1, 1, 2, 1, 1, 2, 2, 2), num_blocks=(2, 2, 2, 2, 2, 4, 4, 6),
                  attentions=(False, True, True, True, True, True, True, True),
                  attention_features=128),
    # The release's layout at half its width (the patcher's GroupNorm needs channels/16 to be
    # a multiple of 16, so 256 is the narrowest at patch 16).
    "small": dict(channels=256, multipliers=(1, 2, 2, 2, 1, 1, 1), factors=(1, 1, 2, 1, 1, 2),
                  num_blocks=(2, 2, 2, 2, 2, 4),
                  attentions=(False, True, True, True, True, True), attention_features=32,
                  attention_heads=8),
    # Every kind of block at a few channels, for tests (patch 4: short latents suffice).
    "tiny": dict(channels=32, patch_factor=4, multipliers=(1, 2, 1), factors=(1, 2),
                 num_blocks=(1, 2), attentions=(False, True), attention_heads=2,
                 attention_features=8),
}
VARIANTS = tuple(_VARIANTS)
# What the release's `UNet1d` has, counted with the package itself (tests/test_unet1d.py).
RELEASE_PARAMS = {"release": 364_416_864, "large": 441_314_656}


def model_config(variant: str = "release", **overrides) -> ml_collections.ConfigDict:
  """The U-Net's settings for a named size; keyword arguments override single keys."""
  if variant not in _VARIANTS:
    raise ValueError(f"unknown U-Net variant {variant!r}; variants: {', '.join(_VARIANTS)}")
  config = ml_collections.ConfigDict({**_COMMON, **_VARIANTS[variant]})
  return config_loading.update_known(config, overrides, f"unet1d.model_config({variant!r})")


def build_model(config: ml_collections.ConfigDict) -> "UNet1d":
  """A UNet1d from `model_config`'s settings (in_channels must be resolved, not 0)."""
  values = dict(config)
  for key in ("multipliers", "factors", "num_blocks", "attentions"):
    values[key] = tuple(values[key])
  if int(values["in_channels"]) <= 0:
    raise ValueError(f"U-Net in_channels={values['in_channels']}: resolve it from the latents "
                     "first")
  return UNet1d(**values)


def package_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The constructor arguments of the package's `UNet1d` for the same network (for the
  reference side of tests and benchmarks): ours plus the three the release fixes."""
  values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()
            if k != "dtype"}
  return dict(values, kernel_sizes_init=[1, 3, 7], use_nearest_upsample=False,
              use_context_time=True)


# -- Initialisers and layers with PyTorch's parameters ---------------------------------------


def _uniform(bound: float):
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


class Conv1d(nn.Module):
  """torch.nn.Conv1d on channels-last activations; weight stored [k, in, out] (XLA's kernel
  layout; PyTorch's is [out, in, k], see `relayout`), bias [out]."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1] * self.kernel_size
    bound = 1 / math.sqrt(fan_in)
    kernel = self.param("weight", _uniform(bound),
                        (self.kernel_size, x.shape[-1], self.features)).astype(self.dtype)
    # Gradients as matrix products: XLA:CPU's convolution gradients are ~2x slower here.
    y = audio_layers.conv1d_matmul_grad(x.astype(self.dtype), kernel, self.stride,
                                        self.padding, jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", _uniform(bound), (self.features,))
    return y


class ConvTranspose1d(nn.Module):
  """torch.nn.ConvTranspose1d (weight [in, out, k]) as the package's Upsample1d builds it:
  kernel 2·factor, stride factor, padding ⌈factor/2⌉, output_padding factor mod 2, so the
  output is exactly factor × longer."""
  features: int
  factor: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    factor = self.factor
    kernel_size, padding = 2 * factor, factor // 2 + factor % 2
    fan_in = self.features * kernel_size  # PyTorch's, from weight.shape[1]·k
    bound = 1 / math.sqrt(fan_in)
    weight = self.param("weight", _uniform(bound), (x.shape[-1], self.features, kernel_size))
    y = audio_layers.conv_transpose_polyphase(
        x.astype(self.dtype), weight.astype(self.dtype), factor, padding,
        output_length=x.shape[-2] * factor, matmul_gradients=True)
    return y.astype(jnp.float32) + self.param("bias", _uniform(bound), (self.features,))


class Linear(nn.Module):
  """torch.nn.Linear (weight [out, in], bias [out])."""
  features: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bound = 1 / math.sqrt(x.shape[-1])
    weight = self.param("weight", _uniform(bound), (self.features, x.shape[-1]))
    y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), weight.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", _uniform(bound), (self.features,))
    return y


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm (weight, bias [C]) over channels-last activations, in float32."""
  num_groups: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"U-Net GroupNorm {self.name}: {channels} channels do not split into "
                       f"{self.num_groups} groups (torch.nn.GroupNorm's rule too)")
    weight = self.param("weight", nn.initializers.ones, (channels,))
    bias = self.param("bias", nn.initializers.zeros, (channels,))
    x = x.astype(jnp.float32)
    grouped = x.reshape(x.shape[:-1] + (self.num_groups, channels // self.num_groups))
    mean = jnp.mean(grouped, axis=(-3, -1), keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=(-3, -1), keepdims=True)
    grouped = (grouped - mean) * lax.rsqrt(var + NORM_EPSILON)
    return grouped.reshape(x.shape) * weight + bias


class LayerNorm(nn.Module):
  """The package's LayerNorm without bias over the last axis: parameter g of `shape`
  ([C] for LayerNorm, [1, C, 1] for LayerNorm1d, which normalises channels)."""
  shape: Sequence[int] | None = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    g = self.param("g", nn.initializers.ones, tuple(self.shape or (channels,)))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + NORM_EPSILON) * g.reshape(channels)


def gelu(x: Array) -> Array:
  """torch.nn.GELU(): the exact (erf) form, not flax's tanh approximation."""
  return nn.gelu(x, approximate=False)


# -- Blocks ----------------------------------------------------------------------------------


class ConvBlock1d(nn.Module):
  """GroupNorm → (× (scale + 1) + shift) → SiLU → Conv1d."""
  features: int
  num_groups: int
  kernel_size: int = 3
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, scale_shift=None) -> Array:
    x = GroupNorm(self.num_groups, name="groupnorm")(x)
    if scale_shift is not None:
      scale, shift = scale_shift
      x = x * (scale + 1) + shift
    x = nn.silu(x)
    return Conv1d(self.features, self.kernel_size, padding=self.padding, dtype=self.dtype,
                  name="project")(x)


class ResnetBlock1d(nn.Module):
  """Two ConvBlocks, the second modulated by the time mapping, plus a (1×1) shortcut."""
  features: int
  num_groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mapping: Array) -> Array:
    h = ConvBlock1d(self.features, self.num_groups, dtype=self.dtype, name="block1")(x)
    # MappingToScaleShift: SiLU → Linear, "b (2c) -> b 1 (2c)", chunked into scale, shift.
    scale_shift = Linear(2 * self.features, name="to_scale_shift.to_scale_shift.1")(
        nn.silu(mapping))[:, None, :]
    scale, shift = jnp.split(scale_shift, 2, axis=-1)
    h = ConvBlock1d(self.features, self.num_groups, dtype=self.dtype, name="block2")(
        h, (scale, shift))
    if x.shape[-1] != self.features:
      x = Conv1d(self.features, 1, dtype=self.dtype, name="to_out")(x)
    return h + x


class Attention(nn.Module):
  """Pre-LayerNorm multi-head self-attention, output Linear then LayerNorm (all bias-free).
  No positional encoding: the package has none."""
  num_heads: int
  head_features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features, mid = x.shape[-1], self.num_heads * self.head_features
    x = LayerNorm(name="norm")(x)
    q = Linear(mid, use_bias=False, dtype=self.dtype, name="to_q")(x)
    k, v = jnp.split(Linear(2 * mid, use_bias=False, dtype=self.dtype, name="to_kv")(x), 2,
                     axis=-1)
    heads = lambda t: t.reshape(t.shape[:-1] + (self.num_heads, self.head_features))
    # The package scales q by head_features^-½ (dot_product_attention's default scale) and
    # takes the softmax in float32.
    out = jax.nn.dot_product_attention(heads(q).astype(self.dtype), heads(k).astype(self.dtype),
                                       heads(v).astype(self.dtype))
    out = out.reshape(out.shape[:-2] + (mid,))
    out = Linear(features, use_bias=False, dtype=self.dtype, name="attention.to_out.0")(out)
    return LayerNorm(name="attention.to_out.1")(out)


class TransformerBlock1d(nn.Module):
  """x + Attention(x), then x + FeedForward(x) (LayerNorm1d, 1×1 conv, GELU, LayerNorm1d,
  1×1 conv; bias-free)."""
  num_heads: int
  head_features: int
  multiplier: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    x = Attention(self.num_heads, self.head_features, dtype=self.dtype,
                  name="attention.fn")(x) + x
    mid = int(channels * self.multiplier)
    h = LayerNorm((1, channels, 1), name="feed_forward.0")(x)
    h = Conv1d(mid, 1, use_bias=False, dtype=self.dtype, name="feed_forward.1")(h)
    h = gelu(h)
    h = LayerNorm((1, mid, 1), name="feed_forward.3")(h)
    h = Conv1d(channels, 1, use_bias=False, dtype=self.dtype, name="feed_forward.4")(h)
    return h + x


def _fold_patches(x: Array, patch: int) -> Array:
  """einops "b c (l p) -> b (c p) l" in channels-last: [b, l·p, c] → [b, l, c·p]."""
  b, length, c = x.shape
  x = x.reshape(b, length // patch, patch, c)
  return jnp.swapaxes(x, -1, -2).reshape(b, length // patch, c * patch)


def _unfold_patches(x: Array, patch: int) -> Array:
  """einops "b (c p) l -> b c (l p)" in channels-last: [b, l, c·p] → [b, l·p, c]."""
  b, length, cp = x.shape
  x = x.reshape(b, length, cp // patch, patch)
  return jnp.swapaxes(x, -1, -2).reshape(b, length * patch, cp // patch)


class UNet1d(nn.Module):
  """F(c_in·x, c_noise) of the release (see the module docstring); x is [b, C, T] with T a
  multiple of `frame_multiple`."""
  in_channels: int
  channels: int
  patch_blocks: int
  patch_factor: int
  multipliers: tuple[int, ...]
  factors: tuple[int, ...]
  num_blocks: tuple[int, ...]
  attentions: tuple[bool, ...]
  attention_heads: int
  attention_features: int
  attention_multiplier: int
  resnet_groups: int
  kernel_multiplier_downsample: int
  use_skip_scale: bool = True
  use_attention_bottleneck: bool = True
  dtype: str = "float32"

  @property
  def frame_multiple(self) -> int:
    """Latent frames must be a multiple of this: the patching times every down factor."""
    return self.patch_factor**self.patch_blocks * math.prod(self.factors)

  @property
  def conv_transpose_keys(self) -> frozenset[str]:
    """Keys of the ConvTranspose1d weights: the upsamplers of levels whose factor is > 1
    (`upsamples` run from the deepest level up)."""
    levels = len(self.factors)
    return frozenset(f"upsamples.{u}.upsample.weight"
                     for u, i in enumerate(reversed(range(levels))) if self.factors[i] > 1)

  def _check(self):
    levels = len(self.multipliers) - 1
    if not (len(self.factors) == len(self.num_blocks) == len(self.attentions) == levels):
      raise ValueError(f"U-Net: factors {self.factors}, num_blocks {self.num_blocks} and "
                       f"attentions {self.attentions} need one entry per level "
                       f"({levels}: one fewer than multipliers {self.multipliers})")
    if self.kernel_multiplier_downsample % 2:
      raise ValueError("U-Net kernel_multiplier_downsample must be even (the package's rule), "
                       f"got {self.kernel_multiplier_downsample}")

  @nn.compact
  def __call__(self, x: Array, c_noise: Array) -> Array:
    self._check()
    dtype = jnp.dtype(self.dtype)
    frames = x.shape[-1]
    if frames % self.frame_multiple:
      raise ValueError(f"U-Net input of {frames} frames: it must be a multiple of "
                       f"{self.frame_multiple} (patch {self.patch_factor}^{self.patch_blocks}"
                       f" × down factors {self.factors})")
    mapping_features = 4 * self.channels
    heads = dict(num_heads=self.attention_heads, head_features=self.attention_features)

    # Time: LearnedPositionalEmbedding → Linear → GELU, then to_mapping (Linear, GELU) × 2.
    c_noise = jnp.asarray(c_noise, jnp.float32).reshape(-1, 1)
    weights = self.param("to_time.0.0.weights", nn.initializers.normal(1.0),
                         (self.channels // 2,))
    freqs = c_noise * weights[None, :] * 2 * math.pi
    fourier = jnp.concatenate([c_noise, jnp.sin(freqs), jnp.cos(freqs)], axis=-1)
    mapping = gelu(Linear(mapping_features, name="to_time.0.1")(fourier))
    mapping = gelu(Linear(mapping_features, name="to_mapping.0")(mapping))
    mapping = gelu(Linear(mapping_features, name="to_mapping.2")(mapping))

    h = jnp.swapaxes(x.astype(jnp.float32), 1, 2)  # [b, T, C]

    # Patcher: each block a resnet block to out/p channels, then p frames into channels.
    pre = [self.in_channels * self.patch_factor**i for i in range(self.patch_blocks)]
    post = [self.in_channels * self.patch_factor**(i + 1) for i in range(self.patch_blocks - 1)]
    post += [self.channels]
    for i in range(self.patch_blocks):
      h = ResnetBlock1d(post[i] // self.patch_factor, min(self.patch_factor, pre[i]),
                        dtype=dtype, name=f"to_in.module_list.{i}.block")(h, mapping)
      h = _fold_patches(h, self.patch_factor)
    patched = h

    skips_list = []
    for i, factor in enumerate(self.factors):
      out = self.channels * self.multipliers[i + 1]
      prefix = f"downsamples.{i}"
      kernel = factor * self.kernel_multiplier_downsample + 1
      h = Conv1d(out, kernel, stride=factor,
                 padding=factor * (self.kernel_multiplier_downsample // 2), dtype=dtype,
                 name=f"{prefix}.downsample")(h)
      skips = []
      for j in range(self.num_blocks[i]):
        h = ResnetBlock1d(out, self.resnet_groups, dtype=dtype,
                          name=f"{prefix}.blocks.{j}")(h, mapping)
        skips.append(h)
      if self.attentions[i]:
        h = TransformerBlock1d(multiplier=self.attention_multiplier, dtype=dtype,
                               name=f"{prefix}.transformer", **heads)(h)
        skips.append(h)
      skips_list.append(skips)

    bottleneck = self.channels * self.multipliers[-1]
    h = ResnetBlock1d(bottleneck, self.resnet_groups, dtype=dtype,
                      name="bottleneck.pre_block")(h, mapping)
    if self.use_attention_bottleneck:
      # The package's BottleneckBlock1d REPLACES x by the attention output (no residual).
      h = Attention(dtype=dtype, name="bottleneck.attention.fn", **heads)(h)
    h = ResnetBlock1d(bottleneck, self.resnet_groups, dtype=dtype,
                      name="bottleneck.post_block")(h, mapping)

    skip_scale = SKIP_SCALE if self.use_skip_scale else 1.0
    for u, i in enumerate(reversed(range(len(self.factors)))):
      prefix = f"upsamples.{u}"
      channels = self.channels * self.multipliers[i + 1]
      skips = skips_list.pop()
      for j in range(self.num_blocks[i] + (1 if self.attentions[i] else 0)):
        h = jnp.concatenate([h, skips.pop() * skip_scale], axis=-1)
        h = ResnetBlock1d(channels, self.resnet_groups, dtype=dtype,
                          name=f"{prefix}.blocks.{j}")(h, mapping)
      if self.attentions[i]:
        h = TransformerBlock1d(multiplier=self.attention_multiplier, dtype=dtype,
                               name=f"{prefix}.transformer", **heads)(h)
      out = self.channels * self.multipliers[i]
      if self.factors[i] == 1:
        h = Conv1d(out, 3, padding=1, dtype=dtype, name=f"{prefix}.upsample")(h)
      else:
        h = ConvTranspose1d(out, self.factors[i], dtype=dtype, name=f"{prefix}.upsample")(h)

    h = h + patched

    # Unpatcher: p channels back into frames, then a resnet block.
    pre = [self.channels] + [self.in_channels * self.patch_factor**(i + 1)
                             for i in reversed(range(self.patch_blocks - 1))]
    post = [self.in_channels * self.patch_factor**i for i in reversed(range(self.patch_blocks))]
    for i in range(self.patch_blocks):
      h = _unfold_patches(h, self.patch_factor)
      h = ResnetBlock1d(post[i], min(self.patch_factor, post[i]), dtype=dtype,
                        name=f"to_out.module_list.{i}.block")(h, mapping)
    return jnp.swapaxes(h, 1, 2).astype(jnp.float32)


def relayout(model: UNet1d, key: str, array):
  """A parameter between our layout and PyTorch's, the same map both ways: a Conv1d weight
  is [k, in, out] here and [out, in, k] there (axes 0 and 2 swapped); every other parameter
  (the transposed convolutions' [in, out, k] included) is stored as PyTorch stores it."""
  if key.endswith(".weight") and array.ndim == 3 and key not in model.conv_transpose_keys:
    return array.swapaxes(0, 2)
  return array


def torch_keys(params) -> dict[str, tuple[Any, ...]]:
  """{PyTorch state-dict key (without the module prefix): flax path} of every parameter."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(params["params"])
  return {".".join(str(p.key) for p in path): tuple(p.key for p in path)
          for path, _ in leaves}


def count_params(model: UNet1d) -> int:
  x = jax.ShapeDtypeStruct((1, model.in_channels, model.frame_multiple), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x,
                          jax.ShapeDtypeStruct((1,), jnp.float32))
  return sum(math.prod(a.shape) for a in jax.tree.leaves(shapes))


def main():
  for variant in VARIANTS:
    count = count_params(build_model(model_config(variant)))
    release = RELEASE_PARAMS.get(variant)
    note = f" (the release's UNet1d: {release:,})" if release else ""
    print(f"{variant:8s} {count:>13,} parameters{note}")


if __name__ == "__main__":
  main()
