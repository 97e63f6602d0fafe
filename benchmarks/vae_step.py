r"""Where a SourceVAE GAN training step's time goes, part by part, on this machine.

  python -m benchmarks.vae_step                          # the demo's VAE (configs/demo.py)
  python -m benchmarks.vae_step --config=configs/slakh.py --batch_size=4

Each row is one jitted function of the trainer's own pieces (`training/train_vae.py`), at the
config's model, discriminator, window and batch, float32, parameters as arguments:
  generator forward       encode → posterior sample → decode (`reconstruct_stem`)
  generator fwd+bwd, mel  the same, differentiated through the multi-scale mel loss only
  mel loss fwd+bwd        the loss alone, differentiated with respect to the estimate
  discriminator forward   every sub-discriminator on one batch of waveforms
  discriminator fwd+bwd   the discriminator's LSGAN loss on (fake, real), by its parameters
  D on fake, by input     the generator's adversarial + feature-matching terms, differentiated
                          with respect to the waveform (what the generator update back-
                          propagates through the fresh discriminator)
  reconstruction-only     one generator update on mel + KL (no discriminator): the step of
    step                  a `vae.adversarial_start` warm-up
  full step               the trainer's compiled step (`loop.CompiledStep`), state donated
Per row: one untimed call (compilation), then --repeats timed calls; the best counts, with the
process CPU time of that call, its system share and the minor page faults it took (fresh
memory that the kernel maps and zeroes on first touch). A per-source VAE's rows run one-stem
batches, as its trainer does. The parts overlap (the full step contains them all), so they
do not sum to the step; they show which piece dominates.
"""

import functools
import os
import resource
import sys
import time

from absl import app
from absl import flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # noqa: E402  pylint: disable=g-import-not-at-top

from msldm_jax.data import pipeline  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.losses import vae_losses  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.models import source_vae  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.parallel import mesh as mesh_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import loop  # noqa: E402  pylint: disable=g-import-not-at-top
from msldm_jax.training import train_vae  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO_ROOT, "configs", "demo.py"), "The config whose VAE to time.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Windows per step (0: the config's).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per row (the best counts).")
_PARTS = flags.DEFINE_list("parts", [], "Only these rows (by their first word(s)); all if "
                           "empty.")


def _usage():
  """(wall s, CPU s, system CPU s, minor page faults) so far, for differences."""
  times, usage = os.times(), resource.getrusage(resource.RUSAGE_SELF)
  return np.array([time.perf_counter(), times.user + times.system, times.system,
                   usage.ru_minflt], np.float64)


def _best_of(call, repeats):
  """The row of the fastest of `repeats` calls (by wall time): wall s, CPU s, system CPU s,
  minor page faults (pages the process touched for the first time since they were mapped:
  the kernel maps and zeroes each)."""
  best = None
  for _ in range(repeats):
    start = _usage()
    call()
    row = _usage() - start
    best = row if best is None or row[0] < best[0] else best
  return best


def _timed(fn, *args, repeats):
  """`_best_of` the calls of fn(*args) after one untimed call (the compilation)."""
  jax.block_until_ready(fn(*args))
  return _best_of(lambda: jax.block_until_ready(fn(*args)), repeats)


def _row(name, measured):
  wall, cpu, system, faults = measured
  return f"| {name} | {wall:.3f} | {cpu:.3f} | {system:.3f} | {faults / 1000:.0f} |"


