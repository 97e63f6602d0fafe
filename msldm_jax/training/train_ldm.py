r"""Stage three: the latent diffusion model (`--mode=train_ldm`), reference §5.

  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=train_ldm

A diffusion transformer (`models/dit.py`) learns the joint latents of the latent store
(`latents/store.py`, made by `--mode=encode_latents`) under EDM preconditioning
(`diffusion/edm.py`) with σ_data = `config.ldm.sigma_data`. Each step is one pure, jitted
function with the whole state donated:
  1. σ per example from `edm.sample_sigma` (Uniform(0, sigma_max_train] with a floor, the
     release's choice, or log-normal by config) and standard normal noise, both from the key
     fold_in(key(seed), step), so a resumed run draws what the uninterrupted one drew;
  2. the loss: `edm.training_loss` (the stable MSE-on-F form) per example, mean over the batch;
  3. AdamW (linear warmup to a constant rate, gradients clipped by global norm) and an EMA of
     the parameters in float32.
Latents are used as stored (the reference does no normalisation); the manifest's per-channel
statistics are there for inspection.

Precision: parameters, EMA and optimizer state in float32; the DiT computes in
`config.ldm.model.dtype` (bfloat16 for the paper sizes), the loss in float32.

Parallelism: one mesh, batches split over its data axis; the state is replicated or FSDP
(`config.ldm.sharding`), decided from shapes by `parallel/sharding.py`.

Outputs in WORKDIR/ldm: checkpoints/ (orbax: state + input position; training resumes from the
newest), logs/ (TensorBoard: loss, loss per σ bucket, gradient norm, learning rate, steps/s,
periodic samples as audio and spectrograms), metrics.jsonl (the logged scalars, one line per
log step, kept consistent across resumes), loss.png (at the end), latents.json (the latent
store and VAE this run learns; a resume against other latents is an error).

`load_denoiser` gives the generation stage the trained network.
"""

import dataclasses
import functools
import json
import os
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from msldm_jax import joint_latent
from msldm_jax import plotting
from msldm_jax import stems as stems_lib
from msldm_jax.data import pipeline
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import samplers
from msldm_jax.generation import sampling
from msldm_jax.latents import encode
from msldm_jax.latents import store
from msldm_jax.models import dit
from msldm_jax.models import source_vae
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.parallel import sharding
from msldm_jax.training import checkpointing
from msldm_jax.training import metric_writer
from msldm_jax.training import train_vae

LDM_FOLDER = "ldm"
LATENTS_RECORD = "latents.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"

# Loss per noise level: 6 log-spaced buckets over the sampler's range [σ_min, σ_max] =
# [0.01, 3]; the outer buckets also take σ below 0.01 (uniform training draws down to the
# floor) and above 3 (log-normal draws).
SIGMA_BUCKET_EDGES = tuple(float(e) for e in np.geomspace(0.01, 3.0, 7))
SIGMA_BUCKET_NAMES = tuple(
    f"loss/sigma_bucket_{k}_{lo:.3g}-{hi:.3g}"
    for k, (lo, hi) in enumerate(zip(SIGMA_BUCKET_EDGES[:-1], SIGMA_BUCKET_EDGES[1:])))

# Folded into a step's key for its periodic sample, apart from the training draws.
_SAMPLE_STREAM = 0x5A4D


@flax.struct.dataclass
class LDMTrainState:
  step: jax.Array
  params: Any      # the DiT's variables, {'params': ...}, float32
  ema_params: Any  # their exponential moving average, float32
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LDMModels:
  """The static half of training: the network, optimizer and diffusion settings."""
  model: dit.DiT
  tx: optax.GradientTransformation
  learning_rate: optax.Schedule
  sigma_data: float
  sigma_distribution: str
  sigma_max_train: float
  p_mean: float
  p_std: float
  ema_decay: float


