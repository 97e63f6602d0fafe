r"""The `--mode=study` stage: every system of the comparison trained, sampled and scored on one
machine under one budget, then the report (configs/study.py says what and why).

  python -m msldm_jax.main --config=configs/study.py --workdir=runs/study --mode=study

WORKDIR holds the shared stages where `--mode=all` would put them, and one folder per
system and per sampler run:

  WORKDIR/{minislakh,tfds}/        the data (shared)
  WORKDIR/vae/, WORKDIR/latents/   the SourceVAE and the joint latents (msldm, isldm, ...)
  WORKDIR/evaluation/vae/          the SourceVAE's reconstructions of the test split scored
  WORKDIR/systems/NAME/            ldm/, samples/, evaluation/ of system NAME; mixldm's also
                                   vae/, evaluation/vae/ and latents/ (its VAE trained on
                                   mixture windows)
  WORKDIR/samplers/SAMPLER_E/      samples/ and evaluation/ of msldm's pieces by SAMPLER at
                                   E network evaluations
  WORKDIR/control/                 the control: a planted dependence, each system with
                                   stems trained on it and scored (study/control.py)
  WORKDIR/study/                   markers of finished steps (steps.jsonl: their times
                                   and commits)

Each step is a stage of `python -m msldm_jax.main` run with a config derived from the study's
(`system_config`, `sampler_run_config`), so every system is reachable, and checked, through
the same stages a user runs. A step finished under the same derived config is skipped when
the study runs again; a killed training resumes with what is left of its time budget
(training/loop.py), so an interrupted study continues where it was.
"""

import hashlib
import json
import os
import time
from collections.abc import Callable

from absl import logging
import jax
import ml_collections

from msldm_jax import atomic_files
from msldm_jax import host_allocator
from msldm_jax import provenance
from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.data import prepare
from msldm_jax.diffusion import samplers
from msldm_jax.evaluation import stage as evaluation_stage
from msldm_jax.evaluation import vae_quality
from msldm_jax.generation import stage as generation_stage
from msldm_jax.latents import encode
from msldm_jax.models import denoisers
from msldm_jax.training import train_ldm
from msldm_jax.training import train_vae

# The stages a study step runs: the `--mode` names of msldm_jax.main.
STAGES: dict[str, Callable] = {
    "data": prepare.run,
    "train_vae": train_vae.run,
    "evaluate_vae": vae_quality.run,
    "encode_latents": encode.run,
    "train_ldm": train_ldm.run,
    "sample": generation_stage.run,
    "evaluate": evaluation_stage.run,
}


def _control(config: ml_collections.ConfigDict, workdir: str):
  # Imported here: the control builds on this module's systems.
  from msldm_jax.study import control  # pylint: disable=g-import-not-at-top
  return control.run(config, workdir)


STAGES["control"] = _control

# The comparison's systems: name -> (config.system, denoiser network).
SYSTEMS = {
    "msldm": ("msldm", denoisers.DIT),
    "isldm": ("isldm", denoisers.DIT),
    "mixldm": ("mixldm", denoisers.DIT),
    "msldm_unet": ("msldm", denoisers.UNET),
    "msldm_coupled": ("msldm", denoisers.DIT),
}
# Settings of a system's network on top of the study's (ldm.model for the DiT): the
# stem-coupled DiT is isldm's four networks joined by mixers (models/coupled_stems.py).
MODEL_SETTINGS = {
    "msldm_coupled": {"stem_streams": stems.NUM_STEMS},
}
# The system whose samplers are compared against network evaluations.
SAMPLER_SYSTEM = "msldm"

SYSTEMS_DIR = "systems"
SAMPLERS_DIR = "samplers"
MARKERS_DIR = "study"
STEPS_LOG = "steps.jsonl"


def parse_list(text: str, what: str) -> list[str]:
  items = [item.strip() for item in str(text).split(",") if item.strip()]
  if not items:
    raise ValueError(f"config key {what}={text!r} names nothing")
  return items


def study_systems(config: ml_collections.ConfigDict) -> list[str]:
  systems = parse_list(config.study.systems, "study.systems")
  unknown = [name for name in systems if name not in SYSTEMS]
  if unknown:
    raise ValueError(f"config key study.systems={config.study.systems!r}: unknown "
                     f"{unknown}; systems: {', '.join(SYSTEMS)}")
  return systems


def sampler_runs(config: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """(sampler, network evaluations) of every sampler run."""
  names = parse_list(config.study.samplers, "study.samplers")
  for name in names:
    if name not in samplers.SAMPLERS:
      raise ValueError(f"config key study.samplers: unknown sampler {name!r}; samplers: "
                       + ", ".join(samplers.SAMPLERS))
  counts = []
  for text in parse_list(config.study.evaluations, "study.evaluations"):
    if not text.isdigit() or int(text) < 1:
      raise ValueError(f"config key study.evaluations={config.study.evaluations!r}: "
                       f"{text!r} is not a positive count")
    counts.append(int(text))
  return [(name, count) for name in names for count in counts]


def system_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, SYSTEMS_DIR, name)


