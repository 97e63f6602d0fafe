"""Every config script loads for every variant; configs/slakh.py keeps demo.py's keys and has
the paper's sizes (counted from abstract shapes: nothing of the paper's size is allocated)."""

import math
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from msldm_jax import config_loading
from msldm_jax.models import dit
from msldm_jax.models import source_vae
from msldm_jax.training import train_ldm
from msldm_jax.training import train_vae

SLAKH_ARGS = ["", "variant=base", "variant=large", "layout=stems,source_dir=/data/x",
              "variant=large,fsdp,source_dir=/data/slakh2100,tfds_dir=/data/tfds"]


def _load(repo_root, name, arg=""):
  path = os.path.join(repo_root, "configs", name)
  return config_loading.load_config(path + (":" + arg if arg else ""))


def _flat_keys(config, prefix=""):
  keys = set()
  for key, value in config.items():
    name = prefix + key
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      keys |= _flat_keys(value, name + ".")
    else:
      keys.add(name)
  return keys


@pytest.mark.parametrize("name,arg", [("demo.py", ""), ("demo.py", "variant=tiny")] +
                         [("slakh.py", arg) for arg in SLAKH_ARGS])
def test_config_loads(repo_root, name, arg):
  config = _load(repo_root, name, arg)
  assert {"data", "vae", "ldm", "sample"} <= set(config)


@pytest.mark.parametrize("arg", SLAKH_ARGS)
def test_slakh_has_the_keys_of_demo(repo_root, arg):
  demo_keys = _flat_keys(_load(repo_root, "demo.py"))
  slakh_keys = _flat_keys(_load(repo_root, "slakh.py", arg))
  assert slakh_keys == demo_keys, (
      f"only in slakh.py: {sorted(slakh_keys - demo_keys)}; "
      f"only in demo.py: {sorted(demo_keys - slakh_keys)}")


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


def test_slakh_reference_values(repo_root):
  config = _load(repo_root, "slakh.py")
  data, vae, ldm, sample = config.data, config.vae, config.ldm, config.sample
  assert (data.min_duration, data.max_duration, data.chunks.samples) == (15.0, 640.0, 327672)
  assert data.vae_windows.train_seconds == 1.0 and data.vae_windows.eval_seconds == 5.0
  assert vae.model.to_dict() == source_vae.model_config("paper").to_dict()
  assert vae.discriminator.variant == "full" and vae.batch_size == 28
  assert dict(vae.loss_weights) == {"mel": 15.0, "feature_matching": 2.0,
                                    "adversarial": 1.0, "kl": 10.0}
  optim = vae.optimizer
  assert (optim.learning_rate, optim.b1, optim.b2, optim.lr_decay) == (5e-5, 0.8, 0.99,
                                                                      0.999996)
  assert (optim.generator_clip, optim.discriminator_clip) == (1000.0, 10.0)
  assert ldm.model.in_channels == 320 and ldm.model.dtype == "bfloat16"
  assert (ldm.optimizer.learning_rate, ldm.optimizer.b1, ldm.optimizer.b2) == (2e-5, 0.9, 0.99)
  assert ldm.batch_size == 16 and 0 < ldm.ema_decay < 1 and sample.use_ema
  assert (sample.sampler, sample.num_steps, sample.sigma_max, sample.sigma_min, sample.rho,
          sample.s_churn) == ("euler_churn", 150, 3.0, 0.01, 7.0, 20.0)
  # The trainers accept the sections (optimisers and models are built; nothing is run).
  train_vae.make_models(vae)
  train_ldm.learning_rate_schedule(ldm.optimizer.learning_rate, ldm.optimizer.warmup_steps)


def test_slakh_paper_sizes(repo_root):
  config = _load(repo_root, "slakh.py")
  params = source_vae.abstract_params(source_vae.SourceVAE.from_config(config.vae.model))
  total = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params["params"]))
  assert round(total / 1e6, 2) == 61.05
  for variant in ("base", "large"):
    model = _load(repo_root, "slakh.py", f"variant={variant}").ldm.model
    count = dit.count_params(model)
    assert abs(count / dit.PARAM_TARGETS[variant] - 1) < 0.05, (variant, count)


def test_slakh_loads_through_the_cli_flag(repo_root, tmp_path):
  """ml_collections' config flag loads the script itself (its demo.py import included); the
  data stage then names the missing source_dir."""
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/slakh.py:variant=large",
       f"--workdir={tmp_path}", "--mode=data"],
      cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "source_dir" in result.stderr
