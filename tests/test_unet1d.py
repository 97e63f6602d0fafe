"""The release's U-Net in flax (models/unet1d.py) and the denoiser choice (models/denoisers.py).

Parity with the PyTorch module, the checkpoint import and the sampler comparison need the
reference environment: tests/test_unet1d_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import unet1d


def test_release_sizes_have_the_release_parameter_counts():
  # Counted with audio-diffusion-pytorch 0.0.43 itself (tests/test_unet1d_parity.py checks
  # these constants against the package).
  for variant in ("release", "large"):
    model = unet1d.build_model(unet1d.model_config(variant))
    assert unet1d.count_params(model) == unet1d.RELEASE_PARAMS[variant]
  assert unet1d.RELEASE_PARAMS == {"release": 364_416_864, "large": 441_314_656}


def test_contract_shapes_and_frames():
  model = unet1d.build_model(unet1d.model_config("tiny", in_channels=12))
  assert model.frame_multiple == 8  # patch 4 × down factor 2
  x = jax.random.normal(jax.random.key(0), (2, 12, 24))
  # Jitted: op by op, the U-Net dispatches hundreds of small programs.
  params = jax.jit(model.init)(jax.random.key(1), x, jnp.zeros((2,)))
  apply = jax.jit(model.apply)
  y = apply(params, x, jnp.array([-1.0, 0.2]))
  assert y.shape == x.shape and y.dtype == jnp.float32
  assert np.isfinite(np.asarray(y)).all()
  # The noise level conditions the output.
  assert not np.allclose(y, apply(params, x, jnp.array([0.5, 0.2])))
  with pytest.raises(ValueError, match="20 frames: it must be a multiple of 8"):
    apply(params, x[..., :20], jnp.zeros((2,)))
  # bfloat16 compute stays close to float32 (parameters and norms stay float32).
  bf16 = unet1d.build_model(unet1d.model_config("tiny", in_channels=12, dtype="bfloat16"))
  y16 = jax.jit(bf16.apply)(params, x, jnp.array([-1.0, 0.2]))
  assert y16.dtype == jnp.float32
  assert np.max(np.abs(y16 - y)) < 0.05 * np.max(np.abs(y))


def test_every_parameter_has_its_pytorch_name_and_layout():
  model = unet1d.build_model(unet1d.model_config("tiny", in_channels=12))
  abstract = denoisers.abstract_params(model)
  keys = unet1d.torch_keys(abstract)
  # A few keys as the package names them, in PyTorch's layouts (through `relayout`).
  shapes = {k: unet1d.relayout(model, k, np.broadcast_to(0, _leaf(abstract["params"],
                                                                  path).shape)).shape
            for k, path in keys.items()}
  assert shapes["to_time.0.0.weights"] == (16,)
  assert shapes["to_in.module_list.0.block.block1.project.weight"] == (8, 12, 3)  # [out,in,k]
  # The deepest up level: 32 channels up to level 1's 64, ConvTranspose [in, out, k].
  assert model.conv_transpose_keys == {"upsamples.0.upsample.weight"}
  assert shapes["upsamples.0.upsample.weight"] == (32, 64, 4)
  assert shapes["upsamples.1.upsample.weight"] == (32, 64, 3)  # factor 1: a Conv1d
  assert shapes["downsamples.0.downsample.weight"] == (64, 32, 3)  # 32 → 64 channels
  # Level 1 (64 → 32 channels) attends: 2 heads × 8 features, keys and values stacked.
  assert shapes["downsamples.1.transformer.attention.fn.to_kv.weight"] == (32, 32)
  assert shapes["downsamples.1.transformer.feed_forward.0.g"] == (1, 32, 1)  # LayerNorm1d
  assert shapes["downsamples.1.transformer.feed_forward.1.weight"] == (64, 32, 1)
  assert shapes["bottleneck.attention.fn.attention.to_out.1.g"] == (32,)
  assert len(shapes) == len(jax.tree.leaves(abstract))  # one key per parameter
  # Ours: Conv1d kernels [k, in, out] (XLA's layout), the rest as PyTorch has it.
  ours = _leaf(abstract["params"], keys["to_in.module_list.0.block.block1.project.weight"])
  assert ours.shape == (3, 12, 8)
  assert _leaf(abstract["params"], keys["upsamples.0.upsample.weight"]).shape == (32, 64, 4)


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_the_config_selects_the_denoiser():
  config = config_loading.load_config("configs/demo.py:variant=tiny")
  assert denoisers.selected(config.ldm)[0] == "dit"
  config.ldm.denoiser = "unet"
  kind, settings = denoisers.selected(config.ldm)
  assert kind == "unet" and settings.channels == 32
  assert denoisers.config_key(kind) == "ldm.unet"
  config.ldm.denoiser = "transformer"
  with pytest.raises(ValueError, match="unknown denoiser 'transformer'"):
    denoisers.selected(config.ldm)


@pytest.mark.parametrize("kind,config", [
    ("dit", dit.model_config("tiny", in_channels=12)),
    ("unet", unet1d.model_config("tiny", in_channels=12))])
def test_records_rebuild_the_same_network(kind, config):
  record = denoisers.record(kind, config, latents={"shape": [4, 3, 16]})
  assert record["kind"] == kind and record["latents"] == {"shape": [4, 3, 16]}
  model = denoisers.from_record(kind, record["config"], "a record")
  assert model == denoisers.build(kind, config)
  assert model.in_channels == 12
  with pytest.raises(ValueError, match="a record: unknown unet config key 'depth'"):
    denoisers.from_record("unet", {"depth": 3}, "a record")
  with pytest.raises(ValueError, match="a record: unknown denoiser 'vae'"):
    denoisers.from_record("vae", {}, "a record")


@pytest.mark.parametrize("kernel_size,stride,padding", [(3, 1, 1), (1, 1, 0), (4, 2, 1),
                                                         (2, 2, 0)])
def test_conv_with_matmul_gradients_is_the_convolution(kernel_size, stride, padding):
  """The U-Net's convolutions differentiate through a matrix product; values and both
  gradients must be the convolution's."""
  from jax import lax  # pylint: disable=g-import-not-at-top
  from msldm_jax.models import audio_layers  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(kernel_size * 10 + stride)
  x = jnp.asarray(rng.standard_normal((2, 12, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((kernel_size, 5, 7)), jnp.float32)
  target = jnp.asarray(rng.standard_normal(((12 + 2 * padding - kernel_size) // stride + 1,
                                            7)), jnp.float32)

  def via(conv):
    return lambda x, k: jnp.sum(jnp.sin(conv(x, k)) * target)

  def plain(x, k):
    return lax.conv_general_dilated(x, k, (stride,), [(padding, padding)],
                                    dimension_numbers=("NWC", "WIO", "NWC"))

  def ours(x, k):
    return audio_layers.conv1d_matmul_grad(x, k, stride, padding)

  np.testing.assert_allclose(ours(x, kernel), plain(x, kernel), rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.grad(via(ours), (0, 1))(x, kernel),
                       jax.grad(via(plain), (0, 1))(x, kernel)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
