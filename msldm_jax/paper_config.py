"""The paper's configuration: every key the stages read, at the release's settings.

MSLDM's numbers (docs: msldm-reference.md, cited as "reference §N") for the data, the
SourceVAE, the latent diffusion model, sampling and evaluation. Where the release publishes no
number (training lengths, logging, evaluation sizes), the value is ours and its comment says
so. Config scripts start from here: `configs/slakh.py` adds its options (DiT size, dataset
layout, folders, FSDP); `configs/demo.py` shrinks it with an explicit list of overrides
(`config_loading.override`), so that every key the demo leaves alone is the paper's.

  config = paper_config.get_paper_config("base")  # or "large"
"""

import ml_collections

from msldm_jax import stems
from msldm_jax.diffusion import samplers
from msldm_jax.losses import vae_losses
from msldm_jax.models import dit
from msldm_jax.models import source_vae
from msldm_jax.models import unet1d

# DiT sizes standing in for the release's U-Nets (reference §5): base ≈ its 364 M U-Net,
# large ≈ its 441 M Large.
VARIANTS = ("base", "large")


def data_config() -> ml_collections.ConfigDict:
  """Data settings shared by every stage (reference §2)."""
  return ml_collections.ConfigDict(dict(
      # Where the stems come from. layout: 'slakh_raw' (the Slakh2100 release: 44.1 kHz flac
      # per instrument with metadata.yaml) or 'stems' ({split}/TrackNNNNN/{stem}.wav, MSDM's
      # conversion and the mini dataset).
      layout="slakh_raw",
      # The dataset's root. Empty: render the mini dataset into WORKDIR/minislakh and build
      # from there (layout 'stems' only), as configs/demo.py does.
      source_dir="",
      # The mini dataset's renderer, used only when source_dir is empty: 0 pieces = every
      # usable chorale, 0 s = whole pieces.
      render=dict(num_pieces=0, seed=0, max_seconds=0.0),
      # The TFDS dataset's name. Empty: the layout's default (slakh2100 or stems).
      name="",
      # Empty: WORKDIR/tfds.
      tfds_dir="",
      sample_rate=stems.SAMPLE_RATE,  # 22050 Hz mono, as MSDM resampled Slakh2100.
      # Track filter: every stem present with one duration in [min_duration, max_duration),
      # the latent set's 15 s and 640 s.
      min_duration=15.0,
      max_duration=640.0,
      seed=0,
      # VAE view: single-stem windows of 1 s at 0.5 s hop jittered by ±0.25 s, silent ones
      # (‖x‖₂/N below the threshold) dropped; validation 5 s at 1 s hop.
      vae_windows=dict(
          stems=",".join(stems.STEM_NAMES),
          train_seconds=1.0, train_hop_seconds=0.5, jitter_seconds=0.25,
          eval_seconds=5.0, eval_hop_seconds=1.0,
          silence_threshold=1.5e-5,
          # Ours: tf.data's shuffle over windows (consecutive windows of a track overlap).
          shuffle_buffer=4096,
      ),
      # Diffusion view: stem-aligned, non-overlapping chunks; 327672 samples (14.86 s) are
      # exactly 1024 latent frames at the VAE's hop 320.
      chunks=dict(samples=327672, shuffle_buffer=256),
  ))


