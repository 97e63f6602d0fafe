"""Stage one: the SourceVAE's GAN training (`--mode=train_vae`), reference §3.

Each step is one pure, jitted function with the whole state donated:
  1. one generator forward: encode single-stem windows, sample the posterior, decode;
  2. a discriminator update against that (detached) reconstruction;
  3. a generator update against the FRESH discriminator, reusing step 1's forward through
     its VJP, so the generator runs forward once per step as in the reference.
With `vae.adversarial_start` = N > 0 the first N steps are a warm-up that updates the
generator on its mel, KL and waveform terms alone (`reconstruction_step`, a second compiled program;
the discriminator neither runs nor changes); 0, the release's recipe, has none.
Inputs are right-padded with zeros to whole latent frames and the reconstruction is cropped
back to the window, the codec convention of DAC.

Parallelism: one mesh, batches split over its data axis; the state is replicated or FSDP
(`config.vae.sharding`), decided from shapes by `parallel/sharding.py`. The loop, checkpoints
and metrics are `training/loop.py`'s, shared with the diffusion trainer.

Outputs in WORKDIR/vae: checkpoints/ (orbax: state, input position, the SourceVAE's model
record), logs/ (TensorBoard), metrics.jsonl, losses.png. Later stages load the generator with
`models/loading.load_vae(WORKDIR)`.
"""

import dataclasses
import functools
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msldm_jax import paper_config
from msldm_jax import plotting
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.data import input_iterator
from msldm_jax.data import pipeline
from msldm_jax.losses import vae_losses
from msldm_jax.models import discriminators
from msldm_jax.models import loading
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import loop


@flax.struct.dataclass
class VAETrainState:
  step: jax.Array
  generator: Any
  discriminator: Any
  generator_opt: Any
  discriminator_opt: Any


@dataclasses.dataclass(frozen=True)
class VAETrainSpec:
  """The static half of training: modules and optimizers (hashable, closed over by jit)."""
  vae: source_vae.SourceVAE
  discriminator: discriminators.Discriminator
  generator_tx: optax.GradientTransformation
  discriminator_tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  # Every batch holds one stem's windows (`vae_windows(stem_batches=True)`), so a per-source
  # VAE runs the batch through that stem's parameters alone (`source_vae.one_group`).
  stem_batches: bool = False


def make_train_spec(vae_config: ml_collections.ConfigDict,
                    mixture: bool = False) -> VAETrainSpec:
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
  return VAETrainSpec(
      vae=source_vae.SourceVAE.from_config(vae_config.model),
      discriminator=discriminators.make_discriminator(
          disc.variant, dtype=vae_config.model.dtype, **disc.get("overrides", {})),
      generator_tx=generator_tx, discriminator_tx=discriminator_tx,
      learning_rate=learning_rate, stem_batches=one_stem_batches(vae_config, mixture))


def one_stem_batches(vae_config: ml_collections.ConfigDict, mixture: bool) -> bool:
  """Whether every batch holds one stem's windows: a per-source VAE of the stems."""
  return bool(vae_config.model.per_source) and not mixture


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


def reconstruct_stem(vae: source_vae.SourceVAE, params, waveforms_bt, stem_b, rng=None,
                     one_stem: bool = False):
  """Encode → (posterior sample, or the mean when rng is None) → decode, cropped to input.

  With `one_stem` (every row of the batch is the same stem), a per-source VAE runs the
  batch through that stem's parameters alone (`source_vae.one_group`).

  Returns (reconstruction [batch, samples], mean, logvar).
  """
  samples = waveforms_bt.shape[-1]
  if one_stem:
    vae, params = source_vae.one_group(vae, params, stem_b[0])
    stem_b = jnp.zeros_like(stem_b)
  mean, logvar = vae.apply(params, pad_to_frames(waveforms_bt, vae), stem_b,
                           method=vae.encode_stem)
  z = mean if rng is None else source_vae.posterior_sample(mean, logvar, rng)
  recon = vae.apply(params, z, stem_b, method=vae.decode_stem)
  return recon[:, :samples], mean, logvar


