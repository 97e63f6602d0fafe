r"""Imports the authors' released SourceVAE (a PyTorch checkpoint) into an orbax checkpoint.

  python -m msldm_jax.tools.import_sourcevae --torch_checkpoint=g_00500000 --out=DIR \
      [--variant=paper] [--per_source]

Input: the release trainer's generator file, `torch.save({'generator': state_dict})`, keys as
the DAC modules name them (`encoder.block.0.weight_v`, `decoder.model.1.block.2.block.1.bias`,
Snake `...alpha` [1, C, 1], ...). torch is NOT needed: `read_torch_checkpoint` reads the zip
format directly with a restricted unpickler (see there).

Output: DIR/params, an orbax `StandardCheckpointer` checkpoint of the variables
({'params': ...}) that `SourceVAE` applies, and DIR/model_config.json, the SourceVAE config it
was made for. `load_sourcevae_params(DIR)` reads both back.

The key map is explicit and derived from the DAC module tree (`source_vae_key_map`); a key
the map does not know, a key it needs but the file lacks, and a shape that differs are all
errors naming the key. The same per-block maps serve the parity tests against the PyTorch
modules (tests/test_source_vae_parity.py), so what is tested is what imports.

Per-source mode: given one checkpoint, every stem's VAE starts from the released (shared)
weights; given one checkpoint per stem (in stems.STEM_NAMES order), each stem gets its own.
"""

import collections
import json
import os
import pickle
import zipfile
from typing import Any, Callable, Mapping, Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import ml_dtypes
import numpy as np

from msldm_jax.models import source_vae

Path = tuple[str, ...]
KeyMap = dict[Path, str]

# -- A torch-free reader for PyTorch's zip checkpoints ----------------------------------------
#
# torch.save writes a zip: `<name>/data.pkl` (a pickle whose tensors are persistent ids that
# point at raw storages), `<name>/data/<key>` (each storage's bytes) and `<name>/byteorder`.
# Unpickling arbitrary globals would run arbitrary code, so the unpickler below only admits
# the handful of names a state dict needs and rebuilds tensors as numpy arrays.

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_, "UntypedStorage": np.uint8,
}


class _StorageType:
  """Stands in for `torch.<X>Storage` inside the pickle: only its dtype matters."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata  # Only the values matter here.
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[storage_offset])
  needed = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if min(size) > 0 and needed > storage.size:
    raise pickle.UnpicklingError(
        f"tensor of size {size}, stride {stride} at offset {storage_offset} overruns its "
        f"storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(
      storage[storage_offset:], shape=size,
      strides=tuple(s * storage.itemsize for s in stride), writeable=False)
  return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride):
  return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}
_ALLOWED_GLOBALS.update({("torch", name): _StorageType(name) for name in _STORAGE_DTYPES})
_ALLOWED_GLOBALS[("torch.storage", "UntypedStorage")] = _StorageType("UntypedStorage")


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds only dicts, OrderedDicts, plain values and tensors (as numpy arrays)."""

  def __init__(self, file, load_storage: Callable[[str, np.dtype, int], np.ndarray], source):
    super().__init__(file)
    self._load_storage = load_storage
    self._source = source

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"{self._source}: refusing to load {module}.{name}: only state dicts of tensors "
          "can be read without torch") from None

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
      raise pickle.UnpicklingError(f"{self._source}: unsupported persistent id {pid!r}")
    _, storage_type, key, _, numel = pid  # The location (cpu, cuda:0) is irrelevant here.
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"{self._source}: unexpected storage type {storage_type!r}")
    return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_torch_checkpoint(path: str) -> Any:
  """Reads a `torch.save` zip checkpoint without torch; tensors come back as numpy arrays."""
  if not zipfile.is_zipfile(path):
    raise ValueError(f"{path}: not a zip-format PyTorch checkpoint (the legacy pre-1.6 "
                     "format is not supported; re-save it with a recent torch)")
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
      raise ValueError(f"{path}: expected one <name>/data.pkl in the archive, found {pickles}")
    prefix = pickles[0][:-len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = archive.read(prefix + "byteorder").decode().strip()
    cache = {}

    def load_storage(key, dtype, numel):
      if key not in cache:
        raw = archive.read(f"{prefix}data/{key}")
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<" if byteorder == "little"
                                                            else ">"))
        if array.size < numel:
          raise ValueError(f"{path}: storage {key} holds {array.size} elements, "
                           f"the pickle expects {numel}")
        cache[key] = array.astype(dtype, copy=False)
      return cache[key]

    with archive.open(pickles[0]) as f:
      return _RestrictedUnpickler(f, load_storage, path).load()


