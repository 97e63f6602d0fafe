"""The MSLDM release's denoiser checkpoint (`msldm.ckpt`, PyTorch Lightning) → our U-Net.

The release's Lightning module (`main.module_base_latent.Model`) holds
`model = AudioDiffusionModel`, whose `unet` is audio-diffusion-pytorch's UNet1d and whose
`diffusion.net` is the same module again; its state dict therefore has every tensor twice,
under `model.unet.` and `model.diffusion.net.`. Both copies are read and must agree.
Our U-Net keeps PyTorch's parameter names and layouts (`models/unet1d.py`), so the map is
key for key; the size is recognised from the tensors' shapes (the release's MSLDM, its
Large, or one of our presets) unless a config is given.

Read without torch (`torch_checkpoint.read_torch_checkpoint`); the hyper-parameters' objects
(Hydra-made instances of the release's classes) are kept as inert placeholders and only
their plain values are recorded.
"""

from collections.abc import Mapping
from typing import Any

import flax
import ml_collections
import numpy as np

from msldm_jax.models import denoisers
from msldm_jax.models import torch_checkpoint
from msldm_jax.models import unet1d

# Where the release's Lightning module keeps the U-Net (two names for one module).
RELEASE_PREFIXES = ("model.diffusion.net.", "model.unet.")
# What the release trains with (its yaml), recorded with an import.
RELEASE_SIGMA_DATA = 0.4
# The shortest listing of keys an error gives.
_SHOWN_KEYS = 10


