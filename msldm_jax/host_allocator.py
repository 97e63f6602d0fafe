"""The host memory allocator of our processes: jemalloc, with freed pages kept mapped.

On CPU the SourceVAE's training step frees and reallocates ~1.9 GB of XLA buffers each step.
glibc's malloc hands large blocks back to the kernel when they are freed, so every step maps
them again and the kernel zeroes each page on first touch: ~500 k page faults a step, a
quarter to a third of the step's CPU time spent in the kernel. jemalloc with its decay off
keeps the freed pages for the next step: the study's reconstruction-only step took 37 %
fewer CPU-seconds on a 2-core AMD EPYC and 14 % fewer on a 2-core Intel Xeon, with no page
faults (benchmarks/RESULTS.md, "The study's one-stem step"). jemalloc's default decay, or a
10 s one, did not help: it returns the pages within the step.

The allocator is chosen when a process starts, so `python -m msldm_jax.main` restarts itself
once with jemalloc preloaded (`restart_on_jemalloc`). Where jemalloc is not installed
(Debian's libjemalloc2; setup.sh installs it) everything runs on glibc's malloc as before.
MSLDM_HOST_ALLOCATOR=system keeps glibc's malloc; a MALLOC_CONF already set is kept as it
is. The test workers and notebooks stay on glibc's malloc: their work is compilations and
one-off passes, where jemalloc saved no CPU time and held more memory.

With decay off a process keeps its peak memory mapped. Between stages, `release_free_pages`
returns what is free to the system, so a multi-stage run (--mode=all, --mode=study) holds
each stage's peak only while that stage runs.
"""

import ctypes
import ctypes.util
import functools
import os
import sys

SWITCH = "MSLDM_HOST_ALLOCATOR"
CHOICES = ("jemalloc", "system")
# Decay off for both of jemalloc's kinds of unused page (dirty: freed, still backed; muzzy:
# advised free, maybe reclaimed), so that neither goes back to the kernel within a step.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# jemalloc's MALLCTL_ARENAS_ALL: the pseudo-arena index naming every arena.
_ALL_ARENAS = 4096


@functools.cache
def jemalloc_library() -> str | None:
  """jemalloc's shared library as the dynamic loader finds it ('libjemalloc.so.2'), or None."""
  return ctypes.util.find_library("jemalloc")


def preload_environment(environ) -> dict[str, str]:
  """The variables that start a new process on jemalloc: empty where MSLDM_HOST_ALLOCATOR is
  'system', jemalloc is not installed, or LD_PRELOAD already names an allocator (jemalloc, or
  another one chosen on purpose, as TPU VMs preload tcmalloc)."""
  choice = environ.get(SWITCH, "jemalloc")
  if choice not in CHOICES:
    raise ValueError(f"environment variable {SWITCH}={choice!r}: expected one of "
                     f"{', '.join(CHOICES)}")
  preloaded = environ.get("LD_PRELOAD", "")
  if choice == "system" or "malloc" in preloaded:
    return {}
  library = jemalloc_library()
  if library is None:
    return {}
  return {"LD_PRELOAD": ":".join(filter(None, (library, preloaded))),
          "MALLOC_CONF": environ.get("MALLOC_CONF", JEMALLOC_CONF)}


def restart_on_jemalloc() -> None:
  """Replaces this process by the same command started on jemalloc, where
  `preload_environment` asks for it; returns where it does not. Call it first thing, before
  the process has done work it would repeat. Runs at most once: the restarted process finds
  jemalloc in LD_PRELOAD (even where the loader could not preload it, which it reports on
  stderr and carries on)."""
  changes = preload_environment(os.environ)
  if changes:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **changes})


def _mallctl():
  """jemalloc's control function where this process allocates with jemalloc, else None."""
  return getattr(ctypes.CDLL(None), "mallctl", None)


def describe() -> str:
  """Which allocator this process runs on, for the log."""
  if _mallctl() is None:
    return "glibc malloc"
  return f"jemalloc (MALLOC_CONF={os.environ.get('MALLOC_CONF', '')!r})"


def release_free_pages() -> None:
  """Returns jemalloc's free pages to the system (a no-op on glibc's malloc)."""
  mallctl = _mallctl()
  if mallctl is not None:
    mallctl(f"arena.{_ALL_ARENAS}.purge".encode(), None, None, None, ctypes.c_size_t(0))
