r"""The `--mode=encode_latents` stage: the frozen SourceVAE's joint latents of every chunk.

  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=encode_latents

Every stem-aligned chunk (`data.chunks.samples` samples, non-overlapping from sample 0, a
track's final partial chunk dropped: the diffusion view of `data/pipeline.py`) of each split
the dataset has (train, validation, test) is encoded stem by stem with the posterior MEAN
(reference §4: no sampling, no normalisation) and stored stem-major [stems, latent_dim,
frames] in the latent store (`store.py`: .npy shards + manifest.json) in
`config.ldm.latents_dir` (empty: WORKDIR/latents).

The VAE: `models/loading.load_vae(config.ldm.vae_checkpoint or WORKDIR)`: an imported
SourceVAE, a VAE checkpoint folder, or (empty) the VAE stage's newest checkpoint in
WORKDIR/vae/checkpoints; the module is built from the checkpoint's own model config, so an
imported 61 M VAE encodes under any run config. Shared and per-source VAEs alike
(`SourceVAE.encode` takes all stems). Its identity (directory, step and a SHA-256 of the
parameters' bytes) goes into the manifest.

Parallelism: the encoder is jitted with the batch split over the mesh's data axis and the
parameters replicated; the batch (`config.ldm.encode_batch_size`) is rounded up to a multiple
of the device count and the split's final batch is padded with zeros, whose rows are dropped.
Every process reads the whole split and assembles the same global batch (the encoder, not the
reading, is the cost), so the stored order is the same for any number of processes; process 0
writes, into a directory all processes see.

Restarts: shards are written atomically in order, so a killed run leaves complete shards and
at most one temporary file. Running the stage again keeps the complete shards, skips their
chunks in the input (read, not encoded) and writes the rest: the result is the same files as
an uninterrupted run (the shard size is a multiple of the batch size, so every batch holds the
same chunks as before and the encoder sees the same inputs).

Re-running on a COMPLETE store made by the same VAE (the same parameter hash) with the same
settings is a no-op. A store made by another VAE, or with other settings (dataset, chunk
length, VAE architecture), is an ERROR naming both: latents of two VAEs must never mix, and
the diffusion stage reads one directory; set `config.ldm.latents_dir` to a new folder (or
delete the old one) to encode again. A fresh directory per VAE was the alternative, but it
would leave the diffusion stage to guess which directory is current.
"""

import functools
import glob
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
import tqdm

from msldm_jax import atomic_files
from msldm_jax import paper_config
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.data import pipeline
from msldm_jax.data import track_features
from msldm_jax.data import windows
from msldm_jax.latents import store
from msldm_jax.models import loading
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib

# Keys of the chunk stream.
_TRACK_ID = "track_id"
_CHUNK_INDEX = "chunk_index"

# Called after each shard is written, with (split, shard index): a hook for progress
# reporting and for tests that simulate a kill by raising from it.
ShardCallback = Callable[[str, int], None]


def _json_roundtrip(value):
  # Tuples become lists, as they will when read back from the manifest.
  return json.loads(json.dumps(value))


def encoding_settings(config: ml_collections.ConfigDict, workdir: str,
                      vae: source_vae.SourceVAE) -> dict:
  """What the latents depend on besides the VAE's parameters (compared on every re-run);
  "stems" names the latent's sources: the four stems, or the mixture alone (mixldm)."""
  chunk = int(config.data.chunks.samples)
  if chunk <= 0:
    raise ValueError(f"config key data.chunks.samples={chunk} must be positive")
  return _json_roundtrip({
      "dataset_dir": os.path.abspath(workdir_layout.dataset_dir(config, workdir)),
      "chunk_samples": chunk,
      "sample_rate": int(config.data.sample_rate),
      "stems": list(paper_config.latent_sources(config)),
      "latent_dim": vae.latent_dim,
      "frames": source_vae.encoded_length(chunk, vae.encoder_strides),
      "vae_model": loading.vae_config_dict(vae),
  })