def _describe(keys, limit: int = _SHOWN_KEYS) -> str:
  keys = list(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def read_checkpoint(path: str) -> dict[str, Any]:
  """The Lightning checkpoint at `path` as plain values (tensors as numpy arrays)."""
  checkpoint = torch_checkpoint.read_torch_checkpoint(path, opaque=True)
  if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
    found = _describe(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint)
    raise ValueError(f"{path}: not a PyTorch Lightning checkpoint (no 'state_dict'; found "
                     f"{found}); expected the MSLDM release's msldm.ckpt")
  return dict(checkpoint)


def unet_state_dict(checkpoint: Mapping[str, Any], source: str) -> dict[str, np.ndarray]:
  """The U-Net's tensors (keys without the module prefix), float32.

  Raises:
    ValueError naming `source` when no key has a release prefix (another model's
    checkpoint), when other keys are present, or when the two copies differ.
  """
  state = checkpoint["state_dict"]
  copies = {prefix: {k[len(prefix):]: np.asarray(v, np.float32) for k, v in state.items()
                     if k.startswith(prefix)} for prefix in RELEASE_PREFIXES}
  if not any(copies.values()):
    raise ValueError(f"{source}: no key starts with {' or '.join(RELEASE_PREFIXES)}, so this "
                     "is not the MSLDM release's Lightning module "
                     f"(main.module_base_latent.Model); its first keys: {_describe(state)}")
  others = [k for k in state if not k.startswith(RELEASE_PREFIXES)]
  if others:
    raise ValueError(f"{source}: keys outside the release's U-Net ({_describe(others)}): not "
                     "the release's denoiser checkpoint (its SourceVAE is a separate file: "
                     "pass it as --sourcevae)")
  first, second = (copies[p] for p in RELEASE_PREFIXES)
  if first and second:
    if first.keys() != second.keys():
      raise ValueError(f"{source}: {RELEASE_PREFIXES[0]}* and {RELEASE_PREFIXES[1]}* hold "
                       "different keys, but are the same module in the release: "
                       f"{_describe(sorted(first.keys() ^ second.keys()))}")
    differing = [k for k in first if first[k].shape != second[k].shape
                 or not np.array_equal(first[k], second[k])]
    if differing:
      raise ValueError(f"{source}: {RELEASE_PREFIXES[0]}* and {RELEASE_PREFIXES[1]}* differ "
                       f"at {_describe(differing)}, but are the same module in the release")
  return first or second


def _torch_paths_and_shapes(model: unet1d.UNet1d) -> dict[str, tuple[tuple, tuple]]:
  """{PyTorch key: (our flax path, the shape PyTorch stores)} of every parameter; one
  abstract evaluation of the network (`relayout` maps our layout to PyTorch's)."""
  abstract = denoisers.abstract_params(model)
  leaves = flax.traverse_util.flatten_dict(abstract["params"])
  return {key: (path, unet1d.relayout(model, key,
                                      np.broadcast_to(False, leaves[path].shape)).shape)
          for key, path in unet1d.torch_keys(abstract).items()}


def mismatches(state: Mapping[str, np.ndarray], model: unet1d.UNet1d,
               expected: Mapping[str, tuple[tuple, tuple]] | None = None) -> list[str]:
  """Every way `state` does not fit `model`: missing, unexpected and misshapen keys."""
  expected = expected or _torch_paths_and_shapes(model)
  shapes = {key: shape for key, (_, shape) in expected.items()}
  problems = [f"missing {k} {shapes[k]}" for k in shapes if k not in state]
  problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in state.items() if k not in shapes]
  problems += [f"{k}: checkpoint {tuple(state[k].shape)}, U-Net {shapes[k]}"
               for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
  return problems


def in_channels_of(state: Mapping[str, np.ndarray], source: str) -> int:
  key = "to_in.module_list.0.block.block1.groupnorm.weight"
  if key not in state:
    raise ValueError(f"{source}: no {key}, so the U-Net's input width is unknown; its keys: "
                     f"{_describe(state)}")
  return int(state[key].shape[0])


def recognise_config(state: Mapping[str, np.ndarray], source: str
                     ) -> ml_collections.ConfigDict:
  """The preset (release, large, small, tiny) whose shapes `state` has exactly.

  Raises:
    ValueError naming the nearest preset and its first mismatching keys when none fits.
  """
  channels = in_channels_of(state, source)
  tried = []
  for variant in unet1d.VARIANTS:
    config = unet1d.model_config(variant, in_channels=channels)
    try:
      problems = mismatches(state, unet1d.build_model(config))
    except ValueError:  # A preset that cannot take this input width at all.
      continue
    if not problems:
      return config
    tried.append((len(problems), variant, problems))
  nearest = ""
  if tried:
    count, variant, problems = min(tried)
    nearest = f"; nearest is {variant!r} with {count} mismatches: {_describe(problems)}"
  raise ValueError(f"{source}: the U-Net's tensors fit none of the presets "
                   f"({', '.join(unet1d.VARIANTS)}) at in_channels={channels}{nearest}. Give "
                   "its settings with --variant and --unet KEY=VALUE if it is another size")


def convert(state: Mapping[str, np.ndarray], model: unet1d.UNet1d, source: str):
  """{'params': …} of `model` from the U-Net's tensors; any mismatch is one error listing
  the first ones."""
  expected = _torch_paths_and_shapes(model)
  problems = mismatches(state, model, expected)
  if problems:
    raise ValueError(f"{source}: the checkpoint does not fit the U-Net "
                     f"({len(problems)} mismatches): {_describe(problems)}")
  params = flax.traverse_util.unflatten_dict({
      path: np.ascontiguousarray(unet1d.relayout(model, key, np.asarray(state[key], np.float32)))
      for key, (path, _) in expected.items()})
  return {"params": params}


def plain_hyper_parameters(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
  """The checkpoint's hyper-parameters that are plain JSON values (placeholders named)."""

  def plain(value):
    if isinstance(value, (str, int, float, bool)) or value is None:
      return value
    if isinstance(value, (list, tuple)):
      return [plain(v) for v in value]
    if isinstance(value, Mapping):
      return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, torch_checkpoint.Opaque):
      fields = {**(value.state if isinstance(value.state, Mapping) else {}), **value.items}
      if value.elements:
        fields["elements"] = value.elements
      return {"class": value.qualified_name, **{str(k): plain(v) for k, v in fields.items()}}
    return repr(value)

  hyper = plain(checkpoint.get("hyper_parameters") or {})
  return hyper if isinstance(hyper, dict) else {"value": hyper}
