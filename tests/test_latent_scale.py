"""`ldm.latent_scale='per_source'`: each source's latents scaled to σ_data's RMS for the
diffusion model, recorded with the denoiser, undone before decoding.

The training side here (synthetic latent stores, as tests/test_train_ldm.py); the generation
side in tests/test_generation.py (a scaled checkpoint through `--mode=sample`), and the whole
chain (encode, train with a periodic sample, sample) in test_train_ldm's end-to-end test.
"""

import functools

import jax
import numpy as np
import pytest

from msldm_jax import joint_latent
from msldm_jax import stems
from msldm_jax.latents import store
from msldm_jax.models import loading
from msldm_jax.training import train_ldm

import test_train_ldm  # pylint: disable=g-bad-import-order

# Far from σ_data and from each other, as the study's stems' latents are (RMS 0.45 to 2.8).
FACTORS = (8.0, 0.25, 3.0, 1.0)


def test_source_scales_give_each_source_the_rms_of_sigma_data():
  rng = np.random.default_rng(0)
  latents = rng.normal(0.3, 1.0, (64, stems.NUM_STEMS, 8, 32)).astype(np.float32)
  latents = latents * np.asarray(FACTORS, np.float32)[None, :, None, None]
  joint = joint_latent.stack_sources(latents)
  mean, std = joint.mean(axis=(0, 2)), joint.std(axis=(0, 2))
  scales = joint_latent.source_scales(mean, std, stems.NUM_STEMS, sigma_data=0.4)
  scaled = joint_latent.unscale_sources(latents, scales)
  rms = np.sqrt((scaled.astype(np.float64)**2).mean(axis=(0, 2, 3)))
  np.testing.assert_allclose(rms, 0.4, rtol=1e-4)
  # The ratios follow the factors (the same noise under each).
  np.testing.assert_allclose(np.asarray(scales) / scales[3], FACTORS, rtol=0.05)
  np.testing.assert_allclose(joint_latent.scale_sources(scaled, scales), latents, rtol=1e-5)
  assert joint_latent.scale_sources(latents, ()) is latents
  with pytest.raises(ValueError, match="3 latent scales for 4 sources"):
    joint_latent.scale_sources(latents, scales[:3])
  with pytest.raises(ValueError, match="positive"):
    joint_latent.source_scales(np.zeros(32), np.zeros(32), stems.NUM_STEMS, 0.4)


def _step(spec, batch):
  state = jax.jit(functools.partial(train_ldm.init_state, spec,
                                    num_frames=test_train_ldm.FRAMES))(jax.random.key(0))
  step = jax.jit(functools.partial(train_ldm.train_step, spec=spec, seed=0))
  return step(state, batch)


def test_a_scaled_step_sees_what_an_unscaled_one_sees_of_unscaled_latents(tmp_path):
  """Training on s·x with scale s is training on x: the same loss, update and σ buckets."""
  config = test_train_ldm.make_config(tmp_path)
  manifest = store.load_manifest(config.ldm.latents_dir)
  model_config = train_ldm.model_config_for_latents(config.ldm, manifest,
                                                    config.ldm.latents_dir)
  x = test_train_ldm.synthetic_latents(4)
  scaled_x = x * np.asarray(FACTORS, np.float32)[None, :, None, None]
  plain = train_ldm.make_train_spec(config.ldm, model_config)
  scaled = train_ldm.make_train_spec(config.ldm, model_config, latent_scale=FACTORS)
  state_a, metrics_a = _step(plain, {store.LATENTS: x})
  state_b, metrics_b = _step(scaled, {store.LATENTS: scaled_x})
  for key in ("loss", "sigma_bucket_sum"):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-5, atol=1e-7)
  test_train_ldm._assert_trees_close(state_a.params, state_b.params, rtol=1e-4, atol=1e-6)


def test_the_trainer_records_the_scale_and_refuses_to_resume_under_another(tmp_path):
  config = test_train_ldm.make_config(tmp_path, num_steps=2, checkpoint_every=2)
  config.ldm.latent_scale = "per_source"
  train_ldm.run(config, str(tmp_path / "run"))
  manifest = store.load_manifest(config.ldm.latents_dir)
  statistics = manifest["statistics"]
  expected = joint_latent.source_scales(statistics["mean"], statistics["std"],
                                        stems.NUM_STEMS, config.ldm.sigma_data)
  denoiser = loading.load_denoiser(str(tmp_path / "run"))
  assert loading.latent_scale(denoiser) == pytest.approx(expected)
  assert denoiser.identity["latents"]["scale"] == pytest.approx(expected)

  config.ldm.latent_scale = "none"
  config.ldm.train.num_steps = 4
  with pytest.raises(ValueError, match=r"scale=\[\].*ldm.latent_scale 'none'"):
    train_ldm.run(config, str(tmp_path / "run"))
  config.ldm.latent_scale = "per_stem"
  with pytest.raises(ValueError, match="ldm.latent_scale='per_stem': one of none, per_source"):
    train_ldm.run(config, str(tmp_path / "other"))
  # A denoiser that used its latents as stored records no scale.
  config.ldm.latent_scale = "none"
  train_ldm.run(config, str(tmp_path / "unscaled"))
  assert loading.latent_scale(loading.load_denoiser(str(tmp_path / "unscaled"))) == ()
