r"""Latent diffusion speed: training throughput, generation against the release, the U-Nets.

Run from the repository root (the reference environment: tests/reference/install_reference_env.sh):
  python -m benchmarks.ldm --reference_python=.venv-reference/bin/python
  python -m benchmarks.ldm --skip_reference --rounds=1          # ours only
  python -m benchmarks.ldm ... --decode_stems=4 --full_sampling   # the exact paths (minutes)
  python -m benchmarks.ldm --skip_train --skip_generation --unet   # (c) only

(a) Training. Throughput (examples/s) of the diffusion trainer's real step on CPU
(`train_ldm.train_step` compiled by `training/loop.CompiledStep`, as `--mode=train_ldm` runs
it): EDM loss (σ ~ the release's Uniform(0, 3)), AdamW with gradient clipping, the EMA update
and the σ-bucket metrics, the state donated, on joint latents [batch, 320, 1024], at a small
stated size (--train_width,
--train_depth, --train_heads, patch 16: 64 tokens, --train_dtype) that runs on a laptop. The
first step (compilation) is not timed; then --train_repeats runs of --train_steps steps; the
best run counts.

(b) Generation of one 14.86 s four-stem piece (joint latent 320 × 1024, 150-step Euler with
churn, VAE decoding of the four stems), ours against the release, on CPU with random weights
(speed does not depend on the values):
  ours     the DiT `base` variant (372.8 M parameters) in its configured compute dtype
           (bfloat16 matmuls with float32 accumulation, float32 parameters; --dit_dtype
           overrides) as the EDM denoiser, sampled as generation samples
           (`generation_program.sampling_denoise_fn`: parameters cast once, the σ-only conditioning
           tabulated once per piece), and the paper-size SourceVAE decoder in float32;
  release  audio-diffusion-pytorch 0.0.43's UNet1d at the release's settings (364.4 M
           parameters) and the release's decoder (DAC's Decoder, 1536 wide, strides 8·5·4·2,
           42.2 M parameters), in the reference environment (torch, CPU;
           benchmarks/ldm_reference.py), twice: in float32 as released, and under
           torch.autocast(cpu, bfloat16), its own mixed-precision path (oneDNN, which uses
           the CPU's bf16 units); the summary also combines its faster U-Net with its
           faster decoder, the release at its best.
Both sides use every core this process may run on (os.sched_getaffinity: XLA's CPU thread
pool is sized from it, torch is given as many threads); `taskset -c 0 python -m
benchmarks.ldm ...` measures one core.
Timed, after compilation / a warm-up call: --evals single denoiser evaluations D(x; σ) (the
best counts), each side's Euler-churn loop (ours: the compiled `samplers.euler_churn` scan at
S = --sampler_steps and 2·S steps, whose difference gives the time per step and the rest the
once-per-piece set-up; the release: S steps of its notebook's Python loop), and the decoding
of --decode_stems stems (1: one stem, times 4; 4: the four stems in one call, as both
codebases generate). A 150-step run is then EXTRAPOLATED: 150 × (sampler time per step)
(+ ours' set-up) + the four stems' decoding; --full_sampling also times our real generation
program end to end in every round (`generation_program.generate_batch`: 150 steps and the
decoding in one compiled call).

(c) The release's U-Net (`--unet`; `--skip_train --skip_generation` runs it alone): per size
(--unet_sizes, default the release's MSLDM and MSLDM-Large), ours (`models/unet1d.py`,
jitted, parameters as an argument) against audio-diffusion-pytorch 0.0.43's UNet1d of the
same settings (benchmarks/ldm_reference.py unet_bench, torch CPU), on joint latents
[batch, 320, 1024], at each precision of --unet_precisions (float32: both sides wholly float32;
bfloat16: ours with the U-Net's compute dtype bfloat16, the package's under
torch.autocast(cpu, bfloat16), parameters, loss and optimiser float32 on both sides; a last
table puts each side at its own fastest precision): the network's forward F(c_in·x, c_noise) at batch 1 and 4
(torch.inference_mode), and a training step at batch 2: ours the trainer's compiled step
(EDM loss, backward, AdamW, clipping, EMA update, σ-bucket metrics), the package's the EDM
loss, backward and Adam (the release's optimiser). Then our DiT `base` (float32) the same
way: the two backbones at equal parameters (372.8 M against 364.4 M). One untimed call per
row first (our compilation), then --unet_repeats timed calls; the best counts, with the CPU
time of that call.

Shared machines: other processes compete for the cores, so each measurement is repeated
(--rounds, ours and the release interleaved) and the minimum is kept; the load average is
printed next to each round. Each measurement also records the process's CPU time (user +
system, all threads), which waiting for a busy core does not inflate: the steadier figure on
a loaded machine (on one core, it is the compute time itself).
"""

