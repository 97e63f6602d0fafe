r"""The study's control: a dependence between the stems, planted in synthetic latents, that each
of the study's stem systems is trained on as on the real latents (the same trainer, network,
time budget clock and sampler). Its pieces show whether a system can learn a dependence it is
shown, apart from whatever the VAE and the data leave learnable.

  python -m msldm_jax.main --config=configs/study.py --workdir=runs/study --mode=control

`--mode=study` runs it as its first step. WORKDIR/control/ holds the planted store
(latents/), one trainer workdir per system (NAME/ldm/) and the scores (control.json,
control.md, control.png: the stems' coordinates against the bass's).

The planted latents have the study's shape [stems, latent_dim, frames]. Their frames are cut
into `study.control_segments` segments. In each segment every stem k is s·a·u_k plus a little
white noise: u_k is a fixed unit vector over stem k's channels, a = σ_data·√latent_dim (an
element's RMS is then about σ_data) and the sign s = ±1 is drawn per chunk and segment and is
the same for all four stems. Each stem alone is fair, independent signs per segment, whether
or not the stems are tied: a model of each stem alone (isldm) can learn every marginal and
nothing more. A piece is read by projecting each stem's segments onto its u_k (the
coordinates, ±1 on the data):

- agreement: the share of stem pairs and segments whose signs agree. 1 on the data, 0.5 for
  stems drawn independently: the learned dependence.
- partial agreement: bass and drums given (held-out planted chunks), guitar and piano
  generated; the share of generated segments whose sign is the given stems'. 1 for a model
  that learned the dependence, 0.5 for one that generates the missing stems alone.
- |frame coordinate| (median over every frame's projection; 1 on the data): whether each
  frame has the data's level, even where a segment's frames disagree in sign.
- |coordinate| (median; 1 on the data, near 0 for a blur between the two signs), the
  spread over segments (the median over pieces and stems of the coordinates' standard
  deviation across a piece's segments: about 0.9 on the data, 0 for a piece without the
  segments' structure, e.g. one level throughout) and the share of positive signs (0.5 on
  the data): whether the marginals were learned.
"""

import functools
import os
import shutil
from collections.abc import Sequence

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from msldm_jax import atomic_files
from msldm_jax import joint_latent
from msldm_jax import paper_config
from msldm_jax import stems as stems_lib
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.latents import store
from msldm_jax.models import loading
from msldm_jax.study import runner
from msldm_jax.training import train_ldm

CONTROL_DIR = "control"
LATENTS_DIR = "latents"
RESULTS_FILE = "control.json"
TABLE_FILE = "control.md"
PLOT_FILE = "control.png"
# The row of the held-out planted chunks themselves: what a model that learned it all scores.
DATA_ROW = "planted data"
# Partial generation: these stems given, the others generated.
GIVEN_STEMS = ("bass", "drums")
NOISE_SHARE = 0.1  # The white noise's RMS, as a share of σ_data.
PROFILE_SEED = 1234  # The stems' fixed channel vectors u_k.
TRAIN_SPLIT, HELD_OUT_SPLIT = "train", "test"
# The intervals' bootstrap draws: the control's own, so that changing the evaluation's
# settings does not re-run it.
BOOTSTRAP_SAMPLES = 1000


def control_dir(workdir: str) -> str:
  return os.path.join(workdir, CONTROL_DIR)


def profiles(num_stems: int, latent_dim: int) -> np.ndarray:
  """The stems' fixed unit vectors u_k over their channels, [stems, latent_dim]."""
  u = np.random.default_rng(PROFILE_SEED).normal(size=(num_stems, latent_dim))
  return (u / np.linalg.norm(u, axis=1, keepdims=True)).astype(np.float32)


def segment_index(frames: int, segments: int) -> np.ndarray:
  """The segment of each frame, [frames]: `segments` runs of (nearly) equal length."""
  if not 1 <= segments <= frames:
    raise ValueError(f"config key study.control_segments={segments}: between 1 and the "
                     f"latents' {frames} frames")
  return np.arange(frames) * segments // frames


