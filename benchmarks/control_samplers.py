r"""Samplers against network evaluations on the control, where the right answer is known.

  python -m benchmarks.control_samplers --config=configs/study.py --workdir=runs/study
  python -m benchmarks.control_samplers --config=configs/study.py --workdir=runs/study \
      --systems=msldm --samplers=euler_churn,heun --evaluations=10,50,150
  python -m benchmarks.control_samplers --config=configs/study.py --workdir=runs/study \
      --samplers=euler_churn --evaluations=150 --every_checkpoint --plot=progress.png

`--config` and its `--config.KEY=VALUE` overrides are the study's, as `--mode=control` (or
`--mode=study`) ran; the control's trained systems are read from WORKDIR/control/NAME.

On real music a sampler's pieces can only be scored against a reference set (KAD, FD). On the
control's planted latents every piece can be read exactly (`msldm_jax/study/control.py`):
whether the stems' signs agree, whether generated stems follow given ones, whether each
frame has the data's level, and whether a segment's frames share it (±1) or cancel (near
0). For each system, sampler and budget of network evaluations this samples the control's
held-out count of pieces, total and with bass and drums given, and prints those scores with
the element RMS of the pieces against the data's (below 1: the pieces shrink; above 1: noise
is left in them) and the milliseconds per piece (wall, batches of `sample.batch_size`,
compilation excluded). It tells a sampler's own loss apart from the network's: a network
that has not learned the ±1 segments gives a blur under every sampler.

Prints a markdown table; the numbers belong in benchmarks/RESULTS.md with the machine, the
command and the commit.
"""

import os
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

from msldm_jax import checkpointing
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.diffusion import samplers
from msldm_jax.latents import store
from msldm_jax.models import loading
from msldm_jax.study import control
from msldm_jax.study import runner
from msldm_jax.training import loop

_CONFIG = config_flags.DEFINE_config_file("config", "configs/study.py",
                                          "The study's config script (configs/study.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "The study's (or control's) workdir.")
_SYSTEMS = flags.DEFINE_string(
    "systems", "", "Control systems to sample (default: every one the config's study.systems "
    "names that has stems).")
_SAMPLERS = flags.DEFINE_string("samplers", "euler_churn,heun,dpmpp_2m", "Samplers.")
_EVALUATIONS = flags.DEFINE_string("evaluations", "10,25,50,150",
                                   "Network evaluations per piece.")
_EVERY_CHECKPOINT = flags.DEFINE_bool(
    "every_checkpoint", False, "Score every complete checkpoint a system's trainer kept "
    "(oldest first; keep them with --config.ldm.train.keep_checkpoints when training), not "
    "only the newest: how the scores grow with training.")
_PLOT = flags.DEFINE_string(
    "plot", "", "Where to plot the scores against the training budget spent (PNG); with "
    "--every_checkpoint.")


def _timed_sample(denoiser, sample_config, sigma_data, known, given, seed):
  """(pieces, wall seconds per piece after a first batch that compiles)."""
  batch = int(sample_config.batch_size)
  control.sample_latents(denoiser, sample_config, sigma_data, known[:batch], given, seed)
  start = time.perf_counter()
  pieces = control.sample_latents(denoiser, sample_config, sigma_data, known, given, seed)
  return pieces, (time.perf_counter() - start) / len(known)


def rms_ratio(pieces: np.ndarray, data: np.ndarray) -> float:
  """The pieces' element RMS over the data's."""
  return float(np.sqrt(np.mean(np.square(pieces, dtype=np.float64))
                       / np.mean(np.square(data, dtype=np.float64))))


