"""The diffusion transformer: shapes, adaLN-Zero initialisation, precision, sizes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax.diffusion import edm
from msldm_jax.models import dit

# A joint latent of 4 sources × 8 channels, 16 frames: 4 tokens of 4 frames.
CHANNELS, FRAMES = 32, 16


@pytest.fixture(scope="module")
def tiny():
  config = dit.model_config("tiny", in_channels=CHANNELS)
  model = dit.build_model(config)
  x = jax.random.normal(jax.random.key(0), (2, CHANNELS, FRAMES))
  c_noise = jnp.array([-1.0, 0.2])
  variables = jax.jit(model.init)(jax.random.key(1), x, c_noise)
  return config, model, variables, x, c_noise


@pytest.fixture(scope="module")
def apply(tiny):
  """One compiled forward pass for the module's tests (compiles once per input shape)."""
  return jax.jit(tiny[1].apply)


@pytest.fixture(scope="module")
def trained(tiny):
  """Params after 'training': every leaf moved, so zero-initialised layers are live."""
  variables = tiny[2]

  leaves, treedef = jax.tree.flatten(variables)
  sizes = [leaf.size for leaf in leaves]
  # One draw for all leaves: cheap to compile on CPU, unlike one PRNG call per leaf.
  noise = np.random.default_rng(42).normal(scale=0.05, size=sum(sizes)).astype(np.float32)
  chunks = np.split(noise, np.cumsum(sizes)[:-1])
  return jax.tree.unflatten(treedef, [
      leaf + chunk.reshape(leaf.shape) for leaf, chunk in zip(leaves, chunks)])


def test_patchify_round_trip_and_token_content():
  x = jnp.arange(2 * 3 * 8, dtype=jnp.float32).reshape(2, 3, 8)
  tokens = dit.patchify(x, 4)
  assert tokens.shape == (2, 2, 12)
  # Token 1 holds frames 4..7 of every channel.
  np.testing.assert_array_equal(tokens[0, 1].reshape(4, 3), x[0, :, 4:8].T)
  np.testing.assert_array_equal(dit.unpatchify(tokens, 4, 3), x)


def test_shapes_dtypes_and_zero_output_at_init(tiny, apply):
  _, _, variables, x, c_noise = tiny
  out = apply(variables, x, c_noise)
  assert out.shape == x.shape and out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 0.0)  # Zero-initialised final projection.
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  # So the fresh EDM denoiser is D = c_skip·x.
  sigma = jnp.array([0.5, 2.0])
  denoised = jax.jit(lambda v, x, s: edm.denoise(apply, v, x, s))(variables, x, sigma)
  np.testing.assert_allclose(denoised, edm.c_skip(sigma)[:, None, None] * x, rtol=1e-6)


