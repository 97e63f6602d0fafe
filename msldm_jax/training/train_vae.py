"""Stage one: the SourceVAE's GAN training (`--mode=train_vae`), reference §3.

Each step is one pure, jitted function with the whole state donated:
  1. one generator forward: encode single-stem windows, sample the posterior, decode;
  2. a discriminator update against that (detached) reconstruction;
  3. a generator update against the FRESH discriminator, reusing step 1's forward through
     its VJP, so the generator runs forward once per step as in the reference.
Inputs are right-padded with zeros to whole latent frames and the reconstruction is cropped
back to the window, the codec convention of DAC.

Parallelism: one mesh, batches split over its data axis; the state is replicated or FSDP
(`config.vae.sharding`), decided from shapes by `parallel/sharding.py`.
"""

import dataclasses
import functools
import os
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msldm_jax import plotting
from msldm_jax import stems as stems_lib
from msldm_jax.data import pipeline
from msldm_jax.data import prepare
from msldm_jax.losses import vae_losses
from msldm_jax.models import discriminators
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.parallel import sharding
from msldm_jax.training import checkpointing
from msldm_jax.training import metric_writer

VAE_FOLDER = "vae"


@flax.struct.dataclass
class VAETrainState:
  step: jax.Array
  generator: Any
  discriminator: Any
  generator_opt: Any
  discriminator_opt: Any


@dataclasses.dataclass(frozen=True)
class VAEModels:
  """The static half of training: modules and optimizers (hashable, closed over by jit)."""
  vae: source_vae.SourceVAE
  discriminator: discriminators.Discriminator
  generator_tx: optax.GradientTransformation
  discriminator_tx: optax.GradientTransformation
  learning_rate: optax.Schedule


