r"""One prepared accelerator benchmark: training, generation and decoding at paper size.

Run from the repository root, on a machine with a GPU or TPU (all parts, one process, meant
to take under 8 minutes on one H100/H200 including compilation; on a CPU, use --tiny):
  python -m benchmarks.accelerator
  python -m benchmarks.accelerator --tiny        # the same code at tiny sizes, on a CPU
  python -m benchmarks.accelerator --parts=train --train_variants=large --train_batch=128

Everything runs on ONE device (`jax.devices()[0]`), so the figures are per chip, whatever the
machine has. Parameters are random, since speed does not depend on their values (the DiT's
from its own initialiser, the SourceVAE's drawn on the host: `random_vae_params`). Timed:

1. train  The diffusion trainer's own step (`train_ldm.train_step` compiled by
   `training/loop.CompiledStep`, as `--mode=train_ldm` runs it: EDM loss, AdamW with
   clipping, the EMA update, σ-bucket metrics, the state donated) for the DiT `large` and
   `base` (`paper_config.get_paper_config(variant).ldm`: the paper's optimiser and σ
   settings), bfloat16 compute with float32 parameters, on random joint latents
   [batch, 4, 80, 1024]. Default batch (--train_batch): the largest power of two up to
   256 that a memory estimate fits in 80 % of the device's memory, 128 on an 80 GB H100,
   256 on an H200 (the estimate and its source: ACTIVATION_BYTES_PER_EXAMPLE).
   After compilation and --train_warmup steps, --train_repeats runs of --train_steps steps;
   the fastest run counts. Reported: steps/s, examples/s, the model FLOPs per step and MFU.
2. generate  One 14.86 s four-stem piece: the joint latent at paper size (320 × 1024), the
   release's sampler (Euler with churn, 150 steps, from the paper config's `sample`
   section) and the decoding of the four stems by the paper-size SourceVAE (float32, as
   generation runs it), all in one compiled call (`generation_program.generate_batch`);
   denoiser: the DiT `base` (--generate_variant) in its configured dtype (bfloat16). At
   batch 1 (latency: the fastest of --generate_repeats calls) and at --generate_batch
   pieces (throughput, pieces/s: one timed call).
3. decode  The paper-size SourceVAE decoding the four stems of one piece (4 × 14.86 s,
   `generation_program.decode_stems`) in bfloat16 and in float32. The SourceVAE has a
   bfloat16 path of its own (`dtype="bfloat16"`: activations and convolution kernels in
   bfloat16, parameters float32, weight norm folded in float32, the waveform returned in
   float32). float32 convolutions run at XLA's default precision (which may use TF32 on
   NVIDIA GPUs). Fastest of --decode_repeats calls after one warm-up call.
Compilation is done ahead of time (`.lower(...).compile()`) and reported on its own.

FLOPs (training only): the DiT's forward pass F(x, c_noise) at the benchmark's batch is
lowered to HLO from abstract shapes (`jax.ShapeDtypeStruct`, `jax.eval_shape`: nothing is
allocated) for the CPU backend and counted by XLA's HLO cost analysis
(`jax.jit(...).lower(...).cost_analysis()["flops"]`, unoptimised HLO: every dot at 2·M·N·K,
attention included, plus elementwise ops, about 1-3 % above the matmul-only count). Lowered
for the CPU whatever the device, so the count is the network's, not a fused kernel's, and
needs no compilation (where no CPU backend is available: the device's compiled cost
analysis). A training step counts 3 × forward (the backward pass ≈ 2 × forward; the
optimiser's elementwise work and any recomputation are left out, as model FLOPs usually
are). The whole step, lowered the same way, is printed as a check of that factor.
MFU = 3 × forward FLOPs × steps/s ÷ the device's peak dense bfloat16 FLOP/s, looked up from
`device_kind` in PEAK_BF16_TFLOPS (vendor figures, dense, no sparsity); an unknown device
prints "unknown" and no MFU.

Memory: `memory_stats()["peak_bytes_in_use"]` after each part, a process-wide high-water
mark that JAX cannot reset, so the parts run in order of expected footprint (decode,
generate, train base, train large) and a row's figure is its own peak only where it exceeds
the rows run before it; "n/a" where the backend keeps no statistics (CPU). Next to it, each
compiled program's own footprint from `memory_analysis()` (arguments + outputs +
temporaries − donated aliases).

A batch that does not fit (RESOURCE_EXHAUSTED) is halved and retried, at most twice, and
the row says so: a fallback, not a search (each retry recompiles).

--tiny runs the same code at tiny sizes: configs/demo.py's tiny variant (its tiny VAE
widths, 32 latent frames = 0.46 s pieces, its 8-step sampler), the DiT `tiny` preset in
place of `large`, `base` and the generation DiT, small batches and few steps.
"""

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from msldm_jax import config_loading
from msldm_jax import paper_config
from msldm_jax import stems as stems_lib
from msldm_jax.diffusion import generation_program
from msldm_jax.latents import store
from msldm_jax.models import dit
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import loop
from msldm_jax.training import train_ldm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO_ROOT, "configs", "demo.py") + ":variant=tiny"
PARTS = ("train", "generate", "decode")

