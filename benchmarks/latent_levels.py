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
euler_churn:150:s_churn=0 for the release's sampler without churn. `--weights=ema,raw` samples
with the EMA parameters (what generation uses) and with the trainer's last ones, side by side.

Where the energy goes, frame by frame: each latent frame's squared distance from the real
frames' mean (per stem, over its channels); printed are the share of sampled frames closer
than the real frames' 10th percentile (collapse towards the mean frame) and the sampled 50th
and 90th percentiles over the real ones (a missing loud tail). With `--samples`, the same for
the pieces a `--mode=sample` run wrote (each piece's latents.npy, in the denoiser's scale),
instead of sampling: `--samples=runs/study/systems/msldm/samples` scores the study's pieces.

Why the samples lose energy, read from the network instead of its samples (`--calibration`):
at each noise level of training's loss buckets, per stem, on the same held-out latents x with
noise n, the denoiser's estimate D = D(x + σn; σ) and

  gain    <x, D> / <D, D> in dB: the scale that would bring D closest to x. The posterior
          mean E[x | x + σn] has gain 0 dB at every σ, and so does the conditional mean on
          any part of the input, so a well-trained but under-informed network still reads 0.
          Above 0, the network shrinks its estimate more than any conditional mean does (an
          EMA of a still-moving network, or a bias towards 0); the sampler compounds that
          over its steps into quiet samples.
  energy  <D, D> / <x, x> in dB: how much of the clean energy the estimate carries. Below
          0 by nature (more so at large σ); with gain at 0 dB the missing energy is what the
          network does not know, which the sampler also turns into quiet samples (a
          denoiser that always answers the mean frame collapses every sample onto it).

Where on the way down the energy goes (`--from_sigmas=0.3,1`): the first `--pieces` held-out
chunks x, noised to σ_s (x + σ_s·n) and sampled back from there with each sampler (its
schedule from σ_s instead of σ_max, the same step count), against those chunks. At σ_max the
start is noise and this is total generation; at small σ_s the chunk's structure is still
there. A σ_s from which the levels stay is one whose decisions the network makes right; the
first σ_s from which they fall brackets where it loses the loud frames.

Prints a markdown table; the numbers belong in benchmarks/RESULTS.md with the machine, the
command and the commit.
"""

import functools
import glob
import os
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax import joint_latent
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.evaluation import latent_dependence
from msldm_jax.evaluation import music_metrics
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
_WEIGHTS = flags.DEFINE_list(
    "weights", ["ema"], "Which parameters sample: 'ema' (what generation uses), 'raw' (the "
    "trainer's last step), or both: an EMA of a network still moving fast can shrink it.")
_CALIBRATION = flags.DEFINE_bool(
    "calibration", False, "Also the denoiser's calibration per noise level on the held-out "
    "latents: the gain that would bring its estimate closest to the clean latent, and the "
    "estimate's energy over the clean one's (see the module's doc).")
_FROM_SIGMAS = flags.DEFINE_list(
    "from_sigmas", [], "Also sample back from the held-out chunks noised to each of these "
    "σ (see the module's doc).")
_SAMPLES = flags.DEFINE_string("samples", "", "With one denoiser: score the pieces in this "
                               "samples folder (piece_*/latents.npy) instead of sampling.")


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
  per_stem = np.moveaxis(np.asarray(latents), 1, 0).reshape(latents.shape[1], -1)
  return music_metrics.levels_db(per_stem)


def _frames(latents: np.ndarray, stem: int) -> np.ndarray:
  """[n, S, D, T] -> stem's frames [n·T, D]."""
  return np.moveaxis(latents[:, stem], 1, 2).reshape(-1, latents.shape[2])


def frame_spread(generated: np.ndarray, real: np.ndarray) -> np.ndarray:
  """[n, S, D, T] sampled and real latents -> [S, 3]: per stem, the share of sampled frames
  whose squared distance from the real frames' mean is below the real frames' 10th
  percentile, and the sampled 50th and 90th percentiles over the real ones."""
  rows = []
  for stem in range(real.shape[1]):
    real_frames = _frames(real, stem)
    mean = real_frames.mean(axis=0)
    ours, theirs = (np.sum(np.square(frames - mean, dtype=np.float64), axis=1)
                    for frames in (_frames(generated, stem), real_frames))
    p10, p50, p90 = np.percentile(theirs, [10, 50, 90])
    rows.append([np.mean(ours < p10), np.percentile(ours, 50) / p50,
                 np.percentile(ours, 90) / p90])
  return np.asarray(rows)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_sources", "sigma_data"))
def _calibration_sums(params, x_bct, noise_bct, weight_b, sigma, *, apply_fn,
                      num_sources: int, sigma_data: float):
  """Per stem, the batch's weighted sums of <x, D> and <D, D> at one σ: [2, S]."""
  denoised = edm.denoise(apply_fn, params, x_bct + sigma * noise_bct, sigma,
                         sigma_data=sigma_data).astype(jnp.float32)
  x = joint_latent.split_sources(x_bct, num_sources)
  d = joint_latent.split_sources(denoised, num_sources)
  per_row = jnp.stack([jnp.sum(x * d, axis=(2, 3)), jnp.sum(d * d, axis=(2, 3))])
  return jnp.sum(per_row * weight_b[None, :, None], axis=1)