def test_adaln_zero_modulation_and_gates_start_at_zero(tiny):
  config, _, variables, _, _ = tiny
  params = variables["params"]
  for i in range(config.depth):
    modulation = params[f"block_{i}"]["adaLN_modulation"]
    np.testing.assert_array_equal(modulation["kernel"], 0.0)
    np.testing.assert_array_equal(modulation["bias"], 0.0)
  np.testing.assert_array_equal(params["final"]["adaLN_modulation"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["final"]["linear"]["kernel"], 0.0)
  # Hence each block is the identity at initialisation.
  block = dit.DiTBlock(config.width, config.num_heads)
  h = jax.random.normal(jax.random.key(0), (2, 4, config.width))
  cond = jax.random.normal(jax.random.key(1), (2, config.width))
  block_vars = {"params": params["block_0"]}
  modulation = block.apply(block_vars, cond, method="modulation")
  np.testing.assert_array_equal(modulation, 0.0)
  np.testing.assert_array_equal(jax.jit(block.apply)(block_vars, h, modulation), h)


def test_precomputed_conditioning_gives_the_same_output(tiny, apply, trained):
  _, model, _, x, c_noise = tiny
  conditioning = model.apply(trained, c_noise, method="conditioning")
  assert len(conditioning["blocks"]) == 2
  assert conditioning["blocks"][0].shape == (2, 6 * 64)
  assert conditioning["final"].shape == (2, 2 * 64)
  out = jax.jit(model.apply)(trained, x, None, conditioning=conditioning)
  np.testing.assert_array_equal(out, apply(trained, x, c_noise))
  # One example's conditioning broadcasts over a batch at that noise level.
  one = model.apply(trained, c_noise[:1], method="conditioning")
  out_one = jax.jit(model.apply)(trained, x, None, conditioning=one)
  np.testing.assert_allclose(out_one, apply(trained, x, jnp.full((2,), c_noise[0])),
                             rtol=1e-6, atol=1e-6)


def test_inference_params_cast_token_matmuls_only_and_keep_outputs(tiny, trained):
  _, _, _, x, c_noise = tiny
  model = dit.build_model(dit.model_config("tiny", in_channels=CHANNELS, dtype="bfloat16"))
  cast = model.inference_params(trained)
  params = cast["params"]
  assert params["block_0"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert params["patch_embed"]["kernel"].dtype == jnp.bfloat16
  # The conditioning path (one row per example) stays float32.
  assert params["block_0"]["adaLN_modulation"]["kernel"].dtype == jnp.float32
  assert params["noise_embed"]["dense_0"]["kernel"].dtype == jnp.float32
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(cast, x, c_noise), apply(trained, x, c_noise))


def test_output_depends_on_noise_level_and_on_other_patches_after_training(tiny, apply,
                                                                          trained):
  x = tiny[3]
  out_a = apply(trained, x, jnp.array([-1.0, -1.0]))
  out_b = apply(trained, x, jnp.array([0.25, 0.25]))
  assert float(jnp.max(jnp.abs(out_a))) > 0
  assert float(jnp.max(jnp.abs(out_a - out_b))) > 1e-3
  # Attention mixes patches: changing the first frame changes the last patch's output.
  out_c = apply(trained, x.at[:, :, 0].add(1.0), jnp.array([-1.0, -1.0]))
  assert float(jnp.max(jnp.abs((out_c - out_a)[:, :, -4:]))) > 1e-4


def test_bfloat16_compute_with_float32_params(tiny, apply, trained):
  _, _, _, x, c_noise = tiny
  bf16_model = dit.build_model(dit.model_config("tiny", in_channels=CHANNELS,
                                                dtype="bfloat16"))
  bf16_vars = jax.eval_shape(bf16_model.init, jax.random.key(1), x, c_noise)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(bf16_vars))
  out = jax.jit(bf16_model.apply)(trained, x, c_noise)
  reference = apply(trained, x, c_noise)
  assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
  np.testing.assert_allclose(out, reference, atol=0.05 * float(jnp.max(jnp.abs(reference))))


def test_input_errors_name_the_problem(tiny):
  _, model, variables, _, c_noise = tiny
  # Checked while tracing: abstract evaluation is enough.
  with pytest.raises(ValueError, match="multiple of patch_size"):
    jax.eval_shape(model.apply, variables, jnp.zeros((2, CHANNELS, 18)), c_noise)
  with pytest.raises(ValueError, match="expects 32 latent channels"):
    jax.eval_shape(model.apply, variables, jnp.zeros((2, 320, 16)), c_noise)
  with pytest.raises(ValueError, match="huge"):
    dit.model_config("huge")
  with pytest.raises(ValueError, match="widht"):
    dit.model_config("tiny", widht=3)


def test_count_params_matches_init(tiny):
  config, _, variables, _, _ = tiny
  actual = sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
  assert dit.count_params(config) == actual


@pytest.mark.parametrize("variant", ["small", "base", "large"])
def test_paper_size_parameter_counts(variant):
  config = dit.model_config(variant)
  assert config.in_channels == 320 and config.patch_size == 16
  count = dit.count_params(config)
  target = dit.PARAM_TARGETS[variant]
  print(f"{variant}: width {config.width} depth {config.depth} heads {config.num_heads} "
        f"patch {config.patch_size}: {count / 1e6:.1f} M parameters (target "
        f"{target / 1e6:.0f} M)")
  assert abs(count / target - 1) < 0.05


