"""Does a stem sound like its instrument? musicnn's MagnaTagATune tagger as the judge.

The MTT tagger (`musicnn.TAGGER`) outputs 50 tag probabilities per 3 s patch; ten of the
tags name instruments. A stem counts as recognised when, averaged over its patches, its own
instrument's tag ranks first among those ten. Only guitar, piano and drums have an MTT tag
(there is no "bass"). Real stems of the same split give the ceiling: the tagger was trained
on MagnaTagATune, not on soundfont renderings, so even real stems are not all recognised.
"""

from typing import Sequence

import numpy as np

from msldm_jax import recent
from msldm_jax import stems
from msldm_jax.evaluation import musicnn

INSTRUMENT_TAGS = ("guitar", "piano", "drums", "strings", "harpsichord", "violin", "flute",
                   "sitar", "harp", "cello")
# Stem name -> its MTT tag, for the stems that have one.
STEM_TAGS = {"guitar": "guitar", "piano": "piano", "drums": "drums"}


def top_instruments(probabilities, labels: Sequence[str]) -> list[str]:
  """The highest instrument tag of each row of mean tag probabilities `[n, tags]`."""
  probabilities = np.asarray(probabilities)
  columns = [list(labels).index(tag) for tag in INSTRUMENT_TAGS]
  return [INSTRUMENT_TAGS[i] for i in np.argmax(probabilities[:, columns], axis=-1)]


def recognition(audio, tag_fn, audible, stem_names: Sequence[str] = stems.STEM_NAMES
                ) -> dict[str, dict[str, float]]:
  """{stem: {"recognised": share, "stems": count}} over the audible stems with an MTT tag.

  `tag_fn(pieces [n, samples]) -> (probabilities [n, patches, tags], labels)`; `audible` is
  bool `[pieces, stems]` (empty stems have no instrument to recognise). The share is NaN
  (with 0 stems) when no stem of that kind is audible or the audio is shorter than one of
  the tagger's patches.
  """
  audio = stems.as_pieces(audio, stem_names, "audio", np.float32)
  audible = np.asarray(audible, bool)
  results = {}
  for name, tag in STEM_TAGS.items():
    if name not in stem_names:
      continue
    index = list(stem_names).index(name)
    keep = np.nonzero(audible[:, index])[0]
    if keep.size == 0:
      results[name] = {"recognised": float("nan"), "stems": 0}
      continue
    probabilities, labels = tag_fn(audio[keep, index])
    if np.asarray(probabilities).shape[1] == 0:
      results[name] = {"recognised": float("nan"), "stems": 0}
      continue
    top = top_instruments(np.asarray(probabilities).mean(axis=1), labels)
    results[name] = {"recognised": float(np.mean([t == tag for t in top])),
                     "stems": int(keep.size)}
  return results


# The tagger's probabilities by the waveforms' bytes, the latest few: one evaluation tags the
# real stems twice (its instrument table and its VAE's reconstruction table), and the
# study's systems that share a VAE tag the same real stems and reconstructions again, each
# time about 40 s on 2 CPU cores at the study's size. Keys are hashes; the values are small.
_TAGGED = recent.Recent(kept=16)


def musicnn_tagger(sample_rate: int):
  """`tag_fn` for `recognition`: musicnn's MTT tagger (the shipped weights) at `sample_rate`.

  Within a process, waveforms it tagged lately are not tagged again."""
  tagger = musicnn.load(musicnn.TAGGER)
  labels = musicnn.LABELS[musicnn.TAGGER]

  def tag_fn(waveforms):
    waveforms = np.asarray(waveforms, np.float32)
    probabilities = _TAGGED.get(
        (musicnn.TAGGER, sample_rate, recent.array_digest(waveforms)),
        lambda: np.asarray(musicnn.tag_batch(tagger, waveforms, sample_rate)))
    return probabilities.copy(), labels

  return tag_fn