_TINY = flags.DEFINE_bool("tiny", False, "Tiny sizes (configs/demo.py's tiny variant, the DiT "
                          "'tiny' preset): the same code path, on a CPU in about a minute.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, of {', '.join(PARTS)}.")
_TRAIN_VARIANTS = flags.DEFINE_list("train_variants", ["base", "large"],
                                    "DiT variants whose train step is timed (run in this order).")
_TRAIN_BATCH = flags.DEFINE_integer(
    "train_batch", 0, "Examples per train step (0: the largest power of two up to 256 that "
    "the memory estimate fits: 128 on an 80 GB H100, 256 on an H200; --tiny: 4).")
_TRAIN_DTYPE = flags.DEFINE_string("train_dtype", "bfloat16",
                                   "The DiT's compute dtype in training.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 0, "Timed steps per run (0: 10; --tiny: 2).")
_TRAIN_WARMUP = flags.DEFINE_integer("train_warmup", 2, "Untimed steps after compilation.")
_TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 2, "Timed runs (the fastest counts).")
_GENERATE_VARIANT = flags.DEFINE_string("generate_variant", "base",
                                        "DiT variant of the generation part (--tiny: 'tiny').")
_GENERATE_BATCH = flags.DEFINE_integer(
    "generate_batch", 0, "Pieces per call for the throughput row (0: 16; --tiny: 2).")
_GENERATE_REPEATS = flags.DEFINE_integer("generate_repeats", 2,
                                         "Timed calls at batch 1 (the fastest counts).")
_SAMPLER_STEPS = flags.DEFINE_integer(
    "sampler_steps", 0, "Sampler steps (0: the config's: the release's 150; --tiny: 8).")
_DECODE_REPEATS = flags.DEFINE_integer("decode_repeats", 3,
                                       "Timed decoding calls (the fastest counts).")

# The train batch's default: the largest power of two up to MAX_TRAIN_BATCH whose estimated
# memory fits MEMORY_SHARE of the device's usable memory (`bytes_limit`; JAX's allocator takes
# 75 % of a GPU by default). A step sees batch × 64 tokens (patch 16 over 1024 frames), so
# 128 examples already make 8 k-row matmuls, enough to keep a GPU's tensor cores busy: past
# 256 a larger batch mostly lengthens the step. The estimate: ~22 bytes of state per
# parameter (float32 parameters, EMA, two Adam moments and gradients, bfloat16 copies) plus
# the saved activations per example, from the compiled step's memory analysis (XLA:CPU,
# `large` cut to 1-2 blocks at batch 8-16: ~7-10 MB per block and example, scaled with
# width and depth). It gives 128 on an 80 GB H100 or A100, 256 on a 141 GB H200, 64 on a
# 40 GB A100, 16 on a 16 GB TPU v5e. Override with --train_batch.
ACTIVATION_BYTES_PER_EXAMPLE = {"small": 80e6, "base": 170e6, "large": 180e6}
STATE_BYTES_PER_PARAMETER = 22
MEMORY_SHARE = 0.8
MAX_TRAIN_BATCH = 256
UNKNOWN_MEMORY_TRAIN_BATCH = 128  # Where the device reports no memory limit.
# Pieces per generation call for the throughput row: the decoding dominates its memory, ~2 GB
# of float32 activations per piece (four stems; XLA:CPU's memory analysis of the paper-size
# decoder), so 16 pieces take ~32 GB.
DEFAULT_GENERATE_BATCH = 16
TINY_BATCH = {"train": 4, "generate": 2}
TIMED_TRAIN_STEPS = {False: 10, True: 2}

