"""Config scripts: the paper's configuration is the base, configs/slakh.py adds its options,
configs/demo.py shrinks it by a visible override list only; variants by one string argument;
errors that name the key at fault. Paper sizes are counted from abstract shapes: nothing of
the paper's size is allocated."""

import copy
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax import paper_config
from msldm_jax import stems
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.models import dit
from msldm_jax.models import source_vae
from msldm_jax.models import unet1d
from msldm_jax.training import train_ldm
from msldm_jax.training import train_vae

SLAKH_ARGS = ["", "variant=base", "variant=large", "layout=stems,source_dir=/data/x",
              "variant=large,fsdp,source_dir=/data/slakh2100,tfds_dir=/data/tfds"]


def _path(repo_root, name):
  return os.path.join(repo_root, "configs", name)


def _load(repo_root, name, arg=""):
  return config_loading.load_config(_path(repo_root, name) + (":" + arg if arg else ""))


def _demo(repo_root, arg=""):
  return _load(repo_root, "demo.py", arg)


def _differing_keys(a, b):
  """Dotted keys whose values differ between two configs of the same keys."""
  flat_a, flat_b = config_loading.flatten(a), config_loading.flatten(b)
  assert flat_a.keys() == flat_b.keys(), sorted(flat_a.keys() ^ flat_b.keys())
  return {key for key in flat_a
          if flat_a[key] != flat_b[key] or type(flat_a[key]) is not type(flat_b[key])}


# Loading, options and errors.

@pytest.mark.parametrize("name,arg", [("demo.py", ""), ("demo.py", "variant=tiny")] +
                         [("slakh.py", arg) for arg in SLAKH_ARGS])
def test_config_loads(repo_root, name, arg):
  config = _load(repo_root, name, arg)
  assert {"data", "vae", "ldm", "sample", "evaluate"} <= set(config)


def test_variants_load(repo_root):
  default, tiny = _demo(repo_root), _demo(repo_root, "variant=tiny")
  assert default.variant == "default" and tiny.variant == "tiny"
  assert tiny.data.chunks.samples < default.data.chunks.samples == 327672


def test_unknown_option_names_it(repo_root):
  with pytest.raises(ValueError, match="varient"):
    _demo(repo_root, "varient=tiny")


def test_unknown_variant_names_it(repo_root):
  with pytest.raises(ValueError, match="huge"):
    _demo(repo_root, "variant=huge")
  with pytest.raises(ValueError, match="huge"):
    paper_config.get_paper_config("huge")


def test_misspelled_key_is_an_error_naming_it(repo_root):
  config = _demo(repo_root, "variant=tiny")
  with pytest.raises(AttributeError, match="min_durration"):
    config.data.min_durration = 3.0
  with pytest.raises(AttributeError, match="shufle_buffer"):
    _ = config.data.chunks.shufle_buffer


def test_parse_arg_types():
  args = config_loading.parse_arg("steps=5,runlocal,rate=0.5", steps=1, runlocal=False,
                                  rate=1.0, name="x")
  assert args.steps == 5 and args.runlocal is True and args.rate == 0.5 and args.name == "x"
  with pytest.raises(ValueError, match="steps"):
    config_loading.parse_arg("steps=five", steps=1)


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_loading.load_config("configs/nope.py")


def test_override_sets_existing_keys_only():
  config = paper_config.get_paper_config()
  config_loading.override(config, dict(vae=dict(optimizer=dict(learning_rate=1e-3)),
                                       sample=dict(num_steps=10)), "test")
  assert config.vae.optimizer.learning_rate == 1e-3 and config.sample.num_steps == 10
  with pytest.raises(KeyError, match=r"test: vae\.optimizer\.learning_rat is not a key"):
    config_loading.override(config, dict(vae=dict(optimizer=dict(learning_rat=1.0))), "test")
  with pytest.raises(KeyError, match="test: evaluation is not a key"):
    config_loading.override(config, dict(evaluation=dict(partial_chunks=1)), "test")
  with pytest.raises(TypeError, match="vae.optimizer is a section"):
    config_loading.override(config, dict(vae=dict(optimizer=1.0)), "test")
  with pytest.raises(TypeError, match="sample.num_steps is a value"):
    config_loading.override(config, dict(sample=dict(num_steps=dict(x=1))), "test")
  with pytest.raises(TypeError):  # ConfigDict's own type check: a float key takes no str.
    config_loading.override(config, dict(ldm=dict(sigma_data="0.4")), "test")
  # An open section takes new keys, merged into what it holds.
  for by_stem in (dict(drums=dict(mel_magnitude=300.0)), dict(drums=dict(kl=1.0)),
                  dict(bass=dict(mel_magnitude=30.0))):
    config_loading.override(config, dict(vae=dict(loss_weights_by_stem=by_stem)), "test")
  assert config.vae.loss_weights_by_stem.to_dict() == {
      "drums": {"mel_magnitude": 300.0, "kl": 1.0}, "bass": {"mel_magnitude": 30.0}}
  with pytest.raises(TypeError, match="vae.loss_weights_by_stem is a section"):
    config_loading.override(config, dict(vae=dict(loss_weights_by_stem=1.0)), "test")


