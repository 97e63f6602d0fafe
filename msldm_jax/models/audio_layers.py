"""The DAC building blocks of the SourceVAE: Snake, weight-normalised convolutions, residual unit.

Layout. Activations are channels-last, `[batch, time, channels]` (NWC): XLA:CPU runs its
convolutions fastest in that layout (measured for the benchmark, benchmarks/RESULTS.md).
Parameters keep the PyTorch reference's layout so that released weights map one-to-one, and
are folded into the NWC kernel once per call — cheap next to the convolution itself:

  WNConv1d           weight_v [out, in, k]   weight_g [out, 1, 1]   bias [out]
  WNConvTranspose1d  weight_v [in, out, k]   weight_g [in, 1, 1]    bias [out]
  Snake              alpha [channels]        (PyTorch stores [1, channels, 1])

Weight normalisation is PyTorch's `weight_norm(module, dim=0)`: w = g · v / ||v||, the norm
taken over every axis but the first PyTorch axis (the input channel for a transposed conv).

Padding is PyTorch's: Conv1d pads `padding` zeros on both sides; ConvTranspose1d with padding
p crops p samples from both ends of the full transposed output, so its length is
(L − 1)·s − 2p + k.

Initialisation follows the release (PyTorch defaults: v ~ U(±1/√fan_in), g = ||v||; the
release's `init_weights` zeroes Conv1d biases — its trunc_normal on `weight` is overwritten by
weight_norm's recomputation, so it has no effect — while ConvTranspose1d biases keep the
default U(±1/√fan_in)).
"""

import functools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

# The Snake's guard against α → 0, as in the reference (added to α, not clamped).
SNAKE_EPSILON = 1e-9


def _uniform_init(bound: float):
  def init(rng, shape, dtype=jnp.float32):
    return jax.random.uniform(rng, shape, dtype, -bound, bound)
  return init


def _norm_except_first(weight_v: Array) -> Array:
  return jnp.sqrt(jnp.sum(jnp.square(weight_v), axis=tuple(range(1, weight_v.ndim)),
                          keepdims=True))


def weight_norm(weight_v: Array, weight_g: Array) -> Array:
  """g · v / ||v||, the norm over all axes but the first (PyTorch's `weight_norm`, dim=0)."""
  return weight_v * (weight_g / _norm_except_first(weight_v))


# sin² has period π, so after z → r = z − nπ (n = round(z/π), π split in two so that n·π_hi
# is exact) an odd Taylor polynomial of degree 11 on [−π/2, π/2] gives sin(r) to ~6e-8.
# XLA:CPU vectorises this chain of multiply-adds; its own sin is a slower general routine
# (measured: 2.3× slower for the Snake), and the decoder evaluates ~600 M Snake elements
# per 14.86 s chunk.
_PI_HI = 3.140625  # 201/64: few significant bits, so n · _PI_HI is exact for |n| < 2^16.
_PI_LO = math.pi - 3.140625
_SIN_COEFFICIENTS = (-1 / 6, 1 / 120, -1 / 5040, 1 / 362880, -1 / 39916800)


def sin_squared(z: Array) -> Array:
  """sin²(z) by range reduction modulo π and a polynomial (see above)."""
  n = jnp.round(z * (1 / math.pi))
  r = (z - n * _PI_HI) - n * _PI_LO
  r2 = r * r
  poly = _SIN_COEFFICIENTS[-1]
  for c in _SIN_COEFFICIENTS[-2::-1]:
    poly = c + r2 * poly
  sin_r = r + r * (r2 * poly)
  return sin_r * sin_r


