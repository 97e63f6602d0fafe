"""Config scripts: variants by one string argument, errors that name the key at fault."""

import os
import subprocess
import sys

import pytest

from msldm_jax import config_loading


def _demo(repo_root, arg=""):
  path = os.path.join(repo_root, "configs", "demo.py")
  return config_loading.load_config(path + (":" + arg if arg else ""))


def test_variants_load(repo_root):
  default, tiny = _demo(repo_root), _demo(repo_root, "variant=tiny")
  assert default.variant == "default" and tiny.variant == "tiny"
  assert tiny.data.chunks.samples < default.data.chunks.samples == 327672


def test_unknown_option_names_it(repo_root):
  with pytest.raises(ValueError, match="varient"):
    _demo(repo_root, "varient=tiny")


def test_unknown_variant_names_it(repo_root):
  with pytest.raises(ValueError, match="huge"):
    _demo(repo_root, "variant=huge")


def test_misspelled_key_is_an_error_naming_it(repo_root):
  config = _demo(repo_root, "variant=tiny")
  with pytest.raises(AttributeError, match="min_durration"):
    config.data.min_durration = 3.0
  with pytest.raises(AttributeError, match="shufle_buffer"):
    _ = config.data.chunks.shufle_buffer


def test_parse_arg_types():
  args = config_loading.parse_arg("steps=5,runlocal,rate=0.5", steps=1, runlocal=False,
                                  rate=1.0, name="x")
  assert args.steps == 5 and args.runlocal is True and args.rate == 0.5 and args.name == "x"
  with pytest.raises(ValueError, match="steps"):
    config_loading.parse_arg("steps=five", steps=1)


def test_missing_config_file():
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_loading.load_config("configs/nope.py")


def test_cli_rejects_misspelled_override(repo_root, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "msldm_jax.main", "--config=configs/demo.py:variant=tiny",
       f"--workdir={tmp_path}", "--mode=data", "--config.data.min_durration=1"],
      cwd=repo_root, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "min_durration" in result.stderr
