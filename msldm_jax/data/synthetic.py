"""Synthetic stem datasets in the built-dataset format, for tests and benchmarks.

`write_dataset` stores tracks exactly as a built dataset holds them (`data/track_features.py`: one
whole track per example) and returns the directory that `tfds.builder_from_directory` loads,
so code under test reads it as it reads a real build. `sine_tracks` makes music-free audio
with the cases the input views must handle: silent regions, a present stem that is all
silence, and absent stems.
"""

import dataclasses
import os
from typing import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from msldm_jax import stems
from msldm_jax.data import track_features


@dataclasses.dataclass(frozen=True)
class Track:
  track_id: str
  audio: np.ndarray         # float32 [NUM_STEMS, num_samples]
  stem_present: np.ndarray  # bool [NUM_STEMS]


def write_dataset(data_dir: str, splits: Mapping[str, Sequence[Track]], *,
                  name: str = "synthetic_stems", version: str = "1.0.0") -> str:
  """Writes `splits` (split name -> tracks) as a TFDS dataset; returns its directory."""
  split_examples = {}
  for split, tracks in splits.items():
    examples = []
    for track in tracks:
      audio = np.asarray(track.audio, np.float32)
      present = np.asarray(track.stem_present, bool)
      if audio.ndim != 2 or audio.shape[0] != stems.NUM_STEMS:
        raise ValueError(f"track {track.track_id!r}: audio shape {audio.shape}, expected "
                         f"({stems.NUM_STEMS}, num_samples)")
      if present.shape != (stems.NUM_STEMS,):
        raise ValueError(f"track {track.track_id!r}: stem_present shape {present.shape}")
      examples.append((track.track_id, {
          track_features.TRACK_ID: track.track_id,
          track_features.AUDIO: audio,
          track_features.NUM_SAMPLES: audio.shape[1],
          track_features.STEM_PRESENT: present,
      }))
    split_examples[split] = examples
  builder = tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=version, features=track_features.features_dict(),
      split_datasets=split_examples, data_dir=data_dir,
      description="Synthetic stems (msldm_jax.data.synthetic).")
  return os.fspath(builder.data_dir)


def sine_tracks(num_tracks: int, seconds: float, *, sample_rate: int = stems.SAMPLE_RATE,
                seed: int = 0, prefix: str = "Track") -> list[Track]:
  """Tracks of per-stem sines (a different pitch per track and stem) with gaps.

  Every stem is silent (exact zeros) over one random stretch of 10-30% of the track; in
  every third track the guitar is absent (zeros, stem_present False), and in every fourth
  the piano is present but silent throughout.
  """
  rng = np.random.default_rng(seed)
  n = int(round(seconds * sample_rate))
  t = np.arange(n, dtype=np.float64) / sample_rate
  tracks = []
  for i in range(num_tracks):
    audio = np.zeros((stems.NUM_STEMS, n), np.float32)
    present = np.ones(stems.NUM_STEMS, bool)
    for s in range(stems.NUM_STEMS):
      freq = 55.0 * 2 ** (s + rng.uniform(0, 1))
      audio[s] = (0.3 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))).astype(
          np.float32)
      gap = int(n * rng.uniform(0.1, 0.3))
      start = int(rng.integers(0, max(n - gap, 1)))
      audio[s, start:start + gap] = 0.0
    if i % 3 == 2:
      audio[stems.stem_index("guitar")] = 0.0
      present[stems.stem_index("guitar")] = False
    if i % 4 == 3:
      audio[stems.stem_index("piano")] = 0.0
    tracks.append(Track(f"{prefix}{i:05d}", audio, present))
  return tracks