import functools
import json
import os
import subprocess
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import machine as machine_info
from msldm_jax import paper_config
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.latents import store
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import source_vae
from msldm_jax.models import unet1d
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import loop
from msldm_jax.training import train_ldm

_TRAIN_WIDTH = flags.DEFINE_integer("train_width", 384, "(a) DiT width.")
_TRAIN_DEPTH = flags.DEFINE_integer("train_depth", 6, "(a) DiT depth.")
_TRAIN_HEADS = flags.DEFINE_integer("train_heads", 6, "(a) DiT heads.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 4, "(a) Examples per step.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 4, "(a) Timed steps per repeat.")
_TRAIN_REPEATS = flags.DEFINE_integer("train_repeats", 3, "(a) Repeats (best counts).")
_SKIP_TRAIN = flags.DEFINE_bool("skip_train", False, "Skip (a).")
_VARIANT = flags.DEFINE_string("dit_variant", "base", "(b) Our DiT size.")
_DTYPE = flags.DEFINE_string("dit_dtype", "", "(b) Our DiT's compute dtype (default: the "
                             "variant's, bfloat16 for base).")
_TRAIN_DTYPE = flags.DEFINE_string("train_dtype", "float32", "(a) The DiT's compute dtype.")
_PATCH = flags.DEFINE_integer("dit_patch_size", 0,
                              "(b) Override the variant's patch size (0: keep).")
_EVALS = flags.DEFINE_integer("evals", 3, "(b) Timed single evaluations per round.")
_SAMPLER_STEPS = flags.DEFINE_integer("sampler_steps", 3, "(b) Timed sampler steps per round.")
_DECODE_STEMS = flags.DEFINE_enum("decode_stems", "1", ["1", "4"],
                                  "(b) Stems per timed decoding (1: one stem, × 4).")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "(b) Interleaved rounds (minimum counts).")
_FULL = flags.DEFINE_bool("full_sampling", False,
                          "(b) Also time our 150-step generation + decoding end to end.")
_REFERENCE_PYTHON = flags.DEFINE_string(
    "reference_python", "", "Interpreter of the reference environment (default: "
    "$MSLDM_REFERENCE_PYTHON, else .venv-reference/bin/python).")
_SKIP_REFERENCE = flags.DEFINE_bool("skip_reference", False, "Time ours only.")
_SKIP_GENERATION = flags.DEFINE_bool("skip_generation", False, "Skip (b).")
_UNET = flags.DEFINE_bool("unet", False, "(c) The release's U-Net, ours against the "
                          "package's, and our DiT base at equal parameters.")
_UNET_SIZES = flags.DEFINE_list("unet_sizes", ["release", "large"], "(c) U-Net presets.")
_UNET_DIT = flags.DEFINE_bool("unet_dit", True, "(c) Also our DiT base at equal parameters.")
_UNET_PRECISIONS = flags.DEFINE_list(
    "unet_precisions", ["float32"], "(c) float32 and/or bfloat16 (ours: bf16 compute dtype; "
    "the package's: torch CPU autocast).")
_UNET_REPEATS = flags.DEFINE_integer("unet_repeats", 3, "(c) Timed calls per row (best "
                                     "counts), after one untimed (compiling) call.")

NUM_STEPS = 150  # The release's sampler (reference §6).
FRAMES = 1024  # 327672 samples, 14.86 s at 22050 Hz.
CHUNK_SAMPLES = 327672
SAMPLE_RATE = 22050
NUM_STEMS = 4


def _load() -> str:
  return "load %.2f" % os.getloadavg()[0]


def _timed(fn, *args):
  """(wall seconds, process CPU seconds) of fn(*args), waiting for the result."""
  wall, cpu = time.perf_counter(), time.process_time()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - wall, time.process_time() - cpu


def _threads() -> int:
  return len(os.sched_getaffinity(0))



# -- (a) training throughput -----------------------------------------------------------------

