r"""The embedded default: a mini Slakh rendered from music21's Bach chorales, on CPU.

Prepare the data (render the mini dataset and build its TFDS dataset):
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=data

Variants (one string argument):
  --config=configs/demo.py:variant=tiny    a few short pieces and tiny shapes, for tests/CI
"""

import ml_collections

from msldm_jax import config_loading
from msldm_jax import stems


def data_config(variant: str) -> ml_collections.ConfigDict:
  """Data settings shared by every stage (reference §2)."""
  tiny = variant == "tiny"
  return ml_collections.ConfigDict(dict(
      # Where the stems come from. layout: 'stems' ({split}/TrackNNNNN/{stem}.wav, MSDM's
      # conversion and the mini dataset) or 'slakh_raw' (the Slakh2100 release).
      layout="stems",
      # Empty: render the mini dataset into WORKDIR/minislakh and build from there.
      source_dir="",
      render=dict(num_pieces=6 if tiny else 0, seed=0, max_seconds=20.0 if tiny else 0.0),
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
          samples=3192 if tiny else 327672,
          shuffle_buffer=16 if tiny else 256,
      ),
  ))


def get_config(arg=None):
  args = config_loading.parse_arg(arg, variant="default")
  if args.variant not in ("default", "tiny"):
    raise ValueError(f"configs/demo.py: unknown variant {args.variant!r} (default, tiny)")
  config = ml_collections.ConfigDict()
  config.variant = args.variant
  config.data = data_config(args.variant)
  config.batch_size = 8 if args.variant == "tiny" else 28
  return config