def init_state(spec: VAETrainSpec, rng: jax.Array, window: int) -> VAETrainState:
  vae_rng, disc_rng = jax.random.split(rng)
  generator = spec.vae.init(vae_rng, jnp.zeros((1, spec.vae.num_stems, window)))
  discriminator = spec.discriminator.init(disc_rng, jnp.zeros((1, window), jnp.float32))
  return VAETrainState(
      step=jnp.zeros((), jnp.int32), generator=generator, discriminator=discriminator,
      generator_opt=spec.generator_tx.init(generator),
      discriminator_opt=spec.discriminator_tx.init(discriminator))


def _update_generator(spec: VAETrainSpec, state: VAETrainState, g_grads, stem_b):
  g_updates, generator_opt = spec.generator_tx.update(
      g_grads, state.generator_opt, state.generator)
  generator = optax.apply_updates(state.generator, g_updates)
  if spec.stem_batches and spec.vae.num_groups > 1:
    # Only the batch's stem steps. Its gradient is zero elsewhere, but AdamW would still
    # decay the other stems' parameters and move them by their leftover momentum at every
    # step: with the stems in turn, four times the weight decay per gradient step and three
    # momentum-only updates between a stem's gradients (benchmarks/RESULTS.md, "Guitar and
    # piano's VAEs continued alone"). So the other stems keep their parameters and moments;
    # the step count (learning rate, bias correction) stays one for all.
    generator = _only_group(generator, state.generator, stem_b[0], spec.vae.num_groups)
    generator_opt = _only_group(generator_opt, state.generator_opt, stem_b[0],
                                spec.vae.num_groups)
  return generator, generator_opt


def _only_group(new, old, group, num_groups: int):
  """`new` in group `group` of every per-group leaf (leading axis `num_groups`), `old` in the
  others; scalars (step counts) from `new`."""
  def pick(updated, kept):
    if updated.ndim == 0:
      return updated
    if updated.shape[0] != num_groups:
      raise ValueError(f"a per-source VAE's parameter or optimiser state of shape "
                       f"{updated.shape} has no leading axis of its {num_groups} stems")
    mask = (jnp.arange(num_groups) == group).reshape((num_groups,) + (1,) * (updated.ndim - 1))
    return jnp.where(mask, updated, kept)
  return jax.tree.map(pick, new, old)


def adversarial_step(state: VAETrainState, batch, *, spec: VAETrainSpec, loss_weights, rng):
  """The reference's step: a discriminator update, then a generator update on every term
  against the fresh discriminator."""
  x, stem = batch[pipeline.AUDIO], batch[pipeline.STEM]

  def generator_forward(generator):
    return reconstruct_stem(spec.vae, generator, x, stem, rng, one_stem=spec.stem_batches)

  (recon, mean, logvar), generator_vjp = jax.vjp(generator_forward, state.generator)

  def discriminator_objective(discriminator):
    d_fake = spec.discriminator.apply(discriminator, jax.lax.stop_gradient(recon))
    d_real = spec.discriminator.apply(discriminator, x)
    return vae_losses.discriminator_loss(d_fake, d_real)

  d_loss, d_grads = jax.value_and_grad(discriminator_objective)(state.discriminator)
  d_updates, discriminator_opt = spec.discriminator_tx.update(
      d_grads, state.discriminator_opt, state.discriminator)
  discriminator = optax.apply_updates(state.discriminator, d_updates)

  d_real = spec.discriminator.apply(discriminator, x)

  def generator_objective(recon, mean, logvar):
    d_fake = spec.discriminator.apply(discriminator, recon)
    return vae_losses.generator_loss(recon, x, d_fake, d_real,
                                     source_vae.kl_divergence(mean, logvar), loss_weights)

  (g_loss, terms), cotangents = jax.value_and_grad(
      generator_objective, argnums=(0, 1, 2), has_aux=True)(recon, mean, logvar)
  (g_grads,) = generator_vjp(cotangents)
  generator, generator_opt = _update_generator(spec, state, g_grads, stem)
  metrics = {f"loss/{name}": value for name, value in terms.items()}
  metrics.update({
      "loss/generator": g_loss, "loss/discriminator": d_loss,
      "grad_norm/generator": optax.tree.norm(g_grads),
      "grad_norm/discriminator": optax.tree.norm(d_grads),
  })
  return state.replace(generator=generator, discriminator=discriminator,
                       generator_opt=generator_opt,
                       discriminator_opt=discriminator_opt), metrics


