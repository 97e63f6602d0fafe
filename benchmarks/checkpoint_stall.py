r"""What an asynchronous checkpoint costs the diffusion trainer's steps, on this machine.

  python -m benchmarks.checkpoint_stall                       # DiT `small`, batch 2
  python -m benchmarks.checkpoint_stall --batch_size=16       # the paper's batch
  python -m benchmarks.checkpoint_stall --compress --nosnapshot   # as saves were before
  python -m benchmarks.checkpoint_stall --dit_variant=tiny --frames=32 --latent_dim=8

Method. The real trainer and loop (`train_ldm.LDMTrainer`, `training/loop.train`: the same
orbax CheckpointManager, asynchronous saves, metrics fetched one step late) train the DiT
variant --dit_variant on a synthetic latent store of [--chunks, 4 stems, --latent_dim,
--frames] at --batch_size on every core of one CPU device, logging every step and saving
every --checkpoint_every steps, for --saves + 1 intervals (the last save, at the final step,
is not measured: nothing follows it). Recorded on the host, by probes around the loop's own
calls: when each step's metrics arrive (the loop fetches step s while step s+1 runs, and at
a checkpoint step at once, to check them before saving), so that the interval between two
arrivals is one step's time plus whatever the host did in between; when each
`checkpointing.save` call returns; after each step, whether orbax is still writing; the CPU
time of each thread of the process.
Step time: the median interval of the steps before the first save (from step 3 on: the
first two include compilation). Per save at step c:
  loop blocked   from step c's metrics to the return of the save: the check, the wait for
                 the previous write, the copy into the host snapshot (on CPU), orbax's
                 synchronous part. The devices have no step queued meanwhile: this is the
                 stall the loop itself makes, in seconds and in steps;
  step c+1 extra the interval of step c+1 minus the step time: the stall above plus what
                 the background write took from that step;
  write in flight  for how many steps orbax was still writing after the save;
  writer CPU     CPU seconds of TensorStore's threads (which write the files) from step c's
                 metrics to step c+--checkpoint_every-1's;
  steps extra    the intervals of steps c+1 ... c+--checkpoint_every-1 summed, minus as many
                 step times: everything the save cost the steps, the write included (on a
                 machine whose cores the steps keep busy, the write's CPU time comes out of
                 theirs).
--compress (zstd, orbax's default) and --nosnapshot (save the state itself: on CPU, orbax
then views the live buffers and the next step cannot donate them) measure saves as they
were before `checkpointing.make_manager` and `training/host_snapshot.py`.
"""

import functools
import os
import platform
import shutil
import sys
import tempfile
import time

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from benchmarks import machine as machine_info
from msldm_jax import checkpointing  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax import config_loading  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax import stems  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.latents import store  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.models import dit  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import host_snapshot  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import train_ldm  # noqa: E402  pylint: disable=g-import-not-at-top

