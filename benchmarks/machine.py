"""What machine a benchmark ran on, as its results name it."""

import platform
import subprocess


def cpu_model() -> str:
  """The CPU's model name as lscpu prints it (platform's guess where lscpu is missing)."""
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown CPU"