def bench_train() -> dict:
  """The diffusion trainer's own compiled step (`train_ldm.train_step` through
  `loop.CompiledStep`): EDM loss, AdamW with clipping, the EMA update and the σ-bucket
  metrics, the state donated, at the paper config's optimiser settings."""
  model_config = dit.model_config(
      "base", width=_TRAIN_WIDTH.value, depth=_TRAIN_DEPTH.value, num_heads=_TRAIN_HEADS.value,
      patch_size=16, in_channels=NUM_STEMS * 80, dtype=_TRAIN_DTYPE.value)
  result = time_train_step(denoisers.DIT, model_config, _TRAIN_BATCH.value,
                           _TRAIN_STEPS.value, _TRAIN_REPEATS.value, "(a)")
  return dict(result, width=_TRAIN_WIDTH.value, dtype=_TRAIN_DTYPE.value,
              depth=_TRAIN_DEPTH.value, heads=_TRAIN_HEADS.value)


def time_train_step(kind: str, model_config, batch_size: int, steps: int, repeats: int,
                    label: str) -> dict:
  """Times the trainer's compiled step for denoiser `kind` with `model_config`."""
  ldm_config = paper_config.get_paper_config("base").ldm
  ldm_config.denoiser = kind
  spec = train_ldm.make_train_spec(ldm_config, model_config)
  mesh = mesh_lib.make_mesh()
  compiled = loop.CompiledStep(
      functools.partial(train_ldm.init_state, spec, num_frames=spec.model.frame_multiple),
      functools.partial(train_ldm.train_step, spec=spec, seed=0), mesh, "replicate")
  latents = 0.5 * np.random.default_rng(0).standard_normal(
      (batch_size, NUM_STEMS, 80, FRAMES)).astype(np.float32)
  batch = mesh_lib.to_global_batch({store.LATENTS: latents}, mesh)
  state = compiled.init(jax.random.key(1))
  num_params = sum(leaf.size for leaf in jax.tree.leaves(state.params))

  start = time.perf_counter()
  state, metrics = compiled.step(state, batch)
  jax.block_until_ready(metrics)
  compile_seconds = time.perf_counter() - start
  step_times, step_cpu = [], []
  for repeat in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
      state, metrics = compiled.step(state, batch)
    jax.block_until_ready(metrics)
    step_times.append((time.perf_counter() - start) / steps)
    step_cpu.append((time.process_time() - cpu) / steps)
    print(f"  {label} repeat {repeat}: {step_times[-1]:.3f} s/step ({_load()})", flush=True)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(f"non-finite training loss {loss}")
  best = min(step_times)
  return dict(num_params=int(num_params), batch=batch_size, compile_seconds=compile_seconds,
              step_times=step_times, step_cpu=step_cpu, examples_per_second=batch_size / best)


# -- (c) the release's U-Net: ours against the package's, and against our DiT -----------------

UNET_BATCHES = (1, 4)
UNET_TRAIN_BATCH = 2


def _best(times):
  """(best wall, CPU of that call) of [(wall, cpu), ...]."""
  return min(times)


def forward_times(model, batches, repeats) -> dict:
  """Our network's forward F(c_in·x, c_noise) in float32, jitted with the parameters as an
  argument: {batch: [(wall, cpu), ...]} after one untimed (compiling) call per batch."""
  x = jnp.zeros((1, model.in_channels, model.frame_multiple))
  init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
  params = init(jax.random.key(0), x, jnp.zeros((1,)))
  apply = jax.jit(model.apply)
  out = {}
  for batch in batches:
    x = jax.random.normal(jax.random.key(batch), (batch, model.in_channels, FRAMES))
    c_noise = jnp.full((batch,), np.log(0.5) / 4)
    jax.block_until_ready(apply(params, x, c_noise))
    out[batch] = [_timed(apply, params, x, c_noise) for _ in range(repeats)]
    print(f"  (c) forward batch {batch}: {_best(out[batch])[0]:.2f} s ({_load()})", flush=True)
  return out


def release_unet_bench(config, repeats, bf16: bool) -> dict:
  """The package's UNet1d of the same settings, in the reference environment (`bf16`: under
  torch's CPU autocast)."""
  return _run_json([_reference_python(), "benchmarks/ldm_reference.py", "unet_bench",
                    json.dumps(unet1d.package_kwargs(config)),
                    f"--batches={','.join(str(b) for b in UNET_BATCHES)}",
                    f"--train_batch={UNET_TRAIN_BATCH}", f"--repeats={repeats}",
                    f"--threads={_threads()}", f"--frames={FRAMES}"] + (["--bf16"] if bf16 else []))