def planted_latents(num_chunks: int, num_stems: int, latent_dim: int, frames: int,
                    segments: int, sigma_data: float, seed: int,
                    dependent: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """Latents [n, stems, latent_dim, frames] and their signs [n, stems, segments].

  With `dependent`, every stem of a chunk has the chunk's signs; without, each stem draws its
  own (the same marginals, no dependence: what an independent model's pieces look like).
  """
  rng = np.random.default_rng(seed)
  sign_shape = (num_chunks, 1 if dependent else num_stems, segments)
  signs = np.broadcast_to(rng.choice([-1.0, 1.0], size=sign_shape),
                          (num_chunks, num_stems, segments))
  amplitude = sigma_data * np.sqrt(latent_dim)
  per_frame = signs[:, :, segment_index(frames, segments)]  # [n, stems, frames]
  latents = amplitude * profiles(num_stems, latent_dim)[None, :, :, None] * per_frame[
      :, :, None, :]
  latents = latents + rng.normal(0.0, NOISE_SHARE * sigma_data, latents.shape)
  return latents.astype(np.float32), np.ascontiguousarray(signs, np.float32)


def frame_coordinates(latents: np.ndarray, sigma_data: float) -> np.ndarray:
  """Each stem's projection on its u_k per frame, in units of the planted amplitude:
  [n, stems, frames], ±1 (up to the noise) on the planted data."""
  latents = np.asarray(latents, np.float64)
  _, num_stems, latent_dim, _ = latents.shape
  projected = np.einsum("nsdt,sd->nst", latents, profiles(num_stems, latent_dim))
  return projected / (sigma_data * np.sqrt(latent_dim))


def coordinates(latents: np.ndarray, segments: int, sigma_data: float) -> np.ndarray:
  """Each stem's mean frame coordinate per segment: [n, stems, segments], ±1 on the planted
  data."""
  per_frame = frame_coordinates(latents, sigma_data)
  index = segment_index(per_frame.shape[-1], segments)
  return np.stack([per_frame[:, :, index == j].mean(axis=-1) for j in range(segments)],
                  axis=-1)


def agreement_per_piece(coords: np.ndarray) -> np.ndarray:
  """Per piece, the share of stem pairs and segments whose signs agree, [n]."""
  signs = np.sign(coords)
  num_stems = signs.shape[1]
  pairs = [(i, j) for i in range(num_stems) for j in range(i + 1, num_stems)]
  return np.mean([signs[:, i] == signs[:, j] for i, j in pairs], axis=(0, 2))


def partial_agreement_per_piece(coords: np.ndarray, given: Sequence[int]) -> np.ndarray:
  """Per piece, the share of generated stems' segments whose sign is the first given stem's
  (the given stems share their signs), [n]."""
  signs = np.sign(coords)
  generated = [k for k in range(signs.shape[1]) if k not in given]
  return np.mean(signs[:, generated] == signs[:, given[0]][:, None], axis=(1, 2))


def mean_with_interval(values: np.ndarray, bootstrap_samples: int, confidence: float,
                       seed: int) -> dict[str, float]:
  """The mean of per-piece values and its percentile bootstrap interval over pieces."""
  values = np.asarray(values, np.float64)
  draws = np.random.default_rng(seed).integers(0, len(values),
                                                (bootstrap_samples, len(values)))
  means = values[draws].mean(axis=1)
  tail = 100.0 * (1.0 - confidence) / 2.0
  return {"value": float(values.mean()), "low": float(np.percentile(means, tail)),
          "high": float(np.percentile(means, 100.0 - tail))}


def scores(total: np.ndarray, partial: np.ndarray, given: Sequence[int], *,
           bootstrap_samples: int, confidence: float, seed: int,
           total_frames: np.ndarray | None = None) -> dict:
  """The control's scores of total-generation and partial-generation coordinates; with
  `total_frames` (total generation's `frame_coordinates`) also the median |frame
  coordinate|: 1 when each frame has the data's level, whether or not a segment's frames
  share their sign (the median |coordinate| is 1 only when they do)."""
  interval = functools.partial(mean_with_interval, bootstrap_samples=bootstrap_samples,
                               confidence=confidence, seed=seed)
  frames = ({} if total_frames is None else
            {"median_abs_frame_coordinate": float(np.median(np.abs(total_frames)))})
  return {"agreement": interval(agreement_per_piece(total)),
          "partial_agreement": interval(partial_agreement_per_piece(partial, given)),
          **frames,
          "median_abs_coordinate": float(np.median(np.abs(total))),
          "segment_spread": float(np.median(np.std(total, axis=-1))),
          "positive_share": float(np.mean(total > 0)),
          "num_pieces": int(total.shape[0])}


@functools.partial(jax.jit, static_argnames=("denoiser", "sampler_name", "settings",
                                             "sigma_data", "given"))
def _sample(params, keys, x_known, *, denoiser, sampler_name, settings, sigma_data, given):
  """Joint latents [batch, stems·latent, frames] at σ = 0, one per key; the stems in `given`
  (indices) kept at x_known's. The sampler and denoise_fn are generation's own."""
  sample = samplers.get_sampler(sampler_name, dict(settings))
  denoise_fn = generation_program.sampling_denoise_fn(denoiser, params, sampler_name,
                                                      dict(settings), sigma_data=sigma_data)
  shape = (1,) + x_known.shape[1:]
  num_stems = stems_lib.NUM_STEMS
  mask = joint_latent.source_mask(list(given), shape[1] // num_stems, num_stems)

  def one_piece(key, known):
    inpaint = samplers.Inpaint(known[None], mask) if given else None
    return sample(denoise_fn, key, shape, inpaint=inpaint)[0]

  return jax.vmap(one_piece)(keys, x_known)


def sample_latents(denoiser: loading.Loaded, sample_config: ml_collections.ConfigDict,
                   sigma_data: float, known: np.ndarray, given: Sequence[int],
                   seed: int) -> np.ndarray:
  """One piece per row of `known` [n, stems, latent_dim, frames] (the stored latents' scale),
  its `given` stems kept; returns [n, stems, latent_dim, frames] in the same scale."""
  name, settings = generation_program.sampler_settings(sample_config)
  scale = loading.latent_scale(denoiser)
  batch_size = int(sample_config.batch_size)
  out = []
  for start in range(0, len(known), batch_size):
    rows = known[start:start + batch_size]
    keys = generation_program.piece_keys(seed, list(range(start, start + len(rows))))
    x_known = joint_latent.stack_sources(joint_latent.unscale_sources(jnp.asarray(rows),
                                                                      scale))
    latents = _sample(denoiser.params, keys, x_known, denoiser=denoiser.module,
                      sampler_name=name, settings=tuple(sorted(settings.items())),
                      sigma_data=float(sigma_data), given=tuple(given))
    out.append(np.asarray(joint_latent.scale_sources(
        joint_latent.split_sources(latents, rows.shape[1]), scale)))
    logging.info("control: sampled %d of %d pieces", start + len(rows), len(known))
  return np.concatenate(out)


def stem_systems(config: ml_collections.ConfigDict) -> list[str]:
  """The study's systems that model the stems (mixldm has none to relate)."""
  return [name for name in runner.study_systems(config)
          if paper_config.latent_sources(runner.system_config(config, "", name))
          == stems_lib.STEM_NAMES]


def latent_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """[stems, latent_dim, frames] of the study's joint latents, from the config alone."""
  from msldm_jax.models import source_vae  # pylint: disable=g-import-not-at-top
  frames = source_vae.encoded_length(int(config.data.chunks.samples),
                                     config.vae.model.encoder_strides)
  return stems_lib.NUM_STEMS, int(config.vae.model.latent_dim), int(frames)


def write_store(config: ml_collections.ConfigDict, directory: str) -> dict:
  """The planted store at DIRECTORY (kept when it holds the same settings)."""
  num_stems, latent_dim, frames = latent_shape(config)
  settings = {"planted": {"segments": int(config.study.control_segments),
                          "noise_share": NOISE_SHARE, "profile_seed": PROFILE_SEED,
                          "sigma_data": float(config.ldm.sigma_data),
                          "train_chunks": int(config.study.control_chunks),
                          "held_out_chunks": int(config.study.control_pieces)}}
  manifest = store.read_manifest(directory)
  if manifest is not None and manifest.get("status") == store.STATUS_COMPLETE:
    if manifest["settings"] != settings or manifest["shape"] != [num_stems, latent_dim,
                                                                   frames]:
      raise ValueError(f"the planted store at {directory} was made under other settings "
                       f"({manifest['settings']}, shape {manifest['shape']}): delete it "
                       "to make it again")
    return manifest
  if manifest is not None:  # A write that was killed: the store is cheap to make again.
    shutil.rmtree(directory)
  planted = settings["planted"]
  splits = {}
  for seed, (split, count) in enumerate(((TRAIN_SPLIT, planted["train_chunks"]),
                                         (HELD_OUT_SPLIT, planted["held_out_chunks"]))):
    splits[split], _ = planted_latents(count, num_stems, latent_dim, frames,
                                       planted["segments"], planted["sigma_data"], seed)
  return store.write_latents(
      directory, splits, settings=settings,
      vae_identity={"checkpoint_dir": "", "step": 0, "params_sha256": "planted"})


def system_config(config: ml_collections.ConfigDict, workdir: str,
                  name: str) -> ml_collections.ConfigDict:
  """System `name`'s study config, trained on the planted store for `study.control_seconds`
  (no VAE: nothing is decoded)."""
  derived = runner.system_config(config, workdir, name)
  derived.ldm.latents_dir = os.path.join(control_dir(workdir), LATENTS_DIR)
  derived.ldm.vae_checkpoint = ""
  derived.ldm.train.sample_every = 0
  derived.ldm.train.max_seconds = float(config.study.control_seconds)
  return derived


def _number(value) -> str:
  # A column that results written by an earlier version lack.
  return "–" if value is None else f"{value:.2f}"


def interval_cell(score: dict) -> str:
  """"value [low, high]" of a mean with its interval."""
  return f"{score['value']:.3f} [{score['low']:.3f}, {score['high']:.3f}]"


def table(results: dict) -> list[str]:
  """The control's markdown table, a row per system and one for the planted data."""
  lines = ["| system | steps | agreement across stems (data 1, independent 0.5) | "
           "partial: generated with given (1 / 0.5) | median abs frame coordinate (data 1) "
           "| median abs coordinate (data 1) | spread over segments | positive share "
           "(data 0.5) |",
           "|---|---|---|---|---|---|---|---|"]
  for name, row in results["rows"].items():
    lines.append(f"| {name} | {row.get('steps', '')} | {interval_cell(row['agreement'])} | "
                 f"{interval_cell(row['partial_agreement'])} | "
                 f"{_number(row.get('median_abs_frame_coordinate'))} | "
                 f"{row['median_abs_coordinate']:.2f} | "
                 f"{_number(row.get('segment_spread'))} | {row['positive_share']:.2f} |")
  return lines


def plot(path: str, coords_by_row: dict[str, np.ndarray]):
  """One panel per row: each segment's bass coordinate against the other stems' (total
  generation). A dependence puts the points in the (+, +) and (−, −) quadrants; stems drawn
  apart fill all four."""
  from msldm_jax import plotting  # pylint: disable=g-import-not-at-top
  plt = plotting.plt
  figure, axes = plt.subplots(1, len(coords_by_row), figsize=(3.2 * len(coords_by_row), 3.2),
                              sharex=True, sharey=True, squeeze=False)
  for axis, (name, coords) in zip(axes[0], coords_by_row.items()):
    for stem in range(1, coords.shape[1]):
      axis.scatter(coords[:, 0].ravel(), coords[:, stem].ravel(), s=4, alpha=0.4,
                   label=stems_lib.STEM_NAMES[stem])
    axis.axhline(0, color="grey", lw=0.5)
    axis.axvline(0, color="grey", lw=0.5)
    axis.set_title(name)
    axis.set_xlabel("bass coordinate")
  axes[0][0].set_ylabel("other stem's coordinate")
  axes[0][-1].legend(loc="lower right", fontsize="small", markerscale=3)
  figure.tight_layout()
  plotting.save_figure(figure, path, dpi=100)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=control` stage: trains each stem system on the planted store (resuming),
  samples, scores; writes WORKDIR/control/control.{json,md} and returns the results."""
  if "study" not in config:
    raise ValueError("--mode=control needs a study config (config.study): "
                     "--config=configs/study.py")
  workdir = os.path.abspath(workdir)
  folder = control_dir(workdir)
  num_stems, _, _ = latent_shape(config)
  segments = int(config.study.control_segments)
  sigma_data = float(config.ldm.sigma_data)
  given = [stems_lib.stem_index(stem) for stem in GIVEN_STEMS]
  score = functools.partial(scores, given=given, bootstrap_samples=BOOTSTRAP_SAMPLES,
                            confidence=0.95, seed=int(config.sample.seed))
  store_dir = os.path.join(folder, LATENTS_DIR)
  # Several processes (a pod slice): one writes the store, every one trains (the trainer
  # shards across them) and samples the same pieces; one writes the scores.
  if jax.process_index() == 0:
    write_store(config, store_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("control store")
  held_out = store.LatentStore(store_dir, HELD_OUT_SPLIT).read_all()
  data = coordinates(held_out, segments, sigma_data)
  rows = {DATA_ROW: score(data, data, total_frames=frame_coordinates(held_out, sigma_data))}
  total_coords = {DATA_ROW: data}
  for name in stem_systems(config):
    derived, system_dir = system_config(config, workdir, name), os.path.join(folder, name)
    logging.info("control: training %s on the planted latents", name)
    train_ldm.run(derived, system_dir)
    denoiser = loading.load_denoiser(system_dir, use_ema=bool(derived.sample.use_ema))
    seed = int(derived.sample.seed)
    total = sample_latents(denoiser, derived.sample, sigma_data, np.zeros_like(held_out), (),
                           seed)
    partial = sample_latents(denoiser, derived.sample, sigma_data, held_out, given, seed)
    total_coords[name] = coordinates(total, segments, sigma_data)
    rows[name] = {"steps": denoiser.identity["step"],
                  **score(total_coords[name], coordinates(partial, segments, sigma_data),
                          total_frames=frame_coordinates(total, sigma_data))}
  name, settings = generation_program.sampler_settings(config.sample)
  results = {"rows": rows, "num_stems": num_stems, "segments": segments,
             "given": list(GIVEN_STEMS), "sampler": {"name": name, **settings},
             "train_chunks": int(config.study.control_chunks),
             "budget_seconds": float(config.study.control_seconds),
             "budget_clock": str(config.ldm.train.budget_clock)}
  if jax.process_index() == 0:
    atomic_files.write_json_atomic(os.path.join(folder, RESULTS_FILE), results)
    with open(os.path.join(folder, TABLE_FILE), "w") as f:
      f.write("\n".join(table(results)) + f"\n\n![coordinates]({PLOT_FILE})\n")
    plot(os.path.join(folder, PLOT_FILE), total_coords)
  logging.info("control:\n%s", "\n".join(table(results)))
  return results
