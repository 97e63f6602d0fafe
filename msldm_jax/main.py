r"""The one entry point: flags only, then the stage function for --mode.

  python -m msldm_jax.main --config=configs/demo.py[:variant=tiny] --workdir=DIR --mode=MODE

Modes:
  data        render the mini dataset when the config asks for it, and build the TFDS dataset.
  train_vae   train (or resume) the SourceVAE with its discriminators, in WORKDIR/vae.
  encode_latents
              encode every chunk of every split with the frozen VAE (posterior mean) into the
              latent store, WORKDIR/latents (resumes a killed run; a no-op when complete).
  train_ldm   train (or resume) the latent diffusion transformer, in WORKDIR/ldm.
  sample      generate pieces (all four stems, or --generate=bass,drums given the other
              stems in --condition_dir or --condition=STEM=FILE,...: a user's recordings, any
              format, rate and length) into WORKDIR/samples: stems, mix, spectrogram;
              --seconds=60 for pieces longer than the model's window.
  separate    separate a mixture (--mix=FILE, any format, rate and length) into its four
              stems by posterior sampling (--out_dir, default WORKDIR/separated/NAME).
  evaluate    score the generated pieces against real chunks (Fréchet distances, empty-stem
              rate, cross-stem coherence, VAE reconstruction) into WORKDIR/evaluation.
  evaluate_vae
              the frozen VAE's reconstructions of real chunks of `evaluate.vae_split`
              (SI-SDR, mel distance, instrument tags per stem) into WORKDIR/evaluation/vae.
  all         data, train_vae, encode_latents, train_ldm, sample and evaluate in order,
              skipping those finished under the same config.
  study       with configs/study.py: MSLDM against ISLDM and MixLDM and samplers against
              steps, each system through the stages above, then a report
              (msldm_jax/study/runner.py); resumable like all.
  control     with configs/study.py: the study's first step alone, in minutes: each system
              with stems trained on latents whose stems share a planted sign pattern, and
              scored on whether its pieces keep it (msldm_jax/study/control.py).

Several processes (a TPU pod slice, a GPU cluster, or processes on one machine): every one
runs the same command with --multihost, plus --coordinator_address=HOST:PORT
--num_processes=N --process_id=I where JAX cannot detect the cluster (parallel/distributed.py;
the README has the commands).

The process restarts itself once on jemalloc where it is installed (msldm_jax/host_allocator.py;
MSLDM_HOST_ALLOCATOR=system keeps glibc's malloc).
"""

# Before anything else: under `python -m msldm_jax.main` the process restarts itself on
# jemalloc (host_allocator: the VAE's CPU steps spend a third of their time in the kernel
# otherwise), and what it imports before that is imported twice.
from msldm_jax import host_allocator

if __name__ == "__main__":
  host_allocator.restart_on_jemalloc()

import hashlib  # noqa: E402
import importlib  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from msldm_jax import workdir_layout  # noqa: E402
from msldm_jax.parallel import distributed  # noqa: E402

# mode -> the stage's module; every stage module has `run(config, workdir)`. Imported lazily
# so that a mode pays only for what it uses.
MODES = {
    "data": "msldm_jax.data.prepare",
    "train_vae": "msldm_jax.training.train_vae",
    "encode_latents": "msldm_jax.latents.encode",
    "train_ldm": "msldm_jax.training.train_ldm",
    "sample": "msldm_jax.generation.stage",
    "separate": "msldm_jax.generation.separation",
    "evaluate": "msldm_jax.evaluation.stage",
    "evaluate_vae": "msldm_jax.evaluation.vae_quality",
    "all": "msldm_jax.main",
    "study": "msldm_jax.study.runner",
    "control": "msldm_jax.study.control",
}
# What --mode=all runs, in order.
ALL_STAGES = ("data", "train_vae", "encode_latents", "train_ldm", "sample", "evaluate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config script (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for data, checkpoints and outputs.")
_MODE = flags.DEFINE_enum("mode", "data", list(MODES), "Which stage to run.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process run first (parallel/distributed.py): every "
    "process of a TPU pod slice, GPU cluster or multi-process CPU run runs the same command. "
    "The cluster is detected (TPU, SLURM, Open MPI) unless the three settings below are given.")
# --multihost settings (parallel/distributed.py); None: detected from the cluster.
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "--multihost: HOST:PORT of process 0's coordinator, the same "
    "on every process (or $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "--multihost: how many processes (or $JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "--multihost: this process's index, 0 ... num_processes-1 (or "
    "$JAX_PROCESS_ID).")
_INITIALIZATION_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "--multihost: seconds to wait for every process to join "
    "before stopping with an error.")
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    "heartbeat_timeout", 100, "--multihost: seconds after which a silent (dead) process stops "
    "the others.")