def main(argv):
  del argv
  config = _CONFIG.value
  vae_config = config.vae
  batch_size = _BATCH.value or int(vae_config.batch_size)
  spec = train_vae.make_train_spec(vae_config)
  window = pipeline.vae_window_spec(config.data, train=True).window
  rng = np.random.default_rng(0)
  # Audio-like inputs: a few decaying harmonics plus a little noise, at speech-like levels.
  t = np.arange(window) / 22050.0
  x = sum(np.sin(2 * np.pi * f * t * rng.uniform(0.5, 2.0, (batch_size, 1)))
          for f in (110.0, 220.0, 330.0)) * 0.1
  x = jnp.asarray(x + 0.01 * rng.standard_normal((batch_size, window)), jnp.float32)
  # A per-source VAE trains on one-stem batches (`train_vae.one_stem_batches`), which run
  # one stem's parameter set; a mixed batch would run all four.
  stem = jnp.asarray(np.zeros(batch_size) if spec.stem_batches else np.arange(batch_size) % 4,
                     jnp.int32)
  state = train_vae.init_state(spec, jax.random.key(0), window)
  gen, disc = state.generator, state.discriminator
  key = jax.random.key(1)
  reconstruct = functools.partial(train_vae.reconstruct_stem, spec.vae,
                                one_stem=spec.stem_batches)
  weights = dict(vae_config.loss_weights)

  def g_forward(g):
    return reconstruct(g, x, stem, key)[0]

  def g_mel(g):
    recon, mean, logvar = reconstruct(g, x, stem, key)
    return (weights["mel"] * vae_losses.multiscale_mel_loss(recon, x)
            + weights["kl"] * source_vae.kl_divergence(mean, logvar))

  def mel(y):
    return vae_losses.multiscale_mel_loss(y, x)

  def d_loss(d, fake):
    return vae_losses.discriminator_loss(spec.discriminator.apply(d, fake),
                                         spec.discriminator.apply(d, x))

  d_real = spec.discriminator.apply(disc, x)

  def g_adversarial(fake):
    d_fake = spec.discriminator.apply(disc, fake)
    return (weights["adversarial"] * vae_losses.generator_adversarial_loss(d_fake)
            + weights["feature_matching"] * vae_losses.feature_matching_loss(d_fake, d_real))

  fake = g_forward(gen)
  rows = [
      ("generator forward", jax.jit(g_forward), (gen,)),
      ("generator fwd+bwd, mel", jax.jit(jax.grad(g_mel)), (gen,)),
      ("mel loss fwd+bwd", jax.jit(jax.grad(mel)), (fake,)),
      ("discriminator forward", jax.jit(spec.discriminator.apply), (disc, x)),
      ("discriminator fwd+bwd", jax.jit(jax.grad(d_loss)), (disc, fake)),
      ("D on fake, by input", jax.jit(jax.grad(g_adversarial)), (fake,)),
  ]
  selected = [p.strip() for p in _PARTS.value]
  print(f"VAE {dict(vae_config.model)}\ndiscriminator {vae_config.discriminator.variant}, "
        f"batch {batch_size} × {window} samples, {jax.device_count()} device(s), "
        f"{os.cpu_count()} cores", flush=True)
  print("| part | wall s | CPU s | system CPU s | page faults (thousands) |\n"
        "|---|---|---|---|---|")
  for name, fn, args in rows:
    if selected and not any(name.startswith(p) for p in selected):
      continue
    print(_row(name, _timed(fn, *args, repeats=_REPEATS.value)), flush=True)
  mesh = mesh_lib.make_mesh()
  batch = mesh_lib.to_global_batch(
      {pipeline.AUDIO: np.asarray(x), pipeline.STEM: np.asarray(stem)}, mesh)
  for name, step_fn in (("reconstruction-only step", train_vae.warmup_step),
                        ("full step", train_vae.train_step)):
    if selected and not any(name.startswith(p) for p in selected):
      continue
    compiled = loop.CompiledStep(
        functools.partial(train_vae.init_state, spec, window=window),
        functools.partial(step_fn, spec=spec, loss_weights=weights, seed=0), mesh,
        "replicate")
    step_state = compiled.init(jax.random.key(0))
    step_state, _ = compiled.step(step_state, batch)
    jax.block_until_ready(step_state)

    def one_step():
      nonlocal step_state
      step_state, metrics = compiled.step(step_state, batch)
      jax.block_until_ready(metrics)

    print(_row(name, _best_of(one_step, _REPEATS.value)), flush=True)


if __name__ == "__main__":
  app.run(main)
