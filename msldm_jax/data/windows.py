"""Where windows and chunks of one track start, and cutting them out: pure TF functions.

These are the maths of the two tf.data views (`data/pipeline.py`), kept free of I/O so that
they can be tested on plain tensors. Every function works on a whole track (or stem) at once:
the window starts of a track are one vector and the windows one gather, so the pipeline does
no per-window Python and no per-window tf.data element work before batching.

Conventions (reference §2):
- A window grid starts at sample 0 and steps by `hop`; only windows that fit entirely inside
  the track are kept (the tail shorter than a window is not padded).
- Training jitter moves each grid start by an integer uniformly drawn from
  [-jitter, +jitter] samples, then clamps the start so that the window stays inside the track.
  Because hop >= 2 * jitter in the reference (0.5 s hop, 0.25 s jitter), jittered starts keep
  the grid's order.
- A window x of N samples is silent when ||x||_2 / N < threshold (the L2 norm divided by N,
  exactly as the reference states, not by sqrt(N)).
- Diffusion chunks are non-overlapping from sample 0; a track's final partial chunk is dropped
  (padding it with silence would teach the diffusion model endings that are not in the data).
"""

import tensorflow as tf


def seconds_to_samples(seconds: float, sample_rate: int, *, name: str) -> int:
  """Rounds a duration to whole samples; `name` is the config key, for the error."""
  samples = int(round(float(seconds) * int(sample_rate)))
  if samples < 0:
    raise ValueError(f"{name}={seconds!r} s is negative")
  return samples


def grid_starts(num_samples, window: int, hop: int) -> tf.Tensor:
  """Starts (int32 [M]) of the windows at `hop` steps that fit inside `num_samples`."""
  num_samples = tf.cast(num_samples, tf.int32)
  count = tf.maximum((num_samples - window) // hop + 1, 0)
  return tf.range(count, dtype=tf.int32) * hop


def jittered_starts(num_samples, window: int, hop: int, jitter: int, seed) -> tf.Tensor:
  """Grid starts each shifted by a uniform integer in [-jitter, jitter], clamped to the track.

  Args:
    num_samples: length of the track (scalar).
    window, hop, jitter: in samples.
    seed: int [2] key of `tf.random.stateless_uniform`; the same key gives the same shifts,
      which is what makes a resumed or rebuilt pipeline repeat its windows exactly.

  Returns:
    int32 [M], M = number of grid windows.
  """
  grid = grid_starts(num_samples, window, hop)
  if jitter == 0:
    return grid
  # maxval is exclusive for integer dtypes.
  shifts = tf.random.stateless_uniform(
      tf.shape(grid), seed=seed, minval=-jitter, maxval=jitter + 1, dtype=tf.int32)
  last_start = tf.cast(num_samples, tf.int32) - window
  return tf.clip_by_value(grid + shifts, 0, tf.maximum(last_start, 0))


def gather_windows(audio: tf.Tensor, starts: tf.Tensor, window: int) -> tf.Tensor:
  """Windows [M, window] of a 1-D signal at arbitrary starts, in one gather.

  The index matrix is as large as the windows (int32), a transient cost of a few times one
  stem's size; jittered starts have no common stride, so `tf.signal.frame` cannot be used.
  """
  indices = starts[:, tf.newaxis] + tf.range(window, dtype=starts.dtype)[tf.newaxis, :]
  return tf.gather(audio, indices)


def frame_windows(audio: tf.Tensor, window: int, hop: int) -> tf.Tensor:
  """Windows [M, window] on the regular grid of `grid_starts` (no jitter), without indices."""
  return tf.signal.frame(audio, frame_length=window, frame_step=hop, pad_end=False, axis=-1)


def is_silent(windows: tf.Tensor, threshold: float) -> tf.Tensor:
  """bool [M]: ||x||_2 / N < threshold for each row x of `windows` [M, N]."""
  length = tf.cast(tf.shape(windows)[-1], windows.dtype)
  return tf.norm(windows, ord="euclidean", axis=-1) / length < threshold


def chunk_track(audio: tf.Tensor, chunk: int) -> tf.Tensor:
  """Stem-aligned chunks [C, S, chunk] of a track [S, N]: row c is samples [c*chunk, (c+1)*chunk)
  of every stem; the final partial chunk is dropped."""
  num_chunks = tf.shape(audio)[-1] // chunk
  stems = tf.shape(audio)[0]
  kept = audio[:, :num_chunks * chunk]
  return tf.transpose(tf.reshape(kept, [stems, num_chunks, chunk]), [1, 0, 2])
