"""tf.data input pipelines: two views over a built stem dataset, and a resumable iterator.

A built dataset (`data/track_features.py`) holds one whole track per example. Two views cut it:

- `vae_windows`: single-stem windows for the SourceVAE (reference §2); with `mixture=True`,
  windows of the track's mixture (the sum of its stems, "stem" 0) for MixLDM's VAE, cut and
  filtered by the same rules. Training: 1 s windows
  at 0.5 s hop, each start jittered by a uniform shift in ±0.25 s and clamped to the track;
  evaluation: 5 s windows at 1 s hop, no jitter, no shuffle. Only the stems named in
  `data_config.vae_windows.stems` and present in the track (`stem_present`) are cut, and a
  window x of N samples is dropped as silent when ||x||_2 / N < `silence_threshold`.
  Batches: {"audio": float32 [batch, window], "stem": int32 [batch] (index in STEM_NAMES)}.
- `diffusion_chunks`: stem-aligned chunks of `data_config.chunks.samples` samples for the
  latent diffusion model: non-overlapping from sample 0, all four stems of a chunk from the
  same place of the same track; no silence filtering; a track's final partial chunk is
  dropped. Batches: {"audio": float32 [batch, NUM_STEMS, samples]}.

Both build ONE EPOCH as a finite `tf.data.Dataset` of this process's batches;
`input_iterator.InputIterator` chains epochs (training) and keeps a position to resume from.

Per-process splits: each process reads a contiguous, disjoint slice of the split's tracks
(`tfds.split_for_jax_process`, i.e. `tfds.even_splits` by example: with 11 tracks and 3
processes the slices hold 4, 4 and 3 tracks), so sharding is by track. `batch_size` is the
GLOBAL batch size; each process emits batch_size / process_count rows. Processes read
different tracks, whose window counts differ, so their epochs end at different batches: each
process keeps its own position (see `InputIterator.state`).

Determinism: for a (seed, epoch) the batches are a pure function of the dataset. Seeds of the
epoch come from numpy's SeedSequence([seed, epoch]): the TFDS file-order shuffle, the
window/chunk shuffle buffer, and the jitter key, from which each (track, stem) derives its
shifts statelessly (fold in a hash of `track_id`, then the stem index), so jitter does not
depend on read order or process split. tf.data runs with `deterministic=True`, so parallel
interleave/map keep their order. Each epoch reshuffles with its own seeds.

Evaluation batches (`train=False`) keep every example: the final partial batch is padded with
zeros to the full batch size and all evaluation batches carry "valid": bool [batch], False on
padding rows. Training drops the final partial batch of each epoch. Evaluation chunks come in
the dataset's track order, each track's in time order. In a multi-process evaluation the
slices hold different numbers of batches; `InputIterator` (with a mesh and num_epochs set)
feeds all-padding batches on processes that have finished until every process has, so that
all take part in every step.

Throughput: all windowing is vectorised per track and stem (see `data/windows.py`); tracks
are read with TFDS's parallel interleave over files, windows are cut in a parallel,
deterministic interleave over (track, stem) pairs, and batches are prefetched.
`benchmarks/input_pipeline.py` measures stem-audio seconds delivered per second per core.
"""

import dataclasses
import functools
from typing import Mapping

from absl import logging
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from msldm_jax import stems as stems_lib
from msldm_jax.data import input_iterator
from msldm_jax.data import track_features
from msldm_jax.data import windows as windows_lib

# Keys of a batch.
AUDIO = "audio"    # VAE: float32 [batch, window]; chunks: float32 [batch, NUM_STEMS, samples]
STEM = "stem"      # VAE only: int32 [batch], index into stems.STEM_NAMES
VALID = input_iterator.VALID  # evaluation only: bool [batch], False on padding rows

