"""The four instrument sources and the audio rate every stage works at.

The order is the reference's (MSDM's Slakh2100 conversion): it fixes the stem axis of every
multi-stem array and the channel blocks of the joint latent.
"""

STEM_NAMES = ("bass", "drums", "guitar", "piano")
NUM_STEMS = len(STEM_NAMES)
SAMPLE_RATE = 22050


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