def learning_rate_schedule(learning_rate: float, warmup_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps` updates, then constant.

  The first update already gets learning_rate / warmup_steps (not 0, which would waste it).
  """
  warmup_steps = int(warmup_steps)
  if warmup_steps <= 1:
    return optax.constant_schedule(learning_rate)
  return optax.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps - 1)


def make_models(ldm_config: ml_collections.ConfigDict) -> LDMModels:
  optim = ldm_config.optimizer
  learning_rate = learning_rate_schedule(float(optim.learning_rate), optim.warmup_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(float(optim.clip)),
      optax.adamw(learning_rate, b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay))
  if not 0.0 <= ldm_config.ema_decay < 1.0:
    raise ValueError(f"config key ldm.ema_decay={ldm_config.ema_decay} must be in [0, 1)")
  return LDMModels(
      model=dit.build_model(ldm_config.model), tx=tx, learning_rate=learning_rate,
      sigma_data=float(ldm_config.sigma_data),
      sigma_distribution=str(ldm_config.sigma_distribution),
      sigma_max_train=float(ldm_config.sigma_max_train), p_mean=float(ldm_config.p_mean),
      p_std=float(ldm_config.p_std), ema_decay=float(ldm_config.ema_decay))


def init_state(models: LDMModels, rng: jax.Array, num_frames: int) -> LDMTrainState:
  """Fresh parameters (the DiT's shapes do not depend on num_frames), EMA = parameters."""
  model = models.model
  x = jnp.zeros((1, model.in_channels, num_frames), jnp.float32)
  params = model.init(rng, x, jnp.zeros((1,), jnp.float32))
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  return LDMTrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=jax.tree.map(jnp.copy, params),
                       opt_state=models.tx.init(params))


def ema_update(ema_params, params, decay: float):
  """ema ← decay·ema + (1 − decay)·params, in float32."""
  return jax.tree.map(
      lambda e, p: decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32),
      ema_params, params)


def sigma_buckets(sigma: jax.Array) -> jax.Array:
  """Index in SIGMA_BUCKET_EDGES' buckets of each σ; outer buckets are open-ended."""
  inner = jnp.asarray(SIGMA_BUCKET_EDGES[1:-1], jnp.float32)
  return jnp.searchsorted(inner, sigma, side="right")


def train_step(state: LDMTrainState, batch, *, models: LDMModels, seed: int):
  """One AdamW update on the EDM loss of a batch of stem-major latents [b, S, D, T]."""
  x = joint_latent.stack_sources(batch[store.LATENTS].astype(jnp.float32))
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  sigma_key, noise_key = jax.random.split(rng)
  sigma = edm.sample_sigma(sigma_key, (x.shape[0],), distribution=models.sigma_distribution,
                           sigma_max=models.sigma_max_train, p_mean=models.p_mean,
                           p_std=models.p_std)
  noise = jax.random.normal(noise_key, x.shape, jnp.float32)

  def objective(params):
    per_example = edm.training_loss(models.model.apply, params, x, sigma, noise,
                                    sigma_data=models.sigma_data)
    return jnp.mean(per_example), per_example

  (loss, per_example), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = models.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  buckets = jax.nn.one_hot(sigma_buckets(sigma), len(SIGMA_BUCKET_NAMES), dtype=jnp.float32)
  metrics = {
      "loss": loss,
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": models.learning_rate(state.step),
      # Sums and counts, not means: buckets are empty in many steps, and the host averages
      # them over each logging interval.
      "sigma_bucket_sum": buckets.T @ per_example,
      "sigma_bucket_count": buckets.sum(axis=0),
  }
  new_state = LDMTrainState(step=state.step + 1, params=params,
                            ema_params=ema_update(state.ema_params, params, models.ema_decay),
                            opt_state=opt_state)
  return new_state, metrics


class _MetricsLog:
  """metrics.jsonl: one JSON line per log step, truncated to the resumed step on restart."""

  def __init__(self, path: str, start_step: int):
    self.path = path
    self.records = []
    self._writer = jax.process_index() == 0
    if os.path.exists(path):
      with open(path) as f:
        self.records = [r for r in map(json.loads, filter(str.strip, f))
                        if r["step"] <= start_step]
    if self._writer:
      # Lines past the checkpoint are the interrupted run's, which this run redoes.
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in self.records)
      os.replace(tmp, path)

  def append(self, record: dict):
    self.records.append(record)
    if self._writer:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")


class LDMTrainer:
  """Builds the jitted step, state and checkpoints for a config; `train()` runs the loop.

  Tests and notebooks use its pieces (`step`, `initial_state`, `train_inputs`) directly.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.config, self.workdir = config, workdir
    self.ldm_config = config.ldm
    self.mesh = mesh or mesh_lib.make_mesh()
    self.models = make_models(self.ldm_config)
    self.stage_dir = os.path.join(workdir, LDM_FOLDER)
    self.latents_dir = encode.latents_dir(config, workdir)

    init = functools.partial(init_state, self.models,
                             num_frames=self.models.model.patch_size)
    abstract = jax.eval_shape(init, jax.random.key(0))
    self.state_shardings = sharding.state_shardings(abstract, self.mesh,
                                                    self.ldm_config.sharding)
    self.abstract_state = checkpointing.abstract_with_shardings(abstract, self.state_shardings)
    self._init = jax.jit(init, out_shardings=self.state_shardings)
    self.step = jax.jit(
        functools.partial(train_step, models=self.models, seed=int(self.ldm_config.seed)),
        in_shardings=(self.state_shardings, mesh_lib.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, mesh_lib.replicated(self.mesh)),
        donate_argnums=(0,))
    self._generate = None

  def initial_state(self) -> LDMTrainState:
    return self._init(jax.random.key(int(self.ldm_config.seed)))

  def train_inputs(self, position=None) -> pipeline.InputIterator:
    dataset_fn = functools.partial(
        store.latent_batches, self.latents_dir, "train", batch_size=self.ldm_config.batch_size,
        train=True, seed=int(self.ldm_config.seed))
    return pipeline.InputIterator(dataset_fn, mesh=self.mesh, position=position)

  def check_latents(self, manifest: dict):
    """The store fits the model, and is the one this run started on (WORKDIR/ldm/latents.json)."""
    num_stems, latent_dim, frames = manifest["shape"]
    model = self.ldm_config.model
    if num_stems * latent_dim != model.in_channels:
      raise ValueError(
          f"config key ldm.model.in_channels={model.in_channels}, but the latent store at "
          f"{self.latents_dir} holds {num_stems} stems x {latent_dim} channels = "
          f"{num_stems * latent_dim}")
    if frames % model.patch_size:
      raise ValueError(
          f"the latent store at {self.latents_dir} has {frames} frames per chunk, not a "
          f"multiple of config key ldm.model.patch_size={model.patch_size}: choose "
          "data.chunks.samples so that it is")
    record = {"latents_dir": os.path.abspath(self.latents_dir), "vae": manifest["vae"],
              "shape": manifest["shape"], "statistics": manifest["statistics"]}
    path = os.path.join(self.stage_dir, LATENTS_RECORD)
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      for key in ("vae", "shape"):
        if old[key] != record[key]:
          raise ValueError(
              f"{path}: this run was trained on latents with {key}={old[key]!r}, but "
              f"{self.latents_dir} now holds {key}={record[key]!r}: use a new workdir (or "
              "delete WORKDIR/ldm) to train on the new latents")
    elif jax.process_index() == 0:
      os.makedirs(self.stage_dir, exist_ok=True)
      store.write_json_atomic(path, record)

  def _make_generate(self, manifest: dict):
    """jit(ema_params, vae_params, key) -> one piece's stems [S, samples], decoded."""
    vae_params, identity = train_vae.restore_generator(
        self.config, self.workdir, manifest["vae"]["checkpoint_dir"])
    digest = encode.params_sha256(vae_params)
    if digest != manifest["vae"]["params_sha256"]:
      raise ValueError(
          f"the VAE checkpoint {identity['checkpoint_dir']} step {identity['step']} (params "
          f"sha256 {digest}) is not the one that encoded {self.latents_dir} (sha256 "
          f"{manifest['vae']['params_sha256']}, step {manifest['vae']['step']}): samples would "
          "be decoded by the wrong VAE; set ldm.train.sample_every=0 or restore that VAE")
    vae = source_vae.SourceVAE.from_config(self.config.vae.model)
    settings = {"num_steps": int(self.ldm_config.train.sample_steps)}
    sampler = samplers.get_sampler(samplers.DEFAULT_SAMPLER, settings)
    num_stems, latent_dim, frames = manifest["shape"]
    shape = (1, num_stems * latent_dim, frames)
    model, sigma_data = self.models.model, self.models.sigma_data

    def generate(ema_params, vae_params, key):
      # Denoised as `--mode=sample` does (parameters cast, conditioning tabulated once).
      denoise_fn = sampling.sampling_denoise_fn(model, ema_params, samplers.DEFAULT_SAMPLER,
                                                settings, sigma_data=sigma_data)
      x = sampler(denoise_fn, key, shape)
      return vae.apply(vae_params, joint_latent.split_sources(x), method=vae.decode)[0]

    replicated = mesh_lib.replicated(self.mesh)
    generate = jax.jit(generate,
                       in_shardings=(self.state_shardings.ema_params, replicated, replicated),
                       out_shardings=replicated)
    vae_params = jax.device_put(vae_params, replicated)
    return lambda ema_params, key: generate(ema_params, vae_params, key)

  def log_sample(self, state: LDMTrainState, step: int, writer: metric_writer.MetricWriter):
    """One piece from the EMA parameters, decoded: audio of the mix and stems, a spectrogram."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(self.ldm_config.seed)),
                                                step), _SAMPLE_STREAM)
    waveforms = np.asarray(jax.device_get(self._generate(state.ema_params, key)))
    named = dict(zip(stems_lib.STEM_NAMES, waveforms))
    named["mix"] = waveforms.sum(axis=0)
    for name, waveform in named.items():
      writer.audio(step, f"samples/{name}", waveform[None], stems_lib.SAMPLE_RATE)
    writer.images(step, "samples/spectrogram", plotting.spectrogram_image(
        named, stems_lib.SAMPLE_RATE, title=f"step {step}")[None])
    logging.info("train_ldm step %d: logged a sample (peak %.3f)", step,
                 float(np.abs(named["mix"]).max()))

  def train(self) -> dict:
    train = self.ldm_config.train
    manifest = store.load_manifest(self.latents_dir)
    self.check_latents(manifest)
    manager = checkpointing.make_manager(os.path.join(self.stage_dir, "checkpoints"),
                                         max_to_keep=train.keep_checkpoints)
    try:
      return self._train(manager, manifest)
    finally:
      # Also on an error: an asynchronous save in flight must finish, so that the last
      # checkpoint is whole.
      manager.wait_until_finished()

  def _train(self, manager, manifest) -> dict:
    train = self.ldm_config.train
    restored = checkpointing.restore_latest(manager, self.abstract_state)
    if restored is None:
      state, position, start = self.initial_state(), None, 0
    else:
      state, position, start = restored
    inputs = self.train_inputs(position)
    writer = metric_writer.MetricWriter(os.path.join(self.stage_dir, "logs"))
    log = _MetricsLog(os.path.join(self.stage_dir, METRICS_FILE), start)
    progress = metric_writer.Progress(train.num_steps, start, train.log_every, "train_ldm")
    if train.sample_every > 0 and self._generate is None:
      self._generate = self._make_generate(manifest)
    buckets = _BucketMeans()
    pending = None  # (step, metrics) of the previous step, checked one step late so that
    # fetching it does not stall the device queue.
    final_metrics = {}
    for step in range(start + 1, train.num_steps + 1):
      batch = next(inputs)
      state, metrics = self.step(state, batch)
      if pending is not None:
        final_metrics = self._check_and_log(*pending, writer, progress, log, buckets)
      pending = (step, metrics)
      if step % train.checkpoint_every == 0 or step == train.num_steps:
        # Checked before saving: a non-finite step never reaches a checkpoint.
        final_metrics = self._check_and_log(*pending, writer, progress, log, buckets)
        pending = None
        checkpointing.save(manager, step, state, inputs.state())
      if train.sample_every > 0 and (step % train.sample_every == 0 or
                                     step == train.num_steps):
        self.log_sample(state, step, writer)
    if pending is not None:
      final_metrics = self._check_and_log(*pending, writer, progress, log, buckets)
    writer.flush()
    if log.records and jax.process_index() == 0:
      curves = {"loss": ([r["step"] for r in log.records], [r["loss"] for r in log.records])}
      for name in SIGMA_BUCKET_NAMES:
        points = [(r["step"], r[name]) for r in log.records if name in r]
        if points:
          curves[name.removeprefix("loss/")] = tuple(zip(*points))
      plotting.save_curves(os.path.join(self.stage_dir, LOSS_PLOT), curves)
    return final_metrics

  def _check_and_log(self, step, metrics, writer, progress, log, buckets):
    metrics = jax.device_get(metrics)
    scalars = {k: float(metrics[k]) for k in ("loss", "grad_norm", "learning_rate")}
    metric_writer.check_finite(step, {"loss": scalars["loss"],
                                      "grad_norm": scalars["grad_norm"]})
    buckets.add(metrics["sigma_bucket_sum"], metrics["sigma_bucket_count"])
    rate = progress.update(step)
    if rate is not None:
      scalars.update(buckets.pop())
      scalars["steps_per_second"] = rate
      writer.scalars(step, scalars)
      log.append({"step": step, **scalars})
    return scalars


class _BucketMeans:
  """Mean loss per σ bucket over the steps since the last log line (empty buckets left out)."""

  def __init__(self):
    self.sums = np.zeros(len(SIGMA_BUCKET_NAMES), np.float64)
    self.counts = np.zeros(len(SIGMA_BUCKET_NAMES), np.float64)

  def add(self, sums, counts):
    self.sums += np.asarray(sums, np.float64)
    self.counts += np.asarray(counts, np.float64)

  def pop(self) -> dict:
    means = {name: float(s / c) for name, s, c in zip(SIGMA_BUCKET_NAMES, self.sums,
                                                        self.counts) if c > 0}
    self.sums[:], self.counts[:] = 0.0, 0.0
    return means


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=train_ldm` stage: trains (or resumes) the diffusion model in WORKDIR/ldm."""
  return LDMTrainer(config, workdir).train()


def load_denoiser(config: ml_collections.ConfigDict, workdir: str,
                  use_ema: bool = True) -> tuple[dit.DiT, Any, dict]:
  """The trained denoiser network from the newest checkpoint in WORKDIR/ldm/checkpoints.

  Returns:
    (model, params, identity): the DiT module (F of the EDM denoiser; wrap it with
    `edm.make_denoise_fn(model.apply, params, sigma_data=config.ldm.sigma_data)`), its
    variables ({'params': ...}; the EMA when use_ema), replicated over all devices, and a
    record of where they came from: checkpoint_dir, step, use_ema, and under "latents" the
    latent store and VAE the run learned (WORKDIR/ldm/latents.json), when present.
  """
  models = make_models(config.ldm)
  abstract = jax.eval_shape(
      functools.partial(init_state, models, num_frames=models.model.patch_size),
      jax.random.key(0))
  mesh = mesh_lib.make_mesh()
  shardings = sharding.state_shardings(abstract, mesh, "replicate")
  stage_dir = os.path.join(workdir, LDM_FOLDER)
  checkpoint_dir = os.path.join(stage_dir, "checkpoints")
  if not os.path.isdir(checkpoint_dir):
    raise FileNotFoundError(f"no diffusion model checkpoint in {checkpoint_dir}: run "
                            "--mode=train_ldm first")
  manager = checkpointing.make_manager(checkpoint_dir)
  restored = checkpointing.restore_latest(
      manager, checkpointing.abstract_with_shardings(abstract, shardings))
  if restored is None:
    raise FileNotFoundError(f"no diffusion model checkpoint in {checkpoint_dir}: run "
                            "--mode=train_ldm first")
  state, _, step = restored
  identity = {"checkpoint_dir": os.path.abspath(checkpoint_dir), "step": int(step),
              "use_ema": bool(use_ema)}
  record_path = os.path.join(stage_dir, LATENTS_RECORD)
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    identity["latents"] = {k: record[k] for k in ("latents_dir", "vae", "shape")}
  return models.model, (state.ema_params if use_ema else state.params), identity
