"""The host allocator: which variables start a process on jemalloc, and main's restart."""

import os
import subprocess
import sys

import pytest

from msldm_jax import host_allocator

LIBRARY = host_allocator.jemalloc_library()


def test_setup_installed_jemalloc():
  # setup.sh installs Debian's libjemalloc2; without it every process silently stays on
  # glibc's malloc, and the tests below would check nothing.
  assert LIBRARY is not None, "jemalloc not found: run `bash setup.sh` (libjemalloc2)"


def test_preload_environment():
  assert host_allocator.preload_environment({}) == {
      "LD_PRELOAD": LIBRARY, "MALLOC_CONF": host_allocator.JEMALLOC_CONF}
  # Another preloaded library is kept, after jemalloc; a user's MALLOC_CONF is kept.
  assert host_allocator.preload_environment(
      {"LD_PRELOAD": "libother.so", "MALLOC_CONF": "narenas:2"}) == {
          "LD_PRELOAD": f"{LIBRARY}:libother.so", "MALLOC_CONF": "narenas:2"}
  # Already preloaded (by a parent, or by the restart itself), or another allocator chosen
  # on purpose: nothing to do.
  assert host_allocator.preload_environment({"LD_PRELOAD": f"/usr/lib/{LIBRARY}"}) == {}
  assert host_allocator.preload_environment({"LD_PRELOAD": "libtcmalloc.so.4"}) == {}
  assert host_allocator.preload_environment({host_allocator.SWITCH: "system"}) == {}
  with pytest.raises(ValueError, match="MSLDM_HOST_ALLOCATOR='tcmalloc'"):
    host_allocator.preload_environment({host_allocator.SWITCH: "tcmalloc"})


def _main_log(repo_root, tmp_path, **environ):
  """What `python -m msldm_jax.main` logs of its allocator, started without jemalloc."""
  env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
  env.update(environ)
  # A mode that stops with a usage error right after main has logged its settings.
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=study"],
      cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
  assert "needs a study config" in result.stderr, result.stderr[-3000:]
  return next(line for line in result.stderr.splitlines() if "host allocator" in line)


def test_main_restarts_on_jemalloc(repo_root, tmp_path):
  line = _main_log(repo_root, tmp_path)
  assert line.endswith(f"host allocator jemalloc (MALLOC_CONF='{host_allocator.JEMALLOC_CONF}')")
  line = _main_log(repo_root, tmp_path, MSLDM_HOST_ALLOCATOR="system")
  assert line.endswith("host allocator glibc malloc")


def test_release_free_pages_returns_memory():
  # In a process started on jemalloc with its decay off: a freed 800 MB array stays mapped
  # until release_free_pages.
  program = """
import numpy as np
from msldm_jax import host_allocator
def resident():
  return int(open('/proc/self/statm').read().split()[1]) * 4096
assert host_allocator.describe().startswith('jemalloc'), host_allocator.describe()
base = resident()
a = np.ones(10**8); del a
held = resident() - base
host_allocator.release_free_pages()
print(held, resident() - base)
"""
  env = {**os.environ, **host_allocator.preload_environment({})}
  result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True,
                          text=True, timeout=120, check=True)
  held, after = map(int, result.stdout.split())
  assert held > 700e6 and after < 100e6, (held, after)
