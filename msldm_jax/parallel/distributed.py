"""Joining a multi-process run: `jax.distributed.initialize`, bounded in time, clear on failure.

Every process of a TPU pod slice, GPU cluster or multi-process CPU run calls `initialize`
before any other JAX call. Who the processes are comes from one of two places:
  - the cluster itself (Cloud TPU, SLURM, Open MPI): `jax.distributed.initialize()` detects
    the coordinator, the number of processes and this one's index; no settings needed;
  - explicit settings, the same on every process but for the index (several processes on one
    machine, a cluster JAX cannot detect): --coordinator_address=HOST:PORT (process 0's
    host, a free port), --num_processes=N, --process_id=I, or the environment variables
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID where a flag is not given.
    Cluster detection is then off, so that a scheduler's environment cannot override them.

Failures end in a bounded time with an error naming the setting, never a hang:
  - joining: a process not in a complete cluster after `initialization_timeout` seconds
    stops with an error that says whether the coordinator answered at all. JAX's own
    connect timeout would end the process from C++ with an XLA stack trace instead, so it is
    given a longer deadline and this module's fires first;
  - disagreement: the processes compare their --num_processes once joined (a process that
    counts more processes than the coordinator does is otherwise accepted);
  - later: JAX's coordination service stops every process within `heartbeat_timeout` s of
    one dying (on CPU, a process that dies inside a collective often aborts the others
    sooner, in gloo's transport, with a misleading "collective mismatch" message), and a
    process failing with an error waits up to `shutdown_timeout` s for the others before
    all stop (JAX's defaults: 100 s and 300 s; a slow host must fit in them, e.g. process 0
    finishing its plots while the others wait at exit);
  - exit: JAX's own shutdown at exit can outlast `shutdown_timeout` (a coordinator whose
    processes disagreed on --num_processes hung there for over 100 s on a loaded 2-core
    machine, its error already printed), so a joined process that is still exiting
    `shutdown_timeout` + _EXIT_GRACE_SECONDS s after its exit began ends itself.

Cross-process collectives on CPU use gloo (named explicitly: it was not always the default).
"""

import atexit
import dataclasses
import faulthandler
import os
import socket
import threading

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

# The settings' environment variables, read when the flag is not given. JAX reads the first
# itself too; the other two are this project's.
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
# JAX's connect deadline, past ours: JAX's would end the process from C++.
_JAX_GRACE_SECONDS = 30
_CONNECT_PROBE_SECONDS = 2.0
EXIT_STATUS = 1  # of a process that could not join, or whose exit did not end
# How long past --shutdown_timeout a joined process's exit may take before it ends itself.
_EXIT_GRACE_SECONDS = 10


@dataclasses.dataclass(frozen=True)
class Settings:
  """What `initialize` needs; the names are main.py's flags (errors refer to them)."""
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  initialization_timeout: int = 300
  heartbeat_timeout: int = 100
  shutdown_timeout: int = 300

  @property
  def explicit(self) -> bool:
    return self.num_processes is not None or self.process_id is not None


def _env_int(name: str) -> int | None:
  text = os.environ.get(name, "")
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"${name}={text!r}: expected an integer") from None


def resolve(settings: Settings) -> Settings:
  """Settings completed from the environment (flags first); a ValueError naming a bad one."""
  for name in ("initialization_timeout", "heartbeat_timeout", "shutdown_timeout"):
    if getattr(settings, name) <= 0:
      raise ValueError(f"--{name}={getattr(settings, name)}: must be a positive number of "
                       "seconds")
  settings = dataclasses.replace(
      settings,
      coordinator_address=settings.coordinator_address or os.environ.get(COORDINATOR_ENV) or None,
      num_processes=(settings.num_processes if settings.num_processes is not None
                     else _env_int(NUM_PROCESSES_ENV)),
      process_id=(settings.process_id if settings.process_id is not None
                  else _env_int(PROCESS_ID_ENV)))
  if not settings.explicit:
    return settings  # JAX detects the cluster (and takes a coordinator address if given).
  missing = [f"--{name} (or ${env})" for name, env, value in (
      ("coordinator_address", COORDINATOR_ENV, settings.coordinator_address),
      ("num_processes", NUM_PROCESSES_ENV, settings.num_processes),
      ("process_id", PROCESS_ID_ENV, settings.process_id)) if value is None]
  if missing:
    raise ValueError(f"explicit multi-process settings need {', '.join(missing)} as well; or "
                     "give neither --num_processes nor --process_id, to let JAX detect a TPU, "
                     "SLURM or Open MPI cluster")
  if settings.num_processes < 1:
    raise ValueError(f"--num_processes={settings.num_processes}: must be at least 1")
  if not 0 <= settings.process_id < settings.num_processes:
    raise ValueError(f"--process_id={settings.process_id}: must be in [0, "
                     f"--num_processes={settings.num_processes})")
  host, _, port = settings.coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"--coordinator_address={settings.coordinator_address!r}: expected "
                     "HOST:PORT, e.g. 10.0.0.1:1234 (process 0's host and a free port)")
  return settings


