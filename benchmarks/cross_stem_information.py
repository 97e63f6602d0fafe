r"""Cross-stem information of trained denoisers, in latents, and how it grows with training.

  python -m benchmarks.cross_stem_information \
      --denoisers=runs/study/systems/msldm,runs/study/systems/isldm
  python -m benchmarks.cross_stem_information --denoisers=runs/long --every_checkpoint \
      --plot=information.png

Each of `--denoisers` is a workdir, its ldm/ folder or a checkpoint folder
(`models/loading.load_denoiser`). On the held-out chunks of `--splits` of the latent store
each was trained from (its record names it), `evaluation/latent_dependence`: per stem and σ,
how much the denoiser's loss on that stem grows when the other stems come from another chunk
(the same table `--mode=evaluate` writes to cross_stem_information.md). With
`--every_checkpoint`, every complete checkpoint the trainer kept (keep them with
`--config.ldm.train.keep_checkpoints` when training; `--steps` picks some), oldest first,
against the budget the trainer had spent there: whether a joint model learns to use the
other stems, and when.

Prints markdown tables; the numbers belong in benchmarks/RESULTS.md with the machine, the
command and the commit.
"""

import os

from absl import app
from absl import flags

from msldm_jax import checkpointing
from msldm_jax.evaluation import latent_dependence
from msldm_jax.evaluation import reference_set
from msldm_jax.models import loading
from msldm_jax.training import loop

_DENOISERS = flags.DEFINE_string("denoisers", None, "Comma-separated denoiser paths.",
                                 required=True)
_SPLITS = flags.DEFINE_string("splits", "validation+test",
                              "Held-out splits of the latent store, joined by '+'.")
_MAX_CHUNKS = flags.DEFINE_integer("max_chunks", 0, "A seeded sample of this many chunks "
                                   "(0: all).")
_EVERY_CHECKPOINT = flags.DEFINE_bool("every_checkpoint", False,
                                      "Every kept checkpoint, not only the newest.")
_STEPS = flags.DEFINE_string("steps", "", "With --every_checkpoint: only these of the kept "
                             "checkpoints' steps (comma-separated; the others are skipped).")
_SIGMA_DATA = flags.DEFINE_float("sigma_data", 0.4, "σ_data the denoisers were trained with.")
_SEED = flags.DEFINE_integer("seed", 0, "Seeds the pairing, the noise and the bootstrap.")
_PLOT = flags.DEFINE_string("plot", "", "With --every_checkpoint: a PNG of the information "
                            "(all stems, relative) against the training budget spent.")


def _cell(row: dict) -> str:
  return f"{row['relative']:+.3f} [{row['low'] / row['own']:+.3f}, {row['high'] / row['own']:+.3f}]"


def plot(path: str, curves: dict[str, list[tuple[int, float | None, dict]]]):
  """One panel per denoiser: the relative information of all stems against training, a
  line per σ."""
  from msldm_jax import plotting  # pylint: disable=g-import-not-at-top
  plt = plotting.plt
  figure, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.8), squeeze=False)
  for axis, (name, points) in zip(axes[0], curves.items()):
    for sigma in latent_dependence.SIGMAS:
      key = f"all stems at σ={sigma:.3g}"
      x = [step if spent is None else spent for step, spent, _ in points]
      rows = [rows[key] for _, _, rows in points]
      axis.errorbar(x, [r["relative"] for r in rows],
                    yerr=[[(r["information"] - r["low"]) / r["own"] for r in rows],
                          [(r["high"] - r["information"]) / r["own"] for r in rows]],
                    marker="o", capsize=3, label=f"σ={sigma:.3g}")
    axis.axhline(0.0, color="grey", lw=0.8, ls="--")
    axis.set_title(name)
    axis.set_xlabel("training budget spent (s; steps where unlogged)")
    axis.set_ylabel("loss increase with other chunks' stems / own")
  axes[0][0].legend(fontsize="small")
  figure.tight_layout()
  plotting.save_figure(figure, path, dpi=100)


def main(argv):
  del argv
  if (_PLOT.value or _STEPS.value) and not _EVERY_CHECKPOINT.value:
    raise app.UsageError("--plot and --steps are about a run's checkpoints: add "
                         "--every_checkpoint")
  splits = reference_set.split_names(_SPLITS.value, "--splits")
  curves = {}
  final = {}
  for path in [p.strip() for p in _DENOISERS.value.split(",") if p.strip()]:
    newest = loading.load_denoiser(path)
    directory = newest.identity["checkpoint_dir"]
    trainer_dir = os.path.dirname(directory)
    steps = (checkpointing.saved_steps(directory) if _EVERY_CHECKPOINT.value
             else [newest.identity["step"]])
    if _STEPS.value:
      chosen = {int(step) for step in _STEPS.value.split(",") if step.strip()}
      steps = [step for step in steps if step in chosen]
    latents, sources = latent_dependence.held_out_latents(newest, splits, _MAX_CHUNKS.value,
                                                          _SEED.value)
    for step in steps:
      denoiser = (newest if step == newest.identity["step"]
                  else loading.load_denoiser(path, step=step))
      rows = latent_dependence.cross_stem_information(
          denoiser, latents, stem_names=sources, seed=_SEED.value,
          sigma_data=_SIGMA_DATA.value)
      spent = loop.budget_spent(trainer_dir, step)
      curves.setdefault(path, []).append((step, spent, rows))
      print(f"{path} step {step} ({spent and round(spent)} s): "
            + ", ".join(f"σ={s:.3g} {_cell(rows[f'all stems at σ={s:.3g}'])}"
                        for s in latent_dependence.SIGMAS), flush=True)
      final[path] = (step, len(latents), sources, rows)

  print("\nAll stems: loss increase with other chunks' stems, relative to own "
        "[95 % interval]\n")
  header = " | ".join(f"σ={s:.3g}" for s in latent_dependence.SIGMAS)
  print(f"| denoiser | step | budget s | {header} |")
  print("|" + "---|" * (3 + len(latent_dependence.SIGMAS)))
  for path, points in curves.items():
    for step, spent, rows in points:
      print(f"| {path} | {step} | {'–' if spent is None else round(spent)} | " + " | ".join(
          _cell(rows[f"all stems at σ={s:.3g}"]) for s in latent_dependence.SIGMAS) + " |")
  for path, (step, count, sources, rows) in final.items():
    print(f"\n{path}, step {step}, {count} held-out chunks: per stem, relative [interval] "
          "(own loss)\n")
    print(f"| stem | {header} |")
    print("|" + "---|" * (1 + len(latent_dependence.SIGMAS)))
    for stem in (*sources, "all stems"):
      print(f"| {stem} | " + " | ".join(
          f"{_cell(rows[f'{stem} at σ={s:.3g}'])} ({rows[f'{stem} at σ={s:.3g}']['own']:.3f})"
          for s in latent_dependence.SIGMAS) + " |")
  if _PLOT.value:
    plot(_PLOT.value, curves)
    print(f"\nPlot: {_PLOT.value}")


if __name__ == "__main__":
  app.run(main)
