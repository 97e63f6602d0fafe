"""The one training loop both trainers run (big_vision's and flax imagenet's shape).

A trainer supplies its state, its step and its hooks (`Trainer` below); this module does
the rest, identically for the SourceVAE and the diffusion model:

  1. abstract state (`jax.eval_shape` of the trainer's init) → shardings by rule
     (`parallel/sharding.py`, replicate or FSDP) → a jitted init with those out_shardings and
     a jitted step with the state donated (`CompiledStep`);
  2. restore-or-init from the newest checkpoint in STAGE/checkpoints, with the input
     position, so a resumed run reads what an uninterrupted one would;
  3. the loop: the step is dispatched, and its metrics stay on the device until a log step;
     they are fetched one step late (after the next step is dispatched, so the device queue
     never drains for a fetch), all steps since the last fetch at once, checked to be finite
     (a non-finite loss raises, naming the step and the term), summarised by the trainer and
     written to TensorBoard and STAGE/metrics.jsonl. At a checkpoint step the metrics are
     checked first, so a non-finite step never reaches a checkpoint; checkpoints carry the
     input position and the trainer's model record. Periodic hooks (evaluation, samples)
     run after the step's checkpoint;
  4. asynchronous saves are waited for, also when the loop fails.

Preemption (`preemption.py`): on SIGTERM the loop finishes the step it is on, saves it with
the input position, and raises `preemption.Preempted` (a SystemExit with status 0), so that
no later stage runs and the restarted job resumes from that step. The metrics of the steps
since the last log line go into the checkpoint (its `unlogged` item) and are logged by the
resumed run at the next log step, so metrics.jsonl ends as an uninterrupted run's would. The
preempted step's periodic hooks (evaluation, samples) are not run: the grace period is short.

Resuming skips incomplete checkpoint folders (a run killed while saving) with a warning
naming them (`checkpointing.complete_steps`), and a checkpoint of another network or of
other shapes is an error naming the differing settings (`checkpointing.check_compatible`).
The restore reads into this run's mesh and sharding, whichever the checkpoint was written
from (e.g. 8 devices under FSDP, resumed on 2 replicated).

Saves are asynchronous: a checkpoint step costs the wait for that step's metrics (they are
checked before saving) and the copy of the state off the devices (on the CPU backend into a
snapshot kept for the run, so that the next step still updates the state in place:
`host_snapshot.py`); orbax's background threads write the files while training goes on
(benchmarks/checkpoint_stall.py).

A time budget (`max_seconds` > 0 in the train config) ends a run early, with a checkpoint, at
the first log step past it: for comparing networks or recipes on equal time. The clock
(`budget_clock`) starts once the first step has run (compilation is not counted): "wall" is
elapsed time; "cpu" is this process's CPU time, which moves far less with other processes'
load on a shared machine. The budget spans restarts: every log record carries the clock's
seconds spent so far (`budget_seconds`), a resumed run continues from the value of its
restored step, and a run whose budget was spent before it was stopped does not train again
(so that a resumable pipeline can rerun a budgeted stage as a no-op). With several processes
the decision is process 0's, broadcast, so that every host stops at the same step.

metrics.jsonl holds one JSON line per log step (and one per hook result), truncated to the
restored step on resume: the lines of an interrupted run past its checkpoint are redone, so
the file of a resumed run equals that of an uninterrupted one.
"""

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from absl import logging
import jax
import ml_collections
import numpy as np

from msldm_jax import atomic_files
from msldm_jax import checkpointing
from msldm_jax import recent
from msldm_jax import workdir_layout
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.parallel import sharding
from msldm_jax.training import host_snapshot
from msldm_jax.training import metric_writer
from msldm_jax.training import preemption


