r"""DiT or U-Net? Each denoiser trained on the mini dataset's latents for the same time, scored.

  python -m benchmarks.denoiser_comparison --run_dir=runs/denoisers \
      [--budget_seconds=480] [--clock=cpu] [--out=docs/denoiser_comparison]

1. The shared stages of configs/demo.py in RUN_DIR, through `main.run` (each skipped when
   done): the mini dataset, its SourceVAE, the joint latents.
2. For each network below, `--mode=train_ldm` on those latents in RUN_DIR/<name> for the same
   time budget (`ldm.train.max_seconds`, clock `--clock`: "cpu" counts this process's CPU
   time, which other work on a shared machine hardly moves; compilation is not counted),
   then `--mode=sample` and `--mode=evaluate` with the demo's settings:
     dit          the DiT 'tiny' preset (the demo's denoiser);
     unet_flops   the U-Net 'tiny' preset: about the DiT's FLOPs per evaluation;
     unet_params  a U-Net cut to about the DiT's parameter count.
3. Writes OUT/README.md (sizes, steps reached, the diffusion loss per σ bucket over the last
   quarter of each run's logged steps and over the same steps for all, the evaluation's
   scores with their intervals and floors, empty stems, levels) and OUT/loss_by_sigma.png,
   with the command, commit and machine.

Same data, same VAE, same optimiser settings and batch for every network; only the denoiser
differs. What such a run can show is stated in the written file.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax import config_loading
from msldm_jax import main as main_lib
from msldm_jax import provenance
from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.latents import store
from msldm_jax.models import denoisers
from msldm_jax.study import report
from msldm_jax.training import loop
from msldm_jax.training import train_ldm


_WORKDIR = flags.DEFINE_string("run_dir", "runs/denoisers", "Shared stages and one folder "
                               "per network.")
_BUDGET = flags.DEFINE_float("budget_seconds", 480.0, "Training time per network.")
_CLOCK = flags.DEFINE_enum("clock", "cpu", list(loop.BUDGET_CLOCKS), "Budget clock.")
_OUT = flags.DEFINE_string("out", "docs/denoiser_comparison", "Where the table and plot go.")
_NOTES = flags.DEFINE_multi_string("note", [], "A remark about this run, written under the "
                                   "tables (e.g. what changed since its stages ran).")
_NETWORKS = flags.DEFINE_list("networks", ["dit", "unet_flops", "unet_params"],
                              "Which networks (see the module docstring).")

SHARED_STAGES = ("data", "train_vae", "encode_latents")
# The networks: (kind, settings over the demo's config for that kind).
NETWORKS = {
    "dit": (denoisers.DIT, {}),
    "unet_flops": (denoisers.UNET, {}),
    "unet_params": (denoisers.UNET, dict(multipliers=(1, 1, 1), num_blocks=(1, 1),
                                         attention_features=16)),
}


def demo_config():
  return config_loading.load_config("configs/demo.py")


def network_config(name: str, workdir: str, budget: float, clock: str):
  kind, settings = NETWORKS[name]
  config = demo_config()
  config.ldm.denoiser = kind
  for key, value in settings.items():
    config.ldm[denoisers.CONFIG_KEYS[kind]][key] = value
  # The shared stages' latents and VAE; this network's own checkpoints, samples, evaluation.
  config.data.tfds_dir = workdir_layout.tfds_dir(demo_config(), workdir)
  config.ldm.latents_dir = workdir_layout.latents_dir(demo_config(), workdir)
  config.ldm.vae_checkpoint = os.path.abspath(workdir)
  config.ldm.train.num_steps = 1_000_000
  config.ldm.train.max_seconds = float(budget)
  config.ldm.train.budget_clock = clock
  config.ldm.train.sample_every = 0
  config.ldm.train.checkpoint_every = 1_000_000
  return config


def size_and_flops(config):
  """(parameters, FLOPs of one denoiser evaluation at batch 1 on one chunk's latents) by
  XLA's cost analysis, for the network the trainer builds on the shared latent store."""
  manifest = store.load_manifest(config.ldm.latents_dir)
  settings = train_ldm.model_config_for_latents(config.ldm, manifest, config.ldm.latents_dir)
  model = denoisers.build(denoisers.selected(config.ldm)[0], settings)
  abstract = denoisers.abstract_params(model)
  frames = manifest["shape"][-1]
  x = jax.ShapeDtypeStruct((1, model.in_channels, frames), jnp.float32)
  c_noise = jax.ShapeDtypeStruct((1,), jnp.float32)
  cost = jax.jit(model.apply).lower(abstract, x, c_noise).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(abstract))
  return count, float(cost["flops"])


def _score(metrics, row, measure="KAD ×100"):
  score = metrics["total_generation"][row][""][measure]
  if score["value"] is None:
    return "refused"
  return (f"{score['value']:.1f} [{score['low']:.1f}, {score['high']:.1f}] "
          f"(floor {score['floor']:.1f})")