def _chunk_stream(dataset_dir: str, split: str, chunk: int) -> tf.data.Dataset:
  """Every chunk of a split with its track id and index: the diffusion view's eval order.

  Built from the same public pieces as `pipeline.diffusion_chunks` (read_tracks in stored
  order, windows.chunk_track), with the ids carried along, so each latent's provenance comes
  from the example it was cut from rather than from a second pass that must agree in order.
  """
  # Process 0 of 1: every process reads the whole split (see module docstring).
  tracks = pipeline.read_tracks(dataset_dir, split, process_index=0, process_count=1)

  def track_chunks(track):
    audio = windows.chunk_track(track[track_features.AUDIO], chunk)
    count = tf.shape(audio)[0]
    return tf.data.Dataset.from_tensor_slices({
        pipeline.AUDIO: audio,
        _TRACK_ID: tf.fill([count], track[track_features.TRACK_ID]),
        _CHUNK_INDEX: tf.range(count, dtype=tf.int32),
    })

  return tracks.flat_map(track_chunks)


def _dataset_splits(dataset_dir: str) -> list[str]:
  try:
    builder = tfds.builder_from_directory(dataset_dir)
  except Exception as e:  # TFDS raises several types for a missing or malformed directory.
    raise FileNotFoundError(f"no built dataset at {dataset_dir}: run --mode=data first "
                            f"({e})") from e
  return [s for s in track_features.SPLITS if s in builder.info.splits]


def _check_same_store(directory: str, manifest: Mapping[str, Any], vae: loading.Loaded,
                      settings: Mapping[str, Any]):
  path = os.path.join(directory, store.MANIFEST)
  old = manifest["vae"]
  try:
    loading.check_same_vae(vae, old, what=f"the latent store at {directory}")
  except ValueError as error:
    raise ValueError(f"{error}; or, to encode with this VAE, set config.ldm.latents_dir to a "
                     "new folder (or delete this one)") from None
  for key in sorted(set(settings) | set(manifest["settings"])):
    if settings.get(key) != manifest["settings"].get(key):
      raise ValueError(
          f"the latent store at {directory} was encoded with {key}="
          f"{manifest['settings'].get(key)!r} ({path}), this run has {key}="
          f"{settings.get(key)!r}: set config.ldm.latents_dir to a new folder, or delete "
          "this one, to encode again")
  identity = vae.identity
  if (old.get("checkpoint_dir"), old.get("step")) != (identity["checkpoint_dir"],
                                                      identity["step"]):
    logging.info("VAE %s step %s has the same parameters as %s step %s, which encoded %s",
                 identity["checkpoint_dir"], identity["step"], old.get("checkpoint_dir"),
                 old.get("step"), directory)


def _global_batch(audio: np.ndarray, batch: int, mesh) -> jax.Array:
  """The padded global batch [batch, stems, samples], split over the mesh's data axis.

  Every process holds the whole batch, so each device's rows come from the local copy.
  """
  padded = np.zeros((batch,) + audio.shape[1:], np.float32)
  padded[:len(audio)] = audio
  return jax.make_array_from_callback(padded.shape, mesh_lib.batch_sharding(mesh),
                                      lambda index: padded[index])


class _ShardBuffer:
  """Collects encoded rows and writes them out as full shards (the last one possibly short)."""

  def __init__(self, directory, split, first_shard, chunks_per_shard, on_shard, write):
    self.directory, self.split = directory, split
    self.next_shard, self.chunks_per_shard = first_shard, chunks_per_shard
    self.on_shard, self.write = on_shard, write
    self.latents, self.ids = [], []
    self.buffered = 0

  def add(self, latents: np.ndarray, ids):
    self.latents.append(latents)
    self.ids.extend(ids)
    self.buffered += len(latents)
    while self.buffered >= self.chunks_per_shard:
      self._flush(self.chunks_per_shard)

  def close(self):
    if self.buffered:
      self._flush(self.buffered)

  def _flush(self, rows: int):
    latents = np.concatenate(self.latents)
    if self.write:
      store.write_shard(self.directory, self.split, self.next_shard, latents[:rows],
                        self.ids[:rows])
    self.latents, self.ids = [latents[rows:]], self.ids[rows:]
    self.buffered -= rows
    index, self.next_shard = self.next_shard, self.next_shard + 1
    if self.on_shard is not None:
      self.on_shard(self.split, index)