def test_cli_rejects_misspelled_override(repo_root, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=data", "--config.data.min_durration=1"],
      cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "min_durration" in result.stderr


# The paper's configuration as the base.

@pytest.mark.parametrize("arg", SLAKH_ARGS)
def test_slakh_has_the_keys_of_demo(repo_root, arg):
  demo_keys = set(config_loading.flatten(_load(repo_root, "demo.py")))
  slakh_keys = set(config_loading.flatten(_load(repo_root, "slakh.py", arg)))
  assert slakh_keys == demo_keys, (
      f"only in slakh.py: {sorted(slakh_keys - demo_keys)}; "
      f"only in demo.py: {sorted(demo_keys - slakh_keys)}")


def test_slakh_is_the_paper_config_with_its_options(repo_root):
  for variant in paper_config.VARIANTS:
    slakh = _load(repo_root, "slakh.py", f"variant={variant}")
    assert _differing_keys(paper_config.get_paper_config(variant), slakh) == set()
  slakh = _load(repo_root, "slakh.py", "layout=stems,source_dir=/s,tfds_dir=/t,fsdp")
  assert _differing_keys(paper_config.get_paper_config(), slakh) == {
      "data.layout", "data.source_dir", "data.tfds_dir", "vae.sharding", "ldm.sharding"}


def test_demo_differs_from_the_paper_only_by_its_override_list(repo_root):
  """Every key configs/demo.py does not list in OVERRIDES is the paper's, and every listed
  one changes something; the tiny variant differs from the demo by TINY_OVERRIDES alone."""
  module = config_loading.load_module(_path(repo_root, "demo.py"))
  demo, tiny = _demo(repo_root), _demo(repo_root, "variant=tiny")
  paper = paper_config.get_paper_config()
  assert _differing_keys(paper, demo) == set(config_loading.flatten(module.OVERRIDES))
  assert _differing_keys(demo, tiny) == set(config_loading.flatten(module.TINY_OVERRIDES))
  # The documented list, as the demo's docstring and the README describe it.
  assert set(config_loading.flatten(module.OVERRIDES)) == {
      "variant",
      "data.layout", "data.render.num_pieces", "data.name",
      "vae.model.encoder_width", "vae.model.decoder_width", "vae.model.latent_dim",
      "vae.discriminator.variant", "vae.optimizer.learning_rate", "vae.batch_size",
      "vae.train.num_steps", "vae.train.log_every", "vae.train.eval_every",
      "vae.train.checkpoint_every", "vae.train.keep_checkpoints", "vae.train.eval_batches",
      "ldm.model.width", "ldm.model.depth", "ldm.model.num_heads", "ldm.model.patch_size",
      "ldm.model.dtype", "ldm.unet.channels", "ldm.unet.patch_factor", "ldm.unet.multipliers",
      "ldm.unet.factors", "ldm.unet.num_blocks", "ldm.unet.attentions",
      "ldm.unet.attention_heads", "ldm.unet.attention_features",
      "ldm.optimizer.learning_rate", "ldm.optimizer.warmup_steps",
      "ldm.ema_decay", "ldm.batch_size", "ldm.train.num_steps", "ldm.train.sample_every",
      "ldm.train.checkpoint_every", "ldm.train.keep_checkpoints", "ldm.train.sample_steps",
      "sample.log_every_steps", "separate.num_steps",
      "evaluate.max_reference_chunks", "evaluate.partial_chunks", "evaluate.separation",
      "evaluate.separation_chunks"}
  # The demo's DiT is the 'tiny' preset; in_channels is set from the latents (below).
  expected = dit.model_config("tiny", in_channels=0).to_dict()
  assert demo.ldm.model.to_dict() == tiny.ldm.model.to_dict() == expected
  # Its U-Net (ldm.denoiser=unet) is the U-Net's 'tiny' preset.
  expected = unet1d.model_config("tiny", in_channels=0).to_dict()
  assert demo.ldm.unet.to_dict() == tiny.ldm.unet.to_dict() == expected
  assert demo.ldm.denoiser == "dit"


@pytest.mark.parametrize("name,arg", [("demo.py", ""), ("demo.py", "variant=tiny"),
                                      ("slakh.py", "variant=large")])
def test_in_channels_come_from_the_latents(repo_root, name, arg):
  # 0: the latent store's stems × latent_dim, set by the diffusion trainer.
  assert _load(repo_root, name, arg).ldm.model.in_channels == 0


def test_slakh_options(repo_root):
  config = _load(repo_root, "slakh.py",
                 "variant=large,layout=stems,source_dir=/data/s,tfds_dir=/t,fsdp")
  assert config.variant == "large" and config.data.layout == "stems"
  assert config.data.source_dir == "/data/s" and config.data.tfds_dir == "/t"
  assert config.vae.sharding == config.ldm.sharding == "fsdp"
  assert config.ldm.model.width == dit.model_config("large").width
  default = _load(repo_root, "slakh.py")
  assert default.data.layout == "slakh_raw" and default.ldm.sharding == "replicate"
  for bad in ("variant=huge", "layout=mp3", "sorce_dir=/x"):
    with pytest.raises(ValueError, match=bad.split("=")[-1] if "=" in bad else bad):
      _load(repo_root, "slakh.py", bad)


def test_slakh_release_is_the_release_inference(repo_root):
  """configs/slakh.py:release: the release's U-Net, sampler, partial generation, no EMA."""
  paper = paper_config.get_paper_config()
  for variant, unet_variant in (("base", "release"), ("large", "large")):
    config = _load(repo_root, "slakh.py", f"release,variant={variant}")
    assert config.ldm.denoiser == "unet"
    expected = unet1d.model_config(unet_variant, in_channels=0, dtype="bfloat16").to_dict()
    assert config.ldm.unet.to_dict() == expected
  sample = config.sample
  assert (sample.sampler, sample.num_steps, sample.sigma_max, sample.sigma_min, sample.rho,
          sample.s_churn, sample.resample_steps, sample.use_ema) == (
              "euler_churn", 150, 3.0, 0.01, 7.0, 20.0, 1, False)
  assert config.ldm.ema_decay == 0.0
  assert (config.ldm.optimizer.learning_rate, config.ldm.batch_size) == (
      paper.ldm.optimizer.learning_rate, paper.ldm.batch_size)


def test_slakh_reference_values(repo_root):
  config = _load(repo_root, "slakh.py")
  data, vae, ldm, sample = config.data, config.vae, config.ldm, config.sample
  assert (data.min_duration, data.max_duration, data.chunks.samples) == (15.0, 640.0, 327672)
  assert data.vae_windows.train_seconds == 1.0 and data.vae_windows.eval_seconds == 5.0
  assert vae.model.to_dict() == source_vae.model_config("paper").to_dict()
  assert vae.discriminator.variant == "full" and vae.batch_size == 28
  assert dict(vae.loss_weights) == {"mel": 15.0, "feature_matching": 2.0,
                                    "adversarial": 1.0, "kl": 10.0, "waveform": 0.0,
                                    "mel_magnitude": 0.0}
  optim = vae.optimizer
  assert (optim.learning_rate, optim.b1, optim.b2, optim.lr_decay) == (5e-5, 0.8, 0.99,
                                                                      0.999996)
  assert (optim.generator_clip, optim.discriminator_clip) == (1000.0, 10.0)
  assert ldm.model.in_channels == 0 and ldm.model.dtype == "bfloat16"
  assert (ldm.optimizer.learning_rate, ldm.optimizer.b1, ldm.optimizer.b2) == (2e-5, 0.9, 0.99)
  assert ldm.batch_size == 16 and 0 < ldm.ema_decay < 1 and sample.use_ema
  assert (sample.sampler, sample.num_steps, sample.sigma_max, sample.sigma_min, sample.rho,
          sample.s_churn) == ("euler_churn", 150, 3.0, 0.01, 7.0, 20.0)
  assert (sample.s_tmin, sample.s_tmax, sample.s_noise) == (0.0, math.inf, 1.0)
  # The trainers accept the sections (optimisers and models are built; nothing is run).
  train_vae.make_train_spec(vae)
  train_ldm.learning_rate_schedule(ldm.optimizer.learning_rate, ldm.optimizer.warmup_steps)


def test_slakh_paper_sizes(repo_root):
  config = _load(repo_root, "slakh.py")
  params = source_vae.abstract_params(source_vae.SourceVAE.from_config(config.vae.model))
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params["params"]))
  assert round(total / 1e6, 2) == 61.05
  for variant in ("base", "large"):
    config = _load(repo_root, "slakh.py", f"variant={variant}")
    # What the diffusion trainer sets in_channels 0 to for the paper's latents: 4 × 80.
    model = ml_collections.ConfigDict(config.ldm.model.to_dict())
    model.in_channels = stems.NUM_STEMS * config.vae.model.latent_dim
    assert model.in_channels == 320
    count = dit.count_params(model)
    assert abs(count / dit.PARAM_TARGETS[variant] - 1) < 0.05, (variant, count)


