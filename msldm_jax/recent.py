"""The last few results of a computation in this process, under a key that names everything
they depend on: a trainer's compiled programs, a reference set's VAE reconstructions, the
tagger's verdicts. The oldest go first once more than `kept` are held."""

import collections
import hashlib
from typing import Any, Callable, Hashable

import numpy as np


class Recent:
  """`get(key, compute)`: `compute()` the first time a key is asked for, then its result."""

  def __init__(self, kept: int):
    self.kept = kept
    self._results: collections.OrderedDict = collections.OrderedDict()

  def get(self, key: Hashable, compute: Callable[[], Any]) -> Any:
    if key in self._results:
      self._results.move_to_end(key)
      return self._results[key]
    result = compute()
    self._results[key] = result
    while len(self._results) > self.kept:
      self._results.popitem(last=False)
    return result

  def __contains__(self, key: Hashable) -> bool:
    return key in self._results

  def __len__(self) -> int:
    return len(self._results)

  def clear(self):
    self._results.clear()


def array_digest(array) -> str:
  """A content key of an array: its shape, dtype and bytes (BLAKE2b, 128 bits)."""
  array = np.ascontiguousarray(array)
  digest = hashlib.blake2b(digest_size=16)
  digest.update(repr((array.shape, array.dtype.str)).encode())
  digest.update(array.data)
  return digest.hexdigest()