def reconstruction_step(state: VAETrainState, batch, *, spec: VAETrainSpec, loss_weights,
                        rng):
  """A warm-up step (`vae.adversarial_start`): the generator on its weighted mel, KL,
  waveform and mel magnitude terms only; the discriminator is neither run nor updated (its
  Adam state neither). The adversarial and feature-matching terms are logged as 0."""
  x, stem = batch[pipeline.AUDIO], batch[pipeline.STEM]

  def objective(generator):
    recon, mean, logvar = reconstruct_stem(spec.vae, generator, x, stem, rng,
                                           one_stem=spec.stem_batches)
    terms = {**vae_losses.mel_loss_terms(recon, x),
             "feature_matching": jnp.zeros((), jnp.float32),
             "adversarial": jnp.zeros((), jnp.float32),
             "kl": source_vae.kl_divergence(mean, logvar),
             "waveform": vae_losses.waveform_l1(recon, x)}
    return vae_losses.weighted_generator_loss(terms, loss_weights)

  (g_loss, terms), g_grads = jax.value_and_grad(objective, has_aux=True)(state.generator)
  generator, generator_opt = _update_generator(spec, state, g_grads, stem)
  metrics = {f"loss/{name}": value for name, value in terms.items()}
  metrics.update({
      "loss/generator": g_loss, "loss/discriminator": jnp.zeros((), jnp.float32),
      "grad_norm/generator": optax.tree.norm(g_grads),
      "grad_norm/discriminator": jnp.zeros((), jnp.float32),
  })
  return state.replace(generator=generator, generator_opt=generator_opt), metrics


def _with_step(step_fn):
  """A step function of the loop's form (state, batch) -> (state, metrics) from one of the
  updates above: the per-step key, the learning rate logged, the step counted."""
  def step(state: VAETrainState, batch, *, spec: VAETrainSpec, loss_weights, seed: int):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    # Per-stem weights (`vae.loss_weights_by_stem`) need one-stem batches: the trainer checks.
    loss_weights = vae_losses.weights_for_stem(loss_weights, batch[pipeline.STEM][0])
    new_state, metrics = step_fn(state, batch, spec=spec, loss_weights=loss_weights, rng=rng)
    metrics["learning_rate"] = spec.learning_rate(state.step)
    return new_state.replace(step=state.step + 1), metrics
  return step


# The reference's step, and the reconstruction-only step of a warm-up (`vae.adversarial_start`
# steps of it first; 0, the paper's setting, has none).
train_step = _with_step(adversarial_step)
warmup_step = _with_step(reconstruction_step)


def eval_step(generator, batch, *, spec: VAETrainSpec):
  """Per-window mel distance, SI-SDR and energies (real and reconstructed) of the
  posterior-mean reconstruction."""
  x, stem = batch[pipeline.AUDIO], batch[pipeline.STEM]
  recon, _, _ = reconstruct_stem(spec.vae, generator, x, stem)
  energy = lambda audio: jnp.sum(jnp.square(audio.astype(jnp.float32)), axis=-1)  # noqa: E731
  return {"mel_distance": vae_losses.multiscale_mel_distance(recon, x),
          "si_sdr": vae_losses.si_sdr(recon, x), "recon": recon,
          "energy_real": energy(x), "energy_reconstructed": energy(recon)}