def sampler_dir(workdir: str, sampler: str, evaluations: int) -> str:
  return os.path.join(workdir, SAMPLERS_DIR, f"{sampler}_{evaluations}")


def _derived(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """An unlocked copy without the study's own section (the stages do not read it)."""
  copy = ml_collections.ConfigDict(config.to_dict())
  del copy["study"]
  return copy


def mixture_vae_adversarial_start(config: ml_collections.ConfigDict) -> int:
  """The mixture VAE's reconstruction-only steps: as many as each stem's VAE gets of
  `vae.adversarial_start` (a quarter when the stems' VAEs are one per stem, trained in turn),
  so that every VAE of the study follows the same recipe, as `study.mixture_vae_seconds`
  gives it a stem's share of the time."""
  start = int(config.vae.adversarial_start)
  return start // stems.NUM_STEMS if config.vae.model.per_source else start


def system_config(config: ml_collections.ConfigDict, workdir: str,
                  name: str) -> ml_collections.ConfigDict:
  """The config the stages of system `name` run under, in `system_dir(workdir, name)`: the
  shared data, and the shared VAE and latents unless it models the mixture (then its own,
  made there, trained for `study.mixture_vae_seconds` with its GAN phase from
  `mixture_vae_adversarial_start`); trained for `study.ldm_seconds` on
  `ldm.train.budget_clock`."""
  system, denoiser = SYSTEMS[name]
  derived = _derived(config)
  derived.system = system
  derived.ldm.denoiser = denoiser
  for key, value in MODEL_SETTINGS.get(name, {}).items():
    derived.ldm[denoisers.CONFIG_KEYS[denoiser]][key] = value
  derived.data.tfds_dir = workdir_layout.tfds_dir(config, workdir)
  if system == "mixldm":
    # The mixture is one source: one parameter set, whatever the stems' VAE has.
    derived.vae.model.per_source = False
    derived.vae.train.max_seconds = float(config.study.mixture_vae_seconds)
    derived.vae.adversarial_start = mixture_vae_adversarial_start(config)
  else:
    derived.ldm.vae_checkpoint = os.path.abspath(workdir)
    derived.ldm.latents_dir = os.path.abspath(workdir_layout.latents_dir(config, workdir))
  derived.ldm.train.max_seconds = float(config.study.ldm_seconds)
  return derived


# The sample keys every sampler run shares with the study's own sampling: the schedule.
SCHEDULE_KEYS = ("sigma_min", "sigma_max", "rho")


def sampler_run_config(config: ml_collections.ConfigDict, workdir: str, sampler: str,
                       evaluations: int) -> ml_collections.ConfigDict:
  """The sample and evaluate config of one sampler run: msldm's checkpoint, `sampler` at
  the most steps within `evaluations` from the study's noise schedule (`SCHEDULE_KEYS`),
  `study.sampler_pieces` pieces scored on the mixture's distances."""
  derived = system_config(config, workdir, SAMPLER_SYSTEM)
  derived.ldm.denoiser_checkpoint = os.path.abspath(system_dir(workdir, SAMPLER_SYSTEM))
  settings = samplers.sampler_config(sampler)
  settings["num_steps"] = samplers.steps_for_evaluations(sampler, evaluations)
  # The noise schedule is the network's (it was trained up to ldm.sigma_max_train), so every
  # sampler keeps the study's; every other setting at this sampler's own default (heun and
  # dpmpp_2m without the release's churn), the step count from the evaluations.
  for key in SCHEDULE_KEYS:
    settings[key] = config.sample[key]
  derived.sample.sampler = sampler
  for key, value in settings.items():
    derived.sample[key] = value
  derived.sample.num_pieces = int(config.study.sampler_pieces)
  derived.evaluate.scope = "mixture_distances"
  return derived


# The config sections a stage never reads (only the stages after it do). A step's marker
# digests the rest, so that changing how pieces are sampled or scored re-runs the sampling or
# scoring, not the trainings and the encoding before them.
UNREAD_SECTIONS = {
    "data": ("sample", "separate", "evaluate"),
    "train_vae": ("sample", "separate", "evaluate"),
    "evaluate_vae": ("sample", "separate"),
    "encode_latents": ("sample", "separate", "evaluate"),
    "train_ldm": ("sample", "separate", "evaluate"),
    "sample": ("separate", "evaluate"),
    "evaluate": (),
    "control": ("separate", "evaluate"),
}
# The study keys the control reads (its step's config keeps only these of the study's): its
# own, and those `system_config` reads, whose systems it trains.
CONTROL_KEYS = ("systems", "ldm_seconds", "mixture_vae_seconds", "control_seconds",
                "control_chunks", "control_pieces", "control_segments")


def control_step_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The study's config with only the study keys the control reads, so that e.g. new notes
  or sampler runs do not re-run it."""
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.study = ml_collections.ConfigDict({key: config.study[key] for key in CONTROL_KEYS})
  return copy


def step_digest(config: ml_collections.ConfigDict, mode: str) -> str:
  """The digest of what stage `mode` reads of `config`: the whole config but its unread
  sections."""
  read = config.to_dict()
  for section in UNREAD_SECTIONS[mode]:
    read.pop(section, None)
  return hashlib.sha256(ml_collections.ConfigDict(read).to_json_best_effort(
      sort_keys=True).encode()).hexdigest()


class Steps:
  """The study's record of finished steps: a marker per step holding its config's digest,
  and one line per step run in steps.jsonl (wall and CPU seconds, the commit it ran from),
  for the report. `report_dir`: where the report goes, whose files do not mark a commit as
  changed (docs/study is inside the repository)."""

  def __init__(self, workdir: str, report_dir: str = ""):
    self.report_dir = report_dir
    self.dir = os.path.join(workdir, MARKERS_DIR)
    os.makedirs(self.dir, exist_ok=True)
    self.log_path = os.path.join(self.dir, STEPS_LOG)

  def _marker(self, name: str) -> str:
    return os.path.join(self.dir, name.replace("/", "__") + ".done")

  def run(self, name: str, mode: str, config: ml_collections.ConfigDict, workdir: str):
    """Runs stage `mode` as step `name` unless it finished under this config."""
    digest = step_digest(config, mode)
    marker = self._marker(name)
    if os.path.exists(marker):
      with open(marker) as f:
        if f.read().strip() == digest:
          logging.info("study step %s: finished earlier under this config, skipped", name)
          return
    logging.info("study step %s: --mode=%s in %s", name, mode, workdir)
    # At the start: the code the step runs is what is checked out when it begins.
    commit = provenance.commit(self.report_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    STAGES[mode](config, workdir)
    record = {"step": name, "mode": mode, "workdir": os.path.abspath(workdir),
              "wall_seconds": time.perf_counter() - wall,
              "cpu_seconds": time.process_time() - cpu,
              "commit": commit}
    if jax.process_index() == 0:
      with open(self.log_path, "a") as f:
        f.write(json.dumps(record) + "\n")
      atomic_files.write_lines_atomic(marker, [digest + "\n"])
    logging.info("study step %s: done in %.0f s", name, record["wall_seconds"])
    host_allocator.release_free_pages()

  def records(self) -> dict[str, dict]:
    """The newest record of each step."""
    if not os.path.exists(self.log_path):
      return {}
    with open(self.log_path) as f:
      return {r["step"]: r for r in map(json.loads, filter(str.strip, f))}


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The `--mode=study` stage; returns the report's folder."""
  if "study" not in config:
    raise ValueError("--mode=study needs a study config (config.study): "
                     "--config=configs/study.py")
  systems = study_systems(config)
  runs = sampler_runs(config)
  if SAMPLER_SYSTEM not in systems:
    raise ValueError(f"config key study.systems={config.study.systems!r}: the samplers are "
                     f"compared on {SAMPLER_SYSTEM}, which must be one of the systems")
  workdir = os.path.abspath(workdir)
  report_dir = config.study.report_dir or os.path.join(workdir, "report")
  steps = Steps(workdir, report_dir)
  steps.run("control", "control", control_step_config(config), workdir)
  shared = _derived(config)
  for mode in ("data", "train_vae", "evaluate_vae", "encode_latents"):
    steps.run(f"shared/{mode}", mode, shared, workdir)
  for name in systems:
    derived, folder = system_config(config, workdir, name), system_dir(workdir, name)
    modes = ("train_ldm", "sample", "evaluate")
    if SYSTEMS[name][0] == "mixldm":
      modes = ("train_vae", "evaluate_vae", "encode_latents") + modes
    for mode in modes:
      steps.run(f"{name}/{mode}", mode, derived, folder)
  for sampler, evaluations in runs:
    derived = sampler_run_config(config, workdir, sampler, evaluations)
    folder = sampler_dir(workdir, sampler, evaluations)
    for mode in ("sample", "evaluate"):
      steps.run(f"{SAMPLERS_DIR}/{sampler}_{evaluations}/{mode}", mode, derived, folder)
  # Imported here: the report reads every product above and draws (matplotlib).
  from msldm_jax.study import report  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    report.write(config, workdir, report_dir, steps.records())
  return report_dir