def make_models(vae_config: ml_collections.ConfigDict) -> VAEModels:
  optim = vae_config.optimizer
  # The reference multiplies the learning rate by `lr_decay` after every step
  # (PyTorch ExponentialLR stepped per batch).
  learning_rate = optax.exponential_decay(optim.learning_rate, transition_steps=1,
                                          decay_rate=optim.lr_decay)
  generator_tx = optax.chain(
      optax.clip_by_global_norm(optim.generator_clip),
      optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  discriminator_tx = optax.chain(
      optax.clip_by_global_norm(optim.discriminator_clip),
      optax.adam(learning_rate, b1=optim.b1, b2=optim.b2))
  disc = vae_config.discriminator
  return VAEModels(
      vae=source_vae.SourceVAE.from_config(vae_config.model),
      discriminator=discriminators.make_discriminator(
          disc.variant, dtype=vae_config.model.dtype, **disc.get("overrides", {})),
      generator_tx=generator_tx, discriminator_tx=discriminator_tx,
      learning_rate=learning_rate)


def covering_frames(samples: int, vae: source_vae.SourceVAE) -> int:
  """The fewest latent frames whose decoding is at least `samples` long."""
  hop = source_vae.hop_length(vae.encoder_strides)
  frames = -(-samples // hop)
  while source_vae.decoded_length(frames, vae.decoder_strides) < samples:
    frames += 1
  return frames


def pad_to_frames(waveforms: jax.Array, vae: source_vae.SourceVAE) -> jax.Array:
  """Right-pads [..., samples] with zeros to whole latent frames covering the window."""
  samples = waveforms.shape[-1]
  padded = covering_frames(samples, vae) * source_vae.hop_length(vae.encoder_strides)
  return jnp.pad(waveforms, [(0, 0)] * (waveforms.ndim - 1) + [(0, padded - samples)])


def reconstruct_stem(models: VAEModels, params, waveforms_bt, stem_b, rng=None):
  """Encode → (posterior sample, or the mean when rng is None) → decode, cropped to input.

  Returns (reconstruction [batch, samples], mean, logvar).
  """
  samples = waveforms_bt.shape[-1]
  mean, logvar = models.vae.apply(params, pad_to_frames(waveforms_bt, models.vae), stem_b,
                                  method=models.vae.encode_stem)
  z = mean if rng is None else source_vae.posterior_sample(mean, logvar, rng)
  recon = models.vae.apply(params, z, stem_b, method=models.vae.decode_stem)
  return recon[:, :samples], mean, logvar


def init_state(models: VAEModels, rng: jax.Array, window: int) -> VAETrainState:
  vae_rng, disc_rng = jax.random.split(rng)
  generator = models.vae.init(vae_rng, jnp.zeros((1, models.vae.num_stems, window)))
  discriminator = models.discriminator.init(disc_rng, jnp.zeros((1, window), jnp.float32))
  return VAETrainState(
      step=jnp.zeros((), jnp.int32), generator=generator, discriminator=discriminator,
      generator_opt=models.generator_tx.init(generator),
      discriminator_opt=models.discriminator_tx.init(discriminator))


def train_step(state: VAETrainState, batch, *, models: VAEModels, loss_weights, seed: int):
  """One discriminator update, then one generator update against the fresh discriminator."""
  x, stem = batch[pipeline.AUDIO], batch[pipeline.STEM]
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def generator_forward(generator):
    return reconstruct_stem(models, generator, x, stem, rng)

  (recon, mean, logvar), generator_vjp = jax.vjp(generator_forward, state.generator)

  def discriminator_objective(discriminator):
    d_fake = models.discriminator.apply(discriminator, jax.lax.stop_gradient(recon))
    d_real = models.discriminator.apply(discriminator, x)
    return vae_losses.discriminator_loss(d_fake, d_real)

  d_loss, d_grads = jax.value_and_grad(discriminator_objective)(state.discriminator)
  d_updates, discriminator_opt = models.discriminator_tx.update(
      d_grads, state.discriminator_opt, state.discriminator)
  discriminator = optax.apply_updates(state.discriminator, d_updates)

  d_real = models.discriminator.apply(discriminator, x)

  def generator_objective(recon, mean, logvar):
    d_fake = models.discriminator.apply(discriminator, recon)
    return vae_losses.generator_loss(recon, x, d_fake, d_real,
                                     source_vae.kl_divergence(mean, logvar), loss_weights)

  (g_loss, terms), cotangents = jax.value_and_grad(
      generator_objective, argnums=(0, 1, 2), has_aux=True)(recon, mean, logvar)
  (g_grads,) = generator_vjp(cotangents)
  g_updates, generator_opt = models.generator_tx.update(
      g_grads, state.generator_opt, state.generator)
  generator = optax.apply_updates(state.generator, g_updates)

  metrics = {f"loss/{name}": value for name, value in terms.items()}
  metrics.update({
      "loss/generator": g_loss, "loss/discriminator": d_loss,
      "grad_norm/generator": optax.tree.norm(g_grads),
      "grad_norm/discriminator": optax.tree.norm(d_grads),
      "learning_rate": models.learning_rate(state.step),
  })
  new_state = VAETrainState(step=state.step + 1, generator=generator,
                            discriminator=discriminator, generator_opt=generator_opt,
                            discriminator_opt=discriminator_opt)
  return new_state, metrics


def eval_step(generator, batch, *, models: VAEModels):
  """Per-window mel distance and SI-SDR of the posterior-mean reconstruction."""
  x, stem = batch[pipeline.AUDIO], batch[pipeline.STEM]
  recon, _, _ = reconstruct_stem(models, generator, x, stem)
  return {"mel_distance": vae_losses.multiscale_mel_distance(recon, x),
          "si_sdr": vae_losses.si_sdr(recon, x), "recon": recon}


class VAETrainer:
  """Builds the jitted steps, state and checkpoints for a config; `train()` runs the loop.

  Tests and notebooks use its pieces (`step`, `state`, `evaluate`) directly.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.config, self.workdir = config, workdir
    self.vae_config = config.vae
    self.mesh = mesh or mesh_lib.make_mesh()
    self.models = make_models(self.vae_config)
    self.window = pipeline.vae_window_spec(config.data, train=True).window
    self.stage_dir = os.path.join(workdir, VAE_FOLDER)

    init = functools.partial(init_state, self.models, window=self.window)
    abstract = jax.eval_shape(init, jax.random.key(0))
    self.state_shardings = sharding.state_shardings(abstract, self.mesh,
                                                    self.vae_config.sharding)
    self.abstract_state = checkpointing.abstract_with_shardings(abstract, self.state_shardings)
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    batch_sharding = mesh_lib.batch_sharding(self.mesh)
    self.step = jax.jit(
        functools.partial(train_step, models=self.models,
                          loss_weights=dict(self.vae_config.loss_weights),
                          seed=int(self.vae_config.seed)),
        in_shardings=(self.state_shardings, batch_sharding),
        out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)),
        donate_argnums=(0,))
    self._eval_step = jax.jit(
        functools.partial(eval_step, models=self.models),
        in_shardings=(self.state_shardings.generator, batch_sharding),
        out_shardings=mesh_lib.replicated(self.mesh))

  def initial_state(self) -> VAETrainState:
    return self._init(jax.random.key(int(self.vae_config.seed)))

  def _dataset_dir(self) -> str:
    path = prepare.dataset_dir(self.config, self.workdir)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no built dataset at {path}: run --mode=data first")
    return path

  def train_inputs(self, position=None) -> pipeline.InputIterator:
    dataset_fn = functools.partial(
        pipeline.vae_windows, self._dataset_dir(), "train", data_config=self.config.data,
        batch_size=self.vae_config.batch_size, train=True, seed=self.config.data.seed)
    return pipeline.InputIterator(dataset_fn, mesh=self.mesh, position=position)

  def evaluate(self, state: VAETrainState, writer=None, step: int = 0) -> dict:
    """Mel distance and SI-SDR per stem over the first `eval_batches` validation batches."""
    train = self.vae_config.train
    dataset_fn = functools.partial(
        pipeline.vae_windows, self._dataset_dir(), "validation", data_config=self.config.data,
        batch_size=train.eval_batch_size, train=False)
    inputs = pipeline.InputIterator(dataset_fn, mesh=self.mesh, num_epochs=1)
    sums = {}
    examples = None
    for index, batch in enumerate(inputs):
      if index >= train.eval_batches:
        break
      out = jax.device_get(self._eval_step(state.generator, batch))
      valid = np.asarray(batch[pipeline.VALID])
      stem = np.asarray(batch[pipeline.STEM])
      for name in ("mel_distance", "si_sdr"):
        for s, stem_name in enumerate(stems_lib.STEM_NAMES):
          rows = valid & (stem == s)
          if rows.any():
            total, count = sums.get((name, stem_name), (0.0, 0))
            sums[(name, stem_name)] = (total + float(out[name][rows].sum()),
                                       count + int(rows.sum()))
      if examples is None:
        examples = (np.asarray(batch[pipeline.AUDIO])[valid][:2], out["recon"][valid][:2])
    metrics = {f"eval/{name}/{stem_name}": total / count
               for (name, stem_name), (total, count) in sums.items()}
    for name in ("mel_distance", "si_sdr"):
      per_stem = [v for k, v in metrics.items() if k.startswith(f"eval/{name}/")]
      if per_stem:
        metrics[f"eval/{name}"] = float(np.mean(per_stem))
    if writer is not None and metrics:
      writer.scalars(step, metrics)
      if examples is not None and len(examples[0]):
        real, recon = examples
        writer.audio(step, "eval/reconstruction", recon, stems_lib.SAMPLE_RATE)
        writer.audio(step, "eval/original", real, stems_lib.SAMPLE_RATE)
        writer.images(step, "eval/spectrograms", plotting.spectrogram_image(
            {"original": real[0], "reconstruction": recon[0]}, stems_lib.SAMPLE_RATE)[None])
    return metrics

  def train(self) -> dict:
    train = self.vae_config.train
    manager = checkpointing.make_manager(os.path.join(self.stage_dir, "checkpoints"),
                                         max_to_keep=train.keep_checkpoints)
    restored = checkpointing.restore_latest(manager, self.abstract_state)
    if restored is None:
      state, position, start = self.initial_state(), None, 0
    else:
      state, position, start = restored
    inputs = self.train_inputs(position)
    writer = metric_writer.MetricWriter(os.path.join(self.stage_dir, "logs"))
    progress = metric_writer.Progress(train.num_steps, start, train.log_every, "train_vae")
    history = []
    pending = None  # (step, metrics) of the previous step, checked one step late so that
    # fetching it does not stall the device queue.
    final_metrics = {}
    try:
      for step in range(start + 1, train.num_steps + 1):
        batch = next(inputs)
        state, metrics = self.step(state, batch)
        if pending is not None:
          final_metrics = self._check_and_log(*pending, writer, progress, history)
        pending = (step, metrics)
        if step % train.checkpoint_every == 0 or step == train.num_steps:
          final_metrics = self._check_and_log(*pending, writer, progress, history)
          pending = None
          checkpointing.save(manager, step, state, inputs.state())
        if step % train.eval_every == 0 or step == train.num_steps:
          final_metrics.update(self.evaluate(state, writer, step))
      if pending is not None:
        final_metrics = self._check_and_log(*pending, writer, progress, history)
    finally:
      # Also on a failure: the checkpoints already under way are the last good ones.
      manager.wait_until_finished()
    writer.flush()
    if history and jax.process_index() == 0:
      steps = [h[0] for h in history]
      plotting.save_curves(
          os.path.join(self.stage_dir, "losses.png"),
          {name: (steps, [h[1][name] for h in history])
           for name in ("loss/mel", "loss/generator", "loss/discriminator")})
    return final_metrics

  def _check_and_log(self, step, metrics, writer, progress, history):
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    metric_writer.check_finite(step, {k: v for k, v in metrics.items()
                                      if k.startswith("loss/")})
    rate = progress.update(step)
    if rate is not None:
      writer.scalars(step, {**metrics, "steps_per_second": rate})
      history.append((step, metrics))
    return metrics


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=train_vae` stage: trains (or resumes) the SourceVAE in WORKDIR/vae."""
  return VAETrainer(config, workdir).train()


def restore_generator(config: ml_collections.ConfigDict, workdir: str,
                      checkpoint_dir: str | None = None) -> tuple[Any, dict]:
  """The trained SourceVAE's parameters from the VAE stage's newest checkpoint.

  Returns (params as `{'params': ...}`, identity) where identity names the checkpoint
  (directory and step) so that products of the frozen VAE can record which one made them.
  """
  checkpoint_dir = checkpoint_dir or os.path.join(workdir, VAE_FOLDER, "checkpoints")
  models = make_models(config.vae)
  window = pipeline.vae_window_spec(config.data, train=True).window
  abstract = jax.eval_shape(functools.partial(init_state, models, window=window),
                            jax.random.key(0))
  mesh = mesh_lib.make_mesh()
  shardings = sharding.state_shardings(abstract, mesh, "replicate")
  manager = checkpointing.make_manager(checkpoint_dir)
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(abstract, shardings))
  if restored is None:
    raise FileNotFoundError(f"no SourceVAE checkpoint in {checkpoint_dir}: run "
                            "--mode=train_vae first, or import published weights")
  state, _, step = restored
  return state.generator, {"checkpoint_dir": os.path.abspath(checkpoint_dir), "step": int(step)}