class DonatingStep:
  """A jitted step(state, batch) that donates `state`, refusing a state already donated.

  jax 0.10's CPU client logs "Buffer has been deleted or donated" for such a call and then
  crashes the process (SIGSEGV) instead of raising: a notebook stepping twice from the same
  state lost its kernel. Donation deletes every buffer of the state, so its first array
  tells: 0.15 ms per step for the study VAE's 1061-leaf state, mostly flattening it, against
  0.33 ms for asking every leaf (benchmarks/RESULTS.md, "The donated-state guard").
  `lower` is the jitted function's, for ahead-of-time compilation.
  """

  def __init__(self, jitted):
    self._jitted = jitted

  def __call__(self, state, batch):
    first = next((leaf for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)),
                 None)
    if first is not None and first.is_deleted():
      raise ValueError("this state was donated to an earlier step (its buffers are "
                       "deleted): step from the state that call returned")
    return self._jitted(state, batch)

  def lower(self, *args, **kwargs):
    return self._jitted.lower(*args, **kwargs)


# What `reuse_programs` built in this process, newest last; the oldest go past the limit.
_MAX_PROGRAMS = 8
_PROGRAMS = recent.Recent(_MAX_PROGRAMS)


def settings_key(section: ml_collections.ConfigDict, leave_out: Sequence[str] = ("train",)
                 ) -> str:
  """A config section's settings as one string, its keys in `leave_out` left out: the part of
  a trainer's `reuse_programs` key that the config gives."""
  settings = section.to_dict()
  for name in leave_out:
    settings.pop(name, None)
  return json.dumps(settings, sort_keys=True, default=repr)


def reuse_programs(key: tuple, build: Callable[[], Any]) -> Any:
  """`build()`, made once per process for each `key`, then returned again.

  A trainer's jitted functions close over modules and optimizers it makes itself, so JAX's
  in-memory caches never matched two trainers: each new trainer of the same settings (the
  resumed half of a run, a notebook cell run again, the checks a test builds after a run)
  traced and lowered every program again, and at best read it from the persistent
  compilation cache. For the tests' tiny SourceVAE on 2 CPU cores that was 8-10 s per
  trainer (tracing its step alone 3.5 s); sharing the jitted functions, the second trainer
  costs nothing. `key` holds everything the programs depend on: the config's settings
  (`settings_key`), the shapes it reads elsewhere and the mesh. The jitted functions hold
  no state, so sharing them is safe; code changed in a running process (a module reloaded
  in a notebook) is not part of the key: restart the kernel.
  Measured (2 CPU cores, tests/test_train_vae.py's resume test: three runs and two restores
  of one config): 107 s → 72 s, its traces 21.5 s → 6.7 s."""
  return _PROGRAMS.get(key, build)


def clear_programs():
  """Forgets what `reuse_programs` built (their compiled executables go with the last user):
  tests start each from none, so that no test depends on which ran before it in a process."""
  _PROGRAMS.clear()


class CompiledStep:
  """Abstract state → shardings → jitted init and donated step, for one mesh.

  Attributes:
    state_shardings: NamedShardings of the state (by `strategy`).
    abstract_state: the state's ShapeDtypeStructs with those shardings (restore target).
    init: jit(key) -> state, laid out by the shardings.
    step: jit(state, batch) -> (state, metrics), the state donated (a `DonatingStep`),
      the batch split over the mesh's data axis, the metrics replicated.
    warmup_steps, warmup_step: an optional second step function (same state and metrics)
      for steps 1..warmup_steps, e.g. the VAE's reconstruction-only warm-up; `step_at`
      picks. Two programs rather than a `lax.cond` in one: XLA:CPU ran the VAE's step
      inside a conditional 8× slower (34.6 s against 4.1 s, benchmarks/vae_step.py).
  """

  def __init__(self, init_fn: Callable[[jax.Array], Any], step_fn: Callable[..., Any],
               mesh, strategy: str,
               warmup: tuple[int, Callable[..., Any]] | None = None):
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    self.state_shardings = sharding.state_shardings(abstract, mesh, strategy)
    self.abstract_state = checkpointing.abstract_with_shardings(abstract, self.state_shardings)
    self.init = jax.jit(init_fn, out_shardings=self.state_shardings)

    def jit_step(fn):
      return DonatingStep(jax.jit(
          fn, in_shardings=(self.state_shardings, mesh_lib.batch_sharding(mesh)),
          out_shardings=(self.state_shardings, mesh_lib.replicated(mesh)),
          donate_argnums=(0,)))

    self.step = jit_step(step_fn)
    # Compiled on first use only: a run resumed past the warm-up never compiles it.
    self.warmup_steps = int(warmup[0]) if warmup else 0
    self.warmup_step = jit_step(warmup[1]) if warmup else None

  def step_at(self, step: int):
    """The jitted step that computes (1-based) step `step`."""
    return self.warmup_step if step <= self.warmup_steps else self.step


