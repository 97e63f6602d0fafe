"""The four instrument sources and the audio rate every stage works at.

The order is the reference's (MSDM's Slakh2100 conversion): it fixes the stem axis of every
multi-stem array and the channel blocks of the joint latent.
"""

from collections.abc import Sequence

import numpy as np


STEM_NAMES = ("bass", "drums", "guitar", "piano")
NUM_STEMS = len(STEM_NAMES)
SAMPLE_RATE = 22050
# The sum of the stems, as a source of its own: what MixLDM's VAE and latent hold.
MIXTURE = "mix"
MIXTURE_SYSTEM = "mixldm"


def latent_sources(system: str) -> tuple[str, ...]:
  """The sources a latent system's latent stacks, in order: the four stems (msldm, isldm), or
  the mixture alone (mixldm, the paper's baseline that models the mix)."""
  return (MIXTURE,) if system == MIXTURE_SYSTEM else STEM_NAMES


def stem_index(name: str) -> int:
  """Position of a stem on the stem axis; a clear error for an unknown name."""
  try:
    return STEM_NAMES.index(name)
  except ValueError:
    raise ValueError(
        f"unknown stem {name!r}: expected one of {', '.join(STEM_NAMES)}") from None


def parse_stem_list(names) -> tuple[str, ...]:
  """Accepts 'bass,drums' or a sequence; returns the names in canonical stem order."""
  if isinstance(names, str):
    names = [n.strip() for n in names.split(",") if n.strip()]
  indices = sorted({stem_index(n) for n in names})
  if not indices:
    raise ValueError("empty stem list: name at least one of " + ", ".join(STEM_NAMES))
  return tuple(STEM_NAMES[i] for i in indices)


def as_pieces(audio, stem_names: Sequence[str] = STEM_NAMES, what: str = "multi-stem audio",
              dtype=None) -> np.ndarray:
  """`[pieces, stems, samples]` (one piece `[stems, samples]` gains the pieces axis), checked
  against `stem_names`; an error names `what` and the shape it got."""
  audio = np.asarray(audio, dtype)
  if audio.ndim == 2:
    audio = audio[None]
  if audio.ndim != 3 or audio.shape[1] != len(stem_names):
    raise ValueError(f"{what}: expected [pieces, {len(stem_names)} stems, samples] for stems "
                     f"{tuple(stem_names)}; got shape {audio.shape}")
  return audio