def plot(path: str, rows: list[dict], clock: str):
  """Agreement, median |coordinate| and RMS against the budget spent, a line per system,
  sampler and evaluations."""
  from msldm_jax import plotting  # pylint: disable=g-import-not-at-top
  plt = plotting.plt
  figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  lines = {}
  for row in rows:
    lines.setdefault((row["system"], row["sampler"], row["evaluations"]), []).append(row)
  for (name, sampler, count), points in lines.items():
    x = [p["budget_seconds"] if p["budget_seconds"] is not None else p["trained"]
         for p in points]
    label = f"{name}, {sampler} {count}"
    axes[0].errorbar(x, [p["agreement"]["value"] for p in points],
                     yerr=[[p["agreement"]["value"] - p["agreement"]["low"] for p in points],
                           [p["agreement"]["high"] - p["agreement"]["value"]
                            for p in points]], marker="o", capsize=3, label=label)
    axes[1].plot(x, [p["median_abs_coordinate"] for p in points], marker="o", label=label)
    axes[2].plot(x, [p["rms_ratio"] for p in points], marker="o", label=label)
  for axis, title, target in zip(axes, ("stems' signs agree", "median |coordinate|",
                                        "RMS / data's"), (1.0, 1.0, 1.0)):
    axis.axhline(target, color="grey", lw=0.8, ls="--")
    axis.set_title(f"{title} (data {target:g})")
    axis.set_xlabel(f"training budget spent ({clock} s)" if rows[0]["budget_seconds"] is not None
                    else "training steps")
  axes[0].axhline(0.5, color="grey", lw=0.5, ls=":")
  axes[0].legend(fontsize="small")
  figure.tight_layout()
  plotting.save_figure(figure, path, dpi=100)


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  folder = control.control_dir(workdir)
  names = (runner.parse_list(_SYSTEMS.value, "--systems") if _SYSTEMS.value
           else control.stem_systems(config))
  missing = [n for n in names if not os.path.isdir(os.path.join(folder, n))]
  if missing:
    raise app.UsageError(f"no trained control system {missing} in {folder}: run "
                         "--mode=control with this config and workdir first")
  if _PLOT.value and not _EVERY_CHECKPOINT.value:
    raise app.UsageError("--plot draws the scores against training: add --every_checkpoint")
  sampler_names = runner.parse_list(_SAMPLERS.value, "--samplers")
  evaluations = [int(e) for e in runner.parse_list(_EVALUATIONS.value, "--evaluations")]
  segments, sigma_data = int(config.study.control_segments), float(config.ldm.sigma_data)
  given = [stems_lib.stem_index(stem) for stem in control.GIVEN_STEMS]
  held_out = store.LatentStore(os.path.join(folder, control.LATENTS_DIR),
                               control.HELD_OUT_SPLIT).read_all()
  rows = []
  for name in names:
    derived = control.system_config(config, workdir, name)
    trainer_dir = workdir_layout.trainer_dir(os.path.join(folder, name), workdir_layout.LDM)
    steps = (checkpointing.saved_steps(os.path.join(trainer_dir, workdir_layout.CHECKPOINTS))
             if _EVERY_CHECKPOINT.value else [None])
    for step in steps:
      denoiser = loading.load_denoiser(os.path.join(folder, name),
                                       use_ema=bool(derived.sample.use_ema), step=step)
      trained = denoiser.identity["step"]
      for sampler in sampler_names:
        for count in evaluations:
          sample_config = derived.sample.copy_and_resolve_references()
          sample_config.sampler = sampler
          sample_config.num_steps = samplers.steps_for_evaluations(sampler, count)
          logging.info("%s at step %d: %s at %d evaluations (%d steps)", name, trained,
                       sampler, count, sample_config.num_steps)
          seed = int(sample_config.seed)
          total, seconds = _timed_sample(denoiser, sample_config, sigma_data,
                                         np.zeros_like(held_out), (), seed)
          partial = control.sample_latents(denoiser, sample_config, sigma_data, held_out,
                                           given, seed)
          score = control.scores(
              control.coordinates(total, segments, sigma_data),
              control.coordinates(partial, segments, sigma_data), given,
              bootstrap_samples=control.BOOTSTRAP_SAMPLES, confidence=0.95, seed=seed,
              total_frames=control.frame_coordinates(total, sigma_data))
          rows.append(dict(score, system=name, trained=trained,
                           budget_seconds=loop.budget_spent(trainer_dir, trained),
                           sampler=sampler, evaluations=count,
                           sampler_steps=int(sample_config.num_steps),
                           rms_ratio=rms_ratio(total, held_out), seconds=seconds))
  clock = str(config.ldm.train.budget_clock)
  print(f"Samplers on the control's planted latents in {folder}: {len(held_out)} pieces "
        "each, total generation and with "
        f"{' and '.join(control.GIVEN_STEMS)} given; [95 % bootstrap interval over pieces]\n")
  print(f"| system | steps trained | {clock} s trained | sampler | evaluations | sampler "
        "steps | agreement (data 1) | partial (data 1) | median abs frame coordinate "
        "(data 1) | median abs coordinate (data 1) | spread over segments (data 0.97) | "
        "RMS / data's | ms per piece |")
  print("|---|" + "---|" * 12)
  for row in rows:
    spent = "–" if row["budget_seconds"] is None else f"{row['budget_seconds']:.0f}"
    print(f"| {row['system']} | {row['trained']} | {spent} | {row['sampler']} | "
          f"{row['evaluations']} | {row['sampler_steps']} | "
          f"{control.interval_cell(row['agreement'])} | "
          f"{control.interval_cell(row['partial_agreement'])} | "
          f"{row['median_abs_frame_coordinate']:.2f} | {row['median_abs_coordinate']:.2f} | "
          f"{row['segment_spread']:.2f} | "
          f"{row['rms_ratio']:.2f} | {1000 * row['seconds']:.1f} |")
  if _PLOT.value:
    plot(_PLOT.value, rows, clock)


if __name__ == "__main__":
  app.run(main)
