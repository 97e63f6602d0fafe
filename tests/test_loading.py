"""The loading layer: every way to name a SourceVAE, and one clear error for anything else."""

import os

import jax
import numpy as np
import pytest

from msldm_jax import config_loading
from msldm_jax.models import loading
from msldm_jax.models import source_vae

# Shared with the latent dataset's tests: a VAE trainer checkpoint without compiling an init.
import test_latents  # pylint: disable=g-bad-import-order


@pytest.fixture(scope="module")
def config():
  return config_loading.load_config("configs/demo.py:variant=tiny")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, config):
  """A workdir whose VAE stage wrote one checkpoint; returns (workdir, generator params)."""
  path = tmp_path_factory.mktemp("work")
  params = test_latents.write_vae_checkpoint(config, path / "vae" / "checkpoints")
  return str(path), params


def _assert_same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_workdir_its_vae_folder_and_its_checkpoints_load_the_same(workdir, config):
  path, params = workdir
  loaded = [loading.load_vae(p) for p in (path, os.path.join(path, "vae"),
                                          os.path.join(path, "vae", "checkpoints"))]
  for vae in loaded:
    assert vae.identity["format"] == "vae_stage" and vae.identity["step"] == 0
    assert vae.identity["checkpoint_dir"] == os.path.join(path, "vae", "checkpoints")
    assert vae.module == source_vae.SourceVAE.from_config(config.vae.model)
    _assert_same(vae.params, params)
  assert len({v.identity["params_sha256"] for v in loaded}) == 1


def test_an_import_is_built_from_its_own_config(workdir, tmp_path):
  """An imported VAE of other widths than the run's config loads as itself."""
  model = source_vae.SourceVAE.from_config(source_vae.model_config("tiny"))
  params = jax.device_get(source_vae.init_params(model, jax.random.key(3)))
  loading.save_imported_vae(str(tmp_path / "imported"), params, model)
  vae = loading.load_vae(str(tmp_path / "imported"))
  assert vae.module == model and vae.identity["format"] == "imported"
  assert vae.identity["step"] is None
  _assert_same(vae.params, params)
  assert vae.identity["params_sha256"] == loading.params_sha256(params)
  assert vae.identity["params_sha256"] != loading.load_vae(workdir[0]).identity[
      "params_sha256"]


def test_wrong_paths_are_one_clear_error(tmp_path, workdir):
  with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}.*does not exist"):
    loading.load_vae(str(tmp_path / "nowhere"))
  junk = tmp_path / "junk"
  junk.mkdir()
  (junk / "weights.bin").write_bytes(b"\0")
  with pytest.raises(ValueError, match=f"no SourceVAE at {junk}.*found there: weights.bin"):
    loading.load_vae(str(junk))
  # A VAE checkpoint is not a diffusion checkpoint, and says so.
  with pytest.raises(ValueError, match="holds a 'source_vae' network, not 'dit' or 'unet'"):
    loading.load_denoiser(workdir[0] + "/vae")
  with pytest.raises(FileNotFoundError, match="no diffusion model checkpoint.*train_ldm"):
    loading.load_denoiser(str(junk))


def test_check_same_vae_names_both(workdir):
  vae = loading.load_vae(workdir[0])
  loading.check_same_vae(vae, vae.identity, what="the store")
  other = {**vae.identity, "params_sha256": "0" * 64, "checkpoint_dir": "/elsewhere"}
  with pytest.raises(ValueError, match=r"is not the one recorded by the store: /elsewhere"):
    loading.check_same_vae(vae, other, what="the store")
  with pytest.raises(ValueError, match="records no VAE identity"):
    loading.check_same_vae(vae, {}, what="the store")