def read_generator_state_dict(path: str) -> dict[str, np.ndarray]:
  """The release's generator weights: `checkpoint['generator']` as {key: array}."""
  checkpoint = read_torch_checkpoint(path)
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


# -- The orbax side ------------------------------------------------------------------------


def _config_dict(model: source_vae.SourceVAE) -> dict:
  return dict(encoder_width=model.encoder_width, encoder_strides=list(model.encoder_strides),
              decoder_width=model.decoder_width, decoder_strides=list(model.decoder_strides),
              latent_dim=model.latent_dim, dilations=list(model.dilations), dtype=model.dtype,
              per_source=model.per_source, num_stems=model.num_stems)


def save_sourcevae_params(directory: str, variables: dict, model: source_vae.SourceVAE):
  """Writes DIR/params (orbax StandardCheckpointer) and DIR/model_config.json."""
  import orbax.checkpoint as ocp  # Imported here: heavy, and only the writer/reader need it.
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(directory, "params"), variables)
  with open(os.path.join(directory, "model_config.json"), "w") as f:
    json.dump(_config_dict(model), f, indent=2)


def load_model_config(directory: str):
  """The SourceVAE config (ml_collections.ConfigDict) an imported checkpoint was made for."""
  path = os.path.join(directory, "model_config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found; is {directory} an imported SourceVAE?")
  with open(path) as f:
    values = json.load(f)
  config = source_vae.model_config("paper")
  for key, value in values.items():
    if key not in config:
      raise KeyError(f"{path}: unknown SourceVAE config key {key!r}")
    config[key] = tuple(value) if isinstance(value, list) else value
  return config


def load_sourcevae_params(directory: str, model: source_vae.SourceVAE | None = None):
  """Reads an imported SourceVAE: returns (model, variables) ready for `model.apply`.

  `model` defaults to the one described by DIR/model_config.json; a given model must have
  the same parameter shapes.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if model is None:
    model = source_vae.SourceVAE.from_config(load_model_config(directory))
  abstract = source_vae.abstract_params(model)
  with ocp.StandardCheckpointer() as checkpointer:
    variables = checkpointer.restore(os.path.join(directory, "params"), abstract)
  return model, variables


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
  save_sourcevae_params(out, variables, model)
  logging.info("wrote %s", os.path.abspath(out))
  return variables


_TORCH_CHECKPOINT = flags.DEFINE_multi_string(
    "torch_checkpoint", None,
    "The release's generator file (torch.save({'generator': ...})). Repeat it once per stem "
    "(in bass, drums, guitar, piano order) to import separate per-source VAEs.")
_OUT = flags.DEFINE_string("out", None, "Output directory (orbax checkpoint + config).")
_VARIANT = flags.DEFINE_string("variant", "paper", "SourceVAE preset (model_config).")
_PER_SOURCE = flags.DEFINE_bool(
    "per_source", False, "Make a per-source model (every stem starts from the given "
    "checkpoint, or from its own if one is given per stem).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = source_vae.model_config(_VARIANT.value)
  config.per_source = _PER_SOURCE.value or len(_TORCH_CHECKPOINT.value) > 1
  import_checkpoints(_TORCH_CHECKPOINT.value, _OUT.value, config)


if __name__ == "__main__":
  flags.mark_flags_as_required(["torch_checkpoint", "out"])
  app.run(main)