def write_report(out: str, results: dict, command: str, elapsed: float):
  os.makedirs(out, exist_ok=True)
  names = list(results)
  report.loss_plot(results, out)

  lines = [
      "# DiT or U-Net on the mini dataset, for the same training time",
      "",
      f"Command: `{command}`  ",
      f"Commit: {provenance.commit()}. Machine: {provenance.machine()}. "
      + (f"This invocation ran for {elapsed / 60:.0f} min. " if elapsed > 120 else
         "(Stages reused from an earlier invocation of the same command.) ")
      + "Written by benchmarks/denoiser_comparison.py.",
      "",
      "Each network trains on the same joint latents (configs/demo.py: 24 Bach chorales "
      "rendered to four stems, the demo's 16-step SourceVAE), with the demo's optimiser, "
      f"batch and EMA, for {results[names[0]]['budget']:.0f} s of "
      f"{results[names[0]]['clock']} time after compilation; then 8 pieces are sampled "
      "(150-step Euler with churn) and evaluated by `--mode=evaluate` (musicnn KAD ×100 "
      "with 95 % bootstrap intervals over pieces, and the real-vs-real floor).",
      "",
      f"| network | parameters | GFLOP / evaluation | steps in budget | steps per "
      f"{results[names[0]]['clock']}-second |",
      "|---|---|---|---|---|",
  ]
  for name in names:
    r = results[name]
    lines.append(f"| {name} | {r['params']:,} | {r['flops'] / 1e9:.3f} | {r['steps']} | "
                 f"{r['steps'] / r['budget']:.2f} |")
  shortest = min(results[n]["steps"] for n in names)
  for title, key in (
      ("Diffusion loss per σ bucket for the same time: the last quarter of each network's "
       "own logged steps", "buckets"),
      (f"The same for the same number of steps: steps {int(0.75 * shortest)}-{shortest} "
       "(the last quarter of the shortest run)", "buckets_equal_steps")):
    lines += ["", title + " (lower is better; step k draws the same σ, noise and batch "
              "for every network):", "", "| σ bucket | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    for bucket in train_ldm.SIGMA_BUCKET_NAMES:
      label = bucket.split("_", 3)[-1]
      lines.append(f"| {label} | " + " | ".join(
          f"{results[n][key][bucket]:.4f}" for n in names) + " |")
  lines += ["", "![loss per σ bucket](loss_by_sigma.png)", "",
            "Evaluation (`--mode=evaluate`, total generation; KAD ×100 [95 % interval] "
            "(floor)):", "", "| measure | " + " | ".join(names) + " |",
            "|---|" + "---|" * len(names)]
  for row in ["mixture", *stems.STEM_NAMES]:
    lines.append(f"| KAD {row} | " + " | ".join(
        _score(results[n]["metrics"], row) for n in names) + " |")
  for stem in stems.STEM_NAMES:
    lines.append(f"| level {stem} dB (real median) | " + " | ".join(
        f"{results[n]['metrics']['levels'][stem]['generated median dB']:.1f} "
        f"({results[n]['metrics']['levels'][stem]['real median dB']:.1f})" for n in names)
        + " |")
  measures = results[names[0]]["metrics"]["music_measures"]["generated"]
  for measure in measures:
    lines.append(f"| {measure} | " + " | ".join(
        f"{results[n]['metrics']['music_measures']['generated'][measure]:.3f}"
        for n in names) + " |")
  lines += ["", "## What this does and does not show", "", NOTES]
  if _NOTES.value:
    lines += ["## About this run", ""] + [f"- {note}" for note in _NOTES.value]
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


NOTES = """\
- It compares how fast each backbone lowers the diffusion loss on these latents per unit of
  CPU time, at two U-Net sizes (matched to the DiT in FLOPs and in parameters), with data,
  VAE, optimiser and σ draws held fixed. The per-σ losses are the direct measure: the
  same (σ, noise) sequence is drawn for every network, so differences of a few percent
  between networks at one σ are meaningful even where the evaluation's intervals overlap.
- It does not rank the backbones at the paper's scale: a few minutes of CPU training of
  ~0.2-0.3 M parameter networks on ~0.3 h of chorales, and pieces decoded by a 16-step VAE
  that itself reconstructs noise-like audio, so the evaluation scores mostly measure the VAE
  and overlap heavily; one seed per network. Steps per CPU-second also favour whichever
  network XLA:CPU runs better at this size, which need not hold on a GPU.
"""


def main(argv):
  del argv
  started = time.perf_counter()
  workdir = os.path.abspath(_WORKDIR.value)
  shared = demo_config()
  for mode in SHARED_STAGES:
    marker = os.path.join(workdir, "comparison", f"{mode}.done")
    if os.path.exists(marker):
      continue
    logging.info("shared stage %s", mode)
    main_lib.run(mode, shared, workdir)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    open(marker, "w").close()
  results = {}
  for name in _NETWORKS.value:
    config = network_config(name, workdir, _BUDGET.value, _CLOCK.value)
    run_dir = os.path.join(workdir, name)
    params, flops = size_and_flops(config)
    logging.info("%s: %d parameters, %.3f GFLOP per evaluation", name, params, flops / 1e9)
    for mode in ("train_ldm", "sample", "evaluate"):
      marker = os.path.join(run_dir, f"{mode}.done")
      if not os.path.exists(marker):
        main_lib.run(mode, config, run_dir)
        open(marker, "w").close()
    records = loop.read_metrics(workdir_layout.trainer_dir(run_dir, workdir_layout.LDM))
    with open(os.path.join(workdir_layout.evaluation_dir(run_dir), "metrics.json")) as f:
      metrics = json.load(f)
    steps = max(r["step"] for r in records if "loss" in r)
    results[name] = dict(params=params, flops=flops, steps=steps, budget=_BUDGET.value,
                         clock=_CLOCK.value, records=records,
                         buckets=report.bucket_means(records, 0.75 * steps, steps),
                         metrics=metrics)
  shortest = min(r["steps"] for r in results.values())
  for result in results.values():
    result["buckets_equal_steps"] = report.bucket_means(result["records"], 0.75 * shortest,
                                                        shortest)
  command = ("python -m benchmarks.denoiser_comparison "
             f"--run_dir={_WORKDIR.value} --budget_seconds={_BUDGET.value:g} "
             f"--clock={_CLOCK.value} --out={_OUT.value}")
  write_report(_OUT.value, results, command, time.perf_counter() - started)
  print(f"wrote {os.path.join(_OUT.value, 'README.md')}")


if __name__ == "__main__":
  app.run(main)