def _unet_precisions():
  known = ("float32", "bfloat16")
  for precision in _UNET_PRECISIONS.value:
    if precision not in known:
      raise ValueError(f"--unet_precisions: {precision!r} is not one of {', '.join(known)}")
  return list(_UNET_PRECISIONS.value)


def bench_unet() -> dict:
  """(c): per U-Net size and precision (--unet_precisions), ours and the package's forward at
  batch 1 and 4 and training step at batch 2; then our DiT base the same way, at equal
  parameters. Precision float32: both sides wholly float32. bfloat16: ours with
  `dtype=bfloat16` (bfloat16 inputs to every convolution, matmul and attention, float32
  accumulation, float32 parameters, loss and AdamW), the package's under
  torch.autocast(cpu, bfloat16) (its mixed precision: oneDNN's bf16 kernels, float32
  parameters and Adam)."""
  repeats = _UNET_REPEATS.value
  rows = {}
  for size in _UNET_SIZES.value:
    for precision in _unet_precisions():
      config = unet1d.model_config(size, in_channels=NUM_STEMS * 80, dtype=precision)
      model = unet1d.build_model(config)
      print(f"(c) U-Net {size}, {precision}: ours", flush=True)
      ours = dict(forward=forward_times(model, UNET_BATCHES, repeats),
                  train=time_train_step(denoisers.UNET, config, UNET_TRAIN_BATCH, 1, repeats,
                                        "(c)"))
      theirs = None
      if not _SKIP_REFERENCE.value:
        print(f"(c) U-Net {size}, {precision}: the package's", flush=True)
        theirs = release_unet_bench(config, repeats, bf16=precision == "bfloat16")
      name = f"unet_{size}" + ("" if precision == "float32" else f"_{precision}")
      rows[name] = dict(ours=ours, theirs=theirs, precision=precision,
                        num_params=unet1d.count_params(model))
      # Each row as soon as it is measured: a long run that dies (e.g. out of memory at the
      # next size) keeps what it measured.
      print(json.dumps({name: rows[name]}), flush=True)
  if not _UNET_DIT.value:
    return rows
  config = dit.model_config("base", in_channels=NUM_STEMS * 80, dtype="float32")
  model = dit.build_model(config)
  print("(c) DiT base (float32): ours", flush=True)
  rows["dit_base"] = dict(
      ours=dict(forward=forward_times(model, UNET_BATCHES, repeats),
                train=time_train_step(denoisers.DIT, config, UNET_TRAIN_BATCH, 1, repeats,
                                      "(c)")),
      theirs=None, precision="float32", num_params=dit.count_params(config))
  return rows


def _unet_cases(row):
  """[(what, (ours wall, CPU), (theirs wall, CPU) or None)] of one row of (c)."""
  ours, theirs = row["ours"], row["theirs"]
  cases = [(f"forward, batch {b}", _best(ours["forward"][b]),
            _best(list(zip(theirs["forward"][str(b)]["wall"],
                           theirs["forward"][str(b)]["cpu"]))) if theirs else None)
           for b in UNET_BATCHES]
  train = ours["train"]
  cases.append((f"training step, batch {UNET_TRAIN_BATCH}",
                min(zip(train["step_times"], train["step_cpu"])),
                min(zip(theirs["train"]["wall"], theirs["train"]["cpu"])) if theirs else None))
  return cases


def print_unet_summary(rows):
  print("\n(c) best of the timed calls: wall s (CPU s of that call); each precision's rows "
        "compare the two sides at that precision")
  print("| network | precision | parameters | what | ours | package's UNet1d | speed-up wall | "
        "speed-up CPU |")
  print("|---|---|---|---|---|---|---|---|")
  for name, row in rows.items():
    for what, (wall, cpu), other in _unet_cases(row):
      prefix = f"| {name} | {row['precision']} | {row['num_params']:,} | {what} | {wall:.2f} ({cpu:.2f}) |"
      if other:
        print(f"{prefix} {other[0]:.2f} ({other[1]:.2f}) | {other[0] / wall:.2f}× | "
              f"{other[1] / cpu:.2f}× |")
      else:
        print(f"{prefix} – | – | – |")
  # Each side at its fastest precision, per size and measurement: what a user of either
  # codebase would pick on this CPU.
  fastest = {}
  for name, row in rows.items():
    if not row["theirs"] or not name.startswith("unet_"):
      continue
    size = name[len("unet_"):].split("_")[0]
    for what, ours_time, theirs_time in _unet_cases(row):
      entry = fastest.setdefault((size, what), {})
      for side, value in (("ours", ours_time), ("theirs", theirs_time)):
        if side not in entry or value[0] < entry[side][0][0]:
          entry[side] = (value, row["precision"])
  if len(_unet_precisions()) > 1 and fastest:
    print("\n(c) each side at its fastest precision (wall s):")
    print("| U-Net | what | ours | package's UNet1d | speed-up wall |")
    print("|---|---|---|---|---|")
    for (size, what), entry in fastest.items():
      (ours_wall, _), ours_precision = entry["ours"]
      (theirs_wall, _), theirs_precision = entry["theirs"]
      print(f"| {size} | {what} | {ours_wall:.2f} ({ours_precision}) | {theirs_wall:.2f} "
            f"({theirs_precision}) | {theirs_wall / ours_wall:.2f}× |")


