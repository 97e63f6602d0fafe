r"""SourceVAE runs side by side: each source's validation mel distance and SI-SDR against the
run's budget clock (CPU or wall seconds, as its config counts them), from the runs' own logs.

  python -m benchmarks.vae_curves --runs=runs/vae_rec,runs/vae_gan \
      --labels=reconstruction-only,GAN --since=8000 --plot=benchmarks/vae_gan_vs_rec.png

For each of `--runs` (a workdir, or its vae/ folder), the validation records of
`--mode=train_vae` (`eval/mel_distance/SOURCE`, `eval/si_sdr/SOURCE`) are placed at the
budget seconds of their step and printed as a table; `--plot` draws one panel per measure, a
line per run and source. Runs continued from one checkpoint share its log up to it:
`--since` keeps the records at or after that many budget seconds. The numbers belong in
benchmarks/RESULTS.md with the machine, the commands and the commits.
"""

import os

from absl import app
from absl import flags

from msldm_jax import plotting
from msldm_jax import workdir_layout
from msldm_jax.training import loop

_RUNS = flags.DEFINE_list("runs", None, "Workdirs (or their vae/ folders) of VAE runs.")
_LABELS = flags.DEFINE_list("labels", None, "A label per run (default: the paths).")
_SINCE = flags.DEFINE_float("since", 0.0, "Keep the records at or after these budget seconds.")
_PLOT = flags.DEFINE_string("plot", None, "Where to write the figure (PNG).")

MEASURES = (("mel_distance", "validation mel distance"), ("si_sdr", "validation SI-SDR (dB)"))


def stage_dir(run: str) -> str:
  """A run's vae/ folder, given it or its workdir."""
  if os.path.isfile(os.path.join(run, workdir_layout.METRICS_FILE)):
    return run
  return workdir_layout.trainer_dir(run, workdir_layout.VAE)


def curves(run: str, since: float = 0.0) -> dict[tuple[str, str], tuple[list, list]]:
  """(measure, source) -> (budget seconds, values) of one run's validation records."""
  records = loop.read_metrics(stage_dir(run))
  if not records:
    raise FileNotFoundError(f"no VAE training records under {stage_dir(run)} ({run!r})")
  clock = loop.budget_by_step(records)
  out = {}
  for record in records:
    seconds = clock.get(record["step"])
    if seconds is None or seconds < since:
      continue
    for key, value in record.items():
      parts = key.split("/")
      if len(parts) == 3 and parts[0] == "eval" and parts[1] in dict(MEASURES):
        xs, ys = out.setdefault((parts[1], parts[2]), ([], []))
        xs.append(seconds)
        ys.append(value)
  return out


def main(argv):
  del argv
  runs = _RUNS.value or []
  if not runs:
    raise app.UsageError("--runs: give at least one VAE run")
  labels = _LABELS.value or runs
  if len(labels) != len(runs):
    raise app.UsageError(f"--labels: {len(labels)} labels for {len(runs)} runs")
  by_run = {label: curves(run, _SINCE.value) for label, run in zip(labels, runs)}
  for measure, title in MEASURES:
    print(f"\n{title}\n\n| run | source | budget s: value |\n|---|---|---|")
    for label, run_curves in by_run.items():
      for (name, source), (xs, ys) in sorted(run_curves.items()):
        if name == measure:
          points = ", ".join(f"{x:.0f}: {y:.2f}" for x, y in zip(xs, ys))
          print(f"| {label} | {source} | {points} |")
  if _PLOT.value:
    fig, axes = plotting.plt.subplots(1, len(MEASURES), figsize=(12, 4.5))
    colours = plotting.plt.get_cmap("tab10")  # a colour per source, a line style per run
    for ax, (measure, title) in zip(axes, MEASURES):
      for index, (label, run_curves) in enumerate(by_run.items()):
        sources = sorted({source for _, source in run_curves})
        for (name, source), (xs, ys) in sorted(run_curves.items()):
          if name == measure:
            ax.plot(xs, ys, linestyle=("-", "--", ":", "-.")[index % 4],
                    color=colours(sources.index(source)), label=f"{label}: {source}")
      ax.set_xlabel("budget seconds of training")
      ax.set_ylabel(title)
      ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    plotting.save_figure(fig, _PLOT.value, dpi=80)
    print(f"\nwrote {_PLOT.value}")


if __name__ == "__main__":
  app.run(main)
