r"""What compiling the SourceVAE trainer's programs costs on this machine, program by program.

  python -m benchmarks.compile_cost                       # the tests' VAE (below)
  python -m benchmarks.compile_cost --config=configs/demo.py --window_seconds=1.0

The tests spend most of their time compiling, not computing (tests/conftest.py, README
"Quick start"): this prints, for each program a VAE trainer builds, its size (lines of
StableHLO), the seconds to trace and lower it, and the seconds XLA takes to compile it, under
the tests' XLA flags (set here as conftest sets them, before JAX starts) and with no
compilation cache. The default is the tests' VAE: configs/demo.py's tiny variant with
tests/test_train_vae.py's quarter-second windows. Rows:
  init                       the jitted initialisation of the whole train state
  reconstruction-only step   the warm-up's step (generator on mel, KL, waveform terms)
  full step                  the GAN step (`loop.CompiledStep.step`)
  generator AdamW update     optax's clipped AdamW on the generator's parameters, alone
  discriminator Adam update  the same for the discriminators
The parts overlap the steps; they show how much of a step's program is the optimisers'
per-parameter updates (one small elementwise program per parameter array).
"""

import functools
import os
import sys
import time

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

if __name__ == "__main__":
  # The tests' flags (tests/conftest.py), before JAX initialises its backend.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8"
                             " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import optax  # noqa: E402  pylint: disable=g-import-not-at-top

from msldm_jax import config_loading  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.parallel import mesh as mesh_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import train_vae  # noqa: E402  pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "configs/demo.py:variant=tiny", "Config file (and its argument).")
flags.DEFINE_float("window_seconds", 0.25, "Training window length in seconds (the tests' 0.25).")
flags.DEFINE_integer("devices", 8, "Devices of the mesh (the tests' 8 fake CPU devices).")


def _optimizer_update(transform, tree_name, opt_name, state):
  params = getattr(state, tree_name)
  updates, opt_state = transform.update(params, getattr(state, opt_name), params)
  return optax.apply_updates(params, updates), opt_state


def measure(name, lower):
  """(name, StableHLO lines, trace+lower s, compile s) of one program."""
  start = time.perf_counter()
  lowered = lower()
  traced = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return name, lowered.as_text().count("\n"), traced - start, done - traced


def main(argv):
  del argv
  config = config_loading.load_config(os.path.join(REPO_ROOT, FLAGS.config))
  config.data.vae_windows.train_seconds = FLAGS.window_seconds
  mesh = mesh_lib.make_mesh(jax.devices()[:FLAGS.devices])
  trainer = train_vae.VAETrainer(config, "/nonexistent-workdir", mesh=mesh)
  state = trainer.compiled.abstract_state
  batch_size = int(config.vae.batch_size)
  batch = {pipeline.AUDIO: jax.ShapeDtypeStruct((batch_size, trainer.window), jnp.float32),
           pipeline.STEM: jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  spec = trainer.spec
  rows = [
      measure("init", lambda: trainer.compiled.init.lower(jax.random.key(0))),
      measure("reconstruction-only step",
              lambda: trainer.compiled.warmup_step.lower(state, batch)),
      measure("full step", lambda: trainer.compiled.step.lower(state, batch)),
      measure("generator AdamW update", lambda: jax.jit(functools.partial(
          _optimizer_update, spec.generator_tx, "generator", "generator_opt")).lower(state)),
      measure("discriminator Adam update", lambda: jax.jit(functools.partial(
          _optimizer_update, spec.discriminator_tx, "discriminator",
          "discriminator_opt")).lower(state)),
  ]
  leaves = {tree: len(jax.tree.leaves(getattr(state, tree)))
            for tree in ("generator", "discriminator")}
  print(f"Config {FLAGS.config}, windows {trainer.window} samples, batch {batch_size}, "
        f"{FLAGS.devices} device(s); parameter arrays: generator {leaves['generator']}, "
        f"discriminator {leaves['discriminator']}. XLA_FLAGS={os.environ['XLA_FLAGS']}")
  print("| program | StableHLO lines | trace + lower s | compile s |")
  print("|---|---|---|---|")
  for name, lines, traced, compiled in rows:
    print(f"| {name} | {lines} | {traced:.1f} | {compiled:.1f} |")


if __name__ == "__main__":
  app.run(main)
