r"""Stage three: the latent diffusion model (`--mode=train_ldm`), reference §5.

  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=train_ldm

A denoiser network (`config.ldm.denoiser`: the diffusion transformer `models/dit.py`, or the
release's U-Net `models/unet1d.py`; see `models/denoisers.py`) learns the joint latents of
the latent store (`latents/store.py`, made by `--mode=encode_latents`) under EDM
preconditioning (`diffusion/edm.py`) with σ_data = `config.ldm.sigma_data`. Each step is one
pure, jitted function with the whole state donated:
  1. σ per example from `edm.sample_sigma` (Uniform(0, sigma_max_train] with a floor, the
     release's choice, or log-normal by config) and standard normal noise, both from the key
     fold_in(key(seed), step), so a resumed run draws what the uninterrupted one drew;
  2. the loss: `edm.training_loss` (the stable MSE-on-F form) per example, mean over the batch;
  3. AdamW (linear warmup to a constant rate, gradients clipped by global norm) and an EMA of
     the parameters in float32, in one pass over the parameters (`fused_adamw.py`: the
     update is memory-bound, and optax's chain takes several).
Latents are used as stored (the reference does no normalisation) unless
`config.ldm.latent_scale='per_source'`: then each source's latents are divided by its scale
from the manifest's train-split statistics (`joint_latent.source_scales`: RMS σ_data), which
the denoiser's record keeps ("latents"/"scale") so that generation undoes it before decoding.

Precision: parameters, EMA and optimizer state in float32; the network computes in
its settings' `dtype` (bfloat16 for the paper sizes), the loss in float32.

The network's input width: its settings' `in_channels` (`ldm.model.in_channels` for the DiT,
`ldm.unet.in_channels` for the U-Net) = 0 takes the latent store's
stems × latent_dim (so a run on an imported 80-channel VAE's latents needs no override); a
non-zero value must equal it.

Parallelism: one mesh, batches split over its data axis; the state is replicated or FSDP
(`config.ldm.sharding`), decided from shapes by `parallel/sharding.py`. The loop, checkpoints
and metrics are `training/loop.py`'s, shared with the VAE trainer.

Outputs in WORKDIR/ldm: checkpoints/ (orbax: state, input position, and the model record:
the network's kind and config and the latents and VAE it learned; training resumes from the newest),
logs/ (TensorBoard: loss, loss per σ bucket, gradient norm, learning rate, steps/s, periodic
samples as audio and spectrograms), metrics.jsonl (one line per log step, kept consistent
across resumes), loss.png (at the end), latents.json (the latent store and VAE this run
learns; a resume against other latents is an error).

Periodic samples go through the same compiled program as `--mode=sample`
(`diffusion/generation_program.generate_batch`), decoded by the VAE that encoded the latents
(`models/loading.load_vae`, checked by parameter hash). Later stages load the trained network
with `models/loading.load_denoiser(WORKDIR)`.
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

from msldm_jax import atomic_files
from msldm_jax import joint_latent
from msldm_jax import paper_config
from msldm_jax import plotting
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.data import input_iterator
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import samplers
from msldm_jax.latents import store
from msldm_jax.models import denoisers
from msldm_jax.models import dit
from msldm_jax.models import loading
from msldm_jax.parallel import mesh as mesh_lib
from msldm_jax.training import fused_adamw
from msldm_jax.training import loop

LATENTS_RECORD = "latents.json"
LOSS_PLOT = "loss.png"

# Loss per noise level, in edm.SIGMA_BUCKET_EDGES' buckets.
SIGMA_BUCKET_EDGES = edm.SIGMA_BUCKET_EDGES
SIGMA_BUCKET_NAMES = tuple(
    f"loss/sigma_bucket_{k}_{lo:.3g}-{hi:.3g}"
    for k, (lo, hi) in enumerate(zip(SIGMA_BUCKET_EDGES[:-1], SIGMA_BUCKET_EDGES[1:])))

# Folded into a step's key for its periodic sample, apart from the training draws.
_SAMPLE_STREAM = 0x5A4D


@flax.struct.dataclass
class LDMTrainState:
  step: jax.Array
  params: Any      # the denoiser's variables, {'params': ...}, float32
  ema_params: Any  # their exponential moving average, float32
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class LDMTrainSpec:
  """The static half of training: the network, optimizer and diffusion settings."""
  model: Any  # The denoiser network (models/denoisers.py).
  optimizer: fused_adamw.FusedAdamW  # AdamW, clipping and the EMA update in one pass
  learning_rate: optax.Schedule
  sigma_data: float
  sigma_distribution: str
  sigma_max_train: float
  p_mean: float
  p_std: float
  # Per source, what its stored latents are divided by (`ldm.latent_scale`); () for none.
  latent_scale: tuple[float, ...] = ()


def learning_rate_schedule(learning_rate: float, warmup_steps: int) -> optax.Schedule:
  """Linear warmup to `learning_rate` over `warmup_steps` updates, then constant.

  The first update already gets learning_rate / warmup_steps (not 0, which would waste it).
  """
  warmup_steps = int(warmup_steps)
  if warmup_steps <= 1:
    return optax.constant_schedule(learning_rate)
  return optax.linear_schedule(learning_rate / warmup_steps, learning_rate, warmup_steps - 1)


def make_train_spec(ldm_config: ml_collections.ConfigDict,
                    model_config: ml_collections.ConfigDict | None = None,
                    independent_stems: int = 0,
                    latent_scale: tuple[float, ...] = ()) -> LDMTrainSpec:
  """The network (from `model_config`, default the settings `ldm_config` selects; ISLDM's
  per-stem networks when independent_stems > 0), optimiser and settings; `latent_scale`
  from `latent_scale_for`."""
  kind, selected = denoisers.selected(ldm_config)
  model_config = selected if model_config is None else model_config
  optim = ldm_config.optimizer
  learning_rate = learning_rate_schedule(float(optim.learning_rate), optim.warmup_steps)
  if not 0.0 <= ldm_config.ema_decay < 1.0:
    raise ValueError(f"config key ldm.ema_decay={ldm_config.ema_decay} must be in [0, 1)")
  optimizer = fused_adamw.FusedAdamW(
      learning_rate, b1=float(optim.b1), b2=float(optim.b2),
      weight_decay=float(optim.weight_decay), clip=float(optim.clip),
      ema_decay=float(ldm_config.ema_decay))
  if kind == "dit":
    _warn_of_width_bottleneck(model_config, independent_stems)
  return LDMTrainSpec(
      model=denoisers.build(kind, model_config, independent_stems), optimizer=optimizer,
      learning_rate=learning_rate,
      sigma_data=float(ldm_config.sigma_data),
      sigma_distribution=str(ldm_config.sigma_distribution),
      sigma_max_train=float(ldm_config.sigma_max_train), p_mean=float(ldm_config.p_mean),
      p_std=float(ldm_config.p_std), latent_scale=tuple(latent_scale))


def latent_scale_for(ldm_config: ml_collections.ConfigDict, manifest: dict,
                     latents_dir: str) -> tuple[float, ...]:
  """Per source, the divisor of its stored latents that `ldm.latent_scale` asks for (() for
  'none'), from the latent store's train-split statistics."""
  mode = str(ldm_config.get("latent_scale", "none"))
  if mode not in joint_latent.LATENT_SCALES:
    raise ValueError(f"config key ldm.latent_scale={mode!r}: one of "
                     f"{', '.join(joint_latent.LATENT_SCALES)}")
  if mode == "none":
    return ()
  statistics = manifest.get("statistics")
  if not statistics:
    raise ValueError(f"config key ldm.latent_scale={mode!r} needs the train split's "
                     f"statistics, but the latent store at {latents_dir} has none (no train "
                     "split?)")
  try:
    return joint_latent.source_scales(statistics["mean"], statistics["std"],
                                      int(manifest["shape"][0]), float(ldm_config.sigma_data))
  except ValueError as e:
    raise ValueError(f"the latent store at {latents_dir}: {e}") from None


