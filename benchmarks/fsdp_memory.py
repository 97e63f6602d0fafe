r"""Per-device memory of the diffusion trainer's step, replicated against FSDP, and what fits.

  python -m benchmarks.fsdp_memory                    # DiT base and large, 8 CPU devices
  python -m benchmarks.fsdp_memory --variants=base --fit_depths=

Nothing is allocated. Every row compiles the trainer's own step (`loop.CompiledStep` over
`train_ldm.train_step`: EDM loss, AdamW with clipping, the EMA, the state donated) from
abstract shapes: the state is `jax.eval_shape` of the trainer's init laid out by the
strategy's shardings (`parallel/sharding.py`: 'replicate', or 'fsdp' splitting every leaf
of 2^14 elements or more along its largest axis the devices divide), the batch is joint
latents [batch, 4, 80, 1024] split over the data axis; `.lower(...).compile()` then gives
XLA's `memory_analysis()` of the partitioned program, per device: arguments (the device's
share of the state and of the batch), temporaries (activations, gradients, the update's
buffers), outputs and the donated aliases. The devices are 8 host-platform CPU devices
(set below, before JAX starts), so the figures are XLA:CPU's plan; a GPU's fusion and
attention kernels change the temporaries, not the state.

Settings: the paper's diffusion settings (`paper_config.get_paper_config(variant).ldm`):
bfloat16 compute, float32 parameters, EMA and AdamW moments (16 bytes per parameter of
state), a global batch of 16 chunks (2 per device).

What fits one device: the peak of one device training alone, arguments + temporaries +
outputs − aliases, compiled on one device at the `large` width (1152, 18 heads, patch 16)
for two depths (--fit_depths), at batch --fit_batch. Parameters and both memory terms are
linear in depth at a fixed width, so the two points give bytes per block and the fixed part
exactly; the largest depth within 16 GiB and 80 GiB follows, with its parameter count.
Whole GiB of the device, no allowance for the runtime's own use (JAX's GPU allocator takes
75 % by default: XLA_PYTHON_CLIENT_MEM_FRACTION).
"""

