"""Every notebook in notebooks/ runs end to end (tiny config, a few steps per stage).

The notebooks run in order in ONE workdir (MSLDM_NOTEBOOK_WORKDIR), so that 02 reuses the
data and the SourceVAE checkpoint 01 made, as a user running both would. The kernel is this
interpreter (a kernel spec written to a temporary JUPYTER_PATH), and it inherits conftest's
environment: 8 fake CPU devices and XLA's cheap CPU compilation.
"""

import glob
import json
import os
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

KERNEL_NAME = "msldm-test-python"
CELL_TIMEOUT_S = 600


def _notebooks(repo_root):
  return sorted(glob.glob(os.path.join(repo_root, "notebooks", "*.ipynb")))


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A kernel spec for the running interpreter, and the notebooks' workdir."""
  kernel_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
  kernel_dir.mkdir(parents=True)
  (kernel_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "msldm_jax tests", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  workdir = tmp_path / "workdir"
  workdir.mkdir()
  monkeypatch.setenv("MSLDM_NOTEBOOK_WORKDIR", str(workdir))
  # The kernel's JAX shares the tests' compilation cache through the environment
  # (conftest.pytest_configure).
  return workdir


# About 1m40 s with a warm compilation cache, about 4 min cold (2 shared CPU cores).
@pytest.mark.slow(minutes=3)
def test_notebooks_run_end_to_end(repo_root, kernel_env, mini_dataset):
  paths = _notebooks(repo_root)
  # The notebooks' OVERRIDES render the session's mini dataset (same settings): 01's data
  # stage then reuses that rendering and only builds, as on a user's second run. Different
  # settings would make that stage fail, naming them.
  mini_dataset.copy_rendering_to(kernel_env)
  assert [os.path.basename(p) for p in paths] == [
      "01_data_and_vae_reconstruction.ipynb", "02_generation.ipynb",
      "03_separate_and_accompany.ipynb"]
  timings = {}
  for path in paths:
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": repo_root}})
    start = time.perf_counter()
    try:
      client.execute()
    except nbclient.exceptions.CellExecutionError as e:
      pytest.fail(f"{os.path.basename(path)}: a cell failed:\n{str(e)[-4000:]}")
    timings[os.path.basename(path)] = time.perf_counter() - start
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, f"{path}: {errors}"
    # Each notebook shows what it made: spectrogram images and audio players (01: a track,
    # the reconstruction; 02: one spectrogram per generated piece, total and partial; 03:
    # the true stems, each separation, the accompaniment).
    shown = [key for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", []) for key in output.get("data", {})]
    assert shown.count("image/png") >= 2, (path, shown)
    audio = [output for cell in notebook.cells if cell.cell_type == "code"
             for output in cell.get("outputs", [])
             if "<audio" in output.get("data", {}).get("text/html", "")]
    assert len(audio) >= 4, (path, len(audio))
  print("notebook run times:", {name: f"{seconds:.0f} s" for name, seconds in timings.items()})
  assert glob.glob(str(kernel_env / "samples_total" / "piece_*" / "mix.wav"))
  partial = glob.glob(str(kernel_env / "samples_partial" / "piece_*" / "piece.json"))
  assert partial
  # 03: both separations and the accompaniment of the given recordings.
  for method in ("dps", "dirac"):
    with open(kernel_env / "separated" / method / "piece.json") as f:
      assert json.load(f)["method"] == method
  accompaniment = glob.glob(str(kernel_env / "samples_accompaniment" / "piece_*" /
                                "piece.json"))
  with open(accompaniment[0]) as f:
    record = json.load(f)
  assert record["generated"] == ["drums", "guitar"] and record["given"] == ["bass", "piano"]