# -- (b) generation: ours ----------------------------------------------------------------------

class Ours:
  """Our denoiser, sampler and decoder, compiled once; each `run_*` times one measurement."""

  def __init__(self):
    start = time.perf_counter()
    overrides = {"patch_size": _PATCH.value} if _PATCH.value else {}
    if _DTYPE.value:
      overrides["dtype"] = _DTYPE.value
    self.model = dit.build_model(dit.model_config(_VARIANT.value, **overrides))
    x = jnp.zeros((1, 320, FRAMES))
    init = jax.jit(self.model.init, compiler_options={"xla_backend_optimization_level": 0})
    self.params = init(jax.random.key(0), x, jnp.zeros((1,)))
    self.num_params = sum(leaf.size for leaf in jax.tree.leaves(self.params))
    self.vae = source_vae.SourceVAE.from_config(source_vae.model_config("paper"))
    self.vae_params = source_vae.init_params(self.vae, jax.random.key(1))
    jax.block_until_ready((self.params, self.vae_params))
    self.init_seconds = time.perf_counter() - start

    self.x = 3.0 * jax.random.normal(jax.random.key(2), (1, 320, FRAMES))
    self.latents = 0.5 * jax.random.normal(jax.random.key(3), (1, NUM_STEMS, 80, FRAMES))
    # One evaluation as a caller outside a sampler makes it: conditioning included, with
    # the parameters already in the compute dtype (as the sampler holds them).
    self.inference_params = jax.jit(self.model.inference_params)(self.params)
    self.denoise = jax.jit(lambda p, x, s: edm.denoise(self.model.apply, p, x, s,
                                                       sigma_data=0.4))
    # The sampler as generation runs it (`generation_program.sampling_denoise_fn`: parameters cast
    # and conditioning tabulated once per call), at S and 2·S steps: the difference is the
    # time per step, the rest the once-per-piece set-up.
    steps = _SAMPLER_STEPS.value
    self.sample = {n: self._sampler(n) for n in (steps, 2 * steps)}
    stems = list(range(int(_DECODE_STEMS.value)))
    self.decode = jax.jit(lambda vp, z: generation_program.decode_stems(self.vae, vp, z, stems))
    start = time.perf_counter()
    jax.block_until_ready(self.denoise(self.inference_params, self.x, 1.0))
    for sample in self.sample.values():
      jax.block_until_ready(sample(self.params, jax.random.key(4)))
    jax.block_until_ready(self.decode(self.vae_params, self.latents))
    self.compile_seconds = time.perf_counter() - start
    self.full = None

  def _sampler(self, num_steps):
    settings = dict(samplers.sampler_config("euler_churn"), num_steps=num_steps)
    return jax.jit(lambda p, key: samplers.euler_churn(
        generation_program.sampling_denoise_fn(self.model, p, "euler_churn", settings,
                                               sigma_data=0.4),
        key, (1, 320, FRAMES), **settings))

  def run_evals(self):
    return [_timed(self.denoise, self.inference_params, self.x, 1.0)
            for _ in range(_EVALS.value)]

  def run_sampler(self):
    """(per step, once per piece), each as (wall, CPU), from runs of S and 2·S steps."""
    steps = _SAMPLER_STEPS.value
    short, long = (_timed(self.sample[n], self.params, jax.random.key(5))
                   for n in (steps, 2 * steps))
    per_step = tuple(max(b - a, 0.0) / steps for a, b in zip(short, long))
    setup = tuple(max(a - steps * p, 0.0) for a, p in zip(short, per_step))
    return per_step, setup

  def run_decode(self):
    return _timed(self.decode, self.vae_params, self.latents)

  def run_full(self) -> dict:
    """The real generation program: 150 steps + four-stem decoding, one compiled call."""
    keys = generation_program.piece_keys(0, [0])
    compile_seconds = None
    if self.full is None:
      spec = generation_program.GenerationSpec(
          vae=self.vae, denoiser=self.model, num_frames=FRAMES, sampler_name="euler_churn",
          sampler_settings=tuple(sorted(samplers.sampler_config("euler_churn").items())),
          sigma_data=0.4)
      start = time.perf_counter()
      self.full = generation_program.generate_batch.lower(self.vae_params, self.params, keys, None,
                                                spec=spec).compile()
      compile_seconds = time.perf_counter() - start
    seconds, cpu_seconds = _timed(self.full, self.vae_params, self.params, keys, None)
    return dict(compile_seconds=compile_seconds, seconds=seconds, cpu_seconds=cpu_seconds)