# How many (track, stem) streams the VAE view interleaves window by window: windows of ~16
# stems from ~4+ tracks are mixed before the shuffle buffer, which alone would hold only a
# couple of tracks' windows. Each stream holds one stem (plus its windows, ~2x for 1 s / 0.5 s)
# in memory: ~16 x 3 x 21 MB for 4-minute tracks. One-stem batches share them among the
# stems' pipelines.
_STEM_STREAMS = 16
# Whole tracks held to shuffle the track order of an ordered (track-id sorted) dataset.
_ORDERED_TRACK_SHUFFLE = 4
# Tracks interleaved chunk by chunk in the diffusion view; each holds a whole track (x2 while
# it is transposed into chunks), hence fewer than for stems.
_TRACK_STREAMS = 8
# track_id hashes seed the jitter; any large range works, this one fits an int64 key.
_HASH_BUCKETS = 2**62


@dataclasses.dataclass(frozen=True)
class WindowSpec:
  """One view's windowing in samples."""
  window: int
  hop: int
  jitter: int
  silence_threshold: float
  stems: tuple[str, ...]


def vae_window_spec(data_config: ml_collections.ConfigDict, train: bool) -> WindowSpec:
  """Training or evaluation windowing of `data_config.vae_windows`, in samples."""
  cfg = data_config.vae_windows
  rate = data_config.sample_rate
  prefix = "data.vae_windows."
  if train:
    window = windows_lib.seconds_to_samples(cfg.train_seconds, rate, name=prefix + "train_seconds")
    hop = windows_lib.seconds_to_samples(
        cfg.train_hop_seconds, rate, name=prefix + "train_hop_seconds")
    jitter = windows_lib.seconds_to_samples(
        cfg.jitter_seconds, rate, name=prefix + "jitter_seconds")
  else:
    window = windows_lib.seconds_to_samples(cfg.eval_seconds, rate, name=prefix + "eval_seconds")
    hop = windows_lib.seconds_to_samples(
        cfg.eval_hop_seconds, rate, name=prefix + "eval_hop_seconds")
    jitter = 0
  for key, value in (("window", window), ("hop", hop)):
    if value <= 0:
      raise ValueError(f"{prefix}{'train' if train else 'eval'} {key} is {value} samples at "
                       f"sample_rate={rate}: it must be positive")
  return WindowSpec(window=window, hop=hop, jitter=jitter,
                    silence_threshold=float(cfg.silence_threshold),
                    stems=stems_lib.parse_stem_list(cfg.stems))


@dataclasses.dataclass(frozen=True)
class _EpochSeeds:
  shuffle_files: int
  shuffle_buffer: int
  jitter_key: tuple[int, int]


def _epoch_seeds(seed: int, epoch: int) -> _EpochSeeds:
  """Independent, well-mixed seeds for one epoch, a pure function of (seed, epoch)."""
  for key, value in (("seed", seed), ("epoch", epoch)):
    if not isinstance(value, (int, np.integer)) or value < 0:
      raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
  words = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(4, dtype=np.uint32)
  return _EpochSeeds(shuffle_files=int(words[0]), shuffle_buffer=int(words[1]),
                     jitter_key=(int(words[2]), int(words[3])))


def _local_batch_size(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} (global) must be positive and divisible by "
                     f"process_count={process_count}")
  return batch_size // process_count


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Parallel map/interleave must keep their input order, or batches would depend on thread
  # timing; this is the default, set explicitly because reproducibility depends on it.
  options.deterministic = True
  return options