def vae_config() -> ml_collections.ConfigDict:
  """The SourceVAE stage (reference §3): the release's model, discriminators and optimiser."""
  return ml_collections.ConfigDict(dict(
      # Hop 320, latent dim 80 per stem, 61.05 M parameters.
      model=source_vae.model_config("paper"),
      # Multi-period (2, 3, 5, 7, 11) and multi-band STFT (2048, 1024, 512) discriminators.
      # overrides: Discriminator fields (periods, fft_sizes, bands, ...) over the variant.
      discriminator=dict(variant="full", overrides={}),
      # 15·mel + 2·feature matching + 1·adversarial + 10·KL; the waveform L1 term (ours)
      # at 0.
      loss_weights=dict(vae_losses.DEFAULT_LOSS_WEIGHTS),
      # Per-stem overrides of those weights ({stem: {term: weight}}; ours, for per-source
      # VAEs trained on one-stem batches). The release has one set for all stems.
      loss_weights_by_stem={},
      # Steps of reconstruction-only warm-up (the generator on mel + KL; no discriminator)
      # before the GAN steps begin. 0, the release's: adversarial from the first step.
      adversarial_start=0,
      # AdamW (G) and Adam (D) at 5e-5, betas (0.8, 0.99), the rate × 0.999996 every step,
      # gradients clipped at 1000 (G) and 10 (D). weight_decay 0.01: PyTorch AdamW's default
      # (the release names AdamW and no decay).
      optimizer=dict(learning_rate=5e-5, lr_decay=0.999996, b1=0.8, b2=0.99,
                     weight_decay=0.01, generator_clip=1000.0, discriminator_clip=10.0),
      # 'replicate' (data parallel) or 'fsdp' (parameters and optimiser state sharded).
      sharding="replicate",
      # 28 windows of 1 s per step; must divide by the mesh's devices.
      batch_size=28,
      seed=0,
      # The release does not publish its length: 800k steps decay the rate to
      # 0.999996**800k ≈ 0.04 of its initial value. Logging and evaluation cadence are ours.
      train=dict(num_steps=800_000, log_every=100, eval_every=5_000,
                 checkpoint_every=5_000, keep_checkpoints=3, eval_batches=16,
                 eval_batch_size=8,
                 # A time budget (0: none) that ends the run early at a log step, with a
                 # checkpoint; clock "wall" or "cpu" (process CPU time). training/loop.py.
                 max_seconds=0.0, budget_clock="wall"),
  ))


def ldm_config(variant: str = "base") -> ml_collections.ConfigDict:
  """The latent diffusion stage (reference §4-§5): a DiT in place of the release's U-Net by
  default, the U-Net itself with denoiser='unet'."""
  return ml_collections.ConfigDict(dict(
      # bfloat16 compute (the release trains in bf16), float32 parameters.
      # in_channels 0: the latent store's stems × latent_dim (set by the diffusion trainer
      # from the latents it trains on; 4 × 80 = 320 at the paper's VAE).
      model=dit.model_config(variant, in_channels=0),
      # The denoiser network: 'dit' (the settings above, the design card's choice) or 'unet'
      # (the release's U-Net, models/unet1d.py, with the settings below); models/denoisers.py.
      denoiser="dit",
      # The release's U-Net at its MSLDM size ('large' for MSLDM-Large); in_channels as above.
      unet=unet1d.model_config("release", in_channels=0),
      # Empty: the VAE stage's newest checkpoint in WORKDIR/vae/checkpoints.
      vae_checkpoint="",
      # Empty: the diffusion stage's newest checkpoint in WORKDIR/ldm/checkpoints. Else a
      # denoiser to sample and evaluate with, e.g. the release's, imported by
      # python -m msldm_jax.tools.import_release.
      denoiser_checkpoint="",
      # Empty: WORKDIR/latents.
      latents_dir="",
      # Chunks per encoding call of the frozen VAE (posterior means, reference §4).
      encode_batch_size=8,
      # Latents per shard file (rounded up to a multiple of the encode batch); a killed
      # encoding redoes at most one shard.
      latents_per_shard=256,
      sigma_data=0.4,
      # 'none': the latents as stored (the release's; its KL weight 10 holds them near
      # σ_data, the mixture latent's std ≈ 0.5). 'per_source': each source's latents divided
      # by its RMS over the train split over σ_data (joint_latent.source_scales), so each
      # has σ_data's scale, the one EDM's preconditioning and σ range assume; recorded with
      # the denoiser, and undone before decoding.
      latent_scale="none",
      # Training σ: 'uniform' on (0, sigma_max_train] (the release's Uniform(0, 3)) or
      # 'lognormal' (p_mean, p_std; EDM's, unused at the release's setting).
      sigma_distribution="uniform", sigma_max_train=3.0, p_mean=-1.2, p_std=1.2,
      # Adam at a constant 2e-5 with betas (0.9, 0.99), as the release (warmup_steps 0: no
      # schedule); clipping at 1.0 is ours.
      optimizer=dict(learning_rate=2e-5, warmup_steps=0, b1=0.9, b2=0.99, weight_decay=0.0,
                     clip=1.0),
      # The release keeps no EMA; ours does (sampling uses it, sample.use_ema).
      ema_decay=0.9999,
      sharding="replicate",
      batch_size=16,
      seed=0,
      # Length and cadence are ours (the release publishes none).
      train=dict(num_steps=600_000, log_every=100, sample_every=20_000,
                 checkpoint_every=5_000, keep_checkpoints=3,
                 # Steps of the default sampler for the periodic training samples
                 # (sample_every=0 turns those off).
                 sample_steps=50,
                 # A time budget (0: none) that ends the run early at a log step, with a
                 # checkpoint; clock "wall" or "cpu" (process CPU time). training/loop.py.
                 max_seconds=0.0, budget_clock="wall"),
  ))


