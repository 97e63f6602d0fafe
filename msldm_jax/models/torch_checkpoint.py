"""A torch-free reader for PyTorch's zip checkpoints (`torch.save`): tensors as numpy arrays.

Used by every importer of published weights (the SourceVAE, VGGish), so the main environment
needs no PyTorch.
"""

import collections
import pickle
import zipfile
from typing import Any, Callable

import ml_dtypes
import numpy as np

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


class Opaque:
  """Stands in for an object of a class that is not admitted (e.g. the σ distribution a
  Lightning checkpoint's hyper_parameters hold): it keeps the class's name, the arguments
  and the state the pickle gives it, and runs none of that class's code."""
  qualified_name = "?"

  # __new__, not __init__: pickle makes most objects with cls.__new__(cls, *args) alone.
  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    self.args, self.kwargs, self.state = args, kwargs, None
    self.items, self.elements = {}, []
    return self

  def __init__(self, *args, **kwargs):
    del args, kwargs  # Kept by __new__.

  def __setstate__(self, state):
    self.state = state

  # A subclass of dict or list (e.g. Lightning's AttributeDict) is pickled as the class plus
  # its items or elements.
  def __setitem__(self, key, value):
    self.items[key] = value

  def append(self, value):
    self.elements.append(value)

  def extend(self, values):
    self.elements.extend(values)

  def __repr__(self):
    return f"<opaque {self.qualified_name}>"


def _opaque_class(module, name):
  return type(name, (Opaque,), {"qualified_name": f"{module}.{name}"})


class _RestrictedUnpickler(pickle.Unpickler):
  """Rebuilds only dicts, OrderedDicts, plain values and tensors (as numpy arrays); with
  `opaque`, objects of any other class become inert `Opaque` placeholders."""

  def __init__(self, file, load_storage: Callable[[str, np.dtype, int], np.ndarray], source,
               opaque: bool = False):
    super().__init__(file)
    self._load_storage = load_storage
    self._source = source
    self._opaque = opaque

  def find_class(self, module, name):
    try:
      return _ALLOWED_GLOBALS[(module, name)]
    except KeyError:
      if self._opaque:
        return _opaque_class(module, name)
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


def read_torch_checkpoint(path: str, opaque: bool = False) -> Any:
  """Reads a `torch.save` zip checkpoint without torch; tensors come back as numpy arrays.

  `opaque`: objects of classes other than the containers and tensors (a PyTorch Lightning
  checkpoint's hyper-parameters and callback states, for two) become `Opaque` placeholders
  instead of an error. Tensors are read as always.
  """
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
      return _RestrictedUnpickler(f, load_storage, path, opaque).load()