def calibration(denoiser: loading.Loaded, latents_nsct: np.ndarray, *,
                sigmas=latent_dependence.SIGMAS, noise_draws: int = 2, batch_size: int = 16,
                seed: int = 0, sigma_data: float = edm.SIGMA_DATA) -> np.ndarray:
  """[len(sigmas), S, 2]: per σ and stem, the gain <x, D>/<D, D> and the energy
  <D, D>/<x, x> of the denoised estimates of `latents_nsct` (the denoiser's scale), in dB."""
  latents_nsct = np.asarray(latents_nsct, np.float32)
  count, num_sources = latents_nsct.shape[:2]
  sums = np.zeros((len(sigmas), 2, num_sources))
  key = jax.random.key(seed)
  for start in range(0, count, batch_size):
    rows = np.arange(start, min(start + batch_size, count))
    # One compiled program for every batch: the last one padded, its padding weighted 0.
    x = jnp.asarray(joint_latent.stack_sources(latents_nsct[np.resize(rows, batch_size)]))
    weight = jnp.asarray(np.arange(batch_size) < len(rows), jnp.float32)
    for i, sigma in enumerate(sigmas):
      for draw in range(noise_draws):
        noise = jax.random.normal(jax.random.fold_in(key, (start * len(sigmas) + i)
                                                     * noise_draws + draw), x.shape)
        sums[i] += np.asarray(_calibration_sums(
            denoiser.params, x, noise, weight, jnp.float32(sigma),
            apply_fn=denoiser.module.apply, num_sources=num_sources,
            sigma_data=float(sigma_data)), np.float64) / noise_draws
  clean = np.sum(np.square(latents_nsct, dtype=np.float64), axis=(0, 2, 3))
  with np.errstate(divide="ignore", invalid="ignore"):
    gain = 20.0 * np.log10(sums[:, 0] / sums[:, 1])
    energy = 10.0 * np.log10(sums[:, 1] / clean[None])
  return np.stack([gain, energy], axis=-1)


def read_samples(directory: str, shape: tuple[int, ...]) -> np.ndarray:
  """The latents.npy of every piece_* in a samples folder, [n, *shape]."""
  paths = sorted(glob.glob(os.path.join(directory, "piece_*", "latents.npy")))
  if not paths:
    raise app.UsageError(f"--samples={directory}: no piece_*/latents.npy in it")
  latents = np.stack([np.load(path) for path in paths])
  if latents.shape[1:] != (shape[0] * shape[1],) + shape[2:]:
    raise app.UsageError(f"--samples={directory}: latents of shape {latents.shape[1:]}, the "
                         f"denoiser's store has {shape}")
  return latents.reshape((len(paths),) + shape)


def sample_latents(denoiser: loading.Loaded, name: str, settings: dict, pieces: int,
                   seed: int, shape: tuple[int, ...]) -> np.ndarray:
  """`pieces` total generations [pieces, channels, frames] in the denoiser's scale."""
  denoise_fn = generation_program.sampling_denoise_fn(denoiser.module, denoiser.params, name,
                                                      settings)
  sample = samplers.get_sampler(name, settings)
  keys = generation_program.piece_keys(seed, range(pieces))
  one_piece = lambda key: sample(denoise_fn, key, (1,) + shape)[0]  # noqa: E731
  return np.asarray(jax.jit(jax.vmap(one_piece))(keys))


def restart_latents(denoiser: loading.Loaded, name: str, settings: dict,
                    real_nsct: np.ndarray, sigma: float, seed: int) -> np.ndarray:
  """The chunks `real_nsct` noised to `sigma` and sampled back from there (the sampler's
  schedule from `sigma`), [n, s, c, t] in the denoiser's scale."""
  count, shape = len(real_nsct), (real_nsct.shape[1] * real_nsct.shape[2], real_nsct.shape[3])
  denoise_fn = generation_program.sampling_denoise_fn(denoiser.module, denoiser.params, name,
                                                      settings)
  sample = samplers.get_sampler(name, {**settings, "sigma_max": float(sigma)})
  keys = generation_program.piece_keys(seed, range(count))
  start = (real_nsct.reshape((count,) + shape) + sigma * np.asarray(jax.random.normal(
      jax.random.key(seed), (count,) + shape), np.float32)).astype(np.float32)
  one_piece = lambda key, x: sample(denoise_fn, key, None, x_init=x[None])[0]  # noqa: E731
  return np.asarray(jax.jit(jax.vmap(one_piece))(keys, start)).reshape(real_nsct.shape)


