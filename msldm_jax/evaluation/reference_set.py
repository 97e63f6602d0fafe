"""The real chunks every evaluation scores against: one held-out split, or several joined by
'+', all of their chunks or a seeded random sample (never the first N in track order)."""

import functools

import ml_collections
import numpy as np

from msldm_jax import workdir_layout
from msldm_jax.data import input_iterator
from msldm_jax.data import pipeline


def split_names(value: str, key: str = "evaluate.reference_split") -> tuple[str, ...]:
  """Config value `value` of `key` as split names: 'test', or several joined by '+' as TFDS
  writes them ('validation+test': both held-out splits, when one holds too few chunks for
  a Fréchet distance)."""
  names = tuple(name.strip() for name in str(value).split("+"))
  if not all(names) or len(set(names)) != len(names):
    raise ValueError(f"config key {key}={value!r}: expected split names joined by '+', each "
                     "once (e.g. 'test' or 'validation+test')")
  return names


def splits_label(value: str) -> str:
  """'the 'test' split' or 'the 'validation' and 'test' splits', for tables and notes."""
  names = split_names(value)
  if len(names) == 1:
    return f"the {names[0]!r} split"
  return ("the " + ", ".join(repr(n) for n in names[:-1]) + f" and {names[-1]!r} splits")


def describe(chosen: int, split_chunks: int, split: str, seed: int) -> str:
  """"94 of the 94 chunks of the 'validation' and 'test' splits (all)", or "... (a seeded
  random sample, seed 0)", for the notes beside a table."""
  return (f"{chosen} of the {split_chunks} chunks of {splits_label(split)}"
          + (" (all)" if chosen == split_chunks else
             f" (a seeded random sample, seed {seed})"))


def read_reference_chunks(config: ml_collections.ConfigDict, workdir: str, split: str,
                          max_chunks: int, seed: int) -> tuple[np.ndarray, int]:
  """(chunks `[n, stems, samples]`, chunks in the split): every chunk of the split, or a
  seeded uniform sample of `max_chunks` of them in split order. `split` may join several
  splits with '+' ('validation+test'); their chunks are then one stream, in that order.

  A reservoir sample over the stream: memory holds `max_chunks` chunks, not the split.
  """
  dataset_dir = workdir_layout.dataset_dir(config, workdir)
  names = split_names(split)
  rng = np.random.default_rng([seed, max_chunks])
  reservoir, positions, seen = [], [], 0
  for name in names:
    dataset_fn = functools.partial(
        pipeline.diffusion_chunks, dataset_dir, name,
        data_config=config.data, batch_size=1, train=False)
    for batch in input_iterator.InputIterator(dataset_fn, num_epochs=1):
      for chunk in np.asarray(batch[pipeline.AUDIO])[np.asarray(batch[pipeline.VALID])]:
        if len(reservoir) < max_chunks:
          reservoir.append(chunk)
          positions.append(seen)
        else:
          slot = rng.integers(0, seen + 1)
          if slot < max_chunks:
            reservoir[slot], positions[slot] = chunk, seen
        seen += 1
  if not reservoir:
    raise ValueError(f"split {split!r} of {dataset_dir} has no "
                     f"chunk of {config.data.chunks.samples} samples")
  order = np.argsort(positions)
  return np.stack([reservoir[i] for i in order]), seen
