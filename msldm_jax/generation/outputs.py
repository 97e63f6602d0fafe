"""Writing one generated piece: its stems, its mixture, a spectrogram and what made it.

  OUTPUT/piece_NNN/stems/{bass,drums,guitar,piano}.wav
  OUTPUT/piece_NNN/mix.wav
  OUTPUT/piece_NNN/spectrogram.png      every stem and the mix, one shared colour scale
  OUTPUT/piece_NNN/piece.json           settings, seed, given/generated stems, checkpoints, peaks
  OUTPUT/piece_NNN/latents.npy          the joint latent [stems·latent_dim, frames] the stems
                                        were decoded from (when given): to decode it again,
                                        with this or another implementation of the VAE

A mixture-only piece (MixLDM, whose latent is the mixture's) has no stems/ folder: its
mix.wav is the decoded mixture itself.

Audio is written as 32-bit float WAV: the mixture is the plain sum of the stems and is never
clipped or normalised (gain 1). A sum of four stems can exceed full scale; a float WAV keeps
it, and piece.json records the peak so that a listener or a converter to PCM can apply
`1 / peak` when it is above 1.
"""

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import soundfile as sf

from msldm_jax import atomic_files
from msldm_jax import plotting
from msldm_jax import stems as stems_lib

WAV_SUBTYPE = "FLOAT"


def piece_dir(output_dir: str, piece_index: int) -> str:
  return os.path.join(output_dir, f"piece_{piece_index:03d}")


def is_mixture_only(stems: Mapping[str, np.ndarray]) -> bool:
  """Whether a piece is the mixture alone (MixLDM's), without stems."""
  return set(stems) == {stems_lib.MIXTURE}


def mixture(stems: Mapping[str, np.ndarray]) -> np.ndarray:
  """The sum of the stems in canonical stem order, float32 (the order fixes the rounding);
  a mixture-only piece's mixture itself."""
  if is_mixture_only(stems):
    return np.asarray(stems[stems_lib.MIXTURE], np.float32)
  total = None
  for name in stems_lib.STEM_NAMES:
    x = np.asarray(stems[name], np.float32)
    total = x.copy() if total is None else total + x
  return total


def _peak(x: np.ndarray) -> float:
  return float(np.max(np.abs(x))) if x.size else 0.0


def write_piece(directory: str, stems: Mapping[str, np.ndarray], sample_rate: int,
                metadata: Mapping[str, Any], title: str = "",
                latents: np.ndarray | None = None) -> dict[str, Any]:
  """Writes one piece's files into `directory` (created); returns the JSON written.

  Args:
    directory: the piece's folder, e.g. `piece_dir(output, 3)`.
    stems: all four stems by name, float32 [samples] each, one length; or {"mix": ...}
      alone for a mixture-only piece.
    sample_rate: of the audio.
    metadata: recorded in piece.json (settings, seed, stems given and generated, ...).
    title: the spectrogram's title.
    latents: the joint latent the piece was decoded from, written as latents.npy.
  """
  names = () if is_mixture_only(stems) else stems_lib.STEM_NAMES
  missing = [name for name in names if name not in stems]
  if missing:
    raise ValueError(f"write_piece({directory}): no audio for stems {missing}")
  lengths = {name: len(stems[name]) for name in names}
  if len(set(lengths.values())) > 1:
    raise ValueError(f"write_piece({directory}): stems differ in length: {lengths}")
  os.makedirs(directory, exist_ok=True)
  if names:
    os.makedirs(os.path.join(directory, "stems"), exist_ok=True)
  for name in names:
    sf.write(os.path.join(directory, "stems", f"{name}.wav"),
             np.asarray(stems[name], np.float32), sample_rate, subtype=WAV_SUBTYPE)
  if latents is not None:
    np.save(os.path.join(directory, "latents.npy"), np.asarray(latents, np.float32))
  mix = mixture(stems)
  sf.write(os.path.join(directory, "mix.wav"), mix, sample_rate, subtype=WAV_SUBTYPE)
  plotting.save_spectrograms(
      os.path.join(directory, "spectrogram.png"),
      {**{name: stems[name] for name in names}, "mix": mix}, sample_rate,
      title=title)
  mix_peak = _peak(mix)
  record = dict(metadata)
  record.update(
      sample_rate=int(sample_rate),
      num_samples=int(len(mix)),
      seconds=len(mix) / sample_rate,
      wav_subtype=WAV_SUBTYPE,
      # No gain is applied: the mix is the plain sum, whatever its peak.
      gain=1.0,
      peak=dict(mix=mix_peak, **{name: _peak(np.asarray(stems[name])) for name in names}),
      exceeds_full_scale=mix_peak > 1.0,
  )
  with open(os.path.join(directory, "piece.json"), "w") as f:
    json.dump(atomic_files.strict_json(record), f, indent=2, sort_keys=True,
              default=atomic_files.json_default, allow_nan=False)
  return record
