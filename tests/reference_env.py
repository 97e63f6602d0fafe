"""Where the tests find the PyTorch reference interpreter (see tests/reference/README.md)."""

import os

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reference_python() -> str:
  """The reference interpreter's path; a skip without it, but a failure under CI, so that CI
  can never pass by skipping a comparison with the reference."""
  configured = os.environ.get("MSLDM_REFERENCE_PYTHON")
  path = configured or os.path.join(REPO_ROOT, ".venv-reference", "bin", "python")
  if os.path.isfile(path) and os.access(path, os.X_OK):
    return path
  reason = (f"PyTorch reference interpreter not found at {path} "
            f"({'from MSLDM_REFERENCE_PYTHON' if configured else 'default location'}); "
            "create it with: bash tests/reference/install_reference_env.sh .venv-reference")
  if os.environ.get("CI"):
    pytest.fail(reason + " — required under CI", pytrace=False)
  pytest.skip(reason)