def sample_config() -> ml_collections.ConfigDict:
  """Generation (reference §6-§7): the release's sampler and its settings.

  The sampler settings (num_steps, sigma_min, sigma_max, rho, s_churn, s_tmin, s_tmax,
  s_noise) are the default sampler's own defaults, read from its signature: Euler with churn,
  150 steps on the Karras schedule 3 → 0.01 with ρ 7, s_churn 20 at every step (s_tmin 0,
  s_tmax ∞, s_noise 1). `generation_program.sampler_settings` passes each sampler those it
  takes.
  """
  return ml_collections.ConfigDict(dict(
      sampler=samplers.DEFAULT_SAMPLER,
      **samplers.sampler_config(samplers.DEFAULT_SAMPLER),
      num_pieces=8,
      # Pieces per compiled call (sampler + decoding), split over the local devices.
      batch_size=4,
      seed=0,
      # Partial generation: the stems to generate, and the given stems as a folder
      # ({stem}.wav, .flac, .ogg or .mp3) or as STEM=FILE,... (then `generate` may be empty:
      # the stems not given). Any rate, channels and length (generation/conditions.py).
      condition_dir="", generate="", condition="",
      # Given stems of different lengths: False is an error, True pads the shorter ones
      # with silence at the end.
      pad=False,
      # Total generation's length in seconds (0: one chunk, data.chunks.samples). Longer
      # pieces, and given stems longer than a chunk, are generated window by window, each
      # continuing the previous one over `overlap` of the window (a fraction), joined with a
      # crossfade there (generation/long_form.py).
      seconds=0.0, overlap=0.25,
      # RePaint passes per step for partial generation (1: the release's single pass).
      resample_steps=1,
      use_ema=True,
      # Log the sampler's steps/s and ETA every this many steps (0: off; one host callback
      # per step when on).
      log_every_steps=25,
      # Empty: WORKDIR/samples.
      output_dir="",
  ))


def separate_config() -> ml_collections.ConfigDict:
  """Separation of a mixture (`--mode=separate`, and the evaluation's separation table):
  posterior sampling with the generative model as the prior (generation/separation.py)."""
  return ml_collections.ConfigDict(dict(
      # The mixture file (--mix) and where its stems go (--out_dir; empty:
      # WORKDIR/separated/<file name>).
      mix="", output_dir="",
      # "dps": the denoised latent pulled towards the mixture by the gradient of the
      # mixture error through the frozen decoder; "dirac": MSDM's, `dirac_stem` is the
      # mixture minus the others (diffusion/mixture_guidance.py).
      method="dps",
      # DPS's share of the Gauss-Newton step per evaluation, in [0, 1].
      strength=1.0,
      dirac_stem=stems.STEM_NAMES[-1],
      # Sampler steps (0: config.sample.num_steps); the sampler is config.sample's.
      num_steps=0,
      seed=0,
  ))


