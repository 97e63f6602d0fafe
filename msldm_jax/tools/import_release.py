r"""Imports the MSLDM release's denoiser (and its SourceVAE) for sampling and evaluation here.

  python -m msldm_jax.tools.import_release --checkpoint=msldm.ckpt \
      --sourcevae=sourcevae_ckpt --out=DIR

Reads the release's PyTorch Lightning checkpoint without torch, recognises the U-Net's size
from its tensors (the release's MSLDM or MSLDM-Large; `--variant`/`--unet KEY=VALUE` for
another), converts it (`models/unet1d_import.py`) and writes
  DIR/params, DIR/denoiser.json   the U-Net (orbax) and its model record: kind, config,
                                  σ_data, where it came from and the VAE it goes with;
  DIR/vae/                        with --sourcevae: the release's SourceVAE (the generator
                                  file its notebook loads), as tools/import_sourcevae writes it.
Everything is converted and checked before anything is written, and DIR appears only when
complete (written under a temporary name, then renamed); an existing DIR is refused.

Then the release's inference, in our code (README.md "The authors' model"):
  python -m msldm_jax.main --config=configs/slakh.py:release --workdir=runs/release \
      --config.ldm.denoiser_checkpoint=DIR --mode=sample
"""

import os
import shutil
import sys
import tempfile

from absl import app
from absl import flags
from absl import logging

from msldm_jax import config_loading
from msldm_jax import file_hashes
from msldm_jax import stems
from msldm_jax.models import denoisers
from msldm_jax.models import loading
from msldm_jax.models import source_vae
from msldm_jax.models import source_vae_import
from msldm_jax.models import unet1d
from msldm_jax.models import unet1d_import

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The release's msldm.ckpt (or "
                                  "msldm_large.ckpt): a PyTorch Lightning checkpoint.")
_OUT = flags.DEFINE_string("out", None, "Output directory; must not exist yet.")
_SOURCEVAE = flags.DEFINE_string("sourcevae", "", "The release's SourceVAE generator file "
                                 "(torch.save({'generator': ...})), imported alongside.")
_SOURCEVAE_VARIANT = flags.DEFINE_string("sourcevae_variant", "paper",
                                         "SourceVAE preset of --sourcevae (model_config).")
_SOURCEVAE_MODEL = flags.DEFINE_multi_string(
    "sourcevae_model", [], "KEY=VALUE over that preset's SourceVAE config (e.g. "
    "encoder_width=8), for a SourceVAE of another width than the paper's.")
_VARIANT = flags.DEFINE_string("variant", "", "U-Net preset (unet1d.model_config); empty: "
                               "recognised from the checkpoint's shapes.")
_UNET = flags.DEFINE_multi_string("unet", [], "KEY=VALUE over the preset's U-Net settings, "
                                  "for a checkpoint of another size.")


def unet_config(state, source: str, variant: str = "", overrides=()):
  """The U-Net's settings: recognised from `state`, or `variant` with KEY=VALUE overrides."""
  if not variant and not overrides:
    return unet1d_import.recognise_config(state, source)
  config = unet1d.model_config(variant or "release",
                               in_channels=unet1d_import.in_channels_of(state, source))
  return config_loading.set_from_strings(config, overrides, "--unet")


def import_release(checkpoint_path: str, out: str, *, sourcevae: str = "",
                   sourcevae_variant: str = "paper", sourcevae_overrides=(),
                   variant: str = "", overrides=()) -> str:
  """Converts the release's checkpoint(s) and writes DIR; returns its absolute path."""
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise ValueError(f"--out={out} exists: choose a new directory (an import is never merged "
                     "into or written over another)")
  checkpoint = unet1d_import.read_checkpoint(checkpoint_path)
  state = unet1d_import.unet_state_dict(checkpoint, checkpoint_path)
  config = unet_config(state, checkpoint_path, variant, overrides)
  model = unet1d.build_model(config)
  params = unet1d_import.convert(state, model, checkpoint_path)
  count = sum(v.size for v in state.values())
  logging.info("U-Net: %d parameters from %s (%s)", count, checkpoint_path,
               dict(config.items()))

  vae_variables = vae_model = None
  if sourcevae:
    vae_model = source_vae.SourceVAE.from_config(config_loading.set_from_strings(
        source_vae.model_config(sourcevae_variant), sourcevae_overrides, "--sourcevae_model"))
    channels = stems.NUM_STEMS * vae_model.latent_dim
    if channels != model.in_channels:
      raise ValueError(f"--sourcevae={sourcevae}: a {sourcevae_variant} SourceVAE makes "
                       f"{stems.NUM_STEMS} × {vae_model.latent_dim} = {channels} latent "
                       f"channels, the U-Net of {checkpoint_path} takes {model.in_channels}")
    vae_variables = source_vae_import.convert_release_state_dict(
        source_vae_import.read_generator_state_dict(sourcevae), vae_model, source=sourcevae)

  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.partial-", dir=parent)
  try:
    record = denoisers.record(
        denoisers.UNET, config, sigma_data=unet1d_import.RELEASE_SIGMA_DATA,
        imported_from={
            "checkpoint": os.path.abspath(checkpoint_path),
            "sha256": file_hashes.sha256(checkpoint_path),
            "epoch": checkpoint.get("epoch"), "global_step": checkpoint.get("global_step"),
            "pytorch_lightning_version": checkpoint.get("pytorch-lightning_version"),
            "hyper_parameters": unet1d_import.plain_hyper_parameters(checkpoint)})
    if vae_variables is not None:
      vae_dir = os.path.join(staging, loading.IMPORTED_VAE_DIR)
      loading.save_imported_vae(vae_dir, vae_variables, vae_model)
      identity = loading.load_vae(vae_dir).identity
      # Relative: the import stays whole when DIR is moved (the loader resolves it).
      record["latents"] = {"vae": {"checkpoint_dir": loading.IMPORTED_VAE_DIR,
                                   "format": identity["format"],
                                   "params_sha256": identity["params_sha256"],
                                   "source": os.path.abspath(sourcevae),
                                   "source_sha256": file_hashes.sha256(sourcevae)}}
    loading.save_imported_denoiser(staging, params, record)
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  logging.info("wrote %s", out)
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    out = import_release(_CHECKPOINT.value, _OUT.value, sourcevae=_SOURCEVAE.value,
                         sourcevae_variant=_SOURCEVAE_VARIANT.value,
                         sourcevae_overrides=_SOURCEVAE_MODEL.value, variant=_VARIANT.value,
                         overrides=_UNET.value)
  except (ValueError, KeyError, FileNotFoundError) as e:
    # One message naming the file and what is wrong with it; nothing was written.
    sys.exit(f"import_release: {e}")
  print(f"imported the release's denoiser into {out}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["checkpoint", "out"])
  app.run(main)
