"""Test set-up: 8 fake CPU devices, so that sharding code runs without an accelerator.

The flag must be set before JAX initialises its backends, hence here, before any test module
imports jax.
"""

import os

# Tests run small shapes a few times each, so XLA:CPU's compile time dominates their cost:
# skipping LLVM's expensive optimisation passes cuts it severalfold without changing results.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
  return REPO_ROOT


def pytest_configure(config):
  """A persistent compilation cache shared by the tests of a run: trainers built again from
  the same config (resume tests, end-to-end runs) then reuse compiled steps instead of paying
  XLA:CPU's compile time again."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  cache_dir = os.environ.get("MSLDM_TEST_COMPILATION_CACHE") or os.path.join(
      tempfile.gettempdir(), "msldm_jax_test_compilation_cache")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