def evaluate_config() -> ml_collections.ConfigDict:
  """Evaluation (reference §9): distances of generated pieces to real chunks of a split."""
  return ml_collections.ConfigDict(dict(
      # The paper reports FAD on the test split. Several held-out splits join with '+'
      # ('validation+test') when one holds too few chunks for a Fréchet distance.
      reference_split="test",
      # The split `--mode=evaluate_vae` reconstructs (evaluation/vae_quality.py): the VAE's
      # own score, before a latent model exists.
      vae_split="test",
      # Sizes are ours (the release has no evaluation code). The reference set is the whole
      # split, or a seeded random sample of this many chunks (never the first N in order).
      max_reference_chunks=256,
      # Partial generation (14 subsets of stems, each generated given the others): this many
      # seeded random reference chunks give the stems, one piece per chunk and subset
      # (14 × partial_chunks pieces in all); 0 skips the partial table.
      partial_chunks=16,
      # MSDM scores partial generations against the whole reference set, conditioning
      # chunks included; True leaves those chunks out (named in the table).
      partial_disjoint_reference=False,
      # The embedding every distance is computed on: "musicnn" (the shipped MSD musicnn's
      # penultimate layer; `pip install --no-deps musicnn==0.1.0`, done by setup.sh),
      # "vggish" (needs vggish_weights) or "statistics" (log-mel/MFCC/chroma, no weights).
      embedding="musicnn",
      musicnn_model="MSD_musicnn",
      # Path of the VGGish weights (the PyTorch port's state dict, see
      # msldm_jax/evaluation/vggish.py) and its PCA, for embedding="vggish".
      vggish_weights="",
      vggish_pca="",
      # Bootstrap draws (pieces resampled) for every score's 95 % interval and floor.
      bootstrap_samples=200,
      # Seeds the reference sample, the conditioning chunks, the floor's halves and the
      # bootstrap.
      seed=0,
      # A stem is empty when this share of its 1 s windows is silent (1.0: all of them).
      empty_share=1.0,
      # "full": every table below; "mixture_distances": the mixture's FD and KAD alone (for
      # sweeps that score many runs of one model, e.g. the study's samplers × steps).
      scope="full",
      # The separation table (separation.md): SI-SDR improvement per stem over the mixture
      # on `separation_chunks` seeded random reference chunks, for each method in
      # `separation_methods`, beside the VAE's own reconstructions (the ceiling).
      separation=False,
      separation_chunks=8,
      separation_methods="dps,dirac",
  ))


SYSTEMS = ("msldm", "isldm", stems.MIXTURE_SYSTEM)


def check_system(config: ml_collections.ConfigDict) -> str:
  system = str(config.get("system", "msldm"))
  if system not in SYSTEMS:
    raise ValueError(f"config key system={system!r}: one of {', '.join(SYSTEMS)}")
  return system


def latent_sources(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The sources the config's system stacks in its latent (`stems.latent_sources`)."""
  return stems.latent_sources(check_system(config))


def get_paper_config(variant: str = "base") -> ml_collections.ConfigDict:
  """The full config at the paper's settings, with the DiT of size `variant` (VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"paper config: unknown DiT variant {variant!r} ({', '.join(VARIANTS)})")
  return ml_collections.ConfigDict(dict(
      variant=variant,
      # What the latent diffusion model learns (SYSTEMS): 'msldm', the paper's, the stems'
      # joint latent with one network; 'isldm', its baseline, each stem's latent with its own
      # network (models/independent_stems.py); 'mixldm', its other baseline, the mixture's
      # latent, from a VAE trained on mixture windows (train_vae, encode_latents, sample and
      # evaluate then work on the mixture alone).
      system="msldm",
      data=data_config(),
      vae=vae_config(),
      ldm=ldm_config(variant),
      sample=sample_config(),
      separate=separate_config(),
      evaluate=evaluate_config(),
  ))
