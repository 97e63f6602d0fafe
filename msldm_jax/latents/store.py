"""The latent store: joint latents as numbered .npy shards plus a JSON manifest, and its reader.

Layout of a store directory (`workdir_layout.latents_dir`, WORKDIR/latents by default):

  manifest.json                   what is here and who made it (below)
  {split}/shard-00000.npy         float32 [n, sources, latent_dim, frames], n <= per shard
                                  (sources: the four stems, or the mixture alone for MixLDM)
  {split}/shard-00000.json        {"chunks": [[track_id, chunk_index], ...]}, one per row
  ...

Each chunk is stored stem-major, [stems, latent_dim, frames], the layout `SourceVAE.encode`
returns per example; `joint_latent.stack_sources` turns a batch of them into the joint latent
[batch, stems·latent_dim, frames] that the diffusion model sees (the reader leaves them
unstacked, so the layout stays in that one function). Shards hold `chunks_per_shard` chunks
each (the last one fewer), in the dataset's track order, each track's chunks in time order.
Plain .npy, so the reader memory-maps them: a training step copies its batch's rows from the
page cache, and no shard is ever loaded whole.

Every file is written to a temporary name and renamed into place (atomic on POSIX), the .json
before the .npy: a shard's .npy exists only when the shard and its index are complete, which
is what makes a killed encoding resumable (see `encode.py`).

manifest.json:
  format             FORMAT
  status             "encoding" while shards are being written, "complete" when done
  vae                the frozen VAE's identity: checkpoint_dir, step, params_sha256
  settings           what the latents depend on besides the VAE's parameters (dataset dir,
                     chunk samples, sample rate, stems, latent_dim, frames, VAE model config)
  shape              [NUM_STEMS, latent_dim, frames] of one chunk
  chunks_per_shard   rows per shard file
  splits             per split: num_chunks, shards [{file, num_chunks}], chunks [[track_id,
                     chunk_index], ...] (row order across the shards)
  statistics         over the train split, per JOINT channel (stack_sources order, stem s's
                     channel c at s·latent_dim + c): mean and population std, accumulated in
                     float64 shard by shard (Chan et al.'s pairwise update), and the number of
                     values per channel; null without a train split.
"""

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from msldm_jax import atomic_files
from msldm_jax import joint_latent
from msldm_jax import stems as stems_lib
from msldm_jax.data import input_iterator

FORMAT = "msldm_jax.latents/1"
MANIFEST = "manifest.json"
STATUS_ENCODING = "encoding"
STATUS_COMPLETE = "complete"

# Keys of a batch from `latent_batches`.
LATENTS = "latents"  # float32 [batch, NUM_STEMS, latent_dim, frames]
VALID = input_iterator.VALID  # evaluation only: bool [batch], False on padding rows


def shard_file(split: str, index: int) -> str:
  """A shard's .npy path relative to the store directory."""
  return os.path.join(split, f"shard-{index:05d}.npy")


def _ids_path(npy_path: str) -> str:
  return npy_path[:-len(".npy")] + ".json"


def read_manifest(directory: str) -> dict | None:
  """The manifest of a store, or None when the directory has none."""
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"latent manifest {path} is not valid JSON: {e}") from e
  if manifest.get("format") != FORMAT:
    raise ValueError(f"latent manifest {path} has format {manifest.get('format')!r}, "
                     f"expected {FORMAT!r}")
  return manifest


def load_manifest(directory: str) -> dict:
  """The manifest of a COMPLETE store; an error saying what to run otherwise."""
  manifest = read_manifest(directory)
  if manifest is None:
    raise FileNotFoundError(f"no latent store at {directory} ({MANIFEST} missing): run "
                            "--mode=encode_latents first")
  if manifest.get("status") != STATUS_COMPLETE:
    raise ValueError(f"the latent store at {directory} is incomplete (status "
                     f"{manifest.get('status')!r}): run --mode=encode_latents again to finish it")
  return manifest


def write_shard(directory: str, split: str, index: int, latents: np.ndarray,
                chunk_ids: Sequence[tuple[str, int]]):
  """Writes one shard: its index first, then its latents (whose presence marks it complete)."""
  if len(chunk_ids) != len(latents):
    raise ValueError(f"shard {split}/{index}: {len(latents)} latents but {len(chunk_ids)} "
                     "chunk ids")
  path = os.path.join(directory, shard_file(split, index))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  atomic_files.write_json_atomic(_ids_path(path),
                    {"chunks": [[str(t), int(c)] for t, c in chunk_ids]})
  atomic_files.write_npy_atomic(path, np.ascontiguousarray(latents, np.float32))


def read_shard_ids(directory: str, split: str, index: int) -> list[list]:
  with open(_ids_path(os.path.join(directory, shard_file(split, index)))) as f:
    return json.load(f)["chunks"]


