"""Preemption: a SIGTERM during training ends the run with a checkpoint, at a step every
process agrees on, and the process exits 0 so that the restarted job resumes from there.

Schedulers (Kubernetes, Slurm, GCE/TPU maintenance, spot instances) announce an eviction with
SIGTERM and kill the job after a grace period. `loop.train` watches for the notice
(`PreemptionWatch`), finishes the step it is on, saves it (with the input position), and
raises `Preempted`.

How the processes agree on the step:
  - with `jax.distributed` initialised and its preemption service on (JAX's default), JAX's
    preemption sync manager catches SIGTERM on any host and names one step for all of them
    (`multihost_utils.reached_preemption_sync_point`, asked at every step, as it requires;
    orbax's `CheckpointManager.reached_preemption` is the same call);
  - otherwise a SIGTERM handler of ours notes the notice. With one process the run stops
    after the current step; with several (the preemption service turned off), the notices
    are gathered at log steps, where the loop already synchronises for the time budget, and
    any process's notice stops all of them at that step.
"""

import signal
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(SystemExit):
  """Training of `stage` stopped at `step` after a preemption notice; the step's checkpoint
  is written.

  A SystemExit with status 0: left uncaught, the process exits 0 as an evicted job should
  (its scheduler restarts it and the rerun resumes from the checkpoint), and every `except
  Exception` on the way up lets it through. So `--mode=all` runs no later stage and writes
  no stage marker for this one (`main.run_all`, the study's steps), and the rerun resumes.
  """

  def __init__(self, stage: str, step: int):
    super().__init__(0)
    self.stage, self.step = stage, int(step)

  def __str__(self):
    return (f"{self.stage}: preempted at step {self.step}; its checkpoint is written and the "
            "process exits with status 0: run the same command again to resume")


def _sync_manager_running() -> bool:
  """Whether JAX's preemption sync manager watches for SIGTERM (multi-host runs)."""
  # jax.distributed.initialize starts it unless the service is configured off.
  return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


class PreemptionWatch:
  """Context manager around a training loop; `reached(step)` says whether to stop after
  `step` (the same answer on every process).

  Without JAX's sync manager it installs a SIGTERM handler for its duration (the main thread
  only: Python delivers signals there) and restores the previous one on exit.
  """

  def __init__(self):
    self._use_sync_manager = _sync_manager_running()
    self._notice = False
    self._previous = None
    self._installed = False

  def __enter__(self):
    if self._use_sync_manager:
      return self
    if threading.current_thread() is not threading.main_thread():
      logging.warning("training outside the main thread: SIGTERM will end the process "
                      "without a checkpoint (signal handlers run in the main thread only)")
      return self
    self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    self._installed = True
    return self

  def __exit__(self, *exc_info):
    if self._installed:
      # None: a handler installed from C, which Python cannot put back; the default then.
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False
    return False

  def _on_sigterm(self, signum, frame):
    del signum, frame
    # Only a flag: the handler runs between two bytecodes of the loop, which acts on it.
    self._notice = True

  @property
  def noticed(self) -> bool:
    """Whether SIGTERM arrived at any process (through this watch's handler: False under
    JAX's sync manager). With several processes, all must ask together."""
    if self._use_sync_manager or jax.process_count() == 1:
      return self._notice
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self._notice))))

  def reached(self, step: int, log_step: bool) -> bool:
    """Whether training must stop after `step`. Every process must call it at every step."""
    if self._use_sync_manager:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    if jax.process_count() == 1:
      return self._notice
    if not log_step:
      return False
    notices = multihost_utils.process_allgather(np.asarray(self._notice))
    return bool(np.any(notices))
