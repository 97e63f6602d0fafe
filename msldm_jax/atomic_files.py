"""Files written whole or not at all: write to a temporary name, then rename into place.

A rename within one folder is atomic on POSIX, so a run killed mid-write leaves the old file
(or none) and at most a temporary one, never a half-written manifest, shard or record.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np


def _tmp_name(path: str) -> str:
  # The pid keeps concurrent writers (which should not exist, but may after a crash) apart.
  return f"{path}.tmp-{os.getpid()}"


def strict_json(value):
  """Non-finite floats (a sampler's s_tmax = inf, a NaN score) as strings: strict JSON has
  none, and other readers than Python's reject `NaN`/`Infinity`."""
  if isinstance(value, (float, np.floating)) and not np.isfinite(value):
    return str(float(value))
  if isinstance(value, Mapping):
    return {k: strict_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json(v) for v in value]
  return value


def json_default(value):
  """numpy scalars and arrays as their Python values."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def write_json_atomic(path: str, value: Any, *, sort_keys: bool = False):
  """Strict JSON (`strict_json`), replaced whole."""
  tmp = _tmp_name(path)
  with open(tmp, "w") as f:
    json.dump(strict_json(value), f, indent=1, sort_keys=sort_keys, default=json_default,
              allow_nan=False)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_npy_atomic(path: str, array: np.ndarray):
  tmp = _tmp_name(path)
  with open(tmp, "wb") as f:
    np.save(f, array, allow_pickle=False)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def write_lines_atomic(path: str, lines):
  """A text file of `lines` (each ending in a newline), replaced whole."""
  tmp = _tmp_name(path)
  with open(tmp, "w") as f:
    f.writelines(lines)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
