"""Config scripts: `configs/NAME.py` defines `get_config(arg)` returning a ConfigDict.

`arg` is one string of comma-separated options (`variant=tiny,runlocal`), parsed against the
options a config declares, so that a misspelled option is an error naming it. The same
`load_config("configs/demo.py:variant=tiny")` serves `main.py`, tests and notebooks.
"""

import importlib.util
import os
from typing import Any

import ml_collections


def _convert(key: str, text: str, default: Any) -> Any:
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("", "1", "true", "yes"):
      return True
    if lowered in ("0", "false", "no"):
      return False
    raise ValueError(f"config option {key!r}: {text!r} is not a boolean")
  if default is None:
    return text
  try:
    return type(default)(text)
  except ValueError:
    raise ValueError(
        f"config option {key!r}: {text!r} is not a {type(default).__name__}") from None


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
  """Parses 'a=1,b,c=x' against `spec` (option name -> default value, whose type is kept).

  A bare name sets a boolean option to True. An option not in `spec` raises, naming it and
  the options that exist.
  """
  values = dict(spec)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, text = item.partition("=")
    key = key.strip()
    if key not in spec:
      raise ValueError(
          f"unknown config option {key!r} in {arg!r}; known options: "
          + ", ".join(sorted(spec)))
    values[key] = _convert(key, text.strip(), spec[key]) if "=" in item or isinstance(
        spec[key], bool) else text
  return ml_collections.ConfigDict(values)


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and returns its locked ConfigDict.

  Locking makes assigning a key that does not exist an error that names it.
  """
  path, _, arg = path_and_arg.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "msldm_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"{path}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config