# Peak dense bfloat16 FLOP/s per device (vendor figures, no sparsity), TFLOP/s, matched in
# order against `device_kind` (case-insensitive). The H100 and H200 NVL boards run slower
# clocks than the SXM parts and are left unknown rather than given a wrong peak.
PEAK_BF16_TFLOPS = (
    (r"nvidia h100.*pcie", "H100 PCIe", 756.0),
    (r"nvidia h100(?!.*nvl)", "H100 SXM", 989.0),
    (r"nvidia h200(?!.*nvl)", "H200", 989.0),
    (r"nvidia a100", "A100", 312.0),
    (r"nvidia l4$", "L4", 121.0),
    (r"tpu v4$", "TPU v4", 275.0),
    (r"tpu v5 ?(lite|e)$", "TPU v5e", 197.0),
    (r"tpu v5p?$", "TPU v5p", 459.0),
    (r"tpu v6 ?(lite|e)$", "TPU v6e", 918.0),
)

NOT_APPLICABLE = "—"
UNAVAILABLE = "n/a"
COLUMNS = ("part", "model", "batch", "dtype", "compile s", "s per call", "steps/s",
           "examples/s", "pieces/s", "× real time", "TFLOP/step", "TFLOP/s", "MFU",
           "peak memory GiB", "footprint GiB")


def default_train_batch(variant: str, num_params: int, memory_limit: int | str) -> int:
  """The largest power-of-two batch (≤ MAX_TRAIN_BATCH) the memory estimate fits."""
  if isinstance(memory_limit, str):
    return UNKNOWN_MEMORY_TRAIN_BATCH
  per_example = ACTIVATION_BYTES_PER_EXAMPLE.get(variant, ACTIVATION_BYTES_PER_EXAMPLE["large"])
  room = MEMORY_SHARE * memory_limit - STATE_BYTES_PER_PARAMETER * num_params
  batch = MAX_TRAIN_BATCH
  while batch > 1 and batch * per_example > room:
    batch //= 2
  return batch


def peak_bf16_flops(device_kind: str) -> tuple[str, float | None]:
  """(name, peak dense bf16 FLOP/s) of a device kind; ("unknown", None) if not tabled."""
  kind = device_kind.strip().lower()
  for pattern, name, tflops in PEAK_BF16_TFLOPS:
    if re.search(pattern, kind):
      return name, tflops * 1e12
  return "unknown", None


@dataclasses.dataclass
class Row:
  """One line of the table; None prints as "—" (not measured for this part)."""
  part: str
  model: str
  batch: int
  dtype: str
  compile_seconds: float
  seconds: float
  steps_per_second: float | None = None
  examples_per_second: float | None = None
  pieces_per_second: float | None = None
  real_time: float | None = None
  flops_per_step: float | None = None
  achieved_flops: float | None = None
  mfu: float | str | None = None
  peak_bytes: int | str = UNAVAILABLE
  footprint_bytes: int | str = UNAVAILABLE
  note: str = ""


# -- device facts ----------------------------------------------------------------------------

def peak_bytes_in_use(device) -> int | str:
  stats = device.memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return UNAVAILABLE
  return int(stats["peak_bytes_in_use"])