class Trainer(Protocol):
  """What a trainer supplies to `train`."""
  name: str                                # "train_vae": log lines and progress
  stage_dir: str                           # WORKDIR/vae, WORKDIR/ldm
  train_config: ml_collections.ConfigDict  # num_steps, log_every, checkpoint_every,
  #                                          keep_checkpoints
  compiled: CompiledStep
  finite_metrics: Sequence[str]            # metric names that must be finite every step
  settings_key: str                        # config key of the network's settings
  #                                          ("ldm.model"), for errors on resume

  def initial_state(self) -> Any: ...
  def train_inputs(self, position: dict | None): ...  # next() -> batch, state() -> position
  def model_record(self) -> dict: ...                 # the checkpoint's `model` item
  def summarize(self, steps: list[tuple[int, dict]]) -> dict[str, float]: ...
  def periodic(self, step: int, state, writer) -> dict[str, float]: ...
  def finish(self, records: list[dict]): ...          # e.g. plots, on process 0


def mean_of_scalars(steps: list[tuple[int, dict]]) -> dict[str, float]:
  """The default summary: each scalar metric averaged over the steps since the last log."""
  values = {}
  for _, metrics in steps:
    for name, value in metrics.items():
      value = np.asarray(value)
      if value.ndim == 0:
        values.setdefault(name, []).append(float(value))
  return {name: float(np.mean(v)) for name, v in values.items()}


def check_finite(steps: list[tuple[int, dict]], names: Sequence[str]):
  """Raises on the first step with a non-finite value among `names`."""
  for step, metrics in steps:
    metric_writer.check_finite(step, {name: metrics[name] for name in names})


class MetricsLog:
  """STAGE/metrics.jsonl: one JSON line per record, truncated to the resumed step on restart.

  Process 0 writes; every process keeps the records (for the end-of-run plots).
  """

  def __init__(self, path: str, start_step: int):
    self.path = path
    self.records = []
    self._writer = jax.process_index() == 0
    if os.path.exists(path):
      with open(path) as f:
        self.records = [r for r in map(json.loads, filter(str.strip, f))
                        if r["step"] <= start_step]
    if self._writer:
      # Lines past the checkpoint are the interrupted run's, which this run redoes.
      os.makedirs(os.path.dirname(path), exist_ok=True)
      atomic_files.write_lines_atomic(path, [json.dumps(r) + "\n" for r in self.records])

  def append(self, record: Mapping[str, Any]):
    record = dict(record)
    self.records.append(record)
    if self._writer:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(stage_dir: str) -> list[dict]:
  """The records of a trainer's metrics.jsonl (for tests, notebooks and reports)."""
  path = os.path.join(stage_dir, workdir_layout.METRICS_FILE)
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def train(trainer: Trainer) -> dict[str, float]:
  """Runs (or resumes) `trainer` to `train_config.num_steps`; returns the last metrics."""
  config = trainer.train_config
  manager = checkpointing.make_manager(
      os.path.join(trainer.stage_dir, workdir_layout.CHECKPOINTS),
      max_to_keep=int(config.keep_checkpoints))
  try:
    with preemption.PreemptionWatch() as watch:
      metrics = _loop(trainer, manager, watch)
      if watch.noticed:
        # SIGTERM after the last step (or with nothing left to train): the stage is trained
        # and saved, but the notice still holds, so no later stage may start.
        manager.wait_until_finished()
        raise preemption.Preempted(trainer.name, manager.latest_step() or 0)
      return metrics
  except preemption.Preempted as preempted:
    manager.wait_until_finished()
    logging.warning("%s", preempted)
    raise
  finally:
    # Also on an error: an asynchronous save in flight must finish, so that the last
    # checkpoint is whole.
    manager.wait_until_finished()


