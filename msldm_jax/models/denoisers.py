"""The denoiser networks F of the EDM denoiser, one choice in the config: `ldm.denoiser`.

  dit   the diffusion transformer (`models/dit.py`), the design card's choice and the default;
        its settings are `ldm.model`. With `ldm.model.stem_streams` = S > 0 it is the
        stem-coupled DiT instead (`models/coupled_stems.py`): one stream per stem, each of
        ISLDM's size, coupled by mixers after every block.
  unet  the MSLDM release's 1-D U-Net (`models/unet1d.py`, audio-diffusion-pytorch 0.0.43's
        UNet1d); its settings are `ldm.unet`.

Both take `apply(params, c_in·x [b, C, T], c_noise [b]) -> [b, C, T]` and have
`in_channels` and `frame_multiple` (latent frames must be a multiple of it), so the trainer,
the samplers, inpainting, sharding, EMA and checkpoints need not know which one runs. A
checkpoint's model record names the kind (`record`), and `from_record` rebuilds the network
from it, whatever the config that loads it.

`independent_stems` = S > 0 builds ISLDM instead (`models/independent_stems.py`): S copies
of the network, each on its own stem's in_channels / S channels; the record carries S.
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from msldm_jax import config_loading
from msldm_jax.models import coupled_stems
from msldm_jax.models import dit
from msldm_jax.models import independent_stems as independent_stems_lib
from msldm_jax.models import unet1d

DIT = "dit"
UNET = "unet"
KINDS = (DIT, UNET)
# The config subtree holding each kind's settings.
CONFIG_KEYS = {DIT: "model", UNET: "unet"}


def _build_dit(config: ml_collections.ConfigDict) -> nn.Module:
  if int(config.get("stem_streams", 0)):
    return coupled_stems.build_model(config)
  return dit.build_model(config)


_BUILDERS = {DIT: _build_dit, UNET: unet1d.build_model}
# The preset whose keys a recorded config is checked against (any preset has them all).
_PRESETS = {DIT: lambda: dit.model_config("tiny"), UNET: lambda: unet1d.model_config("tiny")}


def check_kind(kind: str, source: str = "config key ldm.denoiser") -> str:
  if kind not in KINDS:
    raise ValueError(f"{source}: unknown denoiser {kind!r} (one of {', '.join(KINDS)})")
  return kind


def selected(ldm_config: ml_collections.ConfigDict) -> tuple[str, ml_collections.ConfigDict]:
  """(kind, settings) of the denoiser `ldm_config` selects: ldm.denoiser and its subtree."""
  kind = check_kind(str(ldm_config.get("denoiser", DIT)))
  return kind, ldm_config[CONFIG_KEYS[kind]]


def config_key(kind: str) -> str:
  """The full config key of a kind's settings, for messages ("ldm.model", "ldm.unet")."""
  return f"ldm.{CONFIG_KEYS[check_kind(kind)]}"


def build(kind: str, config: ml_collections.ConfigDict, independent_stems: int = 0
          ) -> nn.Module:
  """The network of `kind` with `config`; with independent_stems = S > 0, ISLDM: S networks
  of config.in_channels / S input channels each."""
  builder = _BUILDERS[check_kind(kind)]
  if not independent_stems:
    return builder(config)
  if int(config.get("stem_streams", 0)):
    raise ValueError(f"stem_streams={config.stem_streams} couples the stems; ISLDM "
                     f"(independent_stems={independent_stems}) keeps them apart: set one")
  channels = int(config.in_channels)
  if independent_stems < 0 or channels % independent_stems:
    raise ValueError(f"independent_stems={independent_stems} must be a positive divisor of "
                     f"the denoiser's in_channels={channels}")
  per_stem = ml_collections.ConfigDict(config.to_dict())
  per_stem.in_channels = channels // independent_stems
  return independent_stems_lib.IndependentStems(builder(per_stem), int(independent_stems))


def record(kind: str, config: Mapping[str, Any], independent_stems: int = 0,
           **extra) -> dict[str, Any]:
  """The `model` item of a checkpoint: the kind, its settings as JSON values (in_channels:
  all stems'), ISLDM's number of stems when set, and `extra`."""
  values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}
  stems = {"independent_stems": int(independent_stems)} if independent_stems else {}
  return {"kind": check_kind(kind), "config": values, **stems, **extra}


def from_record(kind: str, values: Mapping[str, Any], source: str,
                independent_stems: int = 0) -> nn.Module:
  """The network a recorded config describes; an unknown key is an error naming `source`."""
  config = _PRESETS[check_kind(kind, source)]()
  return build(kind, config_loading.update_known(config, values, source, kind),
               independent_stems)


def abstract_params(model: nn.Module):
  """The network's float32 parameter shapes (they do not depend on the number of frames)."""
  x = jax.ShapeDtypeStruct((1, model.in_channels, model.frame_multiple), jnp.float32)
  c_noise = jax.ShapeDtypeStruct((1,), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x, c_noise)
  # The trainer keeps float32 parameters whatever the compute dtype.
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), abstract)
