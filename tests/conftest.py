"""Test set-up: 8 fake CPU devices, so that sharding code runs without an accelerator.

The flag must be set before JAX initialises its backends, hence here, before any test module
imports jax.
"""

import hashlib
import importlib.metadata
import os
import sys
import tempfile

# Tests run small shapes a few times each, so XLA:CPU's compile time dominates their cost:
# skipping LLVM's expensive optimisation passes cuts it severalfold without changing results.
# Not XLA:CPU's older elemental emitters (--xla_cpu_use_fusion_emitters=false): at this
# optimisation level they compile the tests' VAE GAN step in half the time, but the step's
# generator gradient came out NaN (jaxlib 0.10.2; finite op by op and at level 1 and above).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# librosa compiles its numba functions with cache=True, its GUFuncs (peak_pick, localmax, the
# beat tracker's) as soon as their module is imported. Two processes compiling the same
# GUFunc at once can pair one's compiled loop with the other's wrapper on disk, a cache that
# segfaults every later process loading it (numba issue 10128): xdist's workers and the
# stages' subprocesses importing librosa at once did, in CI. So the tests get a numba cache of
# their own, filled by one process before any worker starts (`_warm_numba_cache`); after
# that every process only loads it. The controller sets this before starting the workers,
# who inherit it (and all their subprocesses).
# Named by the environment and the versions whose compiled code it holds, so that it can
# outlive a run (numba keys its entries by the source files' paths).
os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "msldm_jax-test-numba-cache-{}-py{}.{}-numba{}-librosa{}".format(
        hashlib.sha256(sys.prefix.encode()).hexdigest()[:8], *sys.version_info[:2],
        *(importlib.metadata.version(package) for package in ("numba", "librosa")))))

import dataclasses  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
  return REPO_ROOT

# The mini dataset the tests share: the tiny config with three pieces (one per split) cut to
# 6 s. The notebooks override the same keys to the same values, so that their test can reuse
# the rendering too (a rendered folder is reused only under the settings it was made with).
MINI_DATASET_OVERRIDES = {"render": {"num_pieces": 3, "max_seconds": 6.0},
                          "min_duration": 2.0}


def mini_dataset_config(repo_root=REPO_ROOT):
  """configs/demo.py's tiny variant with MINI_DATASET_OVERRIDES in config.data."""
  # The package is imported in the functions that need it, so that loading this file does
  # not import TensorFlow (workdir_layout, prepare) for tests that never touch the data.
  from msldm_jax import config_loading  # pylint: disable=g-import-not-at-top
  config = config_loading.load_config(os.path.join(repo_root, "configs", "demo.py") +
                                      ":variant=tiny")
  config_loading.override(config, {"data": MINI_DATASET_OVERRIDES}, "tests/conftest.py")
  return config


@dataclasses.dataclass(frozen=True)
class MiniDataset:
  """A workdir as `--mode=data` leaves it under `mini_dataset_config()`. Read-only: a test
  that writes takes a copy (`copy_rendering_to`)."""
  workdir: pathlib.Path
  source_dir: pathlib.Path   # WORKDIR/minislakh, the rendered stems
  tfds_dir: pathlib.Path     # WORKDIR/tfds, the TFDS data dir
  dataset_dir: str           # the built dataset's folder, for tfds.builder_from_directory

  def config(self):
    """A fresh copy of the config it was made under, for a test to change."""
    return mini_dataset_config()

  def config_flags(self) -> list[str]:
    """MINI_DATASET_OVERRIDES as `python -m msldm_jax.main` flags (over the tiny variant)."""
    def flags(section, prefix):
      for key, value in section.items():
        if isinstance(value, dict):
          yield from flags(value, f"{prefix}.{key}")
        else:
          yield f"--config.{prefix}.{key}={value}"
    return list(flags(MINI_DATASET_OVERRIDES, "data"))

  def copy_rendering_to(self, workdir) -> pathlib.Path:
    """Copies the rendered stems to WORKDIR/minislakh, where the data stage looks for them:
    it then reuses them (the renderer's manifest names its files relative to the folder)
    and only builds. Returns that folder."""
    from msldm_jax import workdir_layout  # pylint: disable=g-import-not-at-top
    target = pathlib.Path(workdir_layout.minislakh_dir(str(workdir)))
    shutil.copytree(self.source_dir, target)
    return target