BUDGET_CLOCKS = {"wall": time.monotonic, "cpu": time.process_time}


BUDGET_SECONDS = "budget_seconds"  # The log records' key for the budget clock's total.


def budget_by_step(records: list[dict]) -> dict[int, float]:
  """step -> the budget clock's seconds spent at it, from a trainer's log records (a step
  logged again after a resume keeps its last record)."""
  return {r["step"]: r[BUDGET_SECONDS] for r in records if BUDGET_SECONDS in r}


def budget_at(records: list[dict], step: int) -> float | None:
  """The budget clock's seconds a trainer had spent at `step`, from its log records: the
  record of that step, else interpolated between the records around it (a checkpoint written
  when a run was stopped falls between two logging steps); None outside the logged steps."""
  spent = sorted(budget_by_step(records).items())
  if not spent or not spent[0][0] <= step <= spent[-1][0]:
    return None
  steps, seconds = zip(*spent)
  return float(np.interp(step, steps, seconds))


def budget_spent(stage_dir: str, step: int) -> float | None:
  """`budget_at` from the log in `stage_dir`; None without a log."""
  if not os.path.exists(os.path.join(stage_dir, workdir_layout.METRICS_FILE)):
    return None
  return budget_at(read_metrics(stage_dir), step)


class Budget:
  """Whether `max_seconds` of `clock` have passed, counting `spent_before` (from the runs
  before a restart) plus this run's since `start()` (never, for max_seconds 0)."""

  def __init__(self, max_seconds: float, clock: str, spent_before: float = 0.0):
    if clock not in BUDGET_CLOCKS:
      raise ValueError(f"train config budget_clock={clock!r}: one of "
                       f"{', '.join(BUDGET_CLOCKS)}")
    self.max_seconds, self._clock, self._started = float(max_seconds), BUDGET_CLOCKS[clock], None
    self.spent_before = float(spent_before)

  def start(self):
    self._started = self._clock()

  def elapsed(self) -> float:
    """Seconds of the clock spent on training, over every run of this stage."""
    if self._started is None:
      return self.spent_before
    return self.spent_before + self._clock() - self._started

  def spent(self) -> bool:
    if self.max_seconds <= 0:
      return False
    spent = self.elapsed() >= self.max_seconds
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      spent = bool(multihost_utils.broadcast_one_to_all(np.asarray(spent)))
    return spent


