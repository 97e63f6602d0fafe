"""The package's arrows point down: a stage loads what an earlier one made through the loading
layer (`models/loading.py`, `workdir_layout.py`), never by importing a later layer's code.

Read from the source (every import statement, also those inside functions), so a lazy import
cannot hide an arrow that runs back up.
"""

import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "msldm_jax")

# Layers, lowest first: a subpackage may import its own layer and those below it.
LAYERS = {
    "parallel": 0, "data": 0, "audio": 0,
    "losses": 1, "models": 1,
    "diffusion": 2, "latents": 2,
    "training": 3,
    "generation": 4,
    "evaluation": 5,
    "tools": 6,
    "study": 7,
}
# Top-level modules below every stage (shared vocabulary: stems, layouts, checkpoint files).
FOUNDATION = {"stems", "joint_latent", "workdir_layout", "checkpointing", "atomic_files",
              "config_loading", "plotting"}


def _imports(path):
  """Every `msldm_jax.X...` module a file imports, with the line."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [(alias.name, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names]
  return [(name, line) for name, line in found if name.startswith("msldm_jax.")]


def _sources():
  for root, _, files in os.walk(PACKAGE):
    for name in sorted(files):
      if name.endswith(".py"):
        path = os.path.join(root, name)
        yield os.path.relpath(path, PACKAGE), path


def _part(module: str) -> str:
  """'msldm_jax.training.loop' -> 'training'; 'msldm_jax.stems' -> 'stems'."""
  return module.split(".")[1]


def _violations(relpath, path):
  part = relpath.split(os.sep)[0].removesuffix(".py")
  problems = []
  for module, line in _imports(path):
    target = _part(module)
    if target == part:
      continue
    if target in ("main",):
      problems.append(f"{relpath}:{line} imports {module} (the entry point)")
    elif part in FOUNDATION and target in LAYERS and LAYERS[target] >= LAYERS["diffusion"]:
      problems.append(f"{relpath}:{line}: foundation module imports the stage code {module}")
    elif part in LAYERS and target in LAYERS and LAYERS[target] > LAYERS[part]:
      problems.append(f"{relpath}:{line}: {part} (layer {LAYERS[part]}) imports {module} "
                      f"(layer {LAYERS[target]})")
  return problems


def test_no_import_runs_back_up():
  problems = [p for relpath, path in _sources() for p in _violations(relpath, path)]
  assert not problems, "\n".join(problems)


# Besides the layers: what a stage loads from a trainer goes through the loading layer.
FORBIDDEN = {"latents": {"training"}, "generation": {"training"}, "evaluation": {"training"},
             "training": {"generation", "evaluation"}}


def _forbidden(relpath, path):
  part = relpath.split(os.sep)[0]
  return [f"{relpath}:{line} {module}" for module, line in _imports(path)
          if _part(module) in FORBIDDEN.get(part, ())]


@pytest.mark.parametrize("stage", sorted(FORBIDDEN))
def test_stages_reach_trainers_only_through_the_loading_layer(stage):
  offending = [p for relpath, path in _sources() if relpath.startswith(stage + os.sep)
               for p in _forbidden(relpath, path)]
  assert not offending, offending


def test_the_rules_see_a_lazy_import(tmp_path):
  """An import inside a function (how the old stages reached the trainers) is caught."""
  path = tmp_path / "stage.py"
  path.write_text("import os\n\ndef f():\n  from msldm_jax.training import train_vae\n")
  relpath = os.path.join("generation", "stage.py")
  assert _forbidden(relpath, str(path)) == [f"{relpath}:4 msldm_jax.training.train_vae"]
  relpath = os.path.join("models", "loading.py")
  assert _violations(relpath, str(path)) == [
      f"{relpath}:4: models (layer 1) imports msldm_jax.training.train_vae (layer 3)"]


def _benchmarks_the_tests_import():
  tests = os.path.dirname(os.path.abspath(__file__))
  found = set()
  for name in sorted(os.listdir(tests)):
    if name.endswith(".py"):
      with open(os.path.join(tests, name)) as f:
        tree = ast.parse(f.read(), name)
      for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
          found |= {f"benchmarks.{alias.name}" for alias in node.names}
  return sorted(found)


def test_benchmarks_the_tests_import_define_no_flag_of_main():
  """A test worker may import msldm_jax.main and a benchmark in one process: absl refuses a
  flag defined twice, so such a benchmark must define --config, --workdir and the like only
  when it runs as a script. Checked in a fresh interpreter, all of them at once."""
  modules = _benchmarks_the_tests_import()
  assert "benchmarks.vae_levels" in modules
  repo = os.path.dirname(PACKAGE)
  code = "import msldm_jax.main\n" + "".join(f"import {m}\n" for m in modules)
  result = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True,
                          text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