_SHUTDOWN_TIMEOUT = flags.DEFINE_integer(
    "shutdown_timeout", 300, "--multihost: seconds a finished or failed process waits for the "
    "others at exit.")
# Shorthands for the sample stage's config keys (None: keep the config's value).
_CONDITION_DIR = flags.DEFINE_string(
    "condition_dir", None, "--mode=sample: folder of given stems {stem}.wav "
    "(overrides config.sample.condition_dir).")
_GENERATE = flags.DEFINE_string(
    "generate", None, "--mode=sample: stems to generate, e.g. bass,drums; the others are "
    "read from --condition_dir or --condition (overrides config.sample.generate).")
_CONDITION = flags.DEFINE_string(
    "condition", None, "--mode=sample: given stems as files, e.g. bass=my_bass.mp3,"
    "piano=keys.flac; without --generate the other stems are generated (overrides "
    "config.sample.condition).")
_PAD = flags.DEFINE_bool(
    "pad", None, "--mode=sample: pad given stems shorter than the longest with silence "
    "instead of stopping with an error (overrides config.sample.pad).")
_SECONDS = flags.DEFINE_float(
    "seconds", None, "--mode=sample: length of totally generated pieces in seconds; longer "
    "than the model's window is generated window by window (overrides config.sample.seconds).")
_MIX = flags.DEFINE_string(
    "mix", None, "--mode=separate: the mixture to separate (overrides config.separate.mix).")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "--mode=separate: where the stems go (overrides "
    "config.separate.output_dir).")

# flag → the config key it sets, when given.
_SHORTHANDS = (
    (_CONDITION_DIR, ("sample", "condition_dir")),
    (_GENERATE, ("sample", "generate")),
    (_CONDITION, ("sample", "condition")),
    (_PAD, ("sample", "pad")),
    (_SECONDS, ("sample", "seconds")),
    (_MIX, ("separate", "mix")),
    (_OUT_DIR, ("separate", "output_dir")),
)


def run(mode: str, config, workdir: str):
  """Runs one mode; importable so that tests and notebooks take the same path as the CLI."""
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; modes: {', '.join(MODES)}")
  if mode == "all":
    # This module's own function. Importing it by name would, under `python -m
    # msldm_jax.main` (where this module is __main__), execute the module a second time and
    # define its flags twice.
    return run_all(config, workdir)
  return importlib.import_module(MODES[mode]).run(config, workdir)


def _config_digest(config) -> str:
  return hashlib.sha256(config.to_json_best_effort(sort_keys=True).encode()).hexdigest()


def run_all(config, workdir: str) -> dict:
  """Every stage in order. A stage that finished under the same config is skipped (a marker
  in WORKDIR/stages records it); an unfinished one resumes from its own checkpoints."""
  marker_dir = workdir_layout.stage_markers_dir(workdir)
  os.makedirs(marker_dir, exist_ok=True)
  digest = _config_digest(config)
  results = {}
  for mode in ALL_STAGES:
    marker = os.path.join(marker_dir, f"{mode}.done")
    if os.path.isfile(marker):
      with open(marker) as f:
        if f.read().strip() == digest:
          logging.info("stage %s: finished earlier with this config, skipped", mode)
          continue
    start = time.perf_counter()
    logging.info("stage %s: running", mode)
    results[mode] = run(mode, config, workdir)
    logging.info("stage %s: done in %.0f s", mode, time.perf_counter() - start)
    host_allocator.release_free_pages()
    if jax.process_index() == 0:
      with open(marker, "w") as f:
        f.write(digest + "\n")
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  flags.mark_flags_as_required(["config", "workdir"])
  explicit = [f"--{f.name}" for f in (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID)
              if f.value is not None]
  if _MULTIHOST.value:
    # Before any other JAX call: it decides which devices this process sees.
    distributed.initialize(distributed.Settings(
        coordinator_address=_COORDINATOR_ADDRESS.value, num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value, initialization_timeout=_INITIALIZATION_TIMEOUT.value,
        heartbeat_timeout=_HEARTBEAT_TIMEOUT.value, shutdown_timeout=_SHUTDOWN_TIMEOUT.value))
  elif explicit:
    raise app.UsageError(f"{', '.join(explicit)} without --multihost: add --multihost")
  logging.info("mode=%s workdir=%s process %d of %d, host allocator %s", _MODE.value,
               _WORKDIR.value, jax.process_index(), jax.process_count(),
               host_allocator.describe())
  config = _CONFIG.value
  for flag, (section, key) in _SHORTHANDS:
    if flag.value is not None:
      config[section][key] = flag.value
  run(_MODE.value, config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
