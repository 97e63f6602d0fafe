"""Content hashes of files, for records that say exactly which file a result came from."""

import hashlib


def sha256(path: str) -> str:
  """The SHA-256 of a file's bytes, read in 1 MiB blocks."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()
