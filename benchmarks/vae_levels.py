r"""Where a SourceVAE's decoder loses level: per source, by frequency band and by how loud the
real frame is.

  python -m benchmarks.vae_levels --config=configs/study.py --workdir=runs/study \
      --vaes=runs/study,runs/vlev_gan --plot=vae_levels.png

`--mode=evaluate_vae` reports one number per source, the median over chunks of the
reconstruction's level minus the real one's. This splits that loss so that its cause can be
told apart: a decoder that smears or misses transients loses its level in the loudest frames
(a drum hit) and keeps the quiet ones; one whose loss cannot represent noise-like spectra
loses level in the high bands at every loudness; one that only blurs the fine structure
keeps the band energies.

For each of `--vaes` (a workdir, its vae/ folder or a checkpoint folder), the real chunks of
`--split` of the config's dataset (`--max_chunks` of them, seeded as the evaluation samples
them) are reconstructed (posterior mean, then decode) and, per source over its audible
chunks, printed:

  all          the pooled energy of the reconstructions over the real one's, in dB
  band LO-HI   the same within a frequency band (Hann STFT, 2048 / 512)
  loudness qK  the same within the real frames (1024 samples) of the K-th quintile of real
               frame energy among the source's frames (q5: its loudest fifth)

`--plot` draws the bands and quintiles per source and VAE. The numbers belong in
benchmarks/RESULTS.md with the machine, the command and the commit.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np

from msldm_jax import stems as stems_lib
from msldm_jax.evaluation import music_metrics
from msldm_jax.evaluation import reference_set
from msldm_jax.evaluation import vae_quality
from msldm_jax.models import loading

# Band edges in Hz: sub-bass and bass, low and high mids, presence, air.
BAND_EDGES = (0.0, 100.0, 300.0, 1000.0, 3000.0, 8000.0, stems_lib.SAMPLE_RATE / 2)
N_FFT, HOP = 2048, 512
FRAME = 1024
QUINTILES = 5


def _power_spectrogram(audio: np.ndarray) -> np.ndarray:
  """[..., samples] -> [..., frames, N_FFT // 2 + 1] |STFT|² (Hann, hop HOP, not centred)."""
  frames = (audio.shape[-1] - N_FFT) // HOP + 1
  index = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
  windowed = audio[..., index] * np.hanning(N_FFT).astype(np.float32)
  return np.abs(np.fft.rfft(windowed, axis=-1)) ** 2


def _ratio_db(ours: float, theirs: float) -> float:
  with np.errstate(divide="ignore"):
    return float(10.0 * np.log10(ours / theirs)) if theirs > 0 else float("nan")


def band_changes(reconstructed: np.ndarray, real: np.ndarray) -> list[float]:
  """[n, samples] pairs -> per band of BAND_EDGES, pooled energy reconstructed over real, dB."""
  freqs = np.fft.rfftfreq(N_FFT, 1.0 / stems_lib.SAMPLE_RATE)
  ours, theirs = _power_spectrogram(reconstructed), _power_spectrogram(real)
  changes = []
  for low, high in zip(BAND_EDGES[:-1], BAND_EDGES[1:]):
    in_band = (freqs >= low) & (freqs < high if high < BAND_EDGES[-1] else freqs <= high)
    changes.append(_ratio_db(ours[..., in_band].sum(), theirs[..., in_band].sum()))
  return changes


def loudness_changes(reconstructed: np.ndarray, real: np.ndarray) -> list[float]:
  """[n, samples] pairs -> per quintile of real frame energy (quietest first), the pooled
  energy of the reconstruction's same frames over the real ones', dB."""
  frames = real.shape[-1] // FRAME
  shape = real.shape[:-1] + (frames, FRAME)
  theirs = np.sum(np.square(real[..., :frames * FRAME].reshape(shape), dtype=np.float64), -1)
  ours = np.sum(np.square(reconstructed[..., :frames * FRAME].reshape(shape),
                          dtype=np.float64), -1)
  theirs, ours = theirs.ravel(), ours.ravel()
  edges = np.quantile(theirs, np.linspace(0.0, 1.0, QUINTILES + 1))
  bucket = np.clip(np.searchsorted(edges, theirs, side="right") - 1, 0, QUINTILES - 1)
  return [_ratio_db(ours[bucket == k].sum(), theirs[bucket == k].sum())
          for k in range(QUINTILES)]


def level_profile(reconstructed: np.ndarray, real: np.ndarray,
                  sources: tuple[str, ...]) -> dict[str, dict[str, list[float] | float]]:
  """[n, sources, samples] pairs -> {source: {"all", "bands", "loudness"}} over the chunks
  where the real source is audible (music_metrics' silence rule)."""
  audible = ~music_metrics.is_silent(real)
  profile = {}
  for i, name in enumerate(sources):
    keep = audible[:, i]
    if not keep.any():
      continue
    ours, theirs = reconstructed[keep, i], real[keep, i]
    profile[name] = {
        "all": _ratio_db(np.sum(np.square(ours, dtype=np.float64)),
                         np.sum(np.square(theirs, dtype=np.float64))),
        "bands": band_changes(ours, theirs),
        "loudness": loudness_changes(ours, theirs),
    }
  return profile


def band_labels() -> list[str]:
  return [f"{low / 1000:g}-{high / 1000:g} kHz"
          for low, high in zip(BAND_EDGES[:-1], BAND_EDGES[1:])]


def plot(path: str, profiles: dict[str, dict]):
  from msldm_jax import plotting  # pylint: disable=g-import-not-at-top
  plt = plotting.plt
  sources = list(next(iter(profiles.values())))
  figure, axes = plt.subplots(2, len(sources), figsize=(4.2 * len(sources), 6.4),
                              squeeze=False, sharey="row")
  for column, name in enumerate(sources):
    for label, profile in profiles.items():
      if name not in profile:
        continue
      axes[0, column].plot(band_labels(), profile[name]["bands"], marker="o", label=label)
      axes[1, column].plot([f"q{k + 1}" for k in range(QUINTILES)], profile[name]["loudness"],
                           marker="o", label=label)
    axes[0, column].set_title(name)
    axes[0, column].tick_params(axis="x", labelrotation=45)
    for row in (0, 1):
      axes[row, column].axhline(0.0, color="grey", linewidth=0.8)
  axes[0, 0].set_ylabel("band energy, reconstructed − real (dB)")
  axes[1, 0].set_ylabel("by real frame loudness (dB)")
  axes[1, 0].legend(fontsize=7)
  figure.tight_layout()
  plotting.save_figure(figure, path, dpi=110)
  print(f"plot: {path}")


def _define_flags() -> None:
  """Defined only when run as a script: the tests import this module beside msldm_jax.main,
  whose --config and --workdir would otherwise be defined twice."""
  config_flags.DEFINE_config_file("config", "configs/study.py",
                                  "The config whose dataset the chunks come from.")
  flags.DEFINE_string("workdir", "runs/study", "The workdir holding the dataset.")
  flags.DEFINE_string("vaes", None, "Comma-separated SourceVAE paths (stems' VAEs).",
                      required=True)
  flags.DEFINE_string("split", "test", "Split(s) of real chunks, joined by '+'.")
  flags.DEFINE_integer("max_chunks", 64, "At most this many chunks.")
  flags.DEFINE_integer("seed", 0, "Seeds the choice of chunks.")
  flags.DEFINE_string("plot", "", "A PNG of the bands and quintiles per source.")


def main(argv):
  del argv
  options = flags.FLAGS
  workdir = os.path.abspath(options.workdir)
  sources = tuple(stems_lib.STEM_NAMES)
  real, split_chunks = reference_set.read_reference_chunks(
      options.config, workdir, options.split, options.max_chunks, options.seed)
  print(f"{len(real)} of {split_chunks} chunks of {options.split} from {workdir}", flush=True)
  profiles = {}
  for path in (p.strip() for p in options.vaes.split(",") if p.strip()):
    vae = loading.load_vae(path)
    reconstructed = vae_quality.reconstruct(vae, real, sources)
    label = f"{path} (step {vae.identity.get('step')})"
    profiles[label] = level_profile(reconstructed, real, sources)
    print(f"  reconstructed with {label}", flush=True)
  columns = (["all"] + band_labels()
             + [f"loudness q{k + 1}" for k in range(QUINTILES)])
  print("\nReconstructed energy over real energy, pooled over the audible chunks (dB); "
        "quintiles of the real frames' energy, q1 the quietest\n")
  print("| VAE | source | " + " | ".join(columns) + " |")
  print("|---|---|" + "---|" * len(columns))
  for label, profile in profiles.items():
    for name, row in profile.items():
      cells = [row["all"], *row["bands"], *row["loudness"]]
      print(f"| {label} | {name} | " + " | ".join(f"{c:+.1f}" for c in cells) + " |")
  if options.plot:
    plot(options.plot, profiles)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
