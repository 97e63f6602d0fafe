r"""The embedded default: a mini Slakh rendered from music21's Bach chorales, on CPU.

The main job, every stage below in order (a stage finished under the same config is skipped
when run again; an unfinished one resumes), within 20 minutes on 2 CPU cores:
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=all

Prepare the data (render the mini dataset and build its TFDS dataset):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=data
Train the SourceVAE briefly (resumes from runs/demo/vae/checkpoints):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=train_vae
Encode every chunk's stems to joint latents with the frozen VAE (runs/demo/latents):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=encode_latents
Train the diffusion transformer on them (runs/demo/ldm):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=train_ldm
Generate whole pieces, or new stems for given ones (runs/demo/samples):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample \
      --condition_dir=DIR --generate=bass,drums
Evaluate the generated pieces against the test split (runs/demo/evaluation):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=evaluate

Variants (one string argument):
  --config=configs/demo.py:variant=tiny    a few short pieces and tiny shapes, for tests/CI
"""

import ml_collections

from msldm_jax import config_loading
from msldm_jax import stems
from msldm_jax.losses import vae_losses
from msldm_jax.models import dit
from msldm_jax.models import source_vae


def data_config(variant: str) -> ml_collections.ConfigDict:
  """Data settings shared by every stage (reference §2)."""
  tiny = variant == "tiny"
  return ml_collections.ConfigDict(dict(
      # Where the stems come from. layout: 'stems' ({split}/TrackNNNNN/{stem}.wav, MSDM's
      # conversion and the mini dataset) or 'slakh_raw' (the Slakh2100 release).
      layout="stems",
      # Empty: render the mini dataset into WORKDIR/minislakh and build from there.
      source_dir="",
      # The first 48 of the corpus's 404 usable chorales (38/5/5 tracks, 0.6 h): what 2 CPU
      # cores render, train on and evaluate within the main job's 20 minutes. 0: all.
      render=dict(num_pieces=6 if tiny else 48, seed=0, max_seconds=20.0 if tiny else 0.0),
      name="minislakh",
      # Empty: WORKDIR/tfds.
      tfds_dir="",
      sample_rate=stems.SAMPLE_RATE,
      # Track filter: every stem present with one duration in [min_duration, max_duration).
      min_duration=4.0 if tiny else 15.0,
      max_duration=640.0,
      seed=0,
      # VAE view: single-stem windows (reference §2).
      vae_windows=dict(
          stems=",".join(stems.STEM_NAMES),
          train_seconds=1.0, train_hop_seconds=0.5, jitter_seconds=0.25,
          eval_seconds=5.0, eval_hop_seconds=1.0,
          silence_threshold=1.5e-5,
          shuffle_buffer=256 if tiny else 4096,
      ),
      # Diffusion view: stem-aligned chunks; 327672 samples = 1024 latent frames.
      chunks=dict(
          samples=10232 if tiny else 327672,  # 32 or 1024 latent frames
          shuffle_buffer=16 if tiny else 256,
      ),
  ))


def vae_config(variant: str) -> ml_collections.ConfigDict:
  """The SourceVAE stage (reference §3): a narrow model with the paper's strides on CPU."""
  tiny = variant == "tiny"
  model = source_vae.model_config("paper")
  # The paper's strides (hop 320, so chunk lengths map to latent frames as in the paper) at
  # widths a CPU trains in minutes.
  model.encoder_width = 4 if tiny else 16
  model.decoder_width = 16 if tiny else 128
  model.latent_dim = 8 if tiny else 16
  return ml_collections.ConfigDict(dict(
      model=model,
      # overrides: Discriminator fields (periods, fft_sizes, bands, ...) over the variant.
      discriminator=dict(variant="tiny", overrides={}),
      loss_weights=dict(vae_losses.DEFAULT_LOSS_WEIGHTS),
      # 1e-3, not the paper's 5e-5 (configs/slakh.py): the demo trains for 200 steps only.
      optimizer=dict(learning_rate=1e-3, lr_decay=0.999996, b1=0.8,
                     b2=0.99, weight_decay=0.01, generator_clip=1000.0,
                     discriminator_clip=10.0),
      # 'replicate' (data parallel) or 'fsdp'.
      sharding="replicate",
      batch_size=8,
      seed=0,
      # 200 steps at ~0.47 steps/s on 2 cores: about 8 of the main job's 20 minutes.
      train=dict(num_steps=6 if tiny else 200, log_every=2 if tiny else 20,
                 eval_every=6 if tiny else 100, checkpoint_every=3 if tiny else 50,
                 keep_checkpoints=2, eval_batches=1 if tiny else 4,
                 eval_batch_size=8),
  ))