import functools
import math
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
  sys.path.insert(0, REPO_ROOT)
  # Before JAX starts: the mesh's 8 devices, on any machine.
  os.environ["XLA_FLAGS"] = " ".join(
      [f for f in os.environ.get("XLA_FLAGS", "").split()
       if not f.startswith("--xla_force_host_platform_device_count")] +
      ["--xla_force_host_platform_device_count=8"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # noqa: E402  pylint: disable=g-import-not-at-top
import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import ml_collections  # noqa: E402  pylint: disable=g-import-not-at-top

from msldm_jax import paper_config  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax import stems as stems_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.latents import store  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.models import dit  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.parallel import mesh as mesh_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import loop  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import train_ldm  # noqa: E402  pylint: disable=g-import-not-at-top

_VARIANTS = flags.DEFINE_list("variants", ["base", "large"], "DiT variants to compare.")
_BATCH = flags.DEFINE_integer("batch", 16, "Global batch of the comparison (chunks).")
_FIT_DEPTHS = flags.DEFINE_list("fit_depths", ["6", "12"], "Two depths at the large width "
                                "whose one-device peaks give the fit (empty: no fit).")
_FIT_BATCH = flags.DEFINE_integer("fit_batch", 16, "Batch of the one-device fit.")

FRAMES = 1024  # latent frames of one chunk (reference §2)
GIB = 2**30
DEVICE_GIB = (16, 80)


def step_memory(ldm_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict,
                devices, strategy: str, batch: int, frames: int = FRAMES) -> dict:
  """Per-device bytes of the compiled train step, from abstract shapes only.

  Returns {"parameters", "arguments", "temporaries", "outputs", "aliases", "peak"}; peak =
  arguments + temporaries + outputs − aliases (the donated state's buffers are reused).
  """
  mesh = mesh_lib.make_mesh(devices)
  spec = train_ldm.make_train_spec(ldm_config, model_config)
  compiled_step = loop.CompiledStep(
      functools.partial(train_ldm.init_state, spec, num_frames=spec.model.frame_multiple),
      functools.partial(train_ldm.train_step, spec=spec, seed=0), mesh, strategy)
  latent_dim = int(model_config.in_channels) // stems_lib.NUM_STEMS
  latents = jax.ShapeDtypeStruct((batch, stems_lib.NUM_STEMS, latent_dim, frames), jnp.float32,
                                 sharding=mesh_lib.batch_sharding(mesh))
  compiled = compiled_step.step.lower(compiled_step.abstract_state,
                                      {store.LATENTS: latents}).compile()
  stats = compiled.memory_analysis()
  if stats is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  memory = {"parameters": sum(math.prod(p.shape) for p in
                              jax.tree.leaves(compiled_step.abstract_state.params)),
            "arguments": stats.argument_size_in_bytes,
            "temporaries": stats.temp_size_in_bytes,
            "outputs": stats.output_size_in_bytes,
            "aliases": stats.alias_size_in_bytes}
  memory["peak"] = (memory["arguments"] + memory["temporaries"] + memory["outputs"] -
                    memory["aliases"])
  return memory


def _paper_model(variant: str, **overrides) -> tuple[ml_collections.ConfigDict,
                                                     ml_collections.ConfigDict]:
  ldm_config = paper_config.get_paper_config(variant).ldm
  model_config = ml_collections.ConfigDict(ldm_config.model.to_dict())
  model_config.in_channels = dit.IN_CHANNELS
  model_config.update(overrides)
  return ldm_config, model_config


def _gib(value: float) -> str:
  return f"{value / GIB:.2f}"


def compare(variants, batch: int) -> list[str]:
  lines = ["| DiT | parameters | strategy | arguments GiB | temporaries GiB | peak GiB | "
           "arguments vs replicated |", "|---|---|---|---|---|---|---|"]
  devices = jax.devices()
  for variant in variants:
    ldm_config, model_config = _paper_model(variant)
    replicated = None
    for strategy in ("replicate", "fsdp"):
      memory = step_memory(ldm_config, model_config, devices, strategy, batch)
      replicated = replicated or memory
      lines.append(
          f"| {variant} | {memory['parameters'] / 1e6:.1f} M | {strategy} | "
          f"{_gib(memory['arguments'])} | {_gib(memory['temporaries'])} | "
          f"{_gib(memory['peak'])} | 1/{replicated['arguments'] / memory['arguments']:.2f} |")
      print(f"  compiled: {variant} {strategy}", flush=True)
  return lines


def fit(depths, batch: int) -> list[str]:
  """The largest depth at the large width whose one-device peak fits each DEVICE_GIB."""
  ldm_config, _ = _paper_model("large")
  points = []
  for depth in depths:
    _, model_config = _paper_model("large", depth=depth)
    memory = step_memory(ldm_config, model_config, jax.devices()[:1], "replicate", batch)
    points.append((depth, memory))
    print(f"  depth {depth}: {memory['parameters'] / 1e6:.1f} M parameters, peak "
          f"{_gib(memory['peak'])} GiB (arguments {_gib(memory['arguments'])}, temporaries "
          f"{_gib(memory['temporaries'])})", flush=True)
  (d0, m0), (d1, m1) = points
  per_block = {k: (m1[k] - m0[k]) / (d1 - d0) for k in ("peak", "parameters")}
  fixed = {k: m0[k] - per_block[k] * d0 for k in per_block}
  lines = [f"| device | largest depth at width 1152 | parameters | peak GiB (batch {batch}) |",
           "|---|---|---|---|"]
  for capacity in DEVICE_GIB:
    depth = int((capacity * GIB - fixed["peak"]) // per_block["peak"])
    lines.append(f"| {capacity} GiB | {depth} | "
                 f"{(fixed['parameters'] + per_block['parameters'] * depth) / 1e6:.0f} M | "
                 f"{_gib(fixed['peak'] + per_block['peak'] * depth)} |")
  print(f"  per block: {per_block['parameters'] / 1e6:.2f} M parameters, "
        f"{per_block['peak'] / 2**20:.0f} MiB; fixed: {fixed['parameters'] / 1e6:.2f} M, "
        f"{fixed['peak'] / 2**20:.0f} MiB", flush=True)
  return lines


def main(argv):
  del argv
  print(f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} devices", flush=True)
  print("\n".join(compare(_VARIANTS.value, _BATCH.value)))
  if _FIT_DEPTHS.value:
    print("\n".join(fit([int(d) for d in _FIT_DEPTHS.value], _FIT_BATCH.value)))


if __name__ == "__main__":
  app.run(main)
