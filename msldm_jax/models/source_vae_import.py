"""The release's SourceVAE weights in our parameter tree: key map and conversion.

Input: the release trainer's generator file, `torch.save({'generator': state_dict})`, keys as
the DAC modules name them (`encoder.block.0.weight_v`, `decoder.model.1.block.2.block.1.bias`,
Snake `...alpha` [1, C, 1], ...), read without torch by `models/torch_checkpoint.py`.

The key map is explicit and derived from the DAC module tree (`source_vae_key_map`); a key
the map does not know, a key it needs but the file lacks, and a shape that differs are all
errors naming the key. The same per-block maps serve the parity tests against the PyTorch
modules (tests/test_source_vae_parity.py), so what is tested is what imports.

Per-source mode: given one checkpoint, every stem's VAE starts from the released (shared)
weights; given one checkpoint per stem (in stems.STEM_NAMES order), each stem gets its own.

`import_checkpoints` converts and writes an imported checkpoint (DIR/params +
DIR/model_config.json) that `models/loading.load_vae(DIR)` reads;
`python -m msldm_jax.tools.import_sourcevae` is its command line.
"""

import os
from typing import Any, Mapping, Sequence

from absl import logging
import jax
import numpy as np

from msldm_jax.models import loading
from msldm_jax.models import source_vae
from msldm_jax.models import torch_checkpoint

Path = tuple[str, ...]
KeyMap = dict[Path, str]