class Snake(nn.Module):
  """Snake activation `x + sin²(αx) / (α + 1e-9)` with a learnable α per channel (init 1)."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    alpha = self.param("alpha", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    alpha = alpha.astype(self.dtype)
    x = x.astype(self.dtype)
    # Same operation order as the reference (reciprocal, then multiply).
    return x + jnp.reciprocal(alpha + SNAKE_EPSILON) * sin_squared(alpha * x)


class WNConv1d(nn.Module):
  """Weight-normalised Conv1d with bias, PyTorch padding/stride/dilation semantics (NWC)."""
  features: int
  kernel_size: int
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  zero_bias_init: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    fan_in = in_features * self.kernel_size
    weight_v = self.param("weight_v", _uniform_init(1 / math.sqrt(fan_in)),
                          (self.features, in_features, self.kernel_size), jnp.float32)
    weight_g = self.param("weight_g", lambda _: _norm_except_first(weight_v))
    bias = self.param(
        "bias",
        nn.initializers.zeros if self.zero_bias_init else _uniform_init(1 / math.sqrt(fan_in)),
        (self.features,), jnp.float32)
    # [out, in, k] → [k, in, out] (WIO), folded once per call, outside the convolution.
    kernel = jnp.transpose(weight_norm(weight_v, weight_g), (2, 1, 0)).astype(self.dtype)
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel,
        window_strides=(self.stride,),
        padding=[(self.padding, self.padding)],
        rhs_dilation=(self.dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias.astype(self.dtype)


def _conv1d_columns(x: Array, kernel_size: int, stride: int, padding: int) -> Array:
  """[B, T, in] → [B, T_out, k·in]: the k shifted (strided) views of the padded input side by
  side, so that the convolution is one matrix product with the kernel as [k·in, out]."""
  if padding:
    x = jnp.pad(x, ((0, 0),) * (x.ndim - 2) + ((padding, padding), (0, 0)))
  out_length = (x.shape[-2] - kernel_size) // stride + 1
  if kernel_size == 1 and stride == 1:
    return x
  return jnp.concatenate(
      [lax.slice_in_dim(x, k, k + (out_length - 1) * stride + 1, stride, axis=-2)
       for k in range(kernel_size)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv1d_matmul_grad(x: Array, kernel: Array, stride: int = 1, padding: int = 0,
                       preferred_element_type=None) -> Array:
  """lax.conv_general_dilated(x, kernel; NWC, WIO, NWC) whose GRADIENTS are matrix products.

  The forward is XLA's convolution. The backward treats it as one matrix product of the
  input's columns (`_conv1d_columns`) with the kernel, where XLA:CPU's convolution gradients
  (with respect to input and kernel) are slow: forward + backward of the U-Net's
  1024-channel, 3-tap convolutions on 64 frames 21 ms instead of 39 ms (2 CPU cores;
  benchmarks/RESULTS.md). The forward stays a convolution: it is the faster one at batch 1,
  where sampling runs.
  The matrix form materialises k× the input, so this suits short, wide activations (the
  U-Net's), not the SourceVAE's long waveforms (its generator's forward + backward at the
  demo's size: 4.2 s this way, 2.8 s with XLA's gradients).
  """
  return lax.conv_general_dilated(
      x, kernel, window_strides=(stride,), padding=[(padding, padding)],
      dimension_numbers=("NWC", "WIO", "NWC"), preferred_element_type=preferred_element_type)


def _conv1d_forward(x, kernel, stride, padding, preferred_element_type):
  y = conv1d_matmul_grad(x, kernel, stride, padding, preferred_element_type)
  return y, (x, kernel)


def _conv1d_backward(stride, padding, preferred_element_type, residuals, cotangent):
  # y = columns(x) @ K  with K = kernel as [k·in, out]:  dK = columnsᵀ·dy,  dx = columnsᵀ-map
  # of dy·Kᵀ (the transpose of the linear im2col: pads and slices).
  x, kernel = residuals
  kernel_size, in_features, out_features = kernel.shape
  columns, columns_vjp = jax.vjp(
      lambda x: _conv1d_columns(x, kernel_size, stride, padding), x)
  flat_kernel = kernel.reshape(kernel_size * in_features, out_features)
  d_kernel = jnp.einsum("...ti,...to->io", columns, cotangent.astype(columns.dtype),
                        preferred_element_type=jnp.float32)
  d_columns = jnp.matmul(cotangent.astype(kernel.dtype), flat_kernel.T,
                         preferred_element_type=jnp.float32)
  (d_x,) = columns_vjp(d_columns.astype(columns.dtype))
  return d_x.astype(x.dtype), d_kernel.reshape(kernel.shape).astype(kernel.dtype)


conv1d_matmul_grad.defvjp(_conv1d_forward, _conv1d_backward)


def conv_transpose_output_length(length: int, kernel_size: int, stride: int,
                                 padding: int) -> int:
  """PyTorch ConvTranspose1d output length (no output_padding, dilation 1)."""
  return (length - 1) * stride - 2 * padding + kernel_size


def conv_transpose_polyphase(x: Array, weight_iok: Array, stride: int, padding: int,
                             output_length: int | None = None,
                             matmul_gradients: bool = False) -> Array:
  """Transposed conv as ONE ordinary conv whose output channels are the `stride` phases.

  The full transposed output is y[q] = Σ_i x[i]·w[q − i·s] with q = m·s + r, so phase r of
  block m only sees the taps r + j·s (j = 0..J−1, J = ⌈k/s⌉) against x[m − j]. One
  convolution with J taps and s·out output channels computes every phase of every block;
  a reshape interleaves them; the PyTorch padding crops both ends. This never multiplies the
  zeros that an input-dilated convolution inserts (s× fewer FLOPs).

  `output_length` (default (L − 1)·s − 2p + k) also serves PyTorch's output_padding: the
  U-Net's upsampler asks for exactly s·L samples. `matmul_gradients` runs the ordinary
  convolution through `conv1d_matmul_grad` (for the U-Net's short, wide activations).
  """
  in_features, out_features, kernel_size = weight_iok.shape
  taps = -(-kernel_size // stride)
  length = x.shape[-2]
  w = jnp.pad(weight_iok, ((0, 0), (0, 0), (0, taps * stride - kernel_size)))
  # [in, out, taps, s] → kernel[j'] for x[m − (J−1) + j'], i.e. tap j = J − 1 − j'.
  w = w.reshape(in_features, out_features, taps, stride)[:, :, ::-1, :]
  kernel = jnp.transpose(w, (2, 0, 3, 1)).reshape(taps, in_features, stride * out_features)
  if matmul_gradients:
    blocks = conv1d_matmul_grad(x, kernel, 1, taps - 1)
  else:
    blocks = lax.conv_general_dilated(
        x, kernel, window_strides=(1,), padding=[(taps - 1, taps - 1)],
        dimension_numbers=("NWC", "WIO", "NWC"))
  # [B, T + J − 1, s·out] → [B, (T + J − 1)·s, out]: phases interleave into time.
  full = blocks.reshape(blocks.shape[:-2] + (blocks.shape[-2] * stride, out_features))
  out_length = output_length or conv_transpose_output_length(length, kernel_size, stride,
                                                             padding)
  return lax.slice_in_dim(full, padding, padding + out_length, axis=-2)


def _conv_transpose_dilated(x: Array, weight_iok: Array, stride: int, padding: int) -> Array:
  """Transposed conv as an input-dilated conv with the flipped kernel (for comparison)."""
  kernel_size = weight_iok.shape[-1]
  kernel = jnp.transpose(weight_iok[:, :, ::-1], (2, 0, 1))  # [k, in, out]
  edge = kernel_size - 1 - padding
  return lax.conv_general_dilated(
      x, kernel, window_strides=(1,), padding=[(edge, edge)], lhs_dilation=(stride,),
      dimension_numbers=("NWC", "WIO", "NWC"))


class WNConvTranspose1d(nn.Module):
  """Weight-normalised ConvTranspose1d with bias, PyTorch semantics (NWC activations).

  `implementation`: 'polyphase' (default, see `conv_transpose_polyphase`) or 'dilated'
  (XLA's input-dilated convolution; kept to measure against and to cross-check).
  """
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0
  implementation: str = "polyphase"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_features = x.shape[-1]
    # PyTorch computes a transposed conv's fan_in from weight.shape[1] · k = out · k.
    fan_in = self.features * self.kernel_size
    weight_v = self.param("weight_v", _uniform_init(1 / math.sqrt(fan_in)),
                          (in_features, self.features, self.kernel_size), jnp.float32)
    weight_g = self.param("weight_g", lambda _: _norm_except_first(weight_v))
    bias = self.param("bias", _uniform_init(1 / math.sqrt(fan_in)), (self.features,),
                      jnp.float32)
    weight = weight_norm(weight_v, weight_g).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.implementation == "polyphase":
      y = conv_transpose_polyphase(x, weight, self.stride, self.padding)
    elif self.implementation == "dilated":
      y = _conv_transpose_dilated(x, weight, self.stride, self.padding)
    else:
      raise ValueError(f"WNConvTranspose1d: unknown implementation {self.implementation!r} "
                       "(polyphase, dilated)")
    return y + bias.astype(self.dtype)


def center_crop_to(x: Array, length: int) -> Array:
  """DAC's residual alignment: crop equally from both ends to `length` samples."""
  crop = (x.shape[-2] - length) // 2
  if crop > 0:
    x = x[..., crop:-crop, :]
  return x


class ResidualUnit(nn.Module):
  """Snake → WNConv(k7, dilation d, pad 3d) → Snake → WNConv(k1), plus the input."""
  dilation: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    y = Snake(dtype=self.dtype, name="snake_0")(x)
    y = WNConv1d(features, 7, dilation=self.dilation, padding=3 * self.dilation,
                 dtype=self.dtype, name="conv_0")(y)
    y = Snake(dtype=self.dtype, name="snake_1")(y)
    y = WNConv1d(features, 1, dtype=self.dtype, name="conv_1")(y)
    # The padding keeps the length, so the crop never fires; kept to mirror DAC exactly.
    x = center_crop_to(x.astype(y.dtype), y.shape[-2])
    chex.assert_equal_shape((x, y))
    return x + y