def _loop(trainer: Trainer, manager, watch: preemption.PreemptionWatch) -> dict[str, float]:
  config = trainer.train_config
  num_steps = int(config.num_steps)
  restored = checkpointing.restore_latest(
      manager, trainer.compiled.abstract_state, model_record=trainer.model_record(),
      settings_key=getattr(trainer, "settings_key", "model"))
  unlogged = None
  if restored is None:
    state, position, start = trainer.initial_state(), None, 0
  else:
    state, position, start = restored
    unlogged = checkpointing.read_unlogged(manager, start)
  log = MetricsLog(os.path.join(trainer.stage_dir, workdir_layout.METRICS_FILE), start)
  spent_before = max([r[BUDGET_SECONDS] for r in log.records if BUDGET_SECONDS in r] +
                     [float((unlogged or {}).get(BUDGET_SECONDS, 0.0))], default=0.0)
  budget = Budget(float(config.get("max_seconds", 0.0)), str(config.get("budget_clock", "wall")),
                  spent_before)
  if start and budget.spent():
    logging.info("%s: the time budget of %.0f s was spent before step %d: nothing to train",
                 trainer.name, budget.max_seconds, start)
    return {}
  inputs = trainer.train_inputs(position)
  writer = metric_writer.MetricWriter(os.path.join(trainer.stage_dir, workdir_layout.LOGS))
  progress = metric_writer.Progress(num_steps, start, int(config.log_every), trainer.name)
  # (step, device metrics) not yet fetched; after a preemption, the fetched metrics of the
  # steps the interrupted run had not logged yet.
  pending: list[tuple[int, Any]] = checkpointing.decode_unlogged(unlogged)
  due = None  # a log step whose metrics are fetched after the next step is dispatched
  last: dict[str, float] = {}

  def flush(until: int):
    nonlocal pending, last
    ready = [(s, m) for s, m in pending if s <= until]
    pending = [(s, m) for s, m in pending if s > until]
    if not ready:
      return
    fetched = [(s, jax.device_get(m)) for s, m in ready]
    check_finite(fetched, trainer.finite_metrics)
    scalars = trainer.summarize(fetched)
    rate = progress.update(until)
    if rate is not None:
      scalars["steps_per_second"] = rate
    if budget.max_seconds > 0:
      scalars[BUDGET_SECONDS] = budget.elapsed()
    writer.scalars(until, scalars)
    log.append({"step": until, **scalars})
    last = {**last, **scalars}

  def take_unlogged() -> dict[str, Any]:
    """The pending steps' metrics, fetched and checked, for a preemption's checkpoint."""
    nonlocal pending
    fetched = [(s, jax.device_get(m)) for s, m in pending]
    pending = []
    check_finite(fetched, trainer.finite_metrics)
    extra = {BUDGET_SECONDS: budget.elapsed()} if budget.max_seconds > 0 else {}
    return checkpointing.encode_unlogged(fetched, **extra)

  log_every, checkpoint_every = int(config.log_every), int(config.checkpoint_every)
  # On the CPU backend, what saves write from (training/host_snapshot.py).
  snapshot = (host_snapshot.HostSnapshot(trainer.compiled.abstract_state)
              if start < num_steps else None)
  preempted_at = None
  for step in range(start + 1, num_steps + 1):
    batch = next(inputs)
    state, metrics = trainer.compiled.step_at(step)(state, batch)
    pending.append((step, metrics))
    if step == start + 1 and budget.max_seconds > 0:
      jax.block_until_ready(metrics)  # The budget's clock starts after compilation.
      budget.start()
    if due is not None:  # One step late: this step is already queued behind the fetch.
      flush(due)
      due = None
    log_step = step % log_every == 0
    stop = log_step and budget.spent()
    if stop:
      logging.info("%s: time budget of %.0f s spent at step %d (of %d): stopping",
                   trainer.name, budget.max_seconds, step, num_steps)
    preempted = watch.reached(step, log_step)
    if log_step or step == num_steps:
      due = step
    checkpoint = step % checkpoint_every == 0 or step == num_steps or stop
    if checkpoint or preempted:
      unlogged = None
      if checkpoint or due == step:
        # Checked before saving: a non-finite step never reaches a checkpoint.
        flush(step)
        due = None
      else:
        # A preemption between log steps: an uninterrupted run logs these steps together
        # with the next ones, and so does the resumed run, from the checkpoint.
        unlogged = take_unlogged()
      # The snapshot's buffers are the previous save's: its write must be over (the save
      # would wait for it anyway).
      manager.wait_until_finished()
      checkpointing.save(manager, step, snapshot(state), inputs.state(),
                         trainer.model_record(), unlogged=unlogged)
    if preempted:
      preempted_at = step
      break
    hooked = trainer.periodic(step, state, writer)
    if hooked:
      writer.scalars(step, hooked)
      log.append({"step": step, **hooked})
      last = {**last, **hooked}
    if stop:
      break
  if pending:
    flush(pending[-1][0])
  writer.flush()
  if preempted_at is not None:
    raise preemption.Preempted(trainer.name, preempted_at)
  if jax.process_index() == 0:
    trainer.finish(log.records)
  return last


def every(step: int, interval: int, num_steps: int) -> bool:
  """Whether a periodic hook with `interval` (0: off) runs at `step` (always at the end)."""
  return interval > 0 and (step % interval == 0 or step == num_steps)