# -- (b) generation: the release (subprocesses in the reference environment) --------------------

def _reference_python() -> str:
  path = (_REFERENCE_PYTHON.value or os.environ.get("MSLDM_REFERENCE_PYTHON")
          or ".venv-reference/bin/python")
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"reference interpreter {path} not found: run tests/reference/install_reference_env.sh,"
        " pass --reference_python, or --skip_reference")
  return path


def _run_json(command) -> dict:
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode:
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def release_unet(bf16: bool = False) -> dict:
  kwargs = unet1d.package_kwargs(unet1d.model_config("release", in_channels=320))
  return _run_json([_reference_python(), "benchmarks/ldm_reference.py", "unet",
                    json.dumps(kwargs), f"--evals={_EVALS.value}", f"--steps={_SAMPLER_STEPS.value}",
                    f"--threads={_threads()}", f"--frames={FRAMES}"]
                   + (["--bf16"] if bf16 else []))


def release_decode(bf16: bool = False) -> dict:
  return _run_json([_reference_python(), "benchmarks/ldm_reference.py", "decoder",
                    f"--stems={_DECODE_STEMS.value}", f"--threads={_threads()}",
                    f"--frames={FRAMES}"] + (["--bf16"] if bf16 else []))


# -- summary ---------------------------------------------------------------------------------------

RELEASE_VARIANTS = {"release": False, "release_bf16": True}  # name -> torch CPU autocast
_LABELS = {"ours": "ours", "release": "release, float32 (as released)",
           "release_bf16": "release, bfloat16 autocast"}


def _piece(step_seconds: float, decode_seconds: float, setup_seconds: float = 0.0) -> dict:
  """Extrapolated 150-step generation + decoding of the four stems of one piece."""
  four_stems = decode_seconds * NUM_STEMS / int(_DECODE_STEMS.value)
  sampling_seconds = setup_seconds + NUM_STEPS * step_seconds
  total = sampling_seconds + four_stems
  audio_seconds = NUM_STEMS * CHUNK_SAMPLES / SAMPLE_RATE
  return dict(sampling_seconds=sampling_seconds, decode_seconds=four_stems,
              total_seconds=total, sampling_share=sampling_seconds / total,
              stem_audio_seconds_per_second=audio_seconds / total)


def _summarise(row: dict) -> dict:
  """Best (minimum) of each measurement, wall and CPU, and the extrapolated pieces."""
  best = {key: min(values) for key, values in row.items() if isinstance(values, list)}
  row.update(best=best,
             piece=_piece(best["steps"], best["decodes"], best.get("setups", 0.0)),
             piece_cpu=_piece(best["steps_cpu"], best["decodes_cpu"],
                              best.get("setups_cpu", 0.0)))
  return row


def _release_round(name: str, bf16: bool, row: dict, r: int):
  unet = release_unet(bf16)
  row["num_params"] = unet["num_params"]
  for key, field in (("evals", "eval_times"), ("evals_cpu", "eval_cpu"),
                     ("steps", "step_times"), ("steps_cpu", "step_cpu")):
    row[key] += unet[field]
  print(f"  round {r} {name}: eval {min(unet['eval_times']):.3f} s, sampler step "
        f"{unet['step_times'][0]:.3f} s (CPU {unet['step_cpu'][0]:.3f} s) ({_load()})",
        flush=True)
  dec = release_decode(bf16)
  row["decodes"] += dec["times"]
  row["decodes_cpu"] += dec["cpu"]
  print(f"  round {r} {name}: decode {_DECODE_STEMS.value} stem(s) {dec['times'][0]:.2f} s "
        f"(CPU {dec['cpu'][0]:.2f} s) ({_load()})", flush=True)


