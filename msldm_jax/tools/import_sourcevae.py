r"""Imports the authors' released SourceVAE (a PyTorch checkpoint) into an orbax checkpoint.

  python -m msldm_jax.tools.import_sourcevae --torch_checkpoint=g_00500000 --out=DIR \
      [--variant=paper] [--per_source]

Writes DIR/params (the variables `SourceVAE` applies) and DIR/model_config.json (the
SourceVAE config they were made for); torch is not needed. Every stage then takes DIR as its
VAE: `--config.ldm.vae_checkpoint=DIR` (see README.md "Published weights"). The conversion
itself is `models/source_vae_import.py`.
"""

from absl import app
from absl import flags

from msldm_jax import config_loading
from msldm_jax.models import source_vae
from msldm_jax.models import source_vae_import

_TORCH_CHECKPOINT = flags.DEFINE_multi_string(
    "torch_checkpoint", None,
    "The release's generator file (torch.save({'generator': ...})). Repeat it once per stem "
    "(in bass, drums, guitar, piano order) to import separate per-source VAEs.")
_OUT = flags.DEFINE_string("out", None, "Output directory (orbax checkpoint + config).")
_VARIANT = flags.DEFINE_string("variant", "paper", "SourceVAE preset (model_config).")
_PER_SOURCE = flags.DEFINE_bool(
    "per_source", False, "Make a per-source model (every stem starts from the given "
    "checkpoint, or from its own if one is given per stem).")
_OVERRIDES = flags.DEFINE_multi_string(
    "model", [], "KEY=VALUE over the preset's SourceVAE config (e.g. encoder_width=8), for "
    "checkpoints of other widths than the paper's.")


def _model_config():
  config = source_vae.model_config(_VARIANT.value)
  try:
    config_loading.set_from_strings(config, _OVERRIDES.value, "--model")
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  config.per_source = _PER_SOURCE.value or len(_TORCH_CHECKPOINT.value) > 1
  return config


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  source_vae_import.import_checkpoints(_TORCH_CHECKPOINT.value, _OUT.value, _model_config())


if __name__ == "__main__":
  flags.mark_flags_as_required(["torch_checkpoint", "out"])
  app.run(main)