@pytest.fixture(scope="session")
def mini_dataset(tmp_path_factory, repo_root) -> MiniDataset:
  """The mini dataset, rendered (music21 → fluidsynth) and built once per session (once per
  worker under pytest-xdist) by the data stage itself: rendering is the costly part of every
  test that trains on real music, so they share it."""
  from msldm_jax import workdir_layout  # pylint: disable=g-import-not-at-top
  from msldm_jax.data import prepare  # pylint: disable=g-import-not-at-top
  config = mini_dataset_config(repo_root)
  workdir = tmp_path_factory.mktemp("mini_dataset")
  dataset_dir = prepare.run(config, str(workdir))
  return MiniDataset(workdir=workdir,
                     source_dir=pathlib.Path(workdir_layout.minislakh_dir(str(workdir))),
                     tfds_dir=pathlib.Path(workdir_layout.tfds_dir(config, str(workdir))),
                     dataset_dir=dataset_dir)


@pytest.fixture(autouse=True)
def _no_programs_from_earlier_tests():
  """Each test starts without the trainers' programs that earlier tests in this worker built
  (`loop.reuse_programs`): a test then behaves the same whichever tests ran before it."""
  yield
  loop = sys.modules.get("msldm_jax.training.loop")
  if loop is not None:
    loop.clear_programs()


# Imports every librosa module holding a GUFunc (so compiles them all), then calls one.
_NUMBA_WARM_UP = """
import numpy as np
import librosa.beat, librosa.core.audio, librosa.util.utils
assert librosa.util.peak_pick(np.array([0., 0., 1., 0., 0.]), pre_max=1, post_max=2,
                              pre_avg=1, post_avg=2, delta=0.1, wait=0).tolist() == [2]
"""


def _warm_numba_cache():
  """Fills NUMBA_CACHE_DIR with librosa's GUFuncs in one process, then checks that a second
  process loads them, before any test runs. A lock keeps two test runs from compiling at once;
  a marker file, written only after both steps passed, skips the ~20 s compile next time."""
  import fcntl  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  cache_dir = os.environ["NUMBA_CACHE_DIR"]
  os.makedirs(cache_dir, exist_ok=True)
  marker = os.path.join(cache_dir, "filled-by-one-process")
  with open(os.path.join(cache_dir, "lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if os.path.exists(marker):
      return
    for step in ("compile", "load"):
      result = subprocess.run([sys.executable, "-c", _NUMBA_WARM_UP], capture_output=True,
                              text=True, check=False)
      if result.returncode != 0:
        raise RuntimeError(f"filling the numba cache {cache_dir} failed ({step}, exit "
                           f"{result.returncode}); delete it and rerun:\n{result.stderr}")
    with open(marker, "w") as f:
      f.write("librosa's GUFuncs, compiled by one process\n")


def pytest_configure(config):
  """librosa's numba cache is filled once, by the controller, before xdist starts workers
  (they have `workerinput`).

  A persistent compilation cache shared by the tests of a run, pytest-xdist's workers (they
  inherit the controller's environment) and the command-line runs they start: trainers built
  again from the same config (resume tests, end-to-end runs run again, a study rescored) then
  reuse compiled programs instead of paying XLA:CPU's compile time again. A program's key is
  its HLO, flags and devices, so a cache left by other code is never reused wrongly."""
  if not hasattr(config, "workerinput"):
    _warm_numba_cache()
  import jax  # pylint: disable=g-import-not-at-top
  cache_dir = os.environ.get("MSLDM_TEST_COMPILATION_CACHE") or os.path.join(
      tempfile.gettempdir(), "msldm_jax_test_compilation_cache")
  # Every program, however quick to compile: an evaluation runs hundreds of small ones, and
  # a rescored tiny study's evaluations took 38 s with all of them cached against 70 s with
  # those over a second.
  settings = {"jax_compilation_cache_dir": cache_dir,
              "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  for name, value in settings.items():
    jax.config.update(name, value)
    # The same for the command-line runs the tests start (`python -m msldm_jax.main`, the
    # benchmarks): a resumed or rescored run then reuses what the first run compiled.
    os.environ[name.upper()] = str(value)


def _expected_minutes(item) -> float:
  """`@pytest.mark.slow(minutes=M)`: about M minutes on 2 CPU cores (1 if not said); 0 for
  a test not marked slow."""
  marker = item.get_closest_marker("slow")
  return 0.0 if marker is None else float(marker.kwargs.get("minutes", 1.0))


def pytest_collection_modifyitems(config, items):
  """The slow end-to-end tests first, the longest first. pytest-xdist hands tests to its
  workers in this order, so the long ones start at once on every worker, instead of a late
  one keeping one worker busy after the other has run out of tests. Stable: the rest keep
  their order."""
  del config
  items.sort(key=lambda item: -_expected_minutes(item))