def _programs(vae_config: ml_collections.ConfigDict, mixture: bool, window: int, mesh):
  """(spec, compiled init and steps, jitted eval step) of a VAE trainer."""
  spec = make_train_spec(vae_config, mixture)
  step_kwargs = dict(spec=spec, seed=int(vae_config.seed),
                     loss_weights=vae_losses.loss_weights_by_stem(
                         vae_config.loss_weights, vae_config.loss_weights_by_stem,
                         key="vae.loss_weights_by_stem"))
  compiled = loop.CompiledStep(
      functools.partial(init_state, spec, window=window),
      functools.partial(train_step, **step_kwargs), mesh, vae_config.sharding,
      warmup=(int(vae_config.adversarial_start), functools.partial(warmup_step, **step_kwargs)))
  evaluate = jax.jit(functools.partial(eval_step, spec=spec),
                     in_shardings=(compiled.state_shardings.generator,
                                   mesh_lib.batch_sharding(mesh)),
                     out_shardings=mesh_lib.replicated(mesh))
  return spec, compiled, evaluate


class VAETrainer:
  """The SourceVAE's state, step and hooks for `loop.train`; `train()` runs the loop.

  Tests and notebooks use its pieces (`compiled.step`, `initial_state`, `evaluate`) directly.
  """
  name = "train_vae"
  settings_key = "vae.model"  # the model record's settings, as config keys
  finite_metrics = ("loss/generator", "loss/discriminator", "loss/mel", "loss/kl",
                    "loss/adversarial", "loss/feature_matching")

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.config, self.workdir = config, workdir
    self.vae_config = config.vae
    self.train_config = config.vae.train
    self.mesh = mesh or mesh_lib.make_mesh()
    # Before any compilation: a batch the devices cannot split is an error naming its key.
    mesh_lib.local_batch_size(int(self.vae_config.batch_size), self.mesh, "vae.batch_size")
    if int(self.train_config.eval_every) > 0:
      mesh_lib.local_batch_size(int(self.train_config.eval_batch_size), self.mesh,
                                "vae.train.eval_batch_size")
    # MixLDM's VAE: the same stage on mixture windows (its metrics are the source "mix").
    self.sources = paper_config.latent_sources(config)
    self.mixture = self.sources == (stems_lib.MIXTURE,)
    self.window = pipeline.vae_window_spec(config.data, train=True).window
    self.stage_dir = workdir_layout.trainer_dir(workdir, workdir_layout.VAE)
    by_stem = self.vae_config.loss_weights_by_stem
    if by_stem and not one_stem_batches(self.vae_config, self.mixture):
      raise ValueError(
          f"config key vae.loss_weights_by_stem ({', '.join(by_stem)}) weighs a batch by its "
          "stem, so it needs one-stem batches: vae.model.per_source=True, and not the "
          "mixture VAE (system mixldm)")
    warmup_steps = int(self.vae_config.adversarial_start)
    if warmup_steps < 0:
      raise ValueError(f"config key vae.adversarial_start={warmup_steps} must be >= 0")
    # Everything the programs read: vae's settings but its train section, the window, the
    # mixture flag and the mesh (`loop.reuse_programs`).
    self.spec, self.compiled, self._eval_step = loop.reuse_programs(
        (self.name, loop.settings_key(self.vae_config), self.window, self.mixture, self.mesh),
        functools.partial(_programs, self.vae_config, self.mixture, self.window, self.mesh))

  def initial_state(self) -> VAETrainState:
    return self.compiled.init(jax.random.key(int(self.vae_config.seed)))

  def model_record(self) -> dict:
    return loading.vae_record(self.spec.vae)

  def _dataset_dir(self) -> str:
    path = workdir_layout.dataset_dir(self.config, self.workdir)
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no built dataset at {path}: run --mode=data first")
    return path

  def train_inputs(self, position=None) -> input_iterator.InputIterator:
    dataset_fn = functools.partial(
        pipeline.vae_windows, self._dataset_dir(), "train", data_config=self.config.data,
        batch_size=self.vae_config.batch_size, train=True, seed=self.config.data.seed,
        mixture=self.mixture, stem_batches=self.spec.stem_batches)
    return input_iterator.InputIterator(dataset_fn, mesh=self.mesh, position=position)

  def summarize(self, steps) -> dict[str, float]:
    return loop.mean_of_scalars(steps)

  def periodic(self, step: int, state: VAETrainState, writer) -> dict[str, float]:
    if loop.every(step, int(self.train_config.eval_every), int(self.train_config.num_steps)):
      return self.evaluate(state, writer, step)
    return {}

  def finish(self, records):
    curves = {}
    for name in ("loss/mel", "loss/generator", "loss/discriminator"):
      points = [(r["step"], r[name]) for r in records if name in r]
      if points:
        curves[name] = tuple(zip(*points))
    if curves:
      plotting.save_curves(os.path.join(self.stage_dir, "losses.png"), curves)

  def evaluate(self, state: VAETrainState, writer=None, step: int = 0) -> dict:
    """Mel distance, SI-SDR and level change per stem (or of the mixture) over the first
    `eval_batches` validation batches. The level change is the reconstructions' pooled
    energy over the real windows', in dB: both other measures ignore gain, and a decoder
    that plays a stem quiet makes every generated piece's stem quiet."""
    train = self.train_config
    dataset_fn = functools.partial(
        pipeline.vae_windows, self._dataset_dir(), "validation", data_config=self.config.data,
        batch_size=train.eval_batch_size, train=False, mixture=self.mixture)
    inputs = input_iterator.InputIterator(dataset_fn, mesh=self.mesh, num_epochs=1)
    sums = {}
    examples = None
    for index, batch in enumerate(inputs):
      if index >= train.eval_batches:
        break
      out = jax.device_get(self._eval_step(state.generator, batch))
      valid = np.asarray(batch[pipeline.VALID])
      stem = np.asarray(batch[pipeline.STEM])
      for name in ("mel_distance", "si_sdr", "energy_real", "energy_reconstructed"):
        for s, stem_name in enumerate(self.sources):
          rows = valid & (stem == s)
          if rows.any():
            total, count = sums.get((name, stem_name), (0.0, 0))
            sums[(name, stem_name)] = (total + float(out[name][rows].sum()),
                                       count + int(rows.sum()))
      if examples is None:
        examples = (np.asarray(batch[pipeline.AUDIO])[valid][:2], out["recon"][valid][:2])
    metrics = {f"eval/{name}/{stem_name}": total / count
               for (name, stem_name), (total, count) in sums.items()
               if not name.startswith("energy_")}
    for stem_name in self.sources:
      real, _ = sums.get(("energy_real", stem_name), (0.0, 0))
      if real > 0:
        reconstructed, _ = sums[("energy_reconstructed", stem_name)]
        metrics[f"eval/level_change_db/{stem_name}"] = float(
            10.0 * np.log10(max(reconstructed, 1e-30) / real))
    for name in ("mel_distance", "si_sdr"):
      per_stem = [v for k, v in metrics.items() if k.startswith(f"eval/{name}/")]
      if per_stem:
        metrics[f"eval/{name}"] = float(np.mean(per_stem))
    if writer is not None and examples is not None and len(examples[0]):
      real, recon = examples
      writer.audio(step, "eval/reconstruction", recon, stems_lib.SAMPLE_RATE)
      writer.audio(step, "eval/original", real, stems_lib.SAMPLE_RATE)
      writer.images(step, "eval/spectrograms", plotting.spectrogram_image(
          {"original": real[0], "reconstruction": recon[0]}, stems_lib.SAMPLE_RATE)[None])
    return metrics

  def train(self) -> dict:
    return loop.train(self)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=train_vae` stage: trains (or resumes) the SourceVAE in WORKDIR/vae."""
  return VAETrainer(config, workdir).train()
