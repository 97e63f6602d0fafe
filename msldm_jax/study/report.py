"""The study's report: REPORT_DIR/README.md with its tables, and the plots next to it.

Everything is read back from what the steps wrote (metrics.jsonl of each trainer, metrics.json
of each evaluation, the study's steps.jsonl, the pieces' spectrograms), so the report can be
rewritten without running anything again, and says where each number comes from.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msldm_jax import plotting
from msldm_jax import provenance
from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.diffusion import samplers
from msldm_jax.evaluation import reference_set
from msldm_jax.evaluation import vae_quality
from msldm_jax.models import loading
from msldm_jax.study import control
from msldm_jax.study import runner
from msldm_jax.training import loop
from msldm_jax.training import train_ldm

# The score every table leads with, and the other distance.
KAD, FD = "KAD ×100", "FD"
# The paper's ordering on the mixture: each of these against msldm.
BASELINES = ("isldm", "mixldm")


def step_commits(steps: dict[str, dict]) -> str:
  """Which commits the steps ran from (each step's newest run), most steps first."""
  counts: dict[str, int] = {}
  for record in steps.values():
    name = record.get("commit", "not recorded")
    counts[name] = counts.get(name, 0) + 1
  if not counts:
    return "no steps recorded"
  ordered = sorted(counts.items(), key=lambda item: -item[1])
  return "the steps' commits: " + ", ".join(
      f"{name} ({count} step{'s' if count > 1 else ''})" for name, count in ordered)


def time_table(steps: dict[str, dict]) -> list[str]:
  """Each step's wall and CPU minutes (its newest run), in the order they ran, the sampler
  runs summed into one row."""
  rows: dict[str, list[float]] = {}
  for name, record in steps.items():
    label = "samplers (every run, sample and evaluate)" if name.startswith(
        f"{runner.SAMPLERS_DIR}/") else name
    totals = rows.setdefault(label, [0.0, 0.0])
    totals[0] += record.get("wall_seconds", float("nan")) / 60
    totals[1] += record.get("cpu_seconds", float("nan")) / 60
  return ["| step | wall min | CPU min (the study's process) |", "|---|---|---|",
          *(f"| {label} | {wall:.1f} | {cpu:.1f} |" for label, (wall, cpu) in rows.items())]


def bucket_means(records: list[dict], first_step: float, last_step: float) -> dict[str, float]:
  """Mean diffusion loss per σ bucket over the logged steps in (first_step, last_step]."""
  window = [r for r in records if "loss" in r and first_step < r["step"] <= last_step]
  return {name: float(np.nanmean([r.get(name, np.nan) for r in window]))
          if window else float("nan") for name in train_ldm.SIGMA_BUCKET_NAMES}


def size_and_flops(loaded: loading.Loaded, frames: int) -> tuple[int, float]:
  """(parameters, FLOPs of one denoiser evaluation of one piece) by XLA's cost analysis."""
  model = loaded.module
  x = jax.ShapeDtypeStruct((1, model.in_channels, frames), jnp.float32)
  c_noise = jax.ShapeDtypeStruct((1,), jnp.float32)
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), loaded.params)
  cost = jax.jit(model.apply).lower(abstract, x, c_noise).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(loaded.params))
  return count, float(cost.get("flops", float("nan")))


def _num(value) -> float:
  """A number from metrics.json, where non-finite ones are strings ("nan", "inf")."""
  return float("nan") if value is None else float(value)


def _shown_path(path: str) -> str:
  """A path as a user would type it: relative to the working directory when inside it."""
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def _score(metrics: dict, row: str, measure: str = KAD, column: str = "") -> dict | None:
  return metrics.get("total_generation", {}).get(row, {}).get(column, {}).get(measure)


def _cell(score: dict | None, floor: bool = True) -> str:
  if score is None:
    return "–"
  if score["value"] is None:
    return score.get("note") or "refused"
  text = f"{score['value']:.2f} [{score['low']:.2f}, {score['high']:.2f}]"
  bounds = []
  if floor and score.get("floor") is not None:
    bounds.append(f"floor {score['floor']:.2f}")
  if floor and score.get("through_vae") is not None:
    bounds.append(f"through the VAE {score['through_vae']:.2f}")
  return text + (f" ({'; '.join(bounds)})" if bounds else "")


def joint_systems(results: dict) -> list[str]:
  """The systems that model the stems jointly: msldm and its variants (msldm_unet,
  msldm_coupled), each held to the paper's ordering against the baselines."""
  return [name for name in results if name == "msldm" or name.startswith("msldm_")]