_VARIANT = flags.DEFINE_string("dit_variant", "small", "DiT size (models/dit.py).")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Chunks per step.")
_FRAMES = flags.DEFINE_integer("frames", 1024, "Latent frames per chunk (1024: 14.86 s).")
_LATENT_DIM = flags.DEFINE_integer("latent_dim", 80, "Latent channels per stem (paper: 80).")
_CHUNKS = flags.DEFINE_integer("chunks", 16, "Chunks in the synthetic store.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 8, "Steps between saves.")
_SAVES = flags.DEFINE_integer("saves", 2, "Measured saves.")
_COMPRESS = flags.DEFINE_bool("compress", False, "Save the state zstd-compressed (orbax's "
                               "default; `checkpointing.make_manager(compress=...)`).")
_SNAPSHOT = flags.DEFINE_bool("snapshot", True, "Save from the loop's host snapshot "
                               "(training/host_snapshot.py); --nosnapshot saves the state "
                               "itself, as before it.")
_WORKDIR = flags.DEFINE_string("workdir", "", "Where to write (default: a temporary folder).")



_TICK = os.sysconf("SC_CLK_TCK")
_WRITER_THREADS = "ts_pool_worker"  # TensorStore's pool: orbax's file writes run there


def _thread_cpu() -> dict[int, tuple[str, float]]:
  """CPU seconds (user + system) of each live thread of this process: tid -> (name, s)."""
  threads = {}
  for tid in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        stat = f.read()
    except OSError:  # ended meanwhile
      continue
    name = stat[stat.index("(") + 1:stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2:].split()
    threads[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / _TICK)
  return threads


class _TimedTrainer(train_ldm.LDMTrainer):
  """The real trainer, noting when each step's metrics reach the host."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.arrivals = {}  # step -> (perf_counter, process CPU time)

  def summarize(self, steps):
    now = (time.perf_counter(), time.process_time(), _thread_cpu())
    for step, _ in steps:
      self.arrivals.setdefault(step, now)
    return super().summarize(steps)


def _config(workdir: str):
  config = config_loading.load_config(os.path.join(REPO_ROOT, "configs", "demo.py"))
  model = dit.model_config(_VARIANT.value)
  model.in_channels = 0  # the store's
  config.ldm.denoiser = "dit"
  config.ldm.model = model
  config.ldm.batch_size = _BATCH.value
  config.ldm.latents_dir = os.path.join(workdir, "latents")
  every = _CHECKPOINT_EVERY.value
  train = config.ldm.train
  train.num_steps = every * (_SAVES.value + 1)
  train.checkpoint_every = every
  train.log_every = 1
  train.sample_every = 0
  train.keep_checkpoints = 2
  return config


def main(argv):
  del argv
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="checkpoint_stall_")
  try:
    _measure(workdir)
  finally:
    if not _WORKDIR.value:  # a few GiB of checkpoints
      shutil.rmtree(workdir, ignore_errors=True)


def _measure(workdir: str):
  config = _config(workdir)
  rng = np.random.default_rng(0)
  latents = 0.5 * rng.standard_normal(
      (_CHUNKS.value, stems.NUM_STEMS, _LATENT_DIM.value, _FRAMES.value)).astype(np.float32)
  if store.read_manifest(config.ldm.latents_dir) is None:
    store.write_latents(config.ldm.latents_dir, {"train": latents},
                        vae_identity={"checkpoint_dir": "synthetic", "step": 0,
                                      "params_sha256": "0" * 64},
                        settings={}, chunks_per_shard=8)

  # Timing probes around the loop's own calls (the benchmark's, not the library's).
  saves, managers = {}, []
  original_save, original_make = checkpointing.save, checkpointing.make_manager

  @functools.wraps(original_save)
  def timed_save(manager, step, *args, **kwargs):
    start = time.perf_counter()
    result = original_save(manager, step, *args, **kwargs)
    saves[step] = (start, time.perf_counter())
    return result

  @functools.wraps(original_make)
  def kept_manager(*args, **kwargs):
    managers.append(original_make(*args, compress=_COMPRESS.value, **kwargs))
    return managers[-1]

  in_flight = {}  # step -> whether a save was still being written after it
  checkpointing.save, checkpointing.make_manager = timed_save, kept_manager
  original_snapshot = host_snapshot.HostSnapshot
  if not _SNAPSHOT.value:
    host_snapshot.HostSnapshot = lambda abstract_state: (lambda state: state)
  trainer = _TimedTrainer(config, os.path.join(workdir, "run"))
  periodic = trainer.periodic

  def noting_periodic(step, state, writer):
    in_flight[step] = bool(managers and managers[-1].is_saving_in_progress())
    return periodic(step, state, writer)

  trainer.periodic = noting_periodic
  num_params = None
  try:
    num_params = sum(x.size for x in jax.tree.leaves(
        trainer.compiled.abstract_state.params))
    state_bytes = sum(x.size * x.dtype.itemsize
                      for x in jax.tree.leaves(trainer.compiled.abstract_state))
    trainer.train()
  finally:
    checkpointing.save, checkpointing.make_manager = original_save, original_make
    host_snapshot.HostSnapshot = original_snapshot

  every = _CHECKPOINT_EVERY.value
  arrivals = trainer.arrivals
  wall = {s: arrivals[s][0] - arrivals[s - 1][0] for s in arrivals if s - 1 in arrivals}
  cpu = {s: arrivals[s][1] - arrivals[s - 1][1] for s in arrivals if s - 1 in arrivals}
  baseline = [s for s in range(3, every) if s in wall]
  step_time = float(np.median([wall[s] for s in baseline]))
  step_cpu = float(np.median([cpu[s] for s in baseline]))
  print(f"Machine: {machine_info.cpu_model()}, {len(os.sched_getaffinity(0))} cores; jax "
        f"{jax.__version__} ({jax.default_backend()}), Python {platform.python_version()}; "
        f"load average {os.getloadavg()[0]:.2f} at the end")
  print(f"DiT {_VARIANT.value}: {num_params / 1e6:.1f} M parameters; train state "
        f"{state_bytes / 2**30:.2f} GiB (parameters, EMA, two Adam moments); batch "
        f"{_BATCH.value} x [{stems.NUM_STEMS * _LATENT_DIM.value}, {_FRAMES.value}]; state "
        f"saved {'zstd-compressed' if _COMPRESS.value else 'uncompressed'}, "
        f"{'from the host snapshot' if _SNAPSHOT.value else 'from the state itself'}")
  print(f"step time: median {step_time:.3f} s wall, {step_cpu:.3f} s CPU, over steps "
        f"{baseline[0]}-{baseline[-1]} (wall min {min(wall[s] for s in baseline):.3f}, "
        f"max {max(wall[s] for s in baseline):.3f})")
  print(f"| save at step | loop blocked s | step c+1 extra s | write in flight | "
        f"writer CPU s | steps c+1..c+{every - 1} extra s |")
  print("|---|---|---|---|---|---|")
  for c in sorted(saves)[:_SAVES.value]:
    blocked = saves[c][1] - arrivals[c][0]
    extra = wall[c + 1] - step_time
    window = sum(wall[s] - step_time for s in range(c + 1, c + every))
    flight = sum(bool(in_flight.get(s)) for s in range(c, c + every))
    before, after = arrivals[c][2], arrivals[c + every - 1][2]
    writer = sum(seconds - before.get(tid, (name, 0.0))[1]
                 for tid, (name, seconds) in after.items() if name == _WRITER_THREADS)
    print(f"| {c} | {blocked:.3f} ({blocked / step_time:.2f} steps) | {extra:.3f} "
          f"({extra / step_time:.2f}) | {flight} step(s) | {writer:.2f} | {window:.3f} "
          f"({window / step_time:.2f} steps) |")
  print("intervals, s wall (CPU): " + ", ".join(
      f"{s}: {wall[s]:.2f} ({cpu[s]:.2f})" for s in sorted(wall)))


if __name__ == "__main__":
  app.run(main)