def test_slakh_loads_through_the_cli_flag(repo_root, tmp_path):
  """ml_collections' config flag loads the script itself (its paper_config import included);
  the data stage then names the missing source_dir."""
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/slakh.py:variant=large",
       f"--workdir={tmp_path}", "--mode=data"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "source_dir" in result.stderr


# The sample section: the default sampler's own defaults, every setting passed through.

def test_sample_section_holds_the_default_samplers_defaults(repo_root):
  for name, arg in [("demo.py", ""), ("slakh.py", "")]:
    sample = _load(repo_root, name, arg).sample
    assert sample.sampler == samplers.DEFAULT_SAMPLER
    for key, value in samplers.sampler_config(samplers.DEFAULT_SAMPLER).items():
      assert sample[key] == value and type(sample[key]) is type(value), key
  assert set(generation_program.SAMPLER_KEYS) >= {"s_tmin", "s_tmax", "s_noise"}


def _standard_normal_denoiser(x, sigma):
  return x / (1.0 + sigma**2)  # The exact denoiser of N(0, 1) data.


def _sample_with(config, **sample_overrides):
  """(settings, samples with key 1, samples with key 2), from the same start x_init."""
  config = copy.deepcopy(config)
  config_loading.override(config, dict(sample=sample_overrides), "test")
  name, settings = generation_program.sampler_settings(config.sample)
  sample = samplers.get_sampler(name, settings)
  x_init = 3.0 * jax.random.normal(jax.random.key(0), (64, 4))
  run = jax.jit(lambda key: sample(_standard_normal_denoiser, key, None, x_init=x_init))
  return settings, np.asarray(run(jax.random.key(1))), np.asarray(run(jax.random.key(2)))


