"""Where a result came from: the commit of the code that made it, and the machine.

Results that are committed (the study's report, benchmarks' tables) name both, so a reader
can tell which code and which hardware a number belongs to.
"""

import os
import platform
import subprocess

import jax

# The code's own checkout: the commit is that of the package that runs, wherever the command
# was started from.
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def commit(exclude_dir: str = "", repo_dir: str = PACKAGE_DIR) -> str:
  """The short HEAD of the checkout holding `repo_dir`, marked "with uncommitted changes"
  when tracked files differ from it; files under `exclude_dir` aside (a report written into
  the repository, as docs/study is, and rewritten by a later run would otherwise mark its own
  run). "unknown" outside a git checkout.
  """
  def git(*args, cwd=repo_dir):
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                          cwd=cwd).stdout.strip()
  try:
    head = git("rev-parse", "--short", "HEAD")
    top = git("rev-parse", "--show-toplevel")
    pathspec = []
    if exclude_dir:
      inside = os.path.relpath(os.path.abspath(exclude_dir), top)
      if not inside.startswith(os.pardir):
        pathspec = ["--", ".", f":(exclude){inside}"]
    dirty = git("status", "--porcelain", "--untracked-files=no", *pathspec, cwd=top)
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + (" with uncommitted changes" if dirty else "")


def machine() -> str:
  """CPU model and cores this process may use, and JAX's devices."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = f"{names[0]}, {len(os.sched_getaffinity(0))} cores" if names else platform.machine()
  except OSError:
    cpu = platform.machine()
  devices = jax.devices()
  return f"{cpu}; jax {jax.__version__} on {len(devices)} {devices[0].platform} device(s)"