def init_state(spec: LDMTrainSpec, rng: jax.Array, num_frames: int) -> LDMTrainState:
  """Fresh parameters (the denoisers' shapes do not depend on num_frames), EMA = parameters."""
  model = spec.model
  x = jnp.zeros((1, model.in_channels, num_frames), jnp.float32)
  params = model.init(rng, x, jnp.zeros((1,), jnp.float32))
  params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  return LDMTrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=jax.tree.map(jnp.copy, params),
                       opt_state=spec.optimizer.init(params))


def sigma_buckets(sigma: jax.Array) -> jax.Array:
  """Index in SIGMA_BUCKET_EDGES' buckets of each σ; outer buckets are open-ended."""
  inner = jnp.asarray(SIGMA_BUCKET_EDGES[1:-1], jnp.float32)
  return jnp.searchsorted(inner, sigma, side="right")


def train_step(state: LDMTrainState, batch, *, spec: LDMTrainSpec, seed: int):
  """One AdamW update on the EDM loss of a batch of stem-major latents [b, S, D, T]."""
  x = joint_latent.stack_sources(joint_latent.unscale_sources(
      batch[store.LATENTS].astype(jnp.float32), spec.latent_scale))
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  sigma_key, noise_key = jax.random.split(rng)
  sigma = edm.sample_sigma(sigma_key, (x.shape[0],), distribution=spec.sigma_distribution,
                           sigma_max=spec.sigma_max_train, p_mean=spec.p_mean,
                           p_std=spec.p_std)
  noise = jax.random.normal(noise_key, x.shape, jnp.float32)

  def objective(params):
    per_example = edm.training_loss(spec.model.apply, params, x, sigma, noise,
                                    sigma_data=spec.sigma_data)
    return jnp.mean(per_example), per_example

  (loss, per_example), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  params, ema_params, opt_state, grad_norm = spec.optimizer.apply(
      grads, state.opt_state, state.params, state.ema_params)
  buckets = jax.nn.one_hot(sigma_buckets(sigma), len(SIGMA_BUCKET_NAMES), dtype=jnp.float32)
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": spec.learning_rate(state.step),
      # Sums and counts, not means: buckets are empty in many steps, and the host averages
      # them over each logging interval.
      "sigma_bucket_sum": buckets.T @ per_example,
      "sigma_bucket_count": buckets.sum(axis=0),
  }
  new_state = LDMTrainState(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, metrics


def _warn_of_width_bottleneck(model_config: ml_collections.ConfigDict, independent_stems: int):
  """Logs the floor a DiT narrower than its patches puts under its loss (models/dit.py)."""
  per_network = ml_collections.ConfigDict(model_config.to_dict())
  # ISLDM's networks and the stem-coupled DiT's streams each see one stem's channels.
  networks = independent_stems or int(per_network.get("stem_streams", 0))
  if networks and int(per_network.in_channels):
    per_network.in_channels = int(per_network.in_channels) // networks
  share = dit.width_bottleneck(per_network) if int(per_network.in_channels) else 0.0
  if share > 0 and not per_network.get("patch_skip", False):
    features = int(per_network.patch_size) * int(per_network.in_channels)
    logging.warning(
        "ldm.model: the DiT's width %d holds %.0f%% of a patch's %d features (patch_size %d "
        "x %d channels), so its loss at σ cannot fall below %.2f·σ_data²/(σ² + σ_data²) "
        "(the noise it cannot see stays in its output); ldm.model.patch_skip=True or a "
        "width of %d lifts that floor", int(per_network.width), 100 * (1 - share), features,
        int(per_network.patch_size), int(per_network.in_channels), share, features)


def model_config_for_latents(ldm_config: ml_collections.ConfigDict, manifest: dict,
                             latents_dir: str) -> ml_collections.ConfigDict:
  """The selected denoiser's settings with in_channels resolved from (and checked against)
  the latent store."""
  kind, selected = denoisers.selected(ldm_config)
  key = denoisers.config_key(kind)
  num_stems, latent_dim, frames = manifest["shape"]
  channels = num_stems * latent_dim
  config = ml_collections.ConfigDict(selected.to_dict())
  if int(config.in_channels) == 0:
    config.in_channels = channels
  elif int(config.in_channels) != channels:
    raise ValueError(
        f"config key {key}.in_channels={config.in_channels}, but the latent store at "
        f"{latents_dir} holds {num_stems} stems x {latent_dim} channels = {channels} (set it "
        "to 0 to take the store's)")
  streams = int(config.get("stem_streams", 0))
  if streams and streams != num_stems:
    raise ValueError(
        f"config key {key}.stem_streams={streams}, but the latent store at {latents_dir} "
        f"holds {num_stems} source(s): one stream per stem (0 for the DiT on the joint "
        "latent)")
  multiple = denoisers.build(kind, config).frame_multiple
  if frames % multiple:
    raise ValueError(
        f"the latent store at {latents_dir} has {frames} frames per chunk, not a multiple of "
        f"{multiple}, which the {kind} of config key {key} needs (the DiT's patch_size, the "
        "U-Net's patch_factor times its down factors): choose data.chunks.samples so that it "
        "is")
  return config


# ldm's settings that no compiled program reads: the loop's, and paths to what it loads.
_NOT_IN_PROGRAMS = ("train", "latents_dir", "vae_checkpoint", "denoiser_checkpoint")


def _programs(ldm_config: ml_collections.ConfigDict, model_config: ml_collections.ConfigDict,
              independent_stems: int, latent_scale: tuple[float, ...], mesh):
  """(spec, compiled init and step) of a diffusion trainer."""
  spec = make_train_spec(ldm_config, model_config, independent_stems, latent_scale)
  compiled = loop.CompiledStep(
      functools.partial(init_state, spec, num_frames=spec.model.frame_multiple),
      functools.partial(train_step, spec=spec, seed=int(ldm_config.seed)),
      mesh, ldm_config.sharding)
  return spec, compiled


class LDMTrainer:
  """The diffusion model's state, step and hooks for `loop.train`; `train()` runs the loop.

  Built on a complete latent store (`config.ldm.latents_dir`, else WORKDIR/latents): its
  shape decides the network's input width. Tests and notebooks use its pieces
  (`compiled.step`, `initial_state`, `train_inputs`) directly.
  """
  name = "train_ldm"
  finite_metrics = ("loss", "grad_norm")

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh=None):
    self.config, self.workdir = config, workdir
    self.ldm_config = config.ldm
    self.train_config = config.ldm.train
    self.mesh = mesh or mesh_lib.make_mesh()
    # Before any compilation: a batch the devices cannot split is an error naming its key.
    mesh_lib.local_batch_size(int(self.ldm_config.batch_size), self.mesh, "ldm.batch_size")
    self.stage_dir = workdir_layout.trainer_dir(workdir, workdir_layout.LDM)
    self.latents_dir = workdir_layout.latents_dir(config, workdir)
    self.manifest = store.load_manifest(self.latents_dir)
    self.denoiser_kind, _ = denoisers.selected(self.ldm_config)
    self.settings_key = denoisers.config_key(self.denoiser_kind)  # "ldm.model": in errors
    self.model_config = model_config_for_latents(self.ldm_config, self.manifest,
                                                 self.latents_dir)
    # ISLDM: one network per stem of the store.
    self.independent_stems = (int(self.manifest["shape"][0])
                              if paper_config.check_system(config) == "isldm" else 0)
    # What the store's latent stacks: the four stems, or the mixture (MixLDM's store).
    self.sources = list(self.manifest["settings"].get("stems", stems_lib.STEM_NAMES))
    if tuple(self.sources) != paper_config.latent_sources(config):
      raise ValueError(f"config key system={paper_config.check_system(config)!r} trains "
                       f"on latents of {paper_config.latent_sources(config)}, but the store at "
                       f"{self.latents_dir} holds {tuple(self.sources)}")
    self.latent_scale = latent_scale_for(self.ldm_config, self.manifest, self.latents_dir)
    # Everything the programs read: ldm's settings but its train section and paths (the
    # store's shapes and scale count instead), the network's settings resolved against the
    # store, ISLDM's stems, the scale and the mesh (`loop.reuse_programs`).
    self.spec, self.compiled = loop.reuse_programs(
        (self.name, loop.settings_key(self.ldm_config, leave_out=_NOT_IN_PROGRAMS),
         loop.settings_key(self.model_config, leave_out=()), self.independent_stems,
         tuple(self.latent_scale), self.mesh),
        functools.partial(_programs, self.ldm_config, self.model_config,
                          self.independent_stems, self.latent_scale, self.mesh))
    self._buckets = _BucketMeans()
    self._generate = None

  def initial_state(self) -> LDMTrainState:
    return self.compiled.init(jax.random.key(int(self.ldm_config.seed)))

  def latents_record(self) -> dict:
    manifest = self.manifest
    return {"latents_dir": os.path.abspath(self.latents_dir), "vae": manifest["vae"],
            "shape": manifest["shape"], "sources": self.sources,
            "scale": list(self.latent_scale)}

  def model_record(self) -> dict:
    return loading.denoiser_record(self.denoiser_kind, self.model_config,
                                   independent_stems=self.independent_stems,
                                   latents=self.latents_record())

  def train_inputs(self, position=None) -> input_iterator.InputIterator:
    dataset_fn = functools.partial(
        store.latent_batches, self.latents_dir, "train", batch_size=self.ldm_config.batch_size,
        train=True, seed=int(self.ldm_config.seed))
    return input_iterator.InputIterator(dataset_fn, mesh=self.mesh, position=position)

  def check_latents(self):
    """The store is the one this run started on (WORKDIR/ldm/latents.json), else an error."""
    record = {**self.latents_record(), "statistics": self.manifest["statistics"]}
    path = os.path.join(self.stage_dir, LATENTS_RECORD)
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      # A record from before latent scales had none: the latents as stored.
      old.setdefault("scale", [])
      for key in ("vae", "shape", "scale"):
        if old[key] != record[key]:
          raise ValueError(
              f"{path}: this run was trained on latents with {key}={old[key]!r}, but "
              f"{self.latents_dir} now gives {key}={record[key]!r} (ldm.latent_scale "
              f"{self.ldm_config.get('latent_scale', 'none')!r} for the scale): use a new "
              "workdir (or delete WORKDIR/ldm) to train on the new latents")
    elif jax.process_index() == 0:
      os.makedirs(self.stage_dir, exist_ok=True)
      atomic_files.write_json_atomic(path, record)

  def _make_generate(self):
    """(ema_params, key) -> one piece's stems [S, samples], by generation's own program."""
    recorded = self.manifest["vae"]
    vae = loading.load_vae(recorded.get("checkpoint_dir") or "", mesh=self.mesh)
    loading.check_same_vae(vae, recorded, what=f"the latent store at {self.latents_dir}")
    frames = self.manifest["shape"][-1]
    spec = generation_program.GenerationSpec(
        vae=vae.module, denoiser=self.spec.model, num_frames=int(frames),
        sampler_name=samplers.DEFAULT_SAMPLER,
        sampler_settings=(("num_steps", int(self.train_config.sample_steps)),),
        sigma_data=self.spec.sigma_data, generate_stems=tuple(self.sources),
        sources=tuple(self.sources), latent_scale=self.latent_scale)

    def generate(ema_params, key):
      _, waveforms = generation_program.generate_batch(vae.params, ema_params, key[None],
                                                       spec=spec)
      return waveforms[0]

    return generate

  def summarize(self, steps) -> dict[str, float]:
    for _, metrics in steps:
      self._buckets.add(metrics["sigma_bucket_sum"], metrics["sigma_bucket_count"])
    scalars = loop.mean_of_scalars(steps)
    scalars.update(self._buckets.pop())
    return scalars

  def periodic(self, step: int, state: LDMTrainState, writer) -> dict[str, float]:
    if loop.every(step, int(self.train_config.sample_every), int(self.train_config.num_steps)):
      self.log_sample(state, step, writer)
    return {}

  def log_sample(self, state: LDMTrainState, step: int, writer):
    """One piece from the EMA parameters, decoded: audio of the mix and stems, a spectrogram."""
    if self._generate is None:
      self._generate = self._make_generate()
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(int(self.ldm_config.seed)),
                                                step), _SAMPLE_STREAM)
    waveforms = np.asarray(jax.device_get(self._generate(state.ema_params, key)))
    named = dict(zip(self.sources, waveforms))
    named[stems_lib.MIXTURE] = waveforms.sum(axis=0)
    for name, waveform in named.items():
      writer.audio(step, f"samples/{name}", waveform[None], stems_lib.SAMPLE_RATE)
    writer.images(step, "samples/spectrogram", plotting.spectrogram_image(
        named, stems_lib.SAMPLE_RATE, title=f"step {step}")[None])
    logging.info("train_ldm step %d: logged a sample (peak %.3f)", step,
                 float(np.abs(named["mix"]).max()))

  def finish(self, records):
    curves = {}
    points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    if points:
      curves["loss"] = tuple(zip(*points))
    for name in SIGMA_BUCKET_NAMES:
      points = [(r["step"], r[name]) for r in records if name in r]
      if points:
        curves[name.removeprefix("loss/")] = tuple(zip(*points))
    if curves:
      plotting.save_curves(os.path.join(self.stage_dir, LOSS_PLOT), curves)

  def train(self) -> dict:
    self.check_latents()
    if int(self.train_config.sample_every) > 0:
      # Before the first step: a wrong VAE fails now, not after hours of training.
      self._generate = self._make_generate()
    return loop.train(self)


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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=train_ldm` stage: trains (or resumes) the diffusion model in WORKDIR/ldm."""
  return LDMTrainer(config, workdir).train()