def bench_generation() -> dict:
  ours = Ours()
  print(f"  ours: DiT {_VARIANT.value} {ours.model.dtype} patch {ours.model.patch_size} "
        f"{ours.num_params / 1e6:.1f} M parameters, init "
        f"{ours.init_seconds:.1f} s, compile {ours.compile_seconds:.1f} s", flush=True)
  keys = ("evals", "evals_cpu", "steps", "steps_cpu", "decodes", "decodes_cpu")
  rows = {"ours": {key: [] for key in keys + ("setups", "setups_cpu")}}
  if not _SKIP_REFERENCE.value:
    rows.update({name: {key: [] for key in keys} for name in RELEASE_VARIANTS})
  full_runs = []
  for r in range(_ROUNDS.value):
    row = rows["ours"]
    evals = ours.run_evals()
    (step, step_cpu), (setup, setup_cpu) = ours.run_sampler()
    row["evals"] += [t for t, _ in evals]
    row["evals_cpu"] += [c for _, c in evals]
    for key, value in (("steps", step), ("steps_cpu", step_cpu), ("setups", setup),
                       ("setups_cpu", setup_cpu)):
      row[key].append(value)
    print(f"  round {r} ours: eval {min(t for t, _ in evals):.3f} s, sampler step "
          f"{step:.3f} s (CPU {step_cpu:.3f} s), set-up {setup:.2f} s ({_load()})",
          flush=True)
    decode, decode_cpu = ours.run_decode()
    row["decodes"].append(decode)
    row["decodes_cpu"].append(decode_cpu)
    print(f"  round {r} ours: decode {_DECODE_STEMS.value} stem(s) {decode:.2f} s "
          f"(CPU {decode_cpu:.2f} s) ({_load()})", flush=True)
    if _FULL.value:
      full_runs.append(ours.run_full())
      print(f"  round {r} ours, end to end: {full_runs[-1]['seconds']:.1f} s "
            f"(CPU {full_runs[-1]['cpu_seconds']:.1f} s) ({_load()})", flush=True)
    if not _SKIP_REFERENCE.value:
      for name, bf16 in RELEASE_VARIANTS.items():
        _release_round(name, bf16, rows[name], r)
  result = {name: _summarise(row) for name, row in rows.items()}
  result["ours"].update(num_params=int(ours.num_params), patch_size=int(ours.model.patch_size),
                        dtype=str(ours.model.dtype))
  if full_runs:
    result["ours"]["full"] = dict(
        seconds=min(run["seconds"] for run in full_runs),
        cpu_seconds=min(run["cpu_seconds"] for run in full_runs),
        compile_seconds=full_runs[0]["compile_seconds"], runs=full_runs)
  if not _SKIP_REFERENCE.value:
    # The release at its fastest part by part (its faster U-Net and its faster decoder).
    best = {}
    for clock, piece in (("", "piece"), ("_cpu", "piece_cpu")):
      unet = min(RELEASE_VARIANTS, key=lambda n: result[n][piece]["sampling_seconds"])
      decoder = min(RELEASE_VARIANTS, key=lambda n: result[n][piece]["decode_seconds"])
      best[piece] = _piece(result[unet]["best"]["steps" + clock],
                           result[decoder]["best"]["decodes" + clock])
      best["parts" + clock] = dict(unet=unet, decoder=decoder)
    result["release_fastest"] = best
    ours_total = result["ours"]["piece"]["total_seconds"]
    ours_cpu = result["ours"]["piece_cpu"]["total_seconds"]
    result["speedup"] = {name: result[name]["piece"]["total_seconds"] / ours_total
                         for name in RELEASE_VARIANTS}
    result["speedup"]["release_fastest"] = best["piece"]["total_seconds"] / ours_total
    result["speedup_cpu"] = {name: result[name]["piece_cpu"]["total_seconds"] / ours_cpu
                             for name in RELEASE_VARIANTS}
    result["speedup_cpu"]["release_fastest"] = best["piece_cpu"]["total_seconds"] / ours_cpu
  return result