def _answers(address: str) -> bool:
  """Whether anything accepts TCP connections at HOST:PORT."""
  host, _, port = address.rpartition(":")
  try:
    with socket.create_connection((host.strip("[]"), int(port)), _CONNECT_PROBE_SECONDS):
      return True
  except OSError:
    return False


def _timeout_message(settings: Settings) -> str:
  timeout = f"--initialization_timeout={settings.initialization_timeout} s"
  if not settings.explicit:
    return (f"this process did not join the cluster that JAX detected within {timeout}: "
            "check that every host runs the same command, or give --coordinator_address, "
            "--num_processes and --process_id explicitly")
  who = f"process {settings.process_id} of --num_processes={settings.num_processes}"
  address = settings.coordinator_address
  if not _answers(address):
    return (f"{who}: nothing answered at --coordinator_address={address} within {timeout}: "
            "process 0 must run with the same address (its host and a free port), "
            "reachable from this host")
  return (f"{who}: the coordinator at --coordinator_address={address} answered, but the "
          f"processes did not all join within {timeout}: every process must start within "
          f"that time with the same --num_processes={settings.num_processes} and its own "
          f"--process_id in [0, {settings.num_processes}); see the other processes' logs")


def _exit_with(message: str):
  # Not an exception: JAX's connect is still running in its thread, and a normal exit would
  # run JAX's shutdown against a half-made client (a hang or an abort from C++).
  logging.error("%s", message)
  logging.flush()
  os._exit(EXIT_STATUS)


def bound_the_exit(seconds: float):
  """At exit, before JAX's own shutdown (atexit runs the last registered first), arms a
  watchdog that ends the process with status 1 (EXIT_STATUS) if it is still exiting
  `seconds` later, after printing every thread's stack. faulthandler's watchdog is a C
  thread: it fires even while the shutdown holds the GIL in C++, where a Python timer
  would wait."""
  def arm():
    logging.info("exiting: if still exiting in %.0f s (JAX's distributed shutdown past "
                 "--shutdown_timeout), the process ends itself", seconds)
    logging.flush()
    faulthandler.dump_traceback_later(seconds, exit=True)

  atexit.register(arm)


def _check_agreement(settings: Settings):
  """Every process must have been started with the coordinator's process count."""
  counts = np.asarray(multihost_utils.process_allgather(
      np.asarray(settings.num_processes, np.int64)))
  if (counts != jax.process_count()).any() or jax.process_index() != settings.process_id:
    raise ValueError(
        f"--num_processes differs between processes: the processes were started with "
        f"{counts.tolist()} (by process index) and the coordinator has "
        f"{jax.process_count()}; start every process with the same --num_processes")


def initialize(settings: Settings = Settings()):
  """Joins this process to the multi-process run (see the module docstring); call it before
  any other JAX call. A process that cannot join within the timeout logs why and exits with
  status EXIT_STATUS; bad settings raise ValueError."""
  settings = resolve(settings)
  # Before the CPU backend exists: it reads this when it is created.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(initialization_timeout=settings.initialization_timeout + _JAX_GRACE_SECONDS,
                heartbeat_timeout_seconds=settings.heartbeat_timeout,
                shutdown_timeout_seconds=settings.shutdown_timeout)
  if settings.explicit:
    kwargs.update(coordinator_address=settings.coordinator_address,
                  num_processes=settings.num_processes, process_id=settings.process_id,
                  cluster_detection_method="deactivate")
    logging.info("joining %d processes as process %d, coordinator %s", settings.num_processes,
                 settings.process_id, settings.coordinator_address)
  elif settings.coordinator_address:
    kwargs.update(coordinator_address=settings.coordinator_address)
  outcome = []

  def join():
    try:
      jax.distributed.initialize(**kwargs)
      jax.devices()  # The backend's topology exchange, bounded by the same deadline.
      outcome.append(None)
    except Exception as e:  # pylint: disable=broad-except
      outcome.append(e)

  # In a thread, so that the deadline is this module's: JAX's connect blocks without one
  # that Python can interrupt.
  thread = threading.Thread(target=join, name="jax-distributed-initialize", daemon=True)
  thread.start()
  thread.join(settings.initialization_timeout)
  if not outcome:
    _exit_with(_timeout_message(settings))
  if outcome[0] is not None:
    raise RuntimeError(f"jax.distributed.initialize failed: {outcome[0]}") from outcome[0]
  bound_the_exit(settings.shutdown_timeout + _EXIT_GRACE_SECONDS)
  if settings.explicit:
    _check_agreement(settings)
  logging.info("process %d of %d: %d local devices of %d", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
