r"""The embedded default: a mini Slakh rendered from music21's Bach chorales, on CPU.

The paper's configuration (msldm_jax/paper_config.py) shrunk by the overrides listed below
(OVERRIDES, then TINY_OVERRIDES for the tiny variant); every key they leave alone is the
paper's (tests/test_config.py checks that they are the only differences).

The main job, every stage below in order (a stage finished under the same config is skipped
when run again; an unfinished one resumes), within 15 minutes on 2 CPU cores:
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
from msldm_jax import paper_config

VARIANTS = ("default", "tiny")

# The paper's configuration → the demo: what 2 CPU cores render, train, sample and evaluate
# within the main job's 15 minutes.
OVERRIDES = dict(
    variant="default",
    data=dict(
        # The mini dataset rendered into WORKDIR/minislakh (source_dir stays empty) has the
        # stems layout.
        layout="stems",
        # The first 24 of the corpus's 404 usable chorales (about 0.3 h): what 2 CPU cores
        # render, encode and evaluate within the main job's 15 minutes.
        render=dict(num_pieces=24),
        name="minislakh",
    ),
    vae=dict(
        # The paper's strides (hop 320, so chunk lengths map to latent frames as in the
        # paper) at widths a CPU trains in minutes.
        model=dict(encoder_width=16, decoder_width=128, latent_dim=16),
        # Both kinds of sub-discriminator, with few channels.
        discriminator=dict(variant="tiny"),
        # 1e-3, not the paper's 5e-5: the demo trains for 32 steps only.
        optimizer=dict(learning_rate=1e-3),
        # 8 windows, not 28: CPU time per step.
        batch_size=8,
        # 16 steps: a smoke run of the GAN recipe, not a trained codec. On a 2-core AMD EPYC a
        # step takes ~4.5 s and compiling it ~150 s, so this stage is ~4 of the main job's 15
        # minutes; configs/slakh.py (and the study) train it for real. No validation pass
        # (its compile alone costs ~25 s): the evaluate stage measures the frozen VAE's
        # reconstructions of the test split.
        train=dict(num_steps=16, log_every=8, eval_every=0, checkpoint_every=16,
                   keep_checkpoints=2, eval_batches=2),
    ),
    ldm=dict(
        # The DiT's 'tiny' preset (dit.model_config("tiny")): width 64, depth 2, patch 4,
        # float32 (bfloat16 gains nothing on CPU).
        model=dict(width=64, depth=2, num_heads=4, patch_size=4, dtype="float32"),
        # The release's U-Net (--config.ldm.denoiser=unet) at its 'tiny' preset
        # (unet1d.model_config("tiny")): every kind of block, at a CPU size.
        unet=dict(channels=32, patch_factor=4, multipliers=(1, 2, 1), factors=(1, 2),
                  num_blocks=(1, 2), attentions=(False, True), attention_heads=2,
                  attention_features=8),
        # 700 steps need a higher rate than the paper's 2e-5; the warmup keeps the first
        # steps at that rate stable.
        optimizer=dict(learning_rate=5e-4, warmup_steps=100),
        # An EMA horizon of ~200 steps, which a run of 500 steps fills.
        ema_decay=0.995,
        # 8 chunks, not 16: CPU time per step.
        batch_size=8,
        # 500 steps of the tiny DiT at ~4.5 steps/s (2-core AMD EPYC): under 3 of the main
        # job's 15 minutes, with one logged sample at the end.
        train=dict(num_steps=500, sample_every=500, checkpoint_every=250,
                   keep_checkpoints=2, sample_steps=32),
    ),
    sample=dict(
        # Off: a piece's steps take seconds with the tiny DiT, and a logging host callback
        # would synchronise every step.
        log_every_steps=0,
    ),
    separate=dict(
        # 5 steps, not the sampler's 150: a DPS evaluation decodes the four stems and
        # backpropagates through the decoder (~3.4 CPU-s per 14.86 s chunk at the demo's
        # VAE on a 2-core AMD EPYC; Dirac's decode and encode ~0.9 CPU-s), and the main job
        # has 15 minutes.
        num_steps=5,
    ),
    evaluate=dict(
        # A cap for CPU time (the mini dataset's 5 test tracks give fewer chunks anyway).
        max_reference_chunks=64,
        # 14 × 2 = 28 partially generated pieces instead of the paper's 224: CPU time.
        partial_chunks=2,
        # The separation table (separation.md) on 2 test chunks, both methods: about a
        # minute of the main job.
        separation=True,
        separation_chunks=2,
    ),
)

# The demo → its tiny variant (tests, CI): a few short pieces and tiny shapes, a few steps of
# each stage.
TINY_OVERRIDES = dict(
    variant="tiny",
    data=dict(
        render=dict(num_pieces=6, max_seconds=20.0),
        min_duration=4.0,
        # Quarter-second training windows (17 latent frames at hop 320) and half-second
        # validation windows: a tiny VAE step costs a quarter of one on the default second,
        # and the tests that train the tiny VAE (its trainer's tests, the notebooks) all
        # compile one GAN step, which their shared compilation cache then serves: ~13 s of
        # XLA:CPU each on 2 cores.
        vae_windows=dict(train_seconds=0.25, train_hop_seconds=0.125, jitter_seconds=0.05,
                         eval_seconds=0.5, eval_hop_seconds=0.5, shuffle_buffer=32),
        chunks=dict(samples=10232, shuffle_buffer=16),  # 32 latent frames
    ),
    vae=dict(
        # One residual unit per block, not three: the SourceVAE's programs are the largest
        # the tests compile, and XLA:CPU's time goes with their number of operations.
        model=dict(encoder_width=4, decoder_width=16, latent_dim=8, dilations=(1,)),
        train=dict(num_steps=6, log_every=2, eval_every=6, checkpoint_every=3, eval_batches=1),
    ),
    ldm=dict(
        latents_per_shard=4,
        optimizer=dict(learning_rate=1e-3, warmup_steps=5),
        ema_decay=0.99,
        train=dict(num_steps=6, log_every=2, sample_every=6, checkpoint_every=3,
                   sample_steps=4),
    ),
    sample=dict(num_steps=8, num_pieces=2, batch_size=2),
    # No separation table: DPS backpropagates through the decoder, and the table was 39 s
    # of a tiny evaluation's 69 s. tests/test_imported_weights.py turns it on for its run of
    # every stage; tests/test_separation.py checks the table itself.
    evaluate=dict(max_reference_chunks=8, separation=False),
)


def get_config(arg=None) -> ml_collections.ConfigDict:
  args = config_loading.parse_arg(arg, variant="default")
  if args.variant not in VARIANTS:
    raise ValueError(f"configs/demo.py: unknown variant {args.variant!r} "
                     f"({', '.join(VARIANTS)})")
  config = config_loading.override(paper_config.get_paper_config(), OVERRIDES,
                                   "configs/demo.py")
  if args.variant == "tiny":
    config_loading.override(config, TINY_OVERRIDES, "configs/demo.py (tiny)")
  return config