def _encode_split(directory: str, split: str, *, dataset_dir: str, chunk: int,
                  chunks_per_shard: int, shape, batch: int, encode, params, mesh,
                  on_shard: ShardCallback | None) -> dict:
  """Encodes the chunks of one split not yet in complete shards; returns its manifest entry."""
  done = store.completed_shards(directory, split, chunks_per_shard, shape)
  start = sum(done)
  if done:
    logging.info("encode_latents %s: %d complete shards (%d chunks) kept", split, len(done),
                 start)
  writer = jax.process_index() == 0
  if writer:
    # Temporary files of a killed run (their names carry that run's pid).
    for path in glob.glob(os.path.join(directory, split, "*.tmp-*")):
      os.remove(path)
  buffer = _ShardBuffer(directory, split, len(done), chunks_per_shard, on_shard, writer)
  stream = _chunk_stream(dataset_dir, split, chunk)
  # Skipped chunks are read and cut but not encoded; shards start at multiples of the batch
  # (chunks_per_shard is one), so the batches after the skip are those of a straight run.
  stream = stream.skip(start).batch(batch).prefetch(2)
  progress = tqdm.tqdm(desc=f"encode {split}", unit="chunk", initial=start,
                       disable=not writer)
  began, encoded = time.perf_counter(), 0

  def collect(pending):
    out, rows, ids = pending
    latents = np.asarray(jax.device_get(out))[:rows]
    if not np.isfinite(latents).all():
      bad = int(np.argwhere(~np.isfinite(latents).reshape(rows, -1).all(axis=1))[0, 0])
      raise FloatingPointError(
          f"non-finite latent for chunk {ids[bad][1]} of track {ids[bad][0]} (split {split!r}) "
          f"from the VAE: check the VAE checkpoint and that track's audio")
    buffer.add(latents, ids)
    progress.update(rows)

  pending = None
  for element in stream.as_numpy_iterator():
    rows = len(element[pipeline.AUDIO])
    ids = [(t.decode(), int(c)) for t, c in zip(element[_TRACK_ID], element[_CHUNK_INDEX])]
    # Dispatch this batch before fetching the previous one, so the device never waits on
    # the host's copy and write.
    out = encode(params, _global_batch(element[pipeline.AUDIO], batch, mesh))
    if pending is not None:
      collect(pending)
    pending = (out, rows, ids)
    encoded += rows
  if pending is not None:
    collect(pending)
  buffer.close()
  progress.close()
  elapsed = time.perf_counter() - began
  logging.info("encode_latents %s: encoded %d chunks in %.1f s (%.1f chunks/s)", split, encoded,
               elapsed, encoded / max(elapsed, 1e-9))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"encode_latents {split}")

  counts = store.completed_shards(directory, split, chunks_per_shard, shape)
  shards, chunk_ids = [], []
  for index, rows in enumerate(counts):
    shards.append({"file": store.shard_file(split, index), "num_chunks": rows})
    chunk_ids.extend(store.read_shard_ids(directory, split, index))
  if not chunk_ids:
    logging.warning("encode_latents %s: no chunk of %d samples in %s", split, chunk,
                    dataset_dir)
  return {"num_chunks": len(chunk_ids), "shards": shards, "chunks": chunk_ids}


@functools.lru_cache(maxsize=8)
def make_encode_fn(vae: source_vae.SourceVAE, mesh, mixture: bool = False):
  """jit(params, waveforms [batch, stems, samples]) -> posterior means [batch, stems, D, T];
  with `mixture`, of the stems' sum: [batch, 1, D, T] (MixLDM's latents, from its VAE).

  Batch split over the data axis, parameters replicated; the output is replicated, so every
  process can read all of it. Cached per (module, mesh), so that running the stage again in
  one process (a resumed encoding, tests) reuses the compiled encoder.
  """

  def encode(params, waveforms_bst):
    if mixture:
      mix_bt = waveforms_bst.sum(axis=1)
      mean, _ = vae.apply(params, mix_bt, jnp.zeros(mix_bt.shape[:1], jnp.int32),
                          method=vae.encode_stem)
      return mean[:, None]
    mean, _ = source_vae.encode_sources(vae, params, waveforms_bst)
    return mean

  return jax.jit(encode, in_shardings=(mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)),
                 out_shardings=mesh_lib.replicated(mesh))