def _print_summary(machine, train, generation):
  print("\n## Latent diffusion\n")
  print(f"- Machine: {machine['cpu']}, {machine['cores']} cores; jax {machine['jax']}; "
        f"{machine['date']}")
  if train:
    print(f"- (a) DiT train step (EDM loss + AdamW, jit, donated state), width "
          f"{train['width']}, depth {train['depth']}, heads {train['heads']}, patch 16 "
          f"({train['num_params'] / 1e6:.1f} M parameters), batch {train['batch']} × "
          f"[320, 1024], {train['dtype']}: {train['examples_per_second']:.2f} examples/s "
          f"(best of {len(train['step_times'])} runs: "
          + ", ".join(f"{t:.3f}" for t in train["step_times"]) + " s/step)")
  if generation:
    ours = generation["ours"]
    print(f"- (b) one 14.86 s four-stem piece, 150-step Euler-churn + 4 decodes, ours in "
          f"{ours['dtype']}, {machine['threads']} thread(s) per side, decode timed as "
          f"{_DECODE_STEMS.value} stem(s) per call; 150 steps EXTRAPOLATED from the per-step "
          f"time (ours: plus its once-per-piece set-up); best of {_ROUNDS.value} interleaved "
          "rounds; wall-clock (CPU time in brackets):\n")
    print("| | parameters | eval (s) | sampler step (s) | 150 steps (s) | 4 decodes (s) | "
          "total (s) | sampling share | stem-audio s / s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("ours",) + tuple(RELEASE_VARIANTS):
      if name not in generation:
        continue
      row, piece, cpu = (generation[name], generation[name]["piece"],
                         generation[name]["piece_cpu"])
      best = row["best"]
      print(f"| {_LABELS[name]} | {row['num_params'] / 1e6:.1f} M | {best['evals']:.3f} "
            f"({best['evals_cpu']:.3f}) | {best['steps']:.3f} ({best['steps_cpu']:.3f}) | "
            f"{piece['sampling_seconds']:.1f} ({cpu['sampling_seconds']:.1f}) | "
            f"{piece['decode_seconds']:.1f} ({cpu['decode_seconds']:.1f}) | "
            f"{piece['total_seconds']:.1f} ({cpu['total_seconds']:.1f}) | "
            f"{100 * piece['sampling_share']:.0f}% ({100 * cpu['sampling_share']:.0f}%) | "
            f"{piece['stem_audio_seconds_per_second']:.2f} |")
    if "speedup" in generation:
      fastest = generation["release_fastest"]
      print(f"| release, fastest part by part ({fastest['parts']['unet']} U-Net, "
            f"{fastest['parts']['decoder']} decoder) | | | | "
            f"{fastest['piece']['sampling_seconds']:.1f} | "
            f"{fastest['piece']['decode_seconds']:.1f} | "
            f"{fastest['piece']['total_seconds']:.1f} "
            f"({fastest['piece_cpu']['total_seconds']:.1f}) | | |")
      print("\n- Speed-up, ours over the release (extrapolated piece), wall-clock (CPU time): "
            + "; ".join(f"over {name}: {generation['speedup'][name]:.2f}× "
                        f"({generation['speedup_cpu'][name]:.2f}×)"
                        for name in generation["speedup"]))
    if "full" in ours:
      full = ours["full"]
      print(f"- Ours measured end to end (generate_batch, 150 steps + 4 decodes): "
            f"{full['seconds']:.1f} s wall, {full['cpu_seconds']:.1f} s CPU "
            f"(best of {len(full['runs'])}; compile {full['compile_seconds']:.1f} s)")


def main(argv):
  del argv
  if jax.default_backend() != "cpu":
    print(f"note: running on {jax.default_backend()}, not the CPU the method describes")
  machine = dict(cpu=machine_info.cpu_model(), cores=len(os.sched_getaffinity(0)), jax=jax.__version__,
                 date=time.strftime("%Y-%m-%d %H:%M"), threads=_threads())
  print(f"machine: {machine}", flush=True)
  train = generation = unet = None
  if not _SKIP_TRAIN.value:
    print("(a) DiT train-step throughput", flush=True)
    train = bench_train()
  if not _SKIP_GENERATION.value:
    print("(b) generation of one piece", flush=True)
    generation = bench_generation()
    _print_summary(machine, train, generation)
  if _UNET.value:
    unet = bench_unet()
    print_unet_summary(unet)
  print("\n" + json.dumps(dict(machine=machine, train=train, generation=generation,
                               unet=unet)))


if __name__ == "__main__":
  app.run(main)