def completed_shards(directory: str, split: str, chunks_per_shard: int,
                     shape: Sequence[int]) -> list[int]:
  """Row counts of the complete shards 0, 1, ... of a split, up to the first missing one.

  A shard counts when its .npy (renamed into place last) exists with the expected shape and
  its index has as many rows; a short shard may only be the split's last. Anything after the
  first gap or bad shard is left to be rewritten.
  """
  counts = []
  while True:
    path = os.path.join(directory, shard_file(split, len(counts)))
    if not os.path.exists(path):
      return counts
    try:
      array = np.load(path, mmap_mode="r")
      with open(_ids_path(path)) as f:
        num_ids = len(json.load(f)["chunks"])
    except (OSError, ValueError, KeyError) as e:
      logging.warning("latent shard %s is unreadable (%s); it will be rewritten", path, e)
      return counts
    rows = array.shape[0]
    if (array.dtype != np.float32 or tuple(array.shape[1:]) != tuple(shape) or
        num_ids != rows or not 0 < rows <= chunks_per_shard):
      logging.warning("latent shard %s has shape %s (%s), %d ids; expected [<=%d, %s] float32: "
                      "it will be rewritten", path, array.shape, array.dtype, num_ids,
                      chunks_per_shard, list(shape))
      return counts
    if counts and counts[-1] < chunks_per_shard:
      raise ValueError(f"latent shard {path} follows a short shard: the store at {directory} "
                       "is inconsistent; delete it and encode again")
    counts.append(rows)


_STATISTICS_BLOCK = 32  # chunks per float64 block: 84 MB at the paper's 320 x 1024


class _ChannelMoments:
  """Per-channel count, mean and M2 (sum of squared deviations) in float64, mergeable."""

  def __init__(self, channels: int):
    self.count = 0
    self.mean = np.zeros(channels, np.float64)
    self.m2 = np.zeros(channels, np.float64)

  def add(self, values_bct: np.ndarray):
    """Adds [batch, channels, frames] values (Chan et al. 1979's pairwise combination)."""
    x = np.asarray(values_bct, np.float64)
    n = x.shape[0] * x.shape[2]
    if n == 0:
      return
    mean = x.mean(axis=(0, 2))
    m2 = np.square(x - mean[None, :, None]).sum(axis=(0, 2))
    total = self.count + n
    delta = mean - self.mean
    self.mean = self.mean + delta * (n / total)
    self.m2 = self.m2 + m2 + np.square(delta) * (self.count * n / total)
    self.count = total

  def result(self) -> dict:
    return {"values_per_channel": int(self.count), "mean": self.mean.tolist(),
            "std": np.sqrt(self.m2 / max(self.count, 1)).tolist()}


def channel_statistics(directory: str, split_entry: Mapping[str, Any]) -> dict:
  """Mean and population std per joint channel over a split's shards (see module docstring)."""
  moments = None
  for shard in split_entry["shards"]:
    latents = np.load(os.path.join(directory, shard["file"]), mmap_mode="r")
    # Block by block, so memory stays at a few float64 blocks whatever the split's size.
    for start in range(0, len(latents), _STATISTICS_BLOCK):
      joint = joint_latent.stack_sources(latents[start:start + _STATISTICS_BLOCK])
      if moments is None:
        moments = _ChannelMoments(joint.shape[1])
      moments.add(joint)
  return None if moments is None else moments.result()


def finalize(directory: str, manifest: dict) -> dict:
  """Adds the train split's statistics, marks the manifest complete and writes it."""
  manifest = dict(manifest)
  train = manifest["splits"].get("train")
  manifest["statistics"] = None
  if train is not None and train["num_chunks"]:
    manifest["statistics"] = {"split": "train", **channel_statistics(directory, train)}
  manifest["status"] = STATUS_COMPLETE
  if jax.process_index() == 0:
    atomic_files.write_json_atomic(os.path.join(directory, MANIFEST), manifest)
  return manifest


def write_latents(directory: str, latents_by_split: Mapping[str, np.ndarray], *,
                  vae_identity: Mapping[str, Any], settings: Mapping[str, Any],
                  chunk_ids_by_split: Mapping[str, Sequence[tuple[str, int]]] | None = None,
                  chunks_per_shard: int = 256) -> dict:
  """Writes a complete store from in-memory latents [n, stems, latent_dim, frames] per split.

  For latents made elsewhere (imports, tests). Chunk ids default to ('chunk', row). Refuses a
  directory that already holds a store. Returns the manifest.
  """
  if read_manifest(directory) is not None:
    raise FileExistsError(f"a latent store already exists at {directory}")
  shape = None
  splits = {}
  for split, latents in latents_by_split.items():
    latents = np.asarray(latents, np.float32)
    sources = len(settings.get("stems", stems_lib.STEM_NAMES))
    if latents.ndim != 4 or latents.shape[1] != sources:
      raise ValueError(f"latents of split {split!r} have shape {latents.shape}, expected "
                       f"[n, {sources} sources, latent_dim, frames]")
    if shape is None:
      shape = list(latents.shape[1:])
    elif shape != list(latents.shape[1:]):
      raise ValueError(f"latents of split {split!r} have chunk shape {latents.shape[1:]}, "
                       f"other splits {shape}")
    ids = (list(chunk_ids_by_split[split]) if chunk_ids_by_split else
           [("chunk", i) for i in range(len(latents))])
    shards = []
    for index, start in enumerate(range(0, len(latents), chunks_per_shard)):
      rows = latents[start:start + chunks_per_shard]
      write_shard(directory, split, index, rows, ids[start:start + chunks_per_shard])
      shards.append({"file": shard_file(split, index), "num_chunks": len(rows)})
    splits[split] = {"num_chunks": len(latents), "shards": shards,
                     "chunks": [[str(t), int(c)] for t, c in ids]}
  manifest = {"format": FORMAT, "status": STATUS_ENCODING, "vae": dict(vae_identity),
              "settings": dict(settings), "shape": shape, "chunks_per_shard": chunks_per_shard,
              "splits": splits}
  return finalize(directory, manifest)