def _print_calibration(calibrations, sources) -> None:
  print("\nThe denoiser's estimates of the held-out latents: gain <x, D>/<D, D> (0 dB for any "
        "conditional mean; above 0, an estimate shrunk more than that) / energy <D, D>/<x, x>, "
        f"dB; seed {_SEED.value}\n")
  print("| denoiser | σ | " + " | ".join(f"{s} gain / energy" for s in sources) + " |")
  print("|---|---|" + "---|" * len(sources))
  for path, weight, table in calibrations:
    for sigma, per_stem in zip(latent_dependence.SIGMAS, table):
      print(f"| {path} ({weight}) | {sigma:.3g} | " + " | ".join(
          f"{gain:+.2f} / {energy:+.1f}" for gain, energy in per_stem) + " |")


def main(argv):
  del argv
  runs = [parse_sampler(text) for text in _SAMPLERS.value.split(",") if text.strip()]
  splits = reference_set.split_names(_SPLITS.value, "--splits")
  paths = [p.strip() for p in _DENOISERS.value.split(",") if p.strip()]
  if _SAMPLES.value and len(paths) != 1:
    raise app.UsageError("--samples scores one run's pieces: give one --denoisers path, the "
                         "denoiser that sampled them")
  weights = [w.strip() for w in _WEIGHTS.value if w.strip()]
  if not weights or set(weights) - {"ema", "raw"}:
    raise app.UsageError(f"--weights={','.join(_WEIGHTS.value)}: expected ema, raw or both")
  if _SAMPLES.value and weights != ["ema"]:
    raise app.UsageError("--samples scores pieces already sampled: leave --weights out")
  try:
    from_sigmas = [float(text) for text in _FROM_SIGMAS.value if text.strip()]
  except ValueError as error:
    raise app.UsageError(f"--from_sigmas={','.join(_FROM_SIGMAS.value)}: {error}") from error
  if any(sigma <= 0 for sigma in from_sigmas):
    raise app.UsageError(f"--from_sigmas={','.join(_FROM_SIGMAS.value)}: every σ must be > 0")
  if from_sigmas and _SAMPLES.value:
    raise app.UsageError("--from_sigmas samples, --samples scores pieces already sampled: "
                         "give one of them")
  rows, calibrations = [], []
  for path, weight in ((p, w) for p in paths for w in weights):
    denoiser = loading.load_denoiser(path, use_ema=weight == "ema")
    real, sources = latent_dependence.held_out_latents(denoiser, splits)
    real_db = levels_db(real)
    print(f"{path} (step {denoiser.identity.get('step')}): {len(real)} held-out chunks, "
          "real RMS dB " + ", ".join(f"{s} {v:.1f}" for s, v in zip(sources, real_db)),
          flush=True)
    if _SAMPLES.value:
      generated = {f"the pieces in {_SAMPLES.value}": read_samples(_SAMPLES.value,
                                                                    real.shape[1:])}
    else:
      generated = {}
      for name, settings in runs:
        start = time.perf_counter()
        latents = sample_latents(denoiser, name, settings, _PIECES.value, _SEED.value,
                                 (real.shape[1] * real.shape[2], real.shape[3]))
        label = (f"{name} " + ", ".join(f"{k}={v:g}" for k, v in settings.items())
                 + ("" if weights == ["ema"] else f", {weight} weights"))
        generated[label] = latents.reshape((len(latents),) + real.shape[1:])
        print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
    for label, latents in generated.items():
      rows.append((path, label, len(latents), levels_db(latents) - real_db,
                   frame_spread(latents, real)))
    chunks = real[:_PIECES.value]
    for sigma in from_sigmas:
      for name, settings in runs:
        start = time.perf_counter()
        latents = restart_latents(denoiser, name, settings, chunks, sigma, _SEED.value)
        label = (f"{name} " + ", ".join(f"{k}={v:g}" for k, v in settings.items())
                 + f", from the chunks at σ {sigma:g}"
                 + ("" if weights == ["ema"] else f", {weight} weights"))
        print(f"  {label}: {time.perf_counter() - start:.0f} s", flush=True)
        rows.append((path, label, len(latents), levels_db(latents) - levels_db(chunks),
                     frame_spread(latents, chunks)))
    if _CALIBRATION.value:
      calibrations.append((path, weight, calibration(denoiser, real, seed=_SEED.value)))
  if calibrations:
    _print_calibration(calibrations, sources)
  if not rows:
    return
  print("\nSampled latents' RMS against the held-out latents' (dB); frames: the share below "
        "the real 10th percentile of distance from the real mean frame / sampled median and "
        f"90th percentile over the real ones; seed {_SEED.value}\n")
  print("| denoiser | pieces | " + " | ".join(f"{s} dB | {s} frames" for s in sources)
        + " |")
  print("|---|---|" + "---|---|" * len(sources))
  for path, label, count, difference, spread in rows:
    print(f"| {path} | {label} ({count}) | " + " | ".join(
        f"{d:+.1f} | {low:.2f} / {mid:.2f} / {high:.2f}"
        for d, (low, mid, high) in zip(difference, spread)) + " |")


if __name__ == "__main__":
  app.run(main)