def read_generator_state_dict(path: str) -> dict[str, np.ndarray]:
  """The release's generator weights: `checkpoint['generator']` as {key: array}."""
  checkpoint = torch_checkpoint.read_torch_checkpoint(path)
  if not isinstance(checkpoint, Mapping) or "generator" not in checkpoint:
    keys = list(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
    raise KeyError(f"{path}: no 'generator' entry (found {keys}); expected the release "
                   "trainer's g_XXXXXXXX file")
  state = checkpoint["generator"]
  bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: generator entries that are not tensors: {bad}")
  return dict(state)


# -- The key map: our parameter paths -> the PyTorch state-dict keys ---------------------------
# Each function mirrors one DAC module's nn.Sequential (dac/model/dac.py, descript-audio-codec
# 1.0.0): our submodule names on the left, the Sequential index on the right.


def _snake_keys(ours: Path, theirs: str) -> KeyMap:
  return {ours + ("alpha",): theirs + "alpha"}


def wnconv_keys(ours: Path = (), theirs: str = "") -> KeyMap:
  """WNConv1d / WNConvTranspose1d: weight_norm's weight_g, weight_v, and the bias."""
  return {ours + (n,): theirs + n for n in ("weight_g", "weight_v", "bias")}


def snake_keys(ours: Path = (), theirs: str = "") -> KeyMap:
  return _snake_keys(ours, theirs)


def residual_unit_keys(ours: Path = (), theirs: str = "") -> KeyMap:
  """ResidualUnit.block = Sequential(Snake1d, WNConv1d k7, Snake1d, WNConv1d k1)."""
  return {**_snake_keys(ours + ("snake_0",), theirs + "block.0."),
          **wnconv_keys(ours + ("conv_0",), theirs + "block.1."),
          **_snake_keys(ours + ("snake_1",), theirs + "block.2."),
          **wnconv_keys(ours + ("conv_1",), theirs + "block.3.")}


def encoder_block_keys(num_residual: int = 3, ours: Path = (), theirs: str = "") -> KeyMap:
  """EncoderBlock.block = Sequential(ResidualUnit ×3, Snake1d, WNConv1d strided)."""
  keys = {}
  for i in range(num_residual):
    keys.update(residual_unit_keys(ours + (f"residual_{i}",), f"{theirs}block.{i}."))
  keys.update(_snake_keys(ours + ("snake",), f"{theirs}block.{num_residual}."))
  keys.update(wnconv_keys(ours + ("conv",), f"{theirs}block.{num_residual + 1}."))
  return keys


def decoder_block_keys(num_residual: int = 3, ours: Path = (), theirs: str = "") -> KeyMap:
  """DecoderBlock.block = Sequential(Snake1d, WNConvTranspose1d, ResidualUnit ×3)."""
  keys = {**_snake_keys(ours + ("snake",), theirs + "block.0."),
          **wnconv_keys(ours + ("conv_transpose",), theirs + "block.1.")}
  for i in range(num_residual):
    keys.update(residual_unit_keys(ours + (f"residual_{i}",), f"{theirs}block.{i + 2}."))
  return keys


def encoder_keys(num_blocks: int, num_residual: int = 3, ours: Path = (),
                 theirs: str = "") -> KeyMap:
  """Encoder.block = Sequential(WNConv1d, EncoderBlock ×n, Snake1d, WNConv1d)."""
  keys = wnconv_keys(ours + ("conv_in",), theirs + "block.0.")
  for i in range(num_blocks):
    keys.update(encoder_block_keys(num_residual, ours + (f"block_{i}",),
                                   f"{theirs}block.{i + 1}."))
  keys.update(_snake_keys(ours + ("snake_out",), f"{theirs}block.{num_blocks + 1}."))
  keys.update(wnconv_keys(ours + ("conv_out",), f"{theirs}block.{num_blocks + 2}."))
  return keys


def decoder_keys(num_blocks: int, num_residual: int = 3, ours: Path = (),
                 theirs: str = "") -> KeyMap:
  """Decoder.model = Sequential(WNConv1d, DecoderBlock ×n, Snake1d, WNConv1d[, Tanh])."""
  keys = wnconv_keys(ours + ("conv_in",), theirs + "model.0.")
  for i in range(num_blocks):
    keys.update(decoder_block_keys(num_residual, ours + (f"block_{i}",),
                                   f"{theirs}model.{i + 1}."))
  keys.update(_snake_keys(ours + ("snake_out",), f"{theirs}model.{num_blocks + 1}."))
  keys.update(wnconv_keys(ours + ("conv_out",), f"{theirs}model.{num_blocks + 2}."))
  return keys


def source_vae_key_map(model: source_vae.SourceVAE) -> KeyMap:
  """The release generator's keys (`encoder.block...`, `decoder.model...`), one VAE."""
  num_residual = len(model.dilations)
  return {**encoder_keys(len(model.encoder_strides), num_residual, ("encoder",), "encoder."),
          **decoder_keys(len(model.decoder_strides), num_residual, ("decoder",), "decoder.")}


def _torch_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
  # Snake1d stores alpha as [1, C, 1]; we store [C]. Everything else keeps PyTorch's layout.
  return (1,) + shape + (1,) if path[-1] == "alpha" else shape


def _describe_keys(keys: Sequence[str], limit: int = 12) -> str:
  shown = ", ".join(keys[:limit])
  return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], key_map: KeyMap,
                       abstract_params: Any, *, source: str = "state dict",
                       leading_axes: int = 0) -> dict:
  """Fills the parameter tree `abstract_params` (shapes only) from a PyTorch state dict.

  Every key must be used and every parameter found, with the right shape. `leading_axes`
  parameter axes (the SourceVAE's group axis) are not part of the PyTorch shapes; the
  result has them as size-1 axes, for the caller to tile or stack.
  """
  flat = {tuple(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  if set(flat) != set(key_map):
    missing = sorted("/".join(p) for p in set(flat) - set(key_map))
    extra = sorted("/".join(p) for p in set(key_map) - set(flat))
    raise ValueError(f"key map and parameter tree disagree: unmapped parameters {missing}, "
                     f"mapped paths that do not exist {extra}")
  unknown = sorted(set(state_dict) - set(key_map.values()))
  if unknown:
    raise KeyError(f"{source}: keys with no place in the model (does the model config match "
                   f"the checkpoint?): {_describe_keys(unknown)}")
  missing = sorted(k for k in key_map.values() if k not in state_dict)
  if missing:
    raise KeyError(f"{source}: keys the model needs but the checkpoint lacks: "
                   f"{_describe_keys(missing)}")
  params = {}
  for path, torch_key in key_map.items():
    shape = tuple(flat[path].shape)[leading_axes:]
    value = np.asarray(state_dict[torch_key])
    if value.shape != _torch_shape(path, shape):
      raise ValueError(f"{source}: {torch_key} has shape {value.shape}, the model expects "
                       f"{_torch_shape(path, shape)} (for {'/'.join(path)})")
    value = value.reshape((1,) * leading_axes + shape).astype(flat[path].dtype)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return params


def convert_release_state_dict(state_dicts, model: source_vae.SourceVAE,
                               source: str = "checkpoint") -> dict:
  """Release generator state dict(s) → SourceVAE variables {'params': ...} (numpy arrays).

  `state_dicts`: one mapping (shared mode; or per-source mode, every stem starting from it),
  or a sequence of `model.num_groups` mappings (one per parameter group, stem order).
  """
  abstract = source_vae.abstract_params(model)["params"]
  key_map = source_vae_key_map(model)
  if isinstance(state_dicts, Mapping):
    state_dicts = [state_dicts]
  if len(state_dicts) not in (1, model.num_groups):
    raise ValueError(f"{source}: got {len(state_dicts)} state dicts; the model has "
                     f"{model.num_groups} parameter group(s)")
  groups = [convert_state_dict(sd, key_map, abstract, source=f"{source}[{i}]",
                               leading_axes=1) for i, sd in enumerate(state_dicts)]
  if len(groups) == 1:
    params = jax.tree.map(lambda x: np.repeat(x, model.num_groups, axis=0), groups[0])
  else:
    params = jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *groups)
  return {"params": params}


def import_checkpoints(torch_checkpoints: Sequence[str], out: str, model_cfg) -> dict:
  """Reads release checkpoint file(s), converts, saves to `out`; returns the variables."""
  model = source_vae.SourceVAE.from_config(model_cfg)
  state_dicts = [read_generator_state_dict(p) for p in torch_checkpoints]
  variables = convert_release_state_dict(
      state_dicts if len(state_dicts) > 1 else state_dicts[0], model,
      source=",".join(torch_checkpoints))
  count = sum(x.size for x in jax.tree.leaves(variables))
  logging.info("converted %d parameters (%d group(s)) from %s", count, model.num_groups,
               ", ".join(torch_checkpoints))
  loading.save_imported_vae(out, variables, model)
  logging.info("wrote %s", os.path.abspath(out))
  return variables
