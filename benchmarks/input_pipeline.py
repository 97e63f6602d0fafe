r"""Input pipeline throughput: stem-audio seconds delivered per second per CPU core.

Run from the repository root:
  python -m benchmarks.input_pipeline                      # synthesises a dataset first
  python -m benchmarks.input_pipeline --dataset_dir=runs/demo/tfds/minislakh/1.0.0

Method. For each view (VAE training windows, diffusion training chunks) the benchmark builds
an `InputIterator` over the training split with the data settings of --config (default
configs/demo.py: 1 s windows at 0.5 s hop with ±0.25 s jitter, 327672-sample chunks) and
pulls numpy batches, as a trainer's input loop would (no device transfer). The first
--warmup_batches batches are not timed (graph tracing, the first file reads, the shuffle
buffer's first fill); the next --measure_batches batches are, over wall-clock time. Epochs
follow each other as in training, so the time includes rebuilding each epoch's pipeline and
refilling its shuffle buffer, which weighs more on a small dataset than on Slakh.

"Stem audio seconds" delivered are batch x window seconds for VAE windows (one stem per
row) and batch x 4 stems x chunk seconds for chunks. Throughput per core divides the audio
seconds per wall-clock second by the cores this process may use (os.sched_getaffinity);
the benchmark also prints audio seconds per CPU-second the process actually consumed, the
fairer figure on a machine shared with other work. The target for the VAE windows is at least
300 stem-audio seconds per second per core.

Without --dataset_dir, a synthetic dataset of --synthetic_tracks tracks of
--synthetic_seconds seconds (sines with silent regions, absent and silent stems;
`msldm_jax/data/synthetic.py`) is written to a temporary directory first.
"""

import functools
import os
import shutil
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from msldm_jax import config_loading
from msldm_jax import stems
from msldm_jax.data import input_iterator
from msldm_jax.data import pipeline
from msldm_jax.data import synthetic

_DATASET_DIR = flags.DEFINE_string(
    "dataset_dir", "", "Built dataset to read; empty: synthesise one.")
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config whose `data` to use.")
_VAE_BATCH = flags.DEFINE_integer("vae_batch_size", 28, "Global batch of VAE windows.")
_CHUNK_BATCH = flags.DEFINE_integer("chunk_batch_size", 4, "Global batch of chunks.")
_WARMUP = flags.DEFINE_integer("warmup_batches", 20, "Untimed batches first (VAE view).")
_MEASURE = flags.DEFINE_integer("measure_batches", 400, "Timed batches (VAE view).")
_CHUNK_WARMUP = flags.DEFINE_integer("chunk_warmup_batches", 3, "Untimed chunk batches.")
_CHUNK_MEASURE = flags.DEFINE_integer("chunk_measure_batches", 40, "Timed chunk batches.")
_TRACKS = flags.DEFINE_integer("synthetic_tracks", 12, "Synthetic dataset: tracks.")
_SECONDS = flags.DEFINE_float("synthetic_seconds", 60.0, "Synthetic dataset: track seconds.")


def _measure(name, iterator, warmup, measure, audio_seconds_per_batch, cores):
  for _ in range(warmup):
    next(iterator)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(measure):
    next(iterator)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  audio = measure * audio_seconds_per_batch
  print(f"{name}: {warmup} warm-up + {measure} measured batches, {audio:.0f} s of stem audio "
        f"in {wall:.2f} s wall ({cpu:.2f} CPU-s) on {cores} cores\n"
        f"  {audio / wall:.0f} audio-s/s; {audio / wall / cores:.0f} audio-s/s per core; "
        f"{audio / cpu:.0f} audio-s per CPU-second; position {iterator.state()}")
  return audio / wall / cores


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    # Each epoch's rebuild logs a few lines: keep the report readable unless asked.
    logging.set_verbosity(logging.WARNING)
  tfds.display_progress_bar(False)
  config = config_loading.load_config(_CONFIG.value)
  data_config = config.data
  rate = data_config.sample_rate
  cores = len(os.sched_getaffinity(0))
  tmp = None
  dataset_dir = _DATASET_DIR.value
  if not dataset_dir:
    tmp = tempfile.mkdtemp(prefix="input_pipeline_bench_")
    start = time.perf_counter()
    dataset_dir = synthetic.write_dataset(tmp, {_SPLIT.value: synthetic.sine_tracks(
        _TRACKS.value, _SECONDS.value, sample_rate=rate)})
    print(f"Synthesised {_TRACKS.value} tracks x {_SECONDS.value:.0f} s x "
          f"{stems.NUM_STEMS} stems at {rate} Hz in {time.perf_counter() - start:.1f} s.")
  try:
    print(f"Dataset {dataset_dir}, split {_SPLIT.value!r}; config {_CONFIG.value}; "
          f"{cores} cores (os.sched_getaffinity).")
    spec = pipeline.vae_window_spec(data_config, train=True)
    vae = input_iterator.InputIterator(functools.partial(
        pipeline.vae_windows, dataset_dir, _SPLIT.value, data_config=data_config,
        batch_size=_VAE_BATCH.value, train=True))
    vae_rate = _measure(
        f"VAE windows (batch {_VAE_BATCH.value} x {spec.window} samples = "
        f"{spec.window / rate:g} s)", vae, _WARMUP.value, _MEASURE.value,
        _VAE_BATCH.value * spec.window / rate, cores)
    chunk = data_config.chunks.samples
    chunks = input_iterator.InputIterator(functools.partial(
        pipeline.diffusion_chunks, dataset_dir, _SPLIT.value, data_config=data_config,
        batch_size=_CHUNK_BATCH.value, train=True))
    _measure(f"Diffusion chunks (batch {_CHUNK_BATCH.value} x {stems.NUM_STEMS} stems x "
             f"{chunk} samples = {chunk / rate:.2f} s)", chunks, _CHUNK_WARMUP.value,
             _CHUNK_MEASURE.value, _CHUNK_BATCH.value * stems.NUM_STEMS * chunk / rate, cores)
    verdict = "meets" if vae_rate >= 300 else "is BELOW"
    print(f"VAE windows {verdict} the target of 300 stem-audio seconds per second per core.")
  finally:
    if tmp:
      shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
