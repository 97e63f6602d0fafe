"""Files written whole or not at all: write to a temporary name, then rename into place.

A rename within one folder is atomic on POSIX, so a run killed mid-write leaves the old file
(or none) and at most a temporary one, never a half-written manifest, shard or record.
"""

import json
import os
from typing import Any

import numpy as np


def _tmp_name(path: str) -> str:
  # The pid keeps concurrent writers (which should not exist, but may after a crash) apart.
  return f"{path}.tmp-{os.getpid()}"


def write_json_atomic(path: str, value: Any, *, sort_keys: bool = False):
  tmp = _tmp_name(path)
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1, sort_keys=sort_keys)
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