def read_tracks(dataset_dir: str, split: str, *, shuffle_seed: int | None = None,
                process_index: int | None = None,
                process_count: int | None = None) -> tf.data.Dataset:
  """This process's slice of a split's tracks, as decoded examples (`data/track_features.py`).

  Args:
    dataset_dir: a directory `tfds.builder_from_directory` loads (`data.build.build_dataset`).
    split: 'train', 'validation', 'test', or a TFDS sub-split such as 'train[:10]'.
    shuffle_seed: None reads files in order; an int shuffles the order of the TFDS files
      (shards) deterministically and interleaves them one track at a time.
    process_index, process_count: default to JAX's; pass them to simulate other processes.
  """
  index, count = input_iterator.process_slot(process_index, process_count)
  try:
    builder = tfds.builder_from_directory(dataset_dir)
  except Exception as e:  # TFDS raises several types for a missing or malformed directory.
    raise ValueError(f"cannot load a TFDS dataset from dataset_dir={dataset_dir!r}: {e}") from e
  base_split = split.split("[", 1)[0]
  if base_split not in builder.info.splits:
    raise ValueError(f"split {split!r} is not in the dataset at {dataset_dir!r}; it has: "
                     + ", ".join(sorted(builder.info.splits)))
  total = builder.info.splits[split].num_examples
  if total < count:
    raise ValueError(f"split {split!r} of {dataset_dir!r} has {total} tracks, fewer than the "
                     f"{count} processes that must each read at least one")
  process_split = tfds.split_for_jax_process(split, process_index=index, process_count=count)
  read_config = tfds.ReadConfig(
      shuffle_seed=shuffle_seed,
      shuffle_reshuffle_each_iteration=False,
      # One track per file before switching files: tracks are large, and mixing files mixes
      # the music more than reading runs of neighbouring tracks.
      interleave_block_length=1,
      # Caching whole tracks in memory is never what we want for Slakh-sized splits, and it
      # would make small datasets measure differently from large ones.
      try_autocache=False,
      options=_options(),
  )
  logging.info("Reading %s of %s (process %d of %d)%s.", process_split, dataset_dir, index,
               count, f", file-order seed {shuffle_seed}" if shuffle_seed is not None else "")
  # Built datasets keep track-id order (disable_shuffling), for which TFDS refuses file
  # shuffling; their track order is mixed by a small seeded buffer of whole tracks instead.
  ordered = bool(builder.info.disable_shuffling)
  ds = builder.as_dataset(split=process_split,
                          shuffle_files=shuffle_seed is not None and not ordered,
                          read_config=read_config)
  if shuffle_seed is not None and ordered:
    ds = ds.shuffle(_ORDERED_TRACK_SHUFFLE, seed=shuffle_seed, reshuffle_each_iteration=False)
  return ds


def _stem_streams(track: Mapping[str, tf.Tensor], selected: tf.Tensor) -> tf.data.Dataset:
  """One element per selected stem that the track has: its audio, index and a track hash."""
  keep = tf.logical_and(track[track_features.STEM_PRESENT], selected)
  stem_ids = tf.cast(tf.where(keep)[:, 0], tf.int32)
  track_hash = tf.strings.to_hash_bucket_fast(track[track_features.TRACK_ID], _HASH_BUCKETS)
  return tf.data.Dataset.from_tensor_slices({
      AUDIO: tf.gather(track[track_features.AUDIO], stem_ids),
      STEM: stem_ids,
      "track_hash": tf.fill(tf.shape(stem_ids), track_hash),
  })


def _mixture_stream(track: Mapping[str, tf.Tensor]) -> tf.data.Dataset:
  """One element per track: the sum of the stems it has (`stem_present`), as stem 0."""
  track_hash = tf.strings.to_hash_bucket_fast(track[track_features.TRACK_ID], _HASH_BUCKETS)
  audio = track[track_features.AUDIO]
  present = tf.cast(track[track_features.STEM_PRESENT], audio.dtype)
  return tf.data.Dataset.from_tensors({
      AUDIO: tf.reduce_sum(audio * present[:, tf.newaxis], axis=0),
      STEM: tf.constant(0, tf.int32),
      "track_hash": track_hash,
  })