def run(config: ml_collections.ConfigDict, workdir: str, *, mesh=None,
        on_shard: ShardCallback | None = None) -> str:
  """The `--mode=encode_latents` stage (see module docstring); returns the store's directory.

  Args:
    config: the full config (data, vae, ldm sections).
    workdir: the run's directory.
    mesh: defaults to all devices.
    on_shard: called after each shard is written, with (split, shard index).
  """
  directory = workdir_layout.latents_dir(config, workdir)
  dataset_dir = workdir_layout.dataset_dir(config, workdir)
  splits = _dataset_splits(dataset_dir)
  mesh = mesh or mesh_lib.make_mesh()
  loaded = loading.load_vae(config.ldm.vae_checkpoint or workdir, mesh=mesh)
  vae, params, identity = loaded.module, loaded.params, loaded.identity
  if vae.num_stems != stems_lib.NUM_STEMS:
    raise ValueError(f"the SourceVAE {identity['checkpoint_dir']} has num_stems="
                     f"{vae.num_stems}; the latent store needs the {stems_lib.NUM_STEMS} stems "
                     f"{stems_lib.STEM_NAMES}")
  settings = encoding_settings(config, workdir, vae)
  mixture = tuple(settings["stems"]) == (stems_lib.MIXTURE,)
  shape = [len(settings["stems"]), settings["latent_dim"], settings["frames"]]
  if source_vae.decoded_length(settings["frames"], vae.decoder_strides) != settings[
      "chunk_samples"]:
    logging.warning("config key data.chunks.samples=%d: the VAE decodes its %d frames to %d "
                    "samples", settings["chunk_samples"], settings["frames"],
                    source_vae.decoded_length(settings["frames"], vae.decoder_strides))

  manifest = store.read_manifest(directory)
  if manifest is None and glob.glob(os.path.join(directory, "*", "shard-*.npy")):
    raise ValueError(f"{directory} holds latent shards but no {store.MANIFEST}, so nothing "
                     "says which VAE made them: delete them, or set config.ldm.latents_dir "
                     "to a new folder")
  if manifest is not None:
    _check_same_store(directory, manifest, loaded, settings)
    if manifest["status"] == store.STATUS_COMPLETE:
      logging.info("encode_latents: %s is complete for this VAE and settings; nothing to do",
                   directory)
      return directory

  devices = mesh.shape[mesh_lib.DATA_AXIS]
  batch = -(-int(config.ldm.encode_batch_size) // devices) * devices
  if manifest is None:
    # A multiple of the batch, so that a resumed run's batches are a straight run's.
    chunks_per_shard = -(-int(config.ldm.latents_per_shard) // batch) * batch
    manifest = {"format": store.FORMAT, "status": store.STATUS_ENCODING, "vae": identity,
                "settings": settings, "shape": shape, "chunks_per_shard": chunks_per_shard,
                "splits": {}}
    if jax.process_index() == 0:
      os.makedirs(directory, exist_ok=True)
      atomic_files.write_json_atomic(os.path.join(directory, store.MANIFEST), manifest)
  else:
    chunks_per_shard = int(manifest["chunks_per_shard"])
    if chunks_per_shard % batch:
      logging.warning("encode_latents: resuming with batch %d, which does not divide the "
                      "store's %d chunks per shard: the batches differ from a straight run's",
                      batch, chunks_per_shard)
  logging.info("encode_latents: %s -> %s, splits %s, %d-sample chunks -> %s latents, batch %d "
               "over %d devices, %d chunks per shard, VAE %s step %s", dataset_dir, directory,
               ",".join(splits), settings["chunk_samples"], shape, batch, devices,
               chunks_per_shard, identity["checkpoint_dir"], identity["step"])

  encode = make_encode_fn(vae, mesh, mixture)
  for split in splits:
    if split in manifest["splits"]:
      continue
    entry = _encode_split(directory, split, dataset_dir=dataset_dir,
                          chunk=settings["chunk_samples"], chunks_per_shard=chunks_per_shard,
                          shape=shape, batch=batch, encode=encode, params=params, mesh=mesh,
                          on_shard=on_shard)
    manifest = {**manifest, "splits": {**manifest["splits"], split: entry}}
    if jax.process_index() == 0:
      atomic_files.write_json_atomic(os.path.join(directory, store.MANIFEST), manifest)
  manifest = store.finalize(directory, manifest)
  if jax.process_count() > 1:
    # Process 0 wrote the complete manifest: no process goes on (--mode=all: to train_ldm,
    # which reads it) before that.
    multihost_utils.sync_global_devices("encode_latents complete")
  counts = {s: e["num_chunks"] for s, e in manifest["splits"].items()}
  logging.info("encode_latents: complete: %s chunks in %s", counts, directory)
  return directory