def compiled_footprint(compiled) -> int | str:
  """Arguments + outputs + temporaries − donated aliases of one compiled program."""
  try:
    stats = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    return UNAVAILABLE
  if stats is None:
    return UNAVAILABLE
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _nvidia_driver() -> str:
  """The NVIDIA driver's version, from nvidia-smi where there is one."""
  if not shutil.which("nvidia-smi"):
    return UNAVAILABLE
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return UNAVAILABLE
  return out.strip().splitlines()[0] if out.strip() else UNAVAILABLE


def device_facts(device) -> dict:
  client = getattr(device, "client", None)
  stats = device.memory_stats() or {}
  name, peak = peak_bf16_flops(device.device_kind)
  return dict(
      platform=device.platform, device=str(device), device_kind=device.device_kind,
      devices_visible=len(jax.devices()), jax=jax.__version__, jaxlib=jaxlib.__version__,
      platform_version=" ".join(str(getattr(client, "platform_version", UNAVAILABLE)).split()),
      driver=_nvidia_driver() if device.platform == "gpu" else UNAVAILABLE,
      runtime=getattr(client, "runtime_type", UNAVAILABLE),
      memory_limit_bytes=stats.get("bytes_limit", UNAVAILABLE),
      peak_name=name, peak_bf16_flops=peak)


# -- FLOP counting from abstract shapes ------------------------------------------------------

def _cost_flops(cost) -> float | None:
  if isinstance(cost, (list, tuple)):  # Older jaxlibs: one dict per program.
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def count_flops(fn: Callable[..., Any], *abstract_args) -> float | None:
  """FLOPs of fn(*abstract_args) by XLA's HLO cost analysis, without allocating anything.

  Lowered for the CPU backend (the abstract arguments are placed there), whose lowered
  programs support cost analysis without compiling: the count is the network's unoptimised
  HLO, the same on every device. Without a CPU backend (JAX_PLATFORMS=cuda, say), the
  default device's compiled cost analysis instead.
  """
  try:
    cpu = jax.devices("cpu")[0]
  except RuntimeError:
    cpu = None
  if cpu is not None:
    placed = jax.sharding.SingleDeviceSharding(cpu)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed),
                        abstract_args)
    flops = _cost_flops(jax.jit(fn).lower(*args).cost_analysis())
    if flops is not None:
      return flops
  args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_args)
  try:
    return _cost_flops(jax.jit(fn).lower(*args).compile().cost_analysis())
  except NotImplementedError:
    return None


