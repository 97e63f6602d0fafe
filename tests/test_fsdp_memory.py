"""FSDP shards the diffusion trainer's state: per-device argument bytes of the compiled step.

The benchmark (`benchmarks/fsdp_memory.py`) measures the DiT base and large; here the same
measurement (abstract shapes, nothing allocated) on a small DiT, so that it compiles in
seconds on the 8 fake CPU devices.
"""

import sys

import jax

import conftest  # pylint: disable=g-bad-import-order

if conftest.REPO_ROOT not in sys.path:  # benchmarks/ is not a package of the install
  sys.path.insert(0, conftest.REPO_ROOT)

from benchmarks import fsdp_memory  # noqa: E402  pylint: disable=g-import-not-at-top


def test_fsdp_keeps_at_most_a_sixth_of_the_replicated_arguments_per_device():
  ldm_config, model_config = fsdp_memory._paper_model(  # pylint: disable=protected-access
      "base", width=256, depth=1, num_heads=4, dtype="float32")
  assert jax.device_count() == 8
  replicated, fsdp = (fsdp_memory.step_memory(ldm_config, model_config, jax.devices(), strategy,
                                              batch=8, frames=64)
                      for strategy in ("replicate", "fsdp"))
  assert replicated["parameters"] == fsdp["parameters"] > 3e6
  # Float32 parameters, EMA and two Adam moments: 16 bytes per parameter on every device.
  assert replicated["arguments"] >= 16 * replicated["parameters"]
  assert fsdp["arguments"] <= replicated["arguments"] / 6, (fsdp, replicated)
  # The state is donated: its buffers hold the new state (the batch is the rest).
  assert fsdp["aliases"] >= 0.9 * fsdp["arguments"]
