"""Config scripts: `configs/NAME.py` defines `get_config(arg)` returning a ConfigDict.

`arg` is one string of comma-separated options (`variant=tiny,runlocal`), parsed against the
options a config declares, so that a misspelled option is an error naming it. The same
`load_config("configs/demo.py:variant=tiny")` serves `main.py`, tests and notebooks.

A config script starts from the paper's configuration (`msldm_jax/paper_config.py`) and
changes it with `override`, which sets existing keys only: a smaller configuration is the
paper's with a visible list of changes, and a key renamed in the paper's config is an error
in every script that still sets the old one.
"""

import importlib.util
import os
from collections.abc import Mapping
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


def update_known(config: ml_collections.ConfigDict, values: Mapping[str, Any], source: str,
                 what: str = "") -> ml_collections.ConfigDict:
  """Sets `config`'s keys from `values` (lists become tuples, as configs hold them); a key
  `config` does not have is an error naming `source`, `what` config it is, and the keys."""
  for key, value in values.items():
    if key not in config:
      raise ValueError(f"{source}: unknown {what + ' ' if what else ''}config key {key!r} "
                       f"(keys: {', '.join(sorted(config))})")
    config[key] = tuple(value) if isinstance(value, list) else value
  return config


def set_from_strings(config: ml_collections.ConfigDict, items, what: str
                     ) -> ml_collections.ConfigDict:
  """Sets `config`'s keys from 'KEY=VALUE' strings (a tool's repeated flag), each parsed to
  the type of the key's current value; a tuple takes comma-separated elements."""
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or key not in config:
      raise ValueError(f"{what}={item!r}: expected KEY=VALUE with KEY one of "
                       f"{', '.join(sorted(config))}")
    default = config[key]
    if isinstance(default, tuple):
      element = default[0] if default else 0
      config[key] = tuple(_convert(key, v.strip(), element) for v in text.split(",") if v)
    else:
      config[key] = _convert(key, text, default)
  return config


def load_module(path: str):
  """The config script at `path` as a module (its `get_config` and whatever else it defines)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "msldm_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config(path_and_arg: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and returns its locked ConfigDict.

  Locking makes assigning a key that does not exist an error that names it.
  """
  path, _, arg = path_and_arg.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config(arg)")
  config = module.get_config(arg or None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise TypeError(f"{path}: get_config must return an ml_collections.ConfigDict")
  config.lock()
  return config


def _is_section(value: Any) -> bool:
  return isinstance(value, (Mapping, ml_collections.ConfigDict))


# Sections whose keys are data (stems, a dataclass's fields), not settings: empty by default,
# the code reading them checks their keys, and `override` merges into them.
OPEN_SECTIONS = ("vae.loss_weights_by_stem", "vae.discriminator.overrides")


def _is_open(name: str) -> bool:
  """`name` (dotted, from wherever `override` started) is one of OPEN_SECTIONS."""
  return any(section == name or section.endswith("." + name) for section in OPEN_SECTIONS)


def _merged(base: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
  merged = dict(base)
  for key, value in values.items():
    merged[key] = (_merged(merged[key], value) if _is_section(value) and
                   _is_section(merged.get(key)) else value)
  return merged


def override(config: ml_collections.ConfigDict, values: Mapping[str, Any], source: str,
             where: str = "") -> ml_collections.ConfigDict:
  """Sets `values` (nested like `config`) over `config`, existing keys only; returns config.

  A nested mapping sets keys inside that section; any other value replaces the key's value
  (ConfigDict's type checks apply: a float key takes an int, not a string). An
  `OPEN_SECTIONS` section takes new keys: the mapping given is merged into it.

  Raises:
    KeyError naming `source`, the dotted key and the keys that exist, for a key `config`
      does not have (a misspelling, or a key renamed in the base config); TypeError for a
      section given a plain value or a plain key given a section.
  """
  for key, value in values.items():
    name = f"{where}.{key}" if where else key
    if key not in config:
      raise KeyError(f"{source}: {name} is not a key of the base config"
                     f"{' section ' + where if where else ''}; keys: "
                     + ", ".join(sorted(config)))
    is_section = isinstance(config[key], ml_collections.ConfigDict)
    if _is_section(value) != is_section:
      raise TypeError(f"{source}: {name} is {'a section' if is_section else 'a value'} in "
                      f"the base config, but is given {value!r}")
    if is_section and _is_open(name):
      config[key] = _merged(config[key].to_dict(), value)
    elif is_section:
      override(config[key], value, source, name)
    else:
      config[key] = value
  return config


def flatten(tree: Mapping[str, Any] | ml_collections.ConfigDict,
            prefix: str = "") -> dict[str, Any]:
  """{'a.b.c': value} for every leaf of a nested ConfigDict or dict (sections are walked)."""
  leaves = {}
  for key, value in tree.items():
    name = prefix + key
    if _is_section(value):
      leaves.update(flatten(value, name + "."))
    else:
      leaves[name] = value
  return leaves