def _abstract(shape, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def _without_sharding(tree):
  return jax.tree.map(lambda a: _abstract(a.shape, a.dtype), tree)


# -- sizes -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything the parts are built from: a config (paper or demo tiny) and its sizes."""
  tiny: bool
  config: ml_collections.ConfigDict  # data, vae, ldm and sample sections
  frames: int                        # latent frames of one piece
  samples: int                       # audio samples of one piece (per stem)

  @property
  def latent_dim(self) -> int:
    return int(self.config.vae.model.latent_dim)

  @property
  def channels(self) -> int:
    return stems_lib.NUM_STEMS * self.latent_dim

  @property
  def piece_seconds(self) -> float:
    return self.samples / stems_lib.SAMPLE_RATE

  def ldm_config(self, variant: str) -> ml_collections.ConfigDict:
    """The diffusion stage's settings (optimiser, σ, EMA) for a DiT variant."""
    if self.tiny:
      return self.config.ldm
    return paper_config.get_paper_config(variant).ldm

  def dit_config(self, variant: str, dtype: str = "") -> ml_collections.ConfigDict:
    """The DiT of `variant` (--tiny: the 'tiny' preset) over this config's joint latent."""
    if self.tiny:
      config = dit.model_config("tiny", in_channels=self.channels)
    else:
      config = ml_collections.ConfigDict(self.ldm_config(variant).model.to_dict())
      config.in_channels = self.channels
    if dtype:
      config.dtype = dtype
    return config

  def vae(self, dtype: str = "float32") -> source_vae.SourceVAE:
    config = ml_collections.ConfigDict(self.config.vae.model.to_dict())
    config.dtype = dtype
    return source_vae.SourceVAE.from_config(config)


def make_sizes(tiny: bool) -> Sizes:
  config = (config_loading.load_config(TINY_CONFIG) if tiny
            else paper_config.get_paper_config())
  vae = source_vae.SourceVAE.from_config(config.vae.model)
  frames = generation_program.latent_frames(int(config.data.chunks.samples), vae)
  samples = source_vae.decoded_length(frames, vae.decoder_strides)
  return Sizes(tiny=tiny, config=config, frames=frames, samples=samples)


# -- timing helpers --------------------------------------------------------------------------

def _best_of(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` calls of fn, each waited for."""
  times = []
  for _ in range(max(repeats, 1)):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def _compile(jitted, *args):
  """(compiled program, seconds) of an ahead-of-time lowering and compilation."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def _halving_on_oom(run: Callable[[int], Row], batch: int, what: str) -> Row:
  """run(batch); on RESOURCE_EXHAUSTED, run(batch // 2), at most twice more."""
  notes = []
  for attempt in range(3):
    try:
      row = run(batch)
      row.note = "; ".join(notes + [row.note] if row.note else notes)
      return row
    except jax.errors.JaxRuntimeError as error:
      if "RESOURCE_EXHAUSTED" not in str(error) or batch == 1 or attempt == 2:
        raise
    notes.append(f"batch {batch} did not fit")
    print(f"  {what}: batch {batch} ran out of device memory; retrying at {batch // 2}",
          flush=True)
    batch //= 2
  raise AssertionError("unreachable")


def _millions(count: int) -> str:
  return f"{count / 1e6:.1f} M" if count >= 1e5 else f"{count / 1e6:.3f} M"


def _check_finite(name: str, value) -> None:
  value = np.asarray(jax.device_get(value), np.float32)
  if not np.all(np.isfinite(value)):
    raise FloatingPointError(f"{name}: non-finite output")


def random_vae_params(vae: source_vae.SourceVAE, seed: int):
  """Random SourceVAE parameters of the right shapes, drawn on the host.

  Speed does not depend on the values, and the module's own initialiser
  (`source_vae.init_params`) compiles a program of some 170 initialisers and a forward pass:
  ~15 s on a 2-core CPU even at the tiny size, a quarter of --tiny's run, and on a device
  one more compilation inside the 8 minutes. The values keep the decoder's signal in range:
  weight-norm gains 1
  (each output channel's kernel of unit norm), Snake α 1 (its own initial value), biases 0,
  the rest standard normal (weight norm rescales it).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = getattr(path[-1], "key", None)
    if name in ("weight_g", "alpha"):
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    return rng.standard_normal(leaf.shape, dtype=np.float32).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, source_vae.abstract_params(vae))


# -- 1. the train step -----------------------------------------------------------------------

def bench_train(sizes: Sizes, variant: str, batch: int, facts: dict, device) -> Row:
  """The trainer's compiled step for one DiT variant at `batch` examples."""
  model_config = sizes.dit_config(variant, _TRAIN_DTYPE.value)
  spec = train_ldm.make_train_spec(sizes.ldm_config(variant), model_config)
  mesh = mesh_lib.make_mesh([device])
  compiled_step = loop.CompiledStep(
      functools.partial(train_ldm.init_state, spec, num_frames=spec.model.patch_size),
      functools.partial(train_ldm.train_step, spec=spec, seed=0), mesh, "replicate")
  num_params = sum(math.prod(leaf.shape)
                   for leaf in jax.tree.leaves(compiled_step.abstract_state.params))
  latents_shape = (batch, stems_lib.NUM_STEMS, sizes.latent_dim, sizes.frames)

  # Model FLOPs from abstract shapes: F(x, c_noise) once per step (the EDM loss's single
  # network evaluation), ×3 for forward + backward.
  abstract_params = _without_sharding(compiled_step.abstract_state.params)
  forward_flops = count_flops(spec.model.apply, abstract_params,
                              _abstract((batch, sizes.channels, sizes.frames)),
                              _abstract((batch,)))
  step_flops = 3 * forward_flops if forward_flops is not None else None
  whole_step_flops = count_flops(
      functools.partial(train_ldm.train_step, spec=spec, seed=0),
      _without_sharding(compiled_step.abstract_state), {store.LATENTS: _abstract(latents_shape)})
  if forward_flops and whole_step_flops:
    print(f"  train {variant}: forward {forward_flops / 1e12:.4g} TFLOP at batch {batch}; "
          f"the whole step lowered (forward, backward, AdamW, EMA): "
          f"{whole_step_flops / 1e12:.4g} TFLOP = {whole_step_flops / forward_flops:.2f} × "
          "forward (MFU counts 3 ×)", flush=True)

  state = compiled_step.init(jax.random.key(0))
  make_latents = jax.jit(lambda key: 0.5 * jax.random.normal(key, latents_shape),
                         out_shardings=mesh_lib.batch_sharding(mesh))
  train_batch = {store.LATENTS: make_latents(jax.random.key(1))}
  step, compile_seconds = _compile(compiled_step.step, state, train_batch)
  footprint = compiled_footprint(step)
  metrics = None
  for _ in range(_TRAIN_WARMUP.value):
    state, metrics = step(state, train_batch)
  jax.block_until_ready((state, metrics))
  num_steps = _TRAIN_STEPS.value or TIMED_TRAIN_STEPS[sizes.tiny]
  times = []
  for _ in range(max(_TRAIN_REPEATS.value, 1)):
    start = time.perf_counter()
    for _ in range(num_steps):
      state, metrics = step(state, train_batch)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / num_steps)
  _check_finite(f"train {variant} loss", metrics["loss"])
  seconds = min(times)
  peak = facts["peak_bf16_flops"]
  achieved = step_flops / seconds if step_flops is not None else None
  del state, train_batch, metrics
  return Row(
      part=f"train {variant}",
      model=f"DiT {'tiny' if sizes.tiny else variant} {_millions(num_params)}",
      batch=batch, dtype=str(model_config.dtype), compile_seconds=compile_seconds,
      seconds=seconds, steps_per_second=1.0 / seconds, examples_per_second=batch / seconds,
      flops_per_step=step_flops, achieved_flops=achieved,
      mfu=(achieved / peak) if (achieved is not None and peak) else UNAVAILABLE,
      peak_bytes=peak_bytes_in_use(device), footprint_bytes=footprint)


# -- 2. generation: sampler + decoding in one compiled call ----------------------------------

class Generation:
  """The generation program's inputs (the DiT and the SourceVAE, random), built once."""

  def __init__(self, sizes: Sizes, device):
    self.sizes, self.device = sizes, device
    self.variant = "tiny" if sizes.tiny else _GENERATE_VARIANT.value
    self.model_config = sizes.dit_config(self.variant)
    self.model = dit.build_model(self.model_config)
    # One patch of frames: the DiT's parameter shapes do not depend on the length.
    # Initialisation runs once: on a CPU, not worth the optimiser's compile time.
    options = {"xla_backend_optimization_level": 0} if device.platform == "cpu" else None
    init = jax.jit(self.model.init, compiler_options=options)
    with jax.default_device(device):
      self.params = init(jax.random.key(0),
                         jnp.zeros((1, sizes.channels, self.model.patch_size)),
                         jnp.zeros((1,)))
      self.vae = sizes.vae("float32")
    self.vae_params = jax.device_put(random_vae_params(self.vae, seed=1), device)
    self.num_params = sum(leaf.size for leaf in jax.tree.leaves(self.params))
    name, settings = generation_program.sampler_settings(sizes.config.sample)
    if _SAMPLER_STEPS.value:
      settings["num_steps"] = _SAMPLER_STEPS.value
    self.num_steps = int(settings["num_steps"])
    self.spec = generation_program.GenerationSpec(
        vae=self.vae, denoiser=self.model, num_frames=sizes.frames, sampler_name=name,
        sampler_settings=tuple(sorted(settings.items())),
        sigma_data=float(sizes.config.ldm.sigma_data))
    self.sampler_name = name

  def run(self, batch: int, repeats: int) -> Row:
    keys = jax.device_put(generation_program.piece_keys(0, range(batch)), self.device)
    start = time.perf_counter()
    program = generation_program.generate_batch.lower(
        self.vae_params, self.params, keys, None, spec=self.spec).compile()
    compile_seconds = time.perf_counter() - start
    latents, waveforms = program(self.vae_params, self.params, keys, None)  # Warm-up.
    _check_finite(f"generate batch {batch}", latents)
    _check_finite(f"generate batch {batch} waveforms", waveforms[:, :, :4096])
    del latents, waveforms
    seconds = _best_of(lambda: program(self.vae_params, self.params, keys, None),
                       repeats)
    return Row(
        part=f"generate b={batch}",
        model=(f"DiT {self.variant} {_millions(self.num_params)} + SourceVAE float32, "
               f"{self.sampler_name} {self.num_steps} steps"),
        batch=batch, dtype=str(self.model_config.dtype), compile_seconds=compile_seconds,
        seconds=seconds, pieces_per_second=batch / seconds,
        real_time=batch * self.sizes.piece_seconds / seconds,
        peak_bytes=peak_bytes_in_use(self.device), footprint_bytes=compiled_footprint(program))


# -- 3. SourceVAE decoding -------------------------------------------------------------------

def bench_decode(sizes: Sizes, vae_params, dtype: str, device) -> Row:
  """The four stems of one piece, decoded in one call in `dtype`."""
  vae = sizes.vae(dtype)
  decode = jax.jit(lambda params, latents: generation_program.decode_stems(
      vae, params, latents, range(stems_lib.NUM_STEMS)))
  latents = jax.device_put(0.5 * jax.random.normal(
      jax.random.key(2), (1, stems_lib.NUM_STEMS, sizes.latent_dim, sizes.frames)), device)
  program, compile_seconds = _compile(decode, vae_params, latents)
  _check_finite(f"decode {dtype}", program(vae_params, latents)[..., :4096])  # Warm-up.
  seconds = _best_of(lambda: program(vae_params, latents), _DECODE_REPEATS.value)
  num_params = sum(leaf.size for leaf in jax.tree.leaves(vae_params))
  return Row(
      part=f"decode {dtype}", model=f"SourceVAE {_millions(num_params)}, 4 stems",
      batch=1, dtype=dtype, compile_seconds=compile_seconds, seconds=seconds,
      real_time=stems_lib.NUM_STEMS * sizes.piece_seconds / seconds,
      peak_bytes=peak_bytes_in_use(device), footprint_bytes=compiled_footprint(program))


# -- the table -------------------------------------------------------------------------------

def _number(value, fmt: str) -> str:
  if value is None:
    return NOT_APPLICABLE
  if isinstance(value, str):
    return value
  return format(value, fmt)


def _gib(value) -> str:
  return value if isinstance(value, str) else f"{value / 2**30:.3g}"


def format_table(rows: Sequence[Row]) -> str:
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for row in rows:
    cells = [row.part, row.model + (f" ({row.note})" if row.note else ""), str(row.batch),
             row.dtype, f"{row.compile_seconds:.1f}", f"{row.seconds:.4g}",
             _number(row.steps_per_second, ".3g"), _number(row.examples_per_second, ".4g"),
             _number(row.pieces_per_second, ".3g"), _number(row.real_time, ".3g"),
             _number(None if row.flops_per_step is None else row.flops_per_step / 1e12, ".4g"),
             _number(None if row.achieved_flops is None else row.achieved_flops / 1e12, ".4g"),
             _number(row.mfu, ".1%"), _gib(row.peak_bytes), _gib(row.footprint_bytes)]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _print_header(facts: dict, sizes: Sizes) -> None:
  peak = facts["peak_bf16_flops"]
  limit = facts["memory_limit_bytes"]
  print(f"device: {facts['device']} ({facts['platform']}), device_kind: {facts['device_kind']}, "
        f"{facts['devices_visible']} visible (one used)")
  print(f"jax {facts['jax']}, jaxlib {facts['jaxlib']}, platform version: "
        f"{facts['platform_version']}, driver: {facts['driver']}, runtime: {facts['runtime']}")
  print("peak bf16 dense: " + (f"{peak / 1e12:.0f} TFLOP/s ({facts['peak_name']})"
                               if peak else "unknown (no MFU)"))
  print("device memory: " + (UNAVAILABLE if isinstance(limit, str) else f"{_gib(limit)} GiB"))
  print(f"sizes: {'tiny (configs/demo.py:variant=tiny)' if sizes.tiny else 'paper'}; piece "
        f"{sizes.piece_seconds:.2f} s = {sizes.frames} latent frames × {sizes.channels} "
        "channels", flush=True)


def _process_seconds() -> float | None:
  """Wall seconds since this process started (imports included), where Linux says."""
  try:
    with open("/proc/self/stat") as f:
      start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
    with open("/proc/uptime") as f:
      uptime = float(f.read().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return None


def main(argv):
  del argv
  unknown = set(_PARTS.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; parts: {', '.join(PARTS)}")
  start = time.perf_counter()
  progress = lambda what: print(f"[{time.perf_counter() - start:6.1f} s] {what}", flush=True)
  device = jax.devices()[0]
  facts = device_facts(device)
  sizes = make_sizes(_TINY.value)
  _print_header(facts, sizes)

  # Run in order of expected footprint, so that each peak_bytes_in_use high-water mark is
  # mostly its own part's (see the module docstring); printed in the order of PARTS.
  train_rows, generate_rows, decode_rows = [], [], []
  if "decode" in _PARTS.value or "generate" in _PARTS.value:
    progress("initialising the generation DiT and the SourceVAE")
    generation = Generation(sizes, device)
    if "decode" in _PARTS.value:
      for dtype in ("bfloat16", "float32"):
        progress(f"decode {dtype}")
        decode_rows.append(bench_decode(sizes, generation.vae_params, dtype, device))
    if "generate" in _PARTS.value:
      throughput_batch = _GENERATE_BATCH.value or (
          TINY_BATCH["generate"] if sizes.tiny else DEFAULT_GENERATE_BATCH)
      progress("generate b=1")
      generate_rows.append(generation.run(1, _GENERATE_REPEATS.value))
      progress(f"generate b={throughput_batch}")
      generate_rows.append(_halving_on_oom(lambda b: generation.run(b, 1), throughput_batch,
                                           "generate"))
    del generation  # Frees the device for training.
  if "train" in _PARTS.value:
    for variant in _TRAIN_VARIANTS.value:
      batch = _TRAIN_BATCH.value or (
          TINY_BATCH["train"] if sizes.tiny else default_train_batch(
              variant, dit.count_params(sizes.dit_config(variant)), facts["memory_limit_bytes"]))
      progress(f"train {variant} batch {batch}")
      train_rows.append(_halving_on_oom(
          functools.partial(bench_train, sizes, variant, facts=facts, device=device), batch,
          f"train {variant}"))
  rows = train_rows + generate_rows + decode_rows

  total = time.perf_counter() - start
  print()
  print(format_table(rows))
  print()
  print("s per call: one train step, one generation call (batch pieces: sampler + decoding), "
        "one decoding of a piece's 4 stems. × real time: generation counts seconds of music "
        f"(a {sizes.piece_seconds:.2f} s piece once, its four stems together); decoding counts "
        f"stem audio (4 × {sizes.piece_seconds:.2f} s per call). TFLOP/step: 3 × the DiT "
        "forward (HLO cost analysis); MFU against the peak above. peak memory: process "
        "high-water mark after the part (run order: decode, generate, train in the order "
        "given); footprint: the compiled program's own (arguments + outputs + temporaries − "
        "donated).")
  process = _process_seconds()
  print(f"total wall time {total:.1f} s including compilation"
        + (f" ({process:.1f} s since the process started, imports included)"
           if process is not None else ""))
  print(json.dumps(dict(device=facts, tiny=sizes.tiny, total_seconds=total,
                        process_seconds=process, rows=[dataclasses.asdict(r) for r in rows]),
                   default=str))


if __name__ == "__main__":
  app.run(main)
