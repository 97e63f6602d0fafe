"""The separation table: SI-SDR improvement per stem over the mixture, as MSDM reports it.

For each reference chunk (the model's window, from the test split) its four stems are summed
to a mixture, the mixture is separated (`generation/separation.py`, each method of
`evaluate.separation_methods`), and every stem is scored by

  SI-SDRi = SI-SDR(estimate, true stem) − SI-SDR(mixture, true stem),

the gain over taking the mixture itself as the stem. A (chunk, stem) pair whose true stem is
empty (silent in every 1 s window, the data's silence rule) is left out: SI-SDR of a silent
reference is undefined. The row "oracle: VAE reconstruction" scores the frozen VAE's own
posterior-mean reconstruction of the true stems: what the codec allows a separation whose
stems are decodings, so a reader can tell the prior's share from the codec's. It is not a
bound on every method: Dirac's constrained stem is a waveform residual (mixture minus the
others), and DPS moves latents to lower the mixture error, so either can score above a poor
codec's reconstructions.
"""

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from msldm_jax import stems as stems_lib
from msldm_jax.evaluation import music_metrics
from msldm_jax.losses import vae_losses

ORACLE = "oracle: VAE reconstruction"


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """SI-SDR in dB per row of [..., samples] (the training's definition)."""
  return np.asarray(jax.device_get(vae_losses.si_sdr(np.asarray(estimate, np.float32),
                                                     np.asarray(reference, np.float32))))


def improvement(estimates: np.ndarray, reference: np.ndarray,
                audible: np.ndarray) -> dict[str, tuple[float, int]]:
  """Per stem: (mean SI-SDRi in dB over audible chunks, how many), estimates and reference
  [chunks, stems, samples], audible bool [chunks, stems]."""
  mixtures = reference.sum(axis=1, keepdims=True)
  gains = si_sdr(estimates, reference) - si_sdr(np.broadcast_to(mixtures, reference.shape),
                                                reference)
  out = {}
  for s, name in enumerate(stems_lib.STEM_NAMES):
    rows = audible[:, s]
    out[name] = (float(np.mean(gains[rows, s])) if rows.any() else float("nan"),
                 int(rows.sum()))
  return out


def table_rows(results: Mapping[str, Mapping[str, tuple[float, int]]]
               ) -> dict[str, dict[str, float]]:
  """{method: {stem: SI-SDRi, ..., "mean": ..., "chunks": ...}} for `tables.write_table`."""
  rows = {}
  for method, per_stem in results.items():
    values = {name: per_stem[name][0] for name in stems_lib.STEM_NAMES}
    finite = [v for v in values.values() if np.isfinite(v)]
    values["mean"] = float(np.mean(finite)) if finite else float("nan")
    values["scored pairs"] = float(sum(n for _, n in per_stem.values()))
    rows[method] = values
  return rows


def audible_stems(reference: np.ndarray, empty_share: float) -> np.ndarray:
  """bool [chunks, stems]: the true stems that are not empty (judged per 1 s window, or
  on the whole chunk when it is shorter)."""
  seconds = min(music_metrics.EMPTY_WINDOW_SECONDS, reference.shape[-1] / stems_lib.SAMPLE_RATE)
  return ~music_metrics.empty_stems(reference, stems_lib.STEM_NAMES, empty_share=empty_share,
                                    window_seconds=seconds)


def choose_chunks(num_reference: int, count: int, seed: int) -> np.ndarray:
  """`count` seeded random chunk indices (sorted), all when there are fewer."""
  count = min(int(count), num_reference)
  return np.sort(np.random.default_rng([int(seed), count, 7]).choice(
      num_reference, count, replace=False))


def describe(methods: Sequence[str], chunks: int, steps: int, sampler: str,
             strength: float, dirac_stem: str) -> str:
  return (f"SI-SDR improvement (dB) over the mixture on {chunks} seeded random reference "
          f"chunks, {sampler} with {steps} steps per separation; methods: "
          + ", ".join(f"{m}" + (f" (strength {strength})" if m == "dps" else
                                f" ({dirac_stem} = mixture − others)" if m == "dirac" else "")
                      for m in methods)
          + f". '{ORACLE}' is the frozen VAE's own reconstruction of the true stems: what "
          "the codec allows a separation that decodes latents. A method can score above it "
          "where the codec is poor: DPS moves the latents to lower the mixture error, "
          "not to reconstruct, and Dirac's constrained stem is a waveform residual that "
          "bypasses the codec. Pairs with an empty true stem are left out ('scored pairs').")