def _stem_windows(stream: Mapping[str, tf.Tensor], spec: WindowSpec,
                  jitter_key: tf.Tensor) -> tf.data.Dataset:
  """The non-silent windows of one stem of one track, cut in one vectorised step."""
  audio = stream[AUDIO]
  if spec.jitter:
    # Stateless: the shifts of (seed, epoch, track, stem) are the same whenever and wherever
    # they are computed, which is what makes resumption and per-process splits exact.
    key = tf.random.experimental.stateless_fold_in(jitter_key, stream["track_hash"])
    key = tf.random.experimental.stateless_fold_in(key, tf.cast(stream[STEM], tf.int64))
    starts = windows_lib.jittered_starts(tf.shape(audio)[0], spec.window, spec.hop,
                                         spec.jitter, key)
    cut = windows_lib.gather_windows(audio, starts, spec.window)
  else:
    cut = windows_lib.frame_windows(audio, spec.window, spec.hop)
  cut = tf.boolean_mask(cut, tf.logical_not(windows_lib.is_silent(cut, spec.silence_threshold)))
  return tf.data.Dataset.from_tensor_slices({
      AUDIO: cut, STEM: tf.fill(tf.shape(cut)[:1], stream[STEM])})


def _batch(ds: tf.data.Dataset, local_batch: int, train: bool) -> tf.data.Dataset:
  if train:
    return ds.batch(local_batch, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=True)

  def pad(batch):
    rows = tf.shape(batch[AUDIO])[0]
    padded = {}
    for key, value in batch.items():
      paddings = [[0, local_batch - rows]] + [[0, 0]] * (value.shape.rank - 1)
      padded[key] = tf.ensure_shape(tf.pad(value, paddings), [local_batch] + value.shape[1:])
    padded[VALID] = tf.range(local_batch) < rows
    return padded

  ds = ds.batch(local_batch, drop_remainder=False, num_parallel_calls=tf.data.AUTOTUNE,
                deterministic=True)
  return ds.map(pad, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def vae_windows(dataset_dir: str, split: str, *, data_config: ml_collections.ConfigDict,
                batch_size: int, train: bool, seed: int | None = None, epoch: int = 0,
                process_index: int | None = None, process_count: int | None = None,
                mixture: bool = False, stem_batches: bool = False) -> tf.data.Dataset:
  """One epoch of single-stem VAE windows, batched for this process (see module docstring).

  Args:
    dataset_dir: the built dataset (`tfds.builder_from_directory`).
    split: TFDS split, e.g. 'train' or 'validation'.
    data_config: the `data` section of a config (`vae_windows`, `sample_rate`, `seed`).
    batch_size: GLOBAL batch size; this process emits batch_size / process_count rows.
    train: True for jittered, shuffled training windows (final partial batch dropped);
      False for the deterministic evaluation pass (padded final batch, "valid" mask).
    seed: defaults to `data_config.seed`.
    epoch: which epoch's shuffle and jitter (training); ignored for evaluation.
    process_index, process_count: default to JAX's; pass them to simulate other processes.
    mixture: windows of each track's mixture instead of its stems ("stem" is then 0, and
      `vae_windows.stems` is not read).
    stem_batches: training only: every batch holds windows of one stem, the stems taking
      turns in STEM_NAMES order (bass, drums, ... then bass again), the same turn on every
      process, so a global batch is one stem too (what a per-source VAE trains on at 1×
      cost, `source_vae.one_group`). Each stem's windows are shuffled on their own, each
      stem with its share (one over the number of stems) of the view's streams and shuffle
      buffer; the epoch ends when the first stem runs out of batches.

  Returns:
    A finite dataset of {"audio": float32 [b, window], "stem": int32 [b]} (+ "valid": bool
    [b] when not training), b = batch_size / process_count.
  """
  spec = vae_window_spec(data_config, train)
  index, count = input_iterator.process_slot(process_index, process_count)
  local_batch = _local_batch_size(batch_size, count)
  seeds = _epoch_seeds(data_config.seed if seed is None else seed, epoch if train else 0)
  tracks = read_tracks(dataset_dir, split, shuffle_seed=seeds.shuffle_files if train else None,
                       process_index=index, process_count=count)
  if stem_batches and (mixture or not train):
    raise ValueError("stem_batches is for training on stems: not with mixture=True or "
                     "train=False")
  jitter_key = tf.constant(seeds.jitter_key, tf.int64)

  def windows(selected_stems, share=1):
    if mixture:
      ds = tracks.flat_map(_mixture_stream)
    else:
      selected = tf.constant([name in selected_stems for name in stems_lib.STEM_NAMES])
      ds = tracks.flat_map(functools.partial(_stem_streams, selected=selected))
    ds = ds.interleave(
        functools.partial(_stem_windows, spec=spec, jitter_key=jitter_key),
        cycle_length=max(1, _STEM_STREAMS // share), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if train:
      ds = ds.shuffle(max(1, data_config.vae_windows.shuffle_buffer // share),
                      seed=seeds.shuffle_buffer, reshuffle_each_iteration=False)
    return _batch(ds, local_batch, train)

  if stem_batches:
    # One stream of batches per stem, taken in turn: the turn depends on the batch's index
    # alone, so every process's batch k holds the same stem. The stems' pipelines share the
    # view's _STEM_STREAMS and shuffle buffer, so that each stem's windows are mixed as in
    # the one pipeline of all stems (where, on average, one over the number of stems of its
    # buffer holds a stem's windows). With a full share each, the study's input pipeline
    # alone held 8.3 GB (benchmarks/RESULTS.md).
    per_stem = [windows((name,), share=len(spec.stems)) for name in spec.stems]
    ds = tf.data.Dataset.choose_from_datasets(
        per_stem, tf.data.Dataset.range(len(per_stem)).repeat(), stop_on_empty_dataset=True)
  else:
    ds = windows(spec.stems)
  logging.info("VAE windows (%s, %s): %d-sample windows, hop %d, jitter ±%d, %s, "
               "%d rows per process batch%s, epoch %d.", split, "train" if train else "eval",
               spec.window, spec.hop, spec.jitter,
               "the mixture" if mixture else "stems " + ",".join(spec.stems), local_batch,
               ", one stem per batch in turn" if stem_batches else "", epoch)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())


def _track_chunks(track: Mapping[str, tf.Tensor], chunk: int) -> tf.data.Dataset:
  return tf.data.Dataset.from_tensor_slices(
      {AUDIO: windows_lib.chunk_track(track[track_features.AUDIO], chunk)})


def diffusion_chunks(dataset_dir: str, split: str, *, data_config: ml_collections.ConfigDict,
                     batch_size: int, train: bool, seed: int | None = None, epoch: int = 0,
                     process_index: int | None = None,
                     process_count: int | None = None) -> tf.data.Dataset:
  """One epoch of stem-aligned multi-stem chunks, batched for this process.

  Arguments as for `vae_windows`; the chunk length is `data_config.chunks.samples`.
  Training shuffles chunks (buffer `data_config.chunks.shuffle_buffer`) and drops the final
  partial batch. Evaluation keeps the order of the dataset: its tracks in stored order, each
  track's chunks in time order (what a latent-extraction pass wants to index its output by).

  Returns:
    A finite dataset of {"audio": float32 [b, NUM_STEMS, samples]} (+ "valid" when not
    training), b = batch_size / process_count.
  """
  chunk = int(data_config.chunks.samples)
  if chunk <= 0:
    raise ValueError(f"data.chunks.samples={chunk} must be positive")
  index, count = input_iterator.process_slot(process_index, process_count)
  local_batch = _local_batch_size(batch_size, count)
  seeds = _epoch_seeds(data_config.seed if seed is None else seed, epoch if train else 0)
  tracks = read_tracks(dataset_dir, split, shuffle_seed=seeds.shuffle_files if train else None,
                       process_index=index, process_count=count)
  ds = tracks.interleave(
      functools.partial(_track_chunks, chunk=chunk),
      cycle_length=_TRACK_STREAMS if train else 1, block_length=1,
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if train:
    ds = ds.shuffle(data_config.chunks.shuffle_buffer, seed=seeds.shuffle_buffer,
                    reshuffle_each_iteration=False)
  ds = _batch(ds, local_batch, train)
  logging.info("Diffusion chunks (%s, %s): %d samples x %d stems, %d rows per process batch, "
               "epoch %d.", split, "train" if train else "eval", chunk, stems_lib.NUM_STEMS,
               local_batch, epoch)
  return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