def _ordering(results: dict, measure: str = KAD) -> list[str]:
  """Whether each joint system is ahead of each baseline on the mixture, with intervals."""
  lines = []
  for joint in joint_systems(results):
    ours = _score(results[joint].get("metrics", {}), "mixture", measure)
    for name in BASELINES:
      theirs = _score(results.get(name, {}).get("metrics", {}), "mixture", measure)
      if not ours or not theirs or ours["value"] is None or theirs["value"] is None:
        continue
      if ours["high"] < theirs["low"]:
        verdict = f"{joint} ahead, intervals apart: shown"
      elif theirs["high"] < ours["low"]:
        verdict = f"{name} ahead, intervals apart: the paper's ordering is not reproduced"
      elif ours["value"] < theirs["value"]:
        verdict = f"{joint} lower, but the intervals overlap: not shown"
      else:
        verdict = f"{name} lower, the intervals overlap: not shown either way"
      lines.append(f"- mixture {measure}, {joint} {ours['value']:.2f} against {name} "
                   f"{theirs['value']:.2f}: {verdict}.")
  return lines


def _codec_shares(results: dict, measure: str = KAD) -> list[str]:
  """Each system's mixture distance beside its VAE's reconstructions' (the codec's ceiling):
  how far its pieces lie above that is the latent model's share (KAD is not additive, so a
  rough split, but an honest one: the codec alone scores the ceiling)."""
  lines = []
  for name, result in results.items():
    score = _score(result.get("metrics", {}), "mixture", measure)
    if not score or score["value"] is None or score.get("through_vae") is None:
      continue
    codec = score["through_vae"]
    lines.append(f"- {name}: {score['value']:.2f}; the real mixtures through its VAE "
                 f"{codec:.2f} (floor {score['floor']:.2f}): its pieces lie "
                 f"{score['value'] - codec:.2f} above what its codec allows, the latent "
                 "model's share.")
  return lines


# The goals for the study's VAE, on the test split.
GOAL_MEL = 1.5
GOAL_SI_SDR = 0.0
GOAL_TAG_POINTS = 10.0