def test_churn_settings_from_the_config_reach_the_sampler(repo_root):
  config = _demo(repo_root, "variant=tiny")
  settings, a, b = _sample_with(config)
  assert (settings["s_tmin"], settings["s_tmax"], settings["s_noise"]) == (0.0, math.inf, 1.0)
  assert not np.allclose(a, b)  # Churn noise: the key matters.
  # s_noise 0: churn without noise, so the samples no longer depend on the key.
  settings, a, b = _sample_with(config, s_noise=0.0)
  assert settings["s_noise"] == 0.0
  np.testing.assert_array_equal(a, b)
  # A churn window [s_tmin, s_tmax] below σ_min: no step churns, as with s_churn 0.
  _, windowless, _ = _sample_with(config, s_tmin=0.0, s_tmax=0.005)
  _, no_churn, _ = _sample_with(config, s_churn=0.0)
  np.testing.assert_allclose(windowless, no_churn, rtol=1e-6, atol=1e-6)
  assert not np.allclose(windowless, a)
  # The noise levels tabulated for the DiT's conditioning follow the window too.
  _, settings = generation_program.sampler_settings(copy.deepcopy(config).sample)
  settings.update(s_tmax=0.005)
  np.testing.assert_array_equal(samplers.evaluation_sigmas("euler_churn", settings),
                                samplers.karras_sigmas(settings["num_steps"])[:-1])
  # A deterministic sampler is not given the churn settings.
  name, settings = generation_program.sampler_settings(
      config_loading.override(copy.deepcopy(config), dict(sample=dict(sampler="dpmpp_2m")),
                              "test").sample)
  assert name == "dpmpp_2m" and not {"s_churn", "s_tmin", "s_tmax", "s_noise"} & set(settings)
