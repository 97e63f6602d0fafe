r"""How loud a denoiser's samples are in latents, per stem and sampler, against the real latents.

  python -m benchmarks.latent_levels --denoisers=runs/study/systems/msldm \
      --samplers=euler_churn:150,euler_churn:150:s_churn=0,heun:38,dpmpp_2m:50

A generated stem can be quiet for two reasons: the VAE's decoder plays even real latents
quiet (`--mode=evaluate_vae`'s level change), or the sampled latents carry less energy than
real ones. This measures the second, before any decoding: for each of `--denoisers` (a
workdir, its ldm/ folder or a checkpoint folder), `--pieces` total generations with each
sampler, per stem the RMS of the sampled latents over pieces, channels and frames, in dB
against the RMS of the held-out chunks of `--splits` of the latent store the denoiser trained
from, both in the denoiser's scale (`ldm.latent_scale`). The same seeds for every sampler.

Each of `--samplers` is NAME:STEPS, then optional :KEY=VALUE sampler settings (numbers), e.g.
euler_churn:150:s_churn=0 for the release's sampler without churn.

Prints a markdown table; the numbers belong in benchmarks/RESULTS.md with the machine, the
command and the commit.
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.evaluation import latent_dependence
from msldm_jax.evaluation import reference_set
from msldm_jax.models import loading

_DENOISERS = flags.DEFINE_string("denoisers", None, "Comma-separated denoiser paths.",
                                 required=True)
_SAMPLERS = flags.DEFINE_string(
    "samplers", "euler_churn:150,euler_churn:150:s_churn=0,heun:38,dpmpp_2m:50",
    "Comma-separated NAME:STEPS[:KEY=VALUE...] sampler runs.")
_PIECES = flags.DEFINE_integer("pieces", 16, "Pieces per denoiser and sampler.")
_SPLITS = flags.DEFINE_string("splits", "validation+test",
                              "Held-out splits of the latent store, joined by '+'.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the pieces (the same for every sampler).")


def parse_sampler(text: str) -> tuple[str, dict]:
  """'NAME:STEPS[:KEY=VALUE...]' -> (name, settings), checked against the samplers."""
  name, *fields = text.strip().split(":")
  if name not in samplers.SAMPLERS or not fields:
    raise app.UsageError(f"--samplers entry {text!r}: expected NAME:STEPS[:KEY=VALUE...] "
                         f"with NAME one of {', '.join(samplers.SAMPLERS)}")
  settings = {"num_steps": int(fields[0])}
  for field in fields[1:]:
    key, _, value = field.partition("=")
    if not value:
      raise app.UsageError(f"--samplers entry {text!r}: {field!r} is not KEY=VALUE")
    settings[key] = float(value)
  return name, settings


def levels_db(latents: np.ndarray) -> np.ndarray:
  """[n, S, D, T] -> per stem RMS over pieces, channels and frames, in dB."""
  return 20.0 * np.log10(np.sqrt(np.mean(np.square(latents, dtype=np.float64),
                                         axis=(0, 2, 3))))


def sample_latents(denoiser: loading.Loaded, name: str, settings: dict, pieces: int,
                   seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """`pieces` total generations [pieces, channels, frames] in the denoiser's scale."""
  denoise_fn = generation_program.sampling_denoise_fn(denoiser.module, denoiser.params, name,
                                                      settings)
  sample = samplers.get_sampler(name, settings)
  keys = generation_program.piece_keys(seed, range(pieces))
  one_piece = lambda key: sample(denoise_fn, key, (1,) + shape)[0]  # noqa: E731
  return np.asarray(jax.jit(jax.vmap(one_piece))(keys))


def main(argv):
  del argv
  runs = [parse_sampler(text) for text in _SAMPLERS.value.split(",") if text.strip()]
  splits = reference_set.split_names(_SPLITS.value, "--splits")
  rows = []
  for path in [p.strip() for p in _DENOISERS.value.split(",") if p.strip()]:
    denoiser = loading.load_denoiser(path)
    real, sources = latent_dependence.held_out_latents(denoiser, splits)
    real_db = levels_db(real)
    print(f"{path} (step {denoiser.identity.get('step')}): {len(real)} held-out chunks, "
          "real RMS dB " + ", ".join(f"{s} {v:.1f}" for s, v in zip(sources, real_db)),
          flush=True)
    for name, settings in runs:
      start = time.perf_counter()
      latents = sample_latents(denoiser, name, settings, _PIECES.value, _SEED.value,
                               (real.shape[1] * real.shape[2], real.shape[3]))
      generated_db = levels_db(latents.reshape((len(latents),) + real.shape[1:]))
      label = f"{name} " + ", ".join(f"{k}={v:g}" for k, v in settings.items())
      rows.append((path, label, generated_db - real_db))
      print(f"  {label}: " + ", ".join(f"{s} {d:+.1f} dB" for s, d in
                                       zip(sources, generated_db - real_db))
            + f" ({time.perf_counter() - start:.0f} s)", flush=True)
  print(f"\nSampled latents' RMS against the held-out latents' (dB), {_PIECES.value} pieces "
        f"each, seed {_SEED.value}\n")
  print("| denoiser | sampler | " + " | ".join(sources) + " |")
  print("|---|---|" + "---|" * len(sources))
  for path, label, difference in rows:
    print(f"| {path} | {label} | " + " | ".join(f"{d:+.1f}" for d in difference) + " |")


if __name__ == "__main__":
  app.run(main)