def ldm_config(variant: str, latent_dim: int) -> ml_collections.ConfigDict:
  """The latent diffusion stage (reference §4-§5) with a diffusion transformer."""
  tiny = variant == "tiny"
  model = dit.model_config("tiny")
  model.in_channels = stems.NUM_STEMS * latent_dim
  return ml_collections.ConfigDict(dict(
      model=model,
      # Empty: the VAE stage's newest checkpoint in WORKDIR/vae/checkpoints.
      vae_checkpoint="",
      # Empty: WORKDIR/latents.
      latents_dir="",
      encode_batch_size=8,
      # Latents per shard file (rounded up to a multiple of the encode batch); a killed
      # encoding redoes at most one shard.
      latents_per_shard=4 if tiny else 256,
      sigma_data=0.4,
      # 'uniform' on (0, sigma_max_train] (the release) or 'lognormal' (p_mean, p_std).
      sigma_distribution="uniform", sigma_max_train=3.0, p_mean=-1.2, p_std=1.2,
      optimizer=dict(learning_rate=1e-3 if tiny else 5e-4, warmup_steps=5 if tiny else 100,
                     b1=0.9, b2=0.99, weight_decay=0.0, clip=1.0),
      ema_decay=0.99 if tiny else 0.999,
      sharding="replicate",
      batch_size=8,
      seed=0,
      # ~12 steps/s on 2 cores for the tiny DiT: 2000 steps in about 3 minutes.
      train=dict(num_steps=6 if tiny else 2000, log_every=2 if tiny else 100,
                 sample_every=6 if tiny else 1000, checkpoint_every=3 if tiny else 500,
                 keep_checkpoints=2,
                 # Steps of the default sampler for the periodic training samples
                 # (sample_every=0 turns those off).
                 sample_steps=4 if tiny else 32),
  ))


def sample_config(variant: str) -> ml_collections.ConfigDict:
  """Generation (reference §6-§7): the release's sampler by default."""
  tiny = variant == "tiny"
  return ml_collections.ConfigDict(dict(
      sampler="euler_churn", num_steps=8 if tiny else 150, sigma_min=0.01, sigma_max=3.0,
      rho=7.0, s_churn=20.0,
      num_pieces=2 if tiny else 8,
      # Pieces per compiled call (sampler + decoding), split over the local devices.
      batch_size=2 if tiny else 4,
      seed=0,
      # Partial generation: a folder of given stems ({stem}.wav) and the stems to generate.
      condition_dir="", generate="",
      # RePaint passes per step for partial generation (1: the release's single pass).
      resample_steps=1,
      use_ema=True,
      # Log the sampler's steps/s and ETA every this many steps (0: off; one host callback
      # per step when on).
      log_every_steps=0,
      # Empty: WORKDIR/samples.
      output_dir="",
  ))


def evaluate_config(variant: str) -> ml_collections.ConfigDict:
  """Evaluation (issue tables): generated pieces against real chunks of a split."""
  return ml_collections.ConfigDict(dict(
      reference_split="test",
      max_reference_chunks=8 if variant == "tiny" else 64,
      # Partial generation (14 subsets of stems, each generated given the others): the first
      # this many reference chunks give the stems; 0 skips the partial table.
      partial_chunks=2,
      # Path of the VGGish weights (the PyTorch port's state dict, see
      # msldm_jax/evaluation/vggish.py) for FAD; empty: the download-free statistics embedding.
      vggish_weights="",
      vggish_pca="",
  ))


def get_config(arg=None):
  args = config_loading.parse_arg(arg, variant="default")
  if args.variant not in ("default", "tiny"):
    raise ValueError(f"configs/demo.py: unknown variant {args.variant!r} (default, tiny)")
  config = ml_collections.ConfigDict()
  config.variant = args.variant
  config.data = data_config(args.variant)
  config.vae = vae_config(args.variant)
  config.ldm = ldm_config(args.variant, config.vae.model.latent_dim)
  config.sample = sample_config(args.variant)
  config.evaluate = evaluate_config(args.variant)
  return config
