r"""musicnn embedding time for one piece: four stems and their mixture, after compilation.

  python benchmarks/musicnn_embedding.py                    # MSD_musicnn, 5 timed repetitions
  python benchmarks/musicnn_embedding.py --model=MTT_musicnn --repeats=9

What is timed: `musicnn.embed_batch(loaded, signals [5, 655360], 44100)` on one 14.86 s
piece (655 360 samples at 44.1 kHz: the paper's chunk) as the evaluation embeds it, four
stems plus their mixture: resampling to 16 kHz (soxr HQ), the log-mel frontend, and the
network over the 5 × 4 = 20 patches of 3 s (in batches of `musicnn.BATCH_SIZE`). The
signals are deterministic synthetic stems (the time does not depend on the content). One
untimed call first (it compiles), then `--repeats` timed calls; the table gives the median
and the fastest wall time, the median process CPU time (less sensitive to other processes'
load on a shared machine) and, for the median call's breakdown, each stage timed on its own.

Prints a markdown table; the numbers belong in benchmarks/RESULTS.md with the machine, the
command and the commit.
"""

import os
import platform
import statistics
import time

from absl import app
from absl import flags

import jax
import numpy as np

from msldm_jax.evaluation import musicnn

_MODEL = flags.DEFINE_enum("model", musicnn.DEFAULT_EMBEDDING, list(musicnn.MODELS),
                           "Which musicnn checkpoint.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls.")
_SAMPLES = flags.DEFINE_integer("samples", 655360, "Samples per signal (14.86 s at 44.1 kHz).")
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", 44100, "Rate of the signals.")


def _piece(num_samples: int, sample_rate: int) -> np.ndarray:
  """Four synthetic stems (bass, drums, guitar, piano stand-ins) and their mixture."""
  rng = np.random.default_rng(0)
  t = np.arange(num_samples) / sample_rate
  envelope = np.exp(-4.0 * (t % 0.5))
  stems = np.stack([
      0.3 * np.sin(2 * np.pi * 55.0 * t),
      0.3 * rng.standard_normal(num_samples) * envelope ** 4,
      0.2 * np.sign(np.sin(2 * np.pi * 196.0 * t)) * envelope,
      0.2 * np.sin(2 * np.pi * 440.0 * t) * envelope,
  ]).astype(np.float32)
  return np.concatenate([stems, stems.sum(axis=0, keepdims=True)])


def _timed(function):
  wall, cpu = time.perf_counter(), time.process_time()
  result = function()
  jax.block_until_ready(result)
  return time.perf_counter() - wall, time.process_time() - cpu


def _processor() -> str:
  name = platform.processor()
  if not name:  # Empty on many Linux systems: read the CPU model instead.
    try:
      with open("/proc/cpuinfo") as f:
        name = next(line.split(":", 1)[1].strip() for line in f
                    if line.startswith("model name"))
    except (OSError, StopIteration):
      name = platform.machine()
  return name


def main(argv):
  del argv
  loaded = musicnn.load(_MODEL.value)
  signals = _piece(_SAMPLES.value, _SAMPLE_RATE.value)
  rate = _SAMPLE_RATE.value
  load_before = os.getloadavg()

  embeddings = musicnn.embed_batch(loaded, signals, rate)  # Compiles.
  totals = [_timed(lambda: musicnn.embed_batch(loaded, signals, rate))
            for _ in range(_REPEATS.value)]

  # Stages on their own (the same work embed_batch does, split at its seams).
  resampled = musicnn.resampling.resample(signals, rate, musicnn.SAMPLE_RATE)
  patches = musicnn.patches_16k(resampled)
  flat = patches.reshape((-1,) + patches.shape[2:])
  stages = {
      "resample to 16 kHz (soxr HQ)":
          lambda: musicnn.resampling.resample(signals, rate, musicnn.SAMPLE_RATE),
      "log-mel patches": lambda: musicnn.patches_16k(resampled),
      f"network ({flat.shape[0]} patches, batch {musicnn.BATCH_SIZE})":
          lambda: musicnn.apply_patches(loaded, flat),
  }
  stage_times = {name: statistics.median(_timed(f)[0] for _ in range(_REPEATS.value))
                 for name, f in stages.items()}
  load_after = os.getloadavg()

  wall = [w for w, _ in totals]
  cpu = [c for _, c in totals]
  seconds = _SAMPLES.value / rate
  print(f"musicnn {_MODEL.value}: embed one {seconds:.2f} s piece, "
        f"{signals.shape[0]} signals (4 stems + mixture) of {_SAMPLES.value} samples at "
        f"{rate} Hz -> {embeddings.shape} embeddings\n")
  print(f"Machine: {_processor()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
        f"({jax.default_backend()}); load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after.")
  print(f"Method: 1 untimed call (compiles), then {_REPEATS.value} timed calls of "
        "`musicnn.embed_batch`; stages timed separately (median).\n")
  print("| what | median wall s | best wall s | median CPU s |")
  print("|---|---|---|---|")
  print(f"| embed_batch, 5 signals | {statistics.median(wall):.3f} | {min(wall):.3f} | "
        f"{statistics.median(cpu):.3f} |")
  for name, value in stage_times.items():
    print(f"| {name} | {value:.3f} | | |")


if __name__ == "__main__":
  app.run(main)
