"""The accelerator benchmark as a user runs it: `python -m benchmarks.accelerator --tiny`.

The full sizes need a GPU or TPU; --tiny runs the same code at tiny sizes, so this test
shows on a CPU that every part builds, compiles, runs and reports finite figures, and that
a CPU gets no MFU (its peak is not tabled).
"""

import math
import subprocess
import sys

import pytest

ROWS = ("train base", "train large", "generate b=1", "generate b=2", "decode bfloat16",
        "decode float32")
# Columns that hold a number in every row, and where each row holds one.
ALWAYS_NUMERIC = ("batch", "compile s", "s per call")
NUMERIC_IN = {
    "steps/s": ("train",), "examples/s": ("train",), "TFLOP/step": ("train",),
    "TFLOP/s": ("train",), "pieces/s": ("generate",), "× real time": ("generate", "decode"),
}
NOT_APPLICABLE = "—"


def _table(stdout: str) -> list[dict[str, str]]:
  """The markdown table's rows as {column: cell}."""
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  assert len(lines) >= 3, stdout
  split = lambda line: [cell.strip() for cell in line.strip().strip("|").split("|")]
  header = split(lines[0])
  assert set(lines[1]) <= set("|-"), lines[1]
  rows = [dict(zip(header, split(line), strict=True)) for line in lines[2:]]
  return rows


def _finite(cell: str) -> bool:
  try:
    return math.isfinite(float(cell))
  except ValueError:
    return False


@pytest.mark.slow  # ~70 s on a loaded 2-core CPU, most of it compilation and imports.
def test_tiny_benchmark_prints_the_table(repo_root):
  result = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--tiny"],
                          cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "device_kind: cpu" in out
  assert "peak bf16 dense: unknown" in out
  assert "jax " in out and "jaxlib " in out

  rows = _table(out)
  assert [row["part"] for row in rows] == list(ROWS)
  for row in rows:
    kind = row["part"].split()[0]
    for column in ALWAYS_NUMERIC:
      assert _finite(row[column]), (row["part"], column, row[column])
    assert float(row["s per call"]) > 0, row
    for column, kinds in NUMERIC_IN.items():
      if kind in kinds:
        assert _finite(row[column]) and float(row[column]) > 0, (row["part"], column, row[column])
      else:
        assert row[column] == NOT_APPLICABLE, (row["part"], column, row[column])
    # A CPU has no tabled peak (no MFU) and keeps no allocator statistics; the compiled
    # programs' own footprints are known everywhere.
    assert row["MFU"] == ("n/a" if kind == "train" else NOT_APPLICABLE), row
    assert row["peak memory GiB"] == "n/a", row
    assert _finite(row["footprint GiB"]), row
    assert row["dtype"] in ("bfloat16", "float32"), row
  assert {row["dtype"] for row in rows if row["part"].startswith("decode")} == {"bfloat16",
                                                                                 "float32"}
  assert all(row["dtype"] == "bfloat16" for row in rows if row["part"].startswith("train"))
  assert "total wall time" in out