class LatentStore:
  """Random access to one split of a complete store, through memory-mapped shards."""

  def __init__(self, directory: str, split: str, manifest: Mapping[str, Any] | None = None):
    self.directory, self.split = directory, split
    self.manifest = load_manifest(directory) if manifest is None else manifest
    if split not in self.manifest["splits"]:
      raise ValueError(f"split {split!r} is not in the latent store at {directory}; it has: "
                       + ", ".join(sorted(self.manifest["splits"])))
    entry = self.manifest["splits"][split]
    self.shape = tuple(self.manifest["shape"])
    self.num_chunks = int(entry["num_chunks"])
    self.chunk_ids = [tuple(c) for c in entry["chunks"]]
    self._shards = []
    for shard in entry["shards"]:
      path = os.path.join(directory, shard["file"])
      array = np.load(path, mmap_mode="r")
      if array.shape != (shard["num_chunks"],) + self.shape:
        raise ValueError(f"latent shard {path} has shape {array.shape}, the manifest says "
                         f"{[shard['num_chunks'], *self.shape]}")
      self._shards.append(array)
    self._starts = np.cumsum([0] + [len(s) for s in self._shards])
    if self._starts[-1] != self.num_chunks:
      raise ValueError(f"split {split!r} of {directory}: shards hold {self._starts[-1]} "
                       f"chunks, the manifest says {self.num_chunks}")

  def gather(self, indices) -> np.ndarray:
    """float32 [len(indices), *shape]; index -1 gives a row of zeros (padding)."""
    indices = np.asarray(indices, np.int64).reshape(-1)
    out = np.zeros((len(indices),) + self.shape, np.float32)
    shard_of = np.searchsorted(self._starts, indices, side="right") - 1
    for row, (index, shard) in enumerate(zip(indices, shard_of)):
      if index >= 0:
        out[row] = self._shards[shard][index - self._starts[shard]]
    return out

  def read_all(self) -> np.ndarray:
    return self.gather(np.arange(self.num_chunks))


def epoch_order(num_chunks: int, seed: int, epoch: int) -> np.ndarray:
  """The chunk order of a training epoch: a permutation, a pure function of (seed, epoch)."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
  return rng.permutation(num_chunks)


def latent_batches(directory: str, split: str, *, batch_size: int, train: bool, seed: int = 0,
                   epoch: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> tf.data.Dataset:
  """One epoch of latent batches for this process; a `dataset_fn` for `InputIterator`.

  Training: the chunks in `epoch_order(seed, epoch)`, cut into GLOBAL batches of
  `batch_size` (the final partial batch dropped); each process takes its contiguous
  batch_size / process_count rows of every global batch, so the global batches do not depend
  on the number of processes. Evaluation: chunks in stored order, the final batch padded with
  zeros, and a "valid" mask.

  Returns:
    A finite dataset of {"latents": float32 [b, stems, latent_dim, frames]} (+ "valid": bool
    [b] when not training), b = batch_size / process_count.
  """
  index, count = input_iterator.process_slot(process_index, process_count)
  if batch_size <= 0 or batch_size % count:
    raise ValueError(f"batch_size={batch_size} (global) must be positive and divisible by "
                     f"process_count={count}")
  local = batch_size // count
  store = LatentStore(directory, split)
  if train:
    num_batches = store.num_chunks // batch_size
    if num_batches == 0:
      raise ValueError(f"split {split!r} of the latent store at {directory} has "
                       f"{store.num_chunks} chunks, fewer than one batch of {batch_size}")
    order = epoch_order(store.num_chunks, seed, epoch)[:num_batches * batch_size]
  else:
    num_batches = -(-store.num_chunks // batch_size)
    order = np.full(num_batches * batch_size, -1, np.int64)
    order[:store.num_chunks] = np.arange(store.num_chunks)
  rows = order.reshape(num_batches, batch_size)[:, index * local:(index + 1) * local]
  shape = (local,) + store.shape

  def read(indices):
    latents = tf.numpy_function(store.gather, [indices], tf.float32, stateful=False)
    batch = {LATENTS: tf.ensure_shape(latents, shape)}
    if not train:
      batch[VALID] = indices >= 0
    return batch

  options = tf.data.Options()
  options.deterministic = True  # Parallel reads must keep the batches' order.
  ds = tf.data.Dataset.from_tensor_slices(rows)
  ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)