def test_width_bottleneck_share():
  assert dit.width_bottleneck(dit.model_config("tiny", in_channels=64)) == 0.75  # the study's
  assert dit.width_bottleneck(dit.model_config("tiny", in_channels=16)) == 0.0  # one stem
  assert dit.width_bottleneck(dit.model_config("base", in_channels=320)) == 0.8  # the paper's


def _fit_noise_only_latents(patch_skip: bool, steps: int = 400) -> float:
  """σ-weighted loss at σ = σ_data of a DiT of width 8 over patches of 2 × 8 channels
  (f = 0.5), trained on latents that are small white noise (nothing to predict: the optimal
  denoiser shrinks its input towards 0): the mean over the last 50 steps."""
  import optax  # pylint: disable=g-import-not-at-top
  sigma_data, sigma = 0.5, 0.5
  model = dit.build_model(dit.model_config("tiny", in_channels=8, width=8, depth=1,
                                           num_heads=1, patch_size=2, patch_skip=patch_skip))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 16)), jnp.zeros((1,)))
  optimizer = optax.adam(1e-2)

  def loss_fn(params, key):
    data_key, noise_key = jax.random.split(key)
    x = 0.05 * jax.random.normal(data_key, (16, 8, 16))
    noise = jax.random.normal(noise_key, x.shape)
    return edm.training_loss(model.apply, params, x, jnp.full((16,), sigma), noise,
                             sigma_data=sigma_data).mean()

  @jax.jit
  def step(params, state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, key)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = optimizer.init(params), []
  for key in jax.random.split(jax.random.key(1), steps):
    params, state, loss = step(params, state, key)
    losses.append(float(loss))
  return float(np.mean(losses[-50:]))


def test_the_width_floor_holds_and_patch_skip_lifts_it():
  """Without the skip the loss stays at f·c_skip(σ) = 0.5 · 0.5 = 0.25 or above, whatever the
  training; the skip's σ-gated linear path gets close to the optimum (about 0.02)."""
  floor = 0.5 * float(edm.c_skip(0.5, 0.5))
  bottlenecked = _fit_noise_only_latents(patch_skip=False)
  skipped = _fit_noise_only_latents(patch_skip=True)
  assert bottlenecked > 0.95 * floor, bottlenecked
  assert skipped < 0.5 * floor, skipped


def test_patch_skip_starts_at_zero_and_its_gate_is_hoisted_with_the_conditioning():
  model = dit.build_model(dit.model_config("tiny", in_channels=8, patch_skip=True))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  c_noise = jnp.array([-1.0, 0.5])
  # The init, the applies and the perturbation jitted: op by op they are ~250 small compiles.
  params = jax.jit(model.init)(jax.random.key(1), x, c_noise)
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(np.asarray(apply(params, x, c_noise)), 0.0)
  # Trained-like parameters: every leaf moved, so the gate and the skip both act.
  moved = jax.jit(lambda params: jax.tree.map(
      lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params))(params)
  conditioning = jax.jit(functools.partial(model.apply, method="conditioning"))(moved, c_noise)
  assert conditioning["skip"].shape == (2, 4 * 8)
  direct = apply(moved, x, c_noise)
  np.testing.assert_allclose(apply(moved, x, c_noise, conditioning=conditioning),
                             direct, rtol=1e-5, atol=1e-6)
  without = dit.build_model(dit.model_config("tiny", in_channels=8))
  assert not np.allclose(direct, jax.jit(without.apply)({"params": {
      k: v for k, v in moved["params"].items() if not k.startswith("skip")}}, x, c_noise))
  # Sampling's cast (bfloat16 compute) keeps the gate in float32, as the other modulations,
  # and casts the skip's matmul as the other token matmuls.
  bf16 = dit.build_model(dit.model_config("tiny", in_channels=8, patch_skip=True,
                                          dtype="bfloat16"))
  cast = bf16.inference_params(moved)["params"]
  assert cast["skip_gate"]["kernel"].dtype == jnp.float32
  assert cast["skip"]["kernel"].dtype == jnp.bfloat16