def _read_vae_scores(workdir: str) -> dict | None:
  path = os.path.join(vae_quality.output_dir(workdir), "metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _goal_lines(label: str, scores: dict) -> list[str]:
  """Met / not met for each goal, from `vae_quality` scores of one VAE (read back from
  strict JSON, where NaN is the string "nan": hence every float()), then how many it met."""
  lines, met = [], []
  for name, row in scores["reconstruction"].items():
    mel, sdr = float(row["mel_distance"]), float(row["si_sdr"])
    mel_met, sdr_met = mel <= GOAL_MEL, sdr >= GOAL_SI_SDR
    met += [mel_met, sdr_met]
    verdicts = [f"mel {mel:.2f} {'≤' if mel_met else '>'} {GOAL_MEL} "
                f"({'met' if mel_met else 'not met'})",
                f"SI-SDR {sdr:.1f} dB {'≥' if sdr_met else '<'} {GOAL_SI_SDR:g} "
                f"({'met' if sdr_met else 'not met'})"]
    ours, real = (float(row[vae_quality.TAGGED_RECONSTRUCTED]),
                  float(row[vae_quality.TAGGED_REAL]))
    if np.isfinite(real):
      # Points behind the real stems (negative: ahead of them); NaN, when no reconstruction
      # was tagged, meets nothing.
      gap = 100 * (real - ours)
      met.append(bool(gap <= GOAL_TAG_POINTS))
      verdicts.append(f"tagged right {ours:.2f} against real {real:.2f} "
                      f"({'met' if met[-1] else 'not met'}: {gap:.0f} points behind, the goal "
                      f"within {GOAL_TAG_POINTS:g})")
    lines.append(f"- {label}, {name}: " + "; ".join(verdicts) + ".")
  lines.append(f"- {label}: {sum(met)} of the {len(met)} goals met.")
  return lines


def _vae_section(results: dict, gan_starts: dict, test_scores: dict, out: str) -> list[str]:
  """Validation curves of both VAEs against CPU time (each marked where its GAN steps began,
  `gan_starts`: label -> its vae.adversarial_start), their last evaluation, and their
  reconstructions of the test split against the goals."""
  curves_mel, curves_sdr, marks, rows = {}, {}, {}, []
  for label, records in results.items():
    evals = [r for r in records if "eval/mel_distance" in r]
    clock = loop.budget_by_step(records)
    points = [(clock[r["step"]], r) for r in evals if r["step"] in clock]
    if points:
      curves_mel[label] = ([t for t, _ in points], [r["eval/mel_distance"] for _, r in points])
      curves_sdr[label] = ([t for t, _ in points], [r["eval/si_sdr"] for _, r in points])
    start = gan_starts[label]
    gan_from = loop.budget_at(records, start)
    if gan_from is not None and start < max(clock):  # a VAE that took GAN steps
      marks[label] = (gan_from, f"GAN steps from step {start + 1}")
    if not evals:
      continue
    last = evals[-1]
    kl = [r["loss/kl"] for r in records if "loss/kl" in r][-5:]
    per_stem = ", ".join(f"{k.rsplit('/', 1)[1]} {v:.2f}" for k, v in last.items()
                         if k.startswith("eval/mel_distance/"))
    per_stem_sdr = ", ".join(f"{k.rsplit('/', 1)[1]} {v:.1f}" for k, v in last.items()
                             if k.startswith("eval/si_sdr/"))
    steps = max(r["step"] for r in records if "loss/mel" in r)
    seconds = f"{clock[steps]:.0f}" if steps in clock else "–"
    rows.append(f"| {label} | {steps} | {max(0, steps - gan_starts[label])} | {seconds} | "
                f"{last['eval/mel_distance']:.2f} ({per_stem}) | "
                f"{last['eval/si_sdr']:.1f} ({per_stem_sdr}) | {np.mean(kl):.3f} |")
  lines = ["| VAE | steps | of them GAN steps | CPU-s | validation mel distance (per source) | "
           "validation SI-SDR dB (per source) | KL per element |",
           "|---|---|---|---|---|---|---|"]
  lines += rows
  if curves_mel:
    plotting.save_curves(os.path.join(out, "vae_mel.png"), curves_mel,
                         xlabel="CPU seconds of training", ylabel="validation mel distance",
                         marks=marks)
    plotting.save_curves(os.path.join(out, "vae_si_sdr.png"), curves_sdr,
                         xlabel="CPU seconds of training", ylabel="validation SI-SDR (dB)",
                         logy=False, marks=marks)
    lines += ["", "![VAE mel distance](vae_mel.png) ![VAE SI-SDR](vae_si_sdr.png)"]
  scored = {label: scores for label, scores in test_scores.items() if scores}
  if scored:
    lines += ["", "The final VAEs on real chunks (`--mode=evaluate_vae`): SI-SDR, mel "
              "distance and level change (median dB, reconstructed minus real; the other two "
              "ignore gain) where the real source is audible; 'tagged right': the share of "
              "stems whose own instrument musicnn's MTT tagger ranks first, reconstructed "
              "and real.", "",
              "| VAE | source | chunks | mel distance | SI-SDR dB | level change dB | tagged "
              "right (reconstructed) | tagged right (real) |",
              "|---|---|---|---|---|---|---|---|"]
    for label, scores in scored.items():
      for name, row in scores["reconstruction"].items():
        tags = [float(row[k]) for k in (vae_quality.TAGGED_RECONSTRUCTED,
                                        vae_quality.TAGGED_REAL)]
        lines.append(f"| {label} | {name} | {scores['num_chunks']} of "
                     f"{scores['split']} | {float(row['mel_distance']):.2f} | "
                     f"{float(row['si_sdr']):.1f} | "
                     # Scores written before the level change was measured have none.
                     + (f"{float(row['level_change_db']):+.1f} | "
                        if "level_change_db" in row else "– | ")
                     + " | ".join("–" if not np.isfinite(t) else f"{t:.2f}" for t in tags)
                     + " |")
    lines += ["", f"Against the goals (mel distance ≤ {GOAL_MEL}, SI-SDR ≥ {GOAL_SI_SDR:g} "
              f"dB, reconstructions tagged right within {GOAL_TAG_POINTS:g} points of the "
              "real stems):", ""]
    for label, scores in scored.items():
      lines += _goal_lines(label, scores)
  return lines


def loss_plot(results: dict, out: str):
  """OUT/loss_by_sigma.png: each result's mean loss per σ bucket (its "buckets")."""
  plt = plotting.plt  # (plotting selected the Agg backend)
  edges = train_ldm.SIGMA_BUCKET_EDGES
  centres = np.sqrt(np.asarray(edges[:-1]) * np.asarray(edges[1:]))
  figure, axis = plt.subplots(figsize=(7, 4))
  for name, result in results.items():
    axis.plot(centres, [result["buckets"][b] for b in train_ldm.SIGMA_BUCKET_NAMES],
              marker="o", label=name)
  axis.set_xscale("log")
  axis.set_xlabel("σ (bucket centre)")
  axis.set_ylabel("diffusion loss, last quarter of the run")
  axis.legend()
  axis.grid(alpha=0.3)
  figure.tight_layout()
  plotting.save_figure(figure, os.path.join(out, "loss_by_sigma.png"), dpi=100)


def _system_results(config, workdir: str, systems: list[str]) -> dict:
  results = {}
  for name in systems:
    folder = runner.system_dir(workdir, name)
    records = loop.read_metrics(workdir_layout.trainer_dir(folder, workdir_layout.LDM))
    losses = [r for r in records if "loss" in r]
    steps = max(r["step"] for r in losses)
    loaded = loading.load_denoiser(folder)
    frames = int(loaded.identity["latents"]["shape"][-1])
    params, flops = size_and_flops(loaded, frames)
    results[name] = dict(
        params=params, flops=flops, steps=steps,
        seconds=max((r.get(loop.BUDGET_SECONDS, 0.0) for r in losses), default=0.0),
        last_loss=float(np.mean([r["loss"] for r in losses[-4:]])),
        buckets=bucket_means(records, 0.75 * steps, steps),
        metrics=_read_json(os.path.join(workdir_layout.evaluation_dir(folder),
                                        "metrics.json")),
        folder=folder)
  return results


def _total_table(results: dict) -> list[str]:
  names = list(results)
  lines = ["| measure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for row in ("mixture",) + stems.STEM_NAMES:
    for measure in (KAD, FD):
      lines.append(f"| {measure} {row} | " + " | ".join(
          _cell(_score(results[n]["metrics"], row, measure)) for n in names) + " |")
  for stem in stems.STEM_NAMES:
    lines.append(f"| level {stem} dB, generated (real through the VAE / real, medians) | "
                 + " | ".join(_level_cell(results[n]["metrics"].get("levels", {}).get(stem))
                              for n in names) + " |")
  measures = []
  for name in names:
    for key in results[name]["metrics"].get("music_measures", {}).get("generated", {}):
      if key not in measures:
        measures.append(key)
  for key in measures:
    cells = []
    for name in names:
      generated = results[name]["metrics"]["music_measures"]["generated"]
      real = results[name]["metrics"]["music_measures"]["real"]
      cells.append(f"{_num(generated[key]):.3f} (real {_num(real[key]):.3f})"
                   if key in generated else "–")
    lines.append(f"| {key} | " + " | ".join(cells) + " |")
  for stem in ("guitar", "piano", "drums"):
    cells = []
    for name in names:
      tags = results[name]["metrics"].get("instrument_tags", {})
      if not tags or stem not in tags.get("generated", {}):
        cells.append("–")
        continue
      generated, real = tags["generated"][stem], tags["real"][stem]
      cells.append(f"{_num(generated['recognised']):.2f} of {int(generated['stems'])} "
                   f"(real {_num(real['recognised']):.2f})")
    lines.append(f"| {stem} tagged as {stem} | " + " | ".join(cells) + " |")
  return lines


def _level_cell(row: dict | None) -> str:
  """A stem's generated median level, with the real stems' through the VAE (where the
  evaluation measured it) and as they are."""
  if row is None:
    return "–"
  through_vae = row.get("reconstructed median dB")
  return (f"{_num(row['generated median dB']):.1f} ("
          + ("" if through_vae is None else f"{_num(through_vae):.1f} / ")
          + f"{_num(row['real median dB']):.1f})")


def dependence_cell(scores: dict) -> str:
  """One measure's `music_metrics.cross_stem_dependence` scores as a table cell:
  dependence [interval] (own / other pieces)."""
  return (f"{_num(scores['dependence']):+.3f} [{_num(scores['low']):+.3f}, "
          f"{_num(scores['high']):+.3f}] ({_num(scores['same pieces']):.3f} / "
          f"{_num(scores['other pieces']):.3f})")


def _dependence_table(results: dict) -> list[str]:
  """Each system's cross-stem dependence (own − other pieces) with its interval, beside the
  real stems' and their reconstructions' through the stems' VAE, which every system with
  stems shares (from its evaluation's metrics.json, where it has one)."""
  names = [n for n in results if results[n]["metrics"].get("cross_stem_dependence")]
  if not names:
    return ["(not in these evaluations: `python -m benchmarks.cross_stem_dependence` "
            "computes it from the samples)"]
  real = results[names[0]]["metrics"]["cross_stem_dependence"]["real"]
  # An evaluation written before the reconstructions were scored has none.
  reconstructed = next((results[n]["metrics"]["cross_stem_dependence"]["reconstructed"]
                        for n in names
                        if "reconstructed" in results[n]["metrics"]["cross_stem_dependence"]),
                       None)
  lines = ["| measure | real | real through the VAE | " + " | ".join(names) + " |",
           "|---|---|---|" + "---|" * len(names)]
  for measure in real:
    through_vae = dependence_cell(reconstructed[measure]) if reconstructed else "–"
    lines.append(f"| {measure} | {dependence_cell(real[measure])} | {through_vae} | "
                 + " | ".join(dependence_cell(
                     results[n]["metrics"]["cross_stem_dependence"]["generated"][measure])
                              for n in names) + " |")
  return lines


def _information_table(results: dict) -> list[str]:
  """Each system's cross-stem information in latents (all stems, relative, per σ), from its
  evaluation's metrics.json (evaluation/latent_dependence.py)."""
  names = [n for n in results if results[n]["metrics"].get("cross_stem_information")]
  if not names:
    return ["(not in these evaluations: `python -m benchmarks.cross_stem_information` "
            "computes it from the checkpoints)"]
  rows = [row for row in results[names[0]]["metrics"]["cross_stem_information"]
          if row.startswith("all stems at ")]
  lines = ["| noise level | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
  for row in rows:
    cells = []
    for name in names:
      scores = results[name]["metrics"]["cross_stem_information"].get(row)
      cells.append("–" if scores is None else
                   f"{_num(scores['relative']):+.4f} [{_num(scores['low'] / scores['own']):+.4f}"
                   f", {_num(scores['high'] / scores['own']):+.4f}] (own "
                   f"{_num(scores['own']):.3f})")
    lines.append(f"| {row.removeprefix('all stems at ')} | " + " | ".join(cells) + " |")
  return lines


def _control_section(workdir: str, out: str) -> list[str]:
  """The control (study/control.py): can each system learn a dependence it is shown?"""
  path = os.path.join(control.control_dir(workdir), control.RESULTS_FILE)
  if not os.path.exists(path):
    return ["Not run."]
  results = _read_json(path)
  picture = os.path.join(control.control_dir(workdir), control.PLOT_FILE)
  if os.path.exists(picture):
    shutil.copyfile(picture, os.path.join(out, control.PLOT_FILE))
  sampler = results["sampler"]
  return [
      "`--mode=control` (msldm_jax/study/control.py), the study's first step: each system "
      "with stems "
      f"trained for {results['budget_seconds']:.0f} {results['budget_clock']}-s on "
      f"{results['train_chunks']} synthetic latents of the study's shape whose stems share "
      f"a random sign in each of {results['segments']} segments (each stem alone: fair "
      "signs), then sampled by the same sampler "
      f"({sampler['name']}, {sampler['num_steps']} steps): agreement of the stems' signs "
      "within a piece, and of generated guitar and piano with given bass and drums, "
      "[95 % interval over pieces]. It separates what the systems can learn from what "
      "the real data and the VAE let them learn.", "", *control.table(results), "",
      f"![each segment's coordinates, total generation]({control.PLOT_FILE})"]


def _partial_table(results: dict) -> list[str]:
  names = [n for n in results if results[n]["metrics"].get("partial_generation")]
  if not names:
    return ["(no partial generation in this run)"]
  labels = list(results[names[0]]["metrics"]["partial_generation"])
  lines = ["| generated (given the others) | " + " | ".join(
      f"{n}: mixture {KAD} | {n}: generated stems {KAD}" for n in names) + " |",
           "|---|" + "---|---|" * len(names)]
  for label in labels:
    cells = []
    for name in names:
      entry = results[name]["metrics"]["partial_generation"].get(label, {})
      cells += [_cell(entry.get("mixture", {}).get(KAD), floor=False),
                _cell(entry.get("generated stems", {}).get(KAD), floor=False)]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return lines


def _sampler_section(config, workdir: str, steps: dict, out: str) -> list[str]:
  runs = runner.sampler_runs(config)
  rows, scores = [], {}
  pieces = int(config.study.sampler_pieces)
  for sampler, evaluations in runs:
    folder = runner.sampler_dir(workdir, sampler, evaluations)
    metrics = _read_json(os.path.join(workdir_layout.evaluation_dir(folder), "metrics.json"))
    kad = _score(metrics, "mixture", KAD)
    scores[(sampler, evaluations)] = kad
    record = steps.get(f"samplers/{sampler}_{evaluations}/sample", {})
    num_steps = samplers.steps_for_evaluations(sampler, evaluations)
    used = samplers.network_evaluations(sampler, num_steps)
    rows.append(f"| {sampler} | {used} ({num_steps} steps) | {_cell(kad)} | "
                f"{_cell(_score(metrics, 'mixture', FD), floor=False)} | "
                f"{record.get('wall_seconds', float('nan')) / pieces:.2f} |")
  lines = [f"{pieces} pieces per run, scored on the mixture against the same reference set.",
           "", f"| sampler | network evaluations | mixture {KAD} | mixture FD | "
           "wall s per piece (stage, incl. loading and compiling) |", "|---|---|---|---|---|"]
  lines += rows
  most = max(e for _, e in runs)
  reference = scores.get((samplers.DEFAULT_SAMPLER, most))
  if reference and reference["value"] is not None:
    inside = sorted((e, s) for (s, e), kad in scores.items()
                    if kad and kad["value"] is not None
                    and reference["low"] <= kad["value"] <= reference["high"])
    lines += ["", f"Reference: {samplers.DEFAULT_SAMPLER} at {most} evaluations, "
              f"{KAD} {_cell(reference, floor=False)}. "
              + (f"Fewest evaluations whose score lies inside that interval: {inside[0][0]} "
                 f"({', '.join(s for e, s in inside if e == inside[0][0])})." if inside
                 else "No run lies inside that interval.")]
  plt = plotting.plt  # (plotting selected the Agg backend)
  figure, axis = plt.subplots(figsize=(7, 4))
  for sampler in dict.fromkeys(s for s, _ in runs):
    points = [(e, scores[(sampler, e)]) for s, e in runs
              if s == sampler and scores[(sampler, e)] and scores[(sampler, e)]["value"]
              is not None]
    if points:
      x = [e for e, _ in points]
      y = np.asarray([k["value"] for _, k in points])
      err = np.asarray([[k["value"] - k["low"], k["high"] - k["value"]] for _, k in points]).T
      axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=sampler)
  axis.set_xscale("log")
  axis.set_xlabel("network evaluations per piece")
  axis.set_ylabel(f"mixture {KAD} (95 % interval)")
  axis.legend()
  axis.grid(alpha=0.3)
  figure.tight_layout()
  plotting.save_figure(figure, os.path.join(out, "samplers.png"), dpi=100)
  return lines + ["", "![samplers against evaluations](samplers.png)"]


def _decoder_floor(model: ml_collections.ConfigDict) -> str:
  """The decoder's width floor for the VAE's line ('' when its blocks halve all the way)."""
  floor = int(model.get("decoder_min_width", 0))
  return f" (no block under {floor} channels)" if floor else ""


def _departures(config: ml_collections.ConfigDict) -> list[str]:
  """The study's settings that are not the paper's, read from the config it ran."""
  vae, ldm = config.vae, config.ldm
  weights = dict(vae.loss_weights)
  per_source = bool(vae.model.per_source)
  return [
      f"- SourceVAE: encoder width {vae.model.encoder_width}, decoder width "
      f"{vae.model.decoder_width}{_decoder_floor(vae.model)}, latent {vae.model.latent_dim} "
      "per source (the paper's: 64, 1536, 80); discriminators "
      f"'{vae.discriminator.variant}'; batch {vae.batch_size} one-second windows; AdamW at "
      f"{vae.optimizer.learning_rate:g}.",
      *(["- One SourceVAE per stem (the paper shares one across stems), trained on "
         "one-stem batches, the stems in turn, at a shared VAE's cost per step: each stem's "
         "VAE gets a quarter of the steps. The mixture VAE is one VAE."] if per_source else []),
      f"- Its loss: {weights['mel']:g}·mel + {weights['feature_matching']:g}·feature "
      f"matching + {weights['adversarial']:g}·adversarial + {weights['kl']:g}·KL + "
      f"{weights['waveform']:g}·waveform L1"
      + (f" + {weights['mel_magnitude']:g}·mel magnitude L1" if weights["mel_magnitude"]
         else "")
      + " (the paper's: 15, 2, 1, 10, no waveform or mel magnitude term); "
      + "".join(f"for {stem}: " + ", ".join(f"{name} {float(value):g}"
                                             for name, value in overrides.items()) + "; "
                for stem, overrides in vae.loss_weights_by_stem.items())
      + ("reconstruction-only throughout (no discriminator)."
         if vae.adversarial_start >= vae.train.num_steps else
         f"the first {vae.adversarial_start} steps reconstruction-only (no discriminator), "
         f"then GAN steps with the '{vae.discriminator.variant}' discriminators"
         + (f"; the mixture VAE's first {runner.mixture_vae_adversarial_start(config)} steps"
            if per_source else "") + "."),
      f"- Training for a time budget: {vae.train.max_seconds:.0f} s for the stems' VAE"
      + (f" ({vae.train.max_seconds / stems.NUM_STEMS:.0f} s per stem)"
         if per_source else "")
      + f", {config.study.mixture_vae_seconds:.0f} s for the mixture VAE and "
      f"{config.study.ldm_seconds:.0f} s per latent model of {ldm.train.budget_clock} time "
      "(compilation not counted, evaluation passes counted), not for a number of steps.",
      f"- Every latent model the DiT (width {ldm.model.width}, depth {ldm.model.depth}, "
      f"patch {ldm.model.patch_size}) unless named _unet; Adam at "
      f"{ldm.optimizer.learning_rate:g} with {ldm.optimizer.warmup_steps} warm-up steps, "
      f"batch {ldm.batch_size}, EMA {ldm.ema_decay}.",
      ("- Each source's latents divided by its RMS over the train split over σ_data "
       f"{ldm.sigma_data:g} for the latent models (ldm.latent_scale=per_source; the release "
       "uses them as stored)." if ldm.get("latent_scale", "none") == "per_source" else
       f"- Latents as stored (ldm.latent_scale=none, the release's), against σ_data "
       f"{ldm.sigma_data:g} and a training σ up to {ldm.sigma_max_train:g}."),
      "- ISLDM: four DiTs of that size, one per stem (stacked and vmapped), so about 4× the "
      "parameters and FLOPs of msldm's one; partial generation is then each missing stem "
      "generated alone (the given stems cannot influence it).",
      "- MixLDM: the same SourceVAE stage trained on mixture windows (its budget above), "
      "its latents, one DiT on them; total generation of mixtures only.",
      *_noise_departures(config),
      *_variant_departures(config),
  ]


def _noise_departures(config: ml_collections.ConfigDict) -> list[str]:
  """The noise range, where it is not the release's (training σ ~ U(0, 3], sampling from 3)."""
  ldm, sample = config.ldm, config.sample
  release = samplers.sampler_config(samplers.DEFAULT_SAMPLER)["sigma_max"]
  if (ldm.sigma_distribution, ldm.sigma_max_train, sample.sigma_max) == (
      "uniform", release, release):
    return []
  training = (f"σ ~ U(0, {ldm.sigma_max_train:g}]" if ldm.sigma_distribution == "uniform"
              else f"ln σ ~ N({ldm.p_mean:g}, {ldm.p_std:g}²)")
  return [f"- Noise: training {training} and every sampler starting from σ "
          f"{sample.sigma_max:g} (the release's: U(0, {release:g}] and {release:g}). From "
          f"{release:g}, pure noise lacks the loud frames the data's chunks still show at that "
          "σ, and every stem came out quieter (benchmarks/RESULTS.md, \"Where the energy goes "
          "missing\")."]


def _variant_departures(config: ml_collections.ConfigDict) -> list[str]:
  """What msldm's variants among the study's systems are, from the config they ran."""
  systems, lines = runner.study_systems(config), []
  if "msldm_unet" in systems:
    unet = config.ldm.unet
    lines.append(
        f"- msldm_unet: the release's U-Net (models/unet1d.py) at a CPU size, {unet.channels} "
        f"channels, multipliers {tuple(unet.multipliers)}, factors {tuple(unet.factors)}, "
        f"blocks {tuple(unet.num_blocks)}, attention {tuple(unet.attentions)}, on the same "
        "joint latents and budget as msldm (the paper's network at 364 M parameters).")
  if "msldm_coupled" in systems:
    settings = runner.MODEL_SETTINGS["msldm_coupled"]
    hidden = int(config.ldm.model.get("stem_mixer_hidden", 0)) or config.ldm.model.width
    lines.append(
        f"- msldm_coupled (not in the paper): isldm's {settings['stem_streams']} DiTs, joined "
        "after every block by a stem mixer, an MLP of all stems' tokens at the same time "
        f"patch (hidden width {hidden}) added back to each stem through a gate that starts "
        "at 0, so that it starts as isldm (models/coupled_stems.py). A joint model without "
        "msldm's one width shared by four stems: it tells the gain from the other stems "
        "apart from the cost of that sharing.")
  return lines


NOTES = """\
- What it can show: with data, budgets, sampler and reference set held fixed, whether the
  joint model's pieces are closer to real music than the baselines' on this data at this
  scale, with bootstrap intervals over pieces and the real-vs-real floor beside each score.
- What it cannot: the paper's numbers. At the default variant the models are tiny and
  trained on CPU for the budgets above, on Bach chorales rendered by a soundfont; the VAE
  reconstructions bound every generated score (see the VAE table). One seed per system:
  the intervals are over pieces, and a second training run of msldm moved its drum-bass
  onset dependence by more than that interval spans, while its mixture scores stayed within
  a point (benchmarks/RESULTS.md, "A second seed of msldm and isldm"). The musicnn
  embedding (MSD tags) is not the paper's VGGish. ISLDM gets four times msldm's parameters
  and FLOPs per step, msldm_coupled a little more (stated above), which a fixed time budget
  charges them for.
"""


def split_notes(text: str) -> list[str]:
  """`study.notes` as remarks: split at each ';' outside parentheses, so that a remark may
  hold one in brackets."""
  remarks, depth, start = [], 0, 0
  for i, char in enumerate(text + ";"):
    depth += {"(": 1, ")": -1}.get(char, 0)
    if char == ";" and depth <= 0:
      remarks.append(text[start:i].strip())
      start = i + 1
  return [remark for remark in remarks if remark]


def write(config: ml_collections.ConfigDict, workdir: str, out: str, steps: dict):
  """Writes OUT/README.md and its plots from the study's products in WORKDIR."""
  os.makedirs(out, exist_ok=True)
  systems = runner.study_systems(config)
  results = _system_results(config, workdir, systems)
  vae_records = {"SourceVAE (stems)": loop.read_metrics(
      workdir_layout.trainer_dir(workdir, workdir_layout.VAE))}
  gan_starts = {"SourceVAE (stems)": int(config.vae.adversarial_start),
                "mixture VAE (mixldm)": runner.mixture_vae_adversarial_start(config)}
  vae_scores = {"SourceVAE (stems)": _read_vae_scores(workdir)}
  if "mixldm" in results:
    mixldm_dir = runner.system_dir(workdir, "mixldm")
    vae_records["mixture VAE (mixldm)"] = loop.read_metrics(workdir_layout.trainer_dir(
        mixldm_dir, workdir_layout.VAE))
    vae_scores["mixture VAE (mixldm)"] = _read_vae_scores(mixldm_dir)
  loss_plot(results, out)
  for name, result in results.items():
    picture = os.path.join(workdir_layout.samples_dir(
        runner.system_config(config, workdir, name), result["folder"]),
        "piece_000", "spectrogram.png")
    if os.path.exists(picture):
      shutil.copyfile(picture, os.path.join(out, f"spectrogram_{name}.png"))

  total_wall = sum(r["wall_seconds"] for r in steps.values())
  any_metrics = next(iter(results.values()))["metrics"]
  lines = [
      "# The study: MSLDM against ISLDM and MixLDM, samplers against steps",
      "",
      f"Command: `python -m msldm_jax.main --config=configs/study.py:variant={config.variant} "
      f"--workdir={_shown_path(workdir)} --mode=study"
      + (f" --config.study.report_dir={_shown_path(out)}`" if config.study.report_dir
         else "`"),
      "",
      f"Report written at commit {provenance.commit(out)} by msldm_jax/study/report.py; "
      f"{step_commits(steps)}. Machine: {provenance.machine()}. The steps took "
      f"{total_wall / 60:.0f} min of wall time in all (the newest run of each, "
      "WORKDIR/study/steps.jsonl).",
      "",
      f"Data: the mini dataset, {config.data.render.num_pieces or 'all usable'} Bach "
      "chorales rendered to bass, drums, guitar and piano (msldm_jax/data/minislakh.py). "
      f"Scores: {any_metrics['embedding']} embeddings of {any_metrics['num_reference']} "
      "reference chunks of "
      f"{reference_set.splits_label(config.evaluate.reference_split)} against "
      f"{config.sample.num_pieces} generated pieces per system (euler_churn, "
      f"{config.sample.num_steps} steps, the release's sampler); 95 % bootstrap intervals "
      "over pieces; the floor is real against real (two halves of the reference).",
      "",
      "## Where this departs from the paper (all stated config choices)",
      "",
      *_departures(config),
      "",
      "## The SourceVAEs",
      "",
      f"Goals for the study's VAE on the test split: mel distance ≤ {GOAL_MEL}, SI-SDR ≥ "
      f"{GOAL_SI_SDR:g} dB, and the reconstructed guitar, piano and drums stems tagged right "
      f"as often as the real ones (within {GOAL_TAG_POINTS:g} points).",
      "",
      *_vae_section(vae_records, gan_starts, vae_scores, out),
      "",
      "## The latent models, for the same training time",
      "",
      "| system | parameters | GFLOP per evaluation | steps in budget | budget s | "
      "loss, last 4 logs |", "|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    lines.append(f"| {name} | {r['params']:,} | {r['flops'] / 1e9:.3f} | {r['steps']} | "
                 f"{r['seconds']:.0f} | {r['last_loss']:.4f} |")
  lines += ["", "Diffusion loss per σ bucket, last quarter of each run's logged steps "
            "(msldm and isldm on the same joint latents; mixldm on other latents, so its "
            "losses are not comparable):", "",
            "| σ bucket | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
  for bucket in train_ldm.SIGMA_BUCKET_NAMES:
    lines.append(f"| {bucket.split('_', 3)[-1]} | " + " | ".join(
        f"{results[n]['buckets'][bucket]:.4f}" for n in results) + " |")
  lines += ["", "![loss per σ bucket](loss_by_sigma.png)", "",
            "## Total generation", "",
            f"{KAD} and FD with [95 % interval] and (floor; through the VAE): the floor is real "
            "against real (two halves of the reference), 'through the VAE' the first half's "
            "reconstructions by the system's own VAE against the second half, the best a "
            "generator decoding through it can expect (each system's, so mixldm's is its "
            "mixture VAE's); levels in dB RMS of audible stems; measures with the real "
            "chunks' value in brackets. mixldm generates mixtures only.", ""]
  lines += _total_table(results)
  shares = _codec_shares(results)
  if shares:
    lines += ["", f"The mixture's {KAD}: the codec's share and the latent model's "
              "(the reference's first half through each system's VAE against its second half):",
              ""] + shares
  lines += ["", "The paper's ordering on the mixture:", ""] + (_ordering(results) or
                                                                 ["- (msldm or a baseline "
                                                                  "missing)"])
  lines += ["", "Cross-stem dependence: each measure on a piece's own stems minus the same "
            "measure on stems of different pieces (its value when nothing ties them), "
            "[95 % interval over pieces] (own / other pieces). isldm's stems are generated "
            "apart, so 0 is what no dependence scores; the real stems' is what a joint model "
            "should reach, and their reconstructions' what it can reach through this VAE.", ""]
  lines += _dependence_table(results)
  lines += ["", "The same question asked of each denoiser, in latents: on the held-out chunks "
            "of the reference splits, how much its loss grows when a stem's partners come "
            "from another chunk (the same noise), relative to its loss with its own, all "
            "stems, [95 % interval over chunks] (evaluation/latent_dependence.py). isldm's "
            "is 0 by construction; a joint model that uses the other stems scores above "
            "it.", ""]
  lines += _information_table(results)
  lines += ["", "One piece per system (piece 0):", ""]
  lines += [f"![{name}](spectrogram_{name}.png)" for name in results
            if os.path.exists(os.path.join(out, f"spectrogram_{name}.png"))]
  lines += ["", "## The control: a dependence planted in the latents", "",
            *_control_section(workdir, out)]
  lines += ["", "## Partial generation", "",
            f"Each of the 14 subsets generated given the other stems of "
            f"{config.evaluate.partial_chunks} seeded random reference chunks (MSDM's "
            "protocol). "
            "isldm's generated stems never see the given ones.", ""]
  lines += _partial_table(results)
  lines += ["", "## Samplers against network evaluations (msldm)", ""]
  lines += _sampler_section(config, workdir, steps, out)
  lines += ["", "## Where the time went", "",
            "Each step's newest run (WORKDIR/study/steps.jsonl): a step stopped and resumed "
            "shows its last run only (the trainings' budgets above count every run); CPU "
            "time is the study process's, so a step's share of 2 cores shows as CPU over "
            "wall.", "", *time_table(steps)]
  lines += ["", "## What this does and does not show", "", NOTES]
  remarks = split_notes(str(config.study.notes))
  if remarks:
    lines += ["## About this run", ""] + [f"- {note}" for note in remarks]
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
