r"""Slakh2100 at the paper's sizes: the 61 M SourceVAE, then a DiT over its 320-channel latents.

One GPU (each stage resumes from WORKDIR; run them in this order):
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=data
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=train_vae
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=encode_latents
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=train_ldm
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=sample
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=sample --condition_dir=DIR --generate=bass,drums
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100 \
      --workdir=runs/slakh --mode=evaluate

MSDM's converted stems ({split}/TrackNNNNN/{bass,drums,guitar,piano}.wav at 22050 Hz) instead
of the Slakh2100 release (44.1 kHz flac per instrument with metadata.yaml):
  python -m msldm_jax.main --config=configs/slakh.py:layout=stems,source_dir=/data/slakh_msdm \
      --workdir=runs/slakh --mode=data

The Large DiT (≈ the release's 441 M) with FSDP-sharded parameters and optimiser state:
  python -m msldm_jax.main --config=configs/slakh.py:source_dir=/data/slakh2100,variant=large,fsdp \
      --workdir=runs/slakh_large --mode=train_ldm

TPU pod slice / multi-host GPUs: every host runs the SAME command, with WORKDIR on storage
that all hosts share (a bucket or a network file system), e.g. on a TPU VM slice
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd msldm_jax && \
      python -m msldm_jax.main --config=configs/slakh.py:source_dir=/shared/slakh2100,fsdp \
      --workdir=/shared/runs/slakh --mode=train_ldm --multihost"
`--multihost` makes each process call `jax.distributed.initialize()` before touching JAX (on
TPU it finds its peers itself; on GPU clusters set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM). Run `--mode=data` once (one host) before
the multi-host stages. The global batch sizes below must divide by the number of devices of
the mesh (e.g. vae.batch_size 28 on 4 or 7 devices; override with --config.vae.batch_size=32
on 8 or 16).

Options (one string argument, comma-separated):
  variant=base|large     DiT size: base ≈ the release's 364 M U-Net, large ≈ its 441 M Large
  layout=slakh_raw|stems the Slakh2100 release, or MSDM's converted four-stem folders
  source_dir=PATH        the dataset's root (required by --mode=data)
  tfds_dir=PATH          where the TFDS dataset is built (default WORKDIR/tfds)
  fsdp                   shard parameters and optimiser state (both stages) instead of
                         replicating them
"""

import importlib.util
import os

import ml_collections

from msldm_jax import config_loading
from msldm_jax import stems
from msldm_jax.losses import vae_losses
from msldm_jax.models import dit
from msldm_jax.models import source_vae

VARIANTS = ("base", "large")
LAYOUTS = ("slakh_raw", "stems")


def _demo_module():
  """configs/demo.py, whose config defines every key the stages read."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
  spec = importlib.util.spec_from_file_location("msldm_config_demo_for_slakh", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _override(section: ml_collections.ConfigDict, values: dict, where: str):
  """Sets existing keys only, so that a key demo.py renamed is an error here, not a new key."""
  for key, value in values.items():
    if key not in section:
      raise KeyError(f"configs/slakh.py: {where}.{key} is not a key of configs/demo.py's "
                     f"{where} section; keys: {', '.join(sorted(section))}")
    if isinstance(value, dict):
      _override(section[key], value, f"{where}.{key}")
    else:
      section[key] = value


def get_config(arg=None):
  args = config_loading.parse_arg(arg, variant="base", layout="slakh_raw", source_dir="",
                                  tfds_dir="", fsdp=False)
  if args.variant not in VARIANTS:
    raise ValueError(f"configs/slakh.py: unknown variant {args.variant!r} "
                     f"({', '.join(VARIANTS)})")
  if args.layout not in LAYOUTS:
    raise ValueError(f"configs/slakh.py: unknown layout {args.layout!r} ({', '.join(LAYOUTS)})")
  demo = _demo_module()
  sharding = "fsdp" if args.fsdp else "replicate"

  # Every section demo.py defines (the stages read them all, including any added there
  # later), at its full size; then the paper's values over them.
  config = demo.get_config("variant=default")
  config.variant = args.variant

  # Reference §2: the demo's full-size windows and chunks are already the reference's.
  _override(config.data, dict(
      layout=args.layout, source_dir=args.source_dir, tfds_dir=args.tfds_dir,
      # Nothing to render: the stems come from source_dir.
      render=dict(num_pieces=0, max_seconds=0.0),
      # Empty: the layout's default name (slakh2100 or stems).
      name="",
      min_duration=15.0, max_duration=640.0,
      chunks=dict(samples=327672, shuffle_buffer=256),
  ), "data")

  # Reference §3: the release's SourceVAE, discriminators and optimiser.
  config.vae.model = source_vae.model_config("paper")
  _override(config.vae, dict(
      discriminator=dict(variant="full"),
      loss_weights=dict(vae_losses.DEFAULT_LOSS_WEIGHTS),
      optimizer=dict(learning_rate=5e-5, lr_decay=0.999996, b1=0.8, b2=0.99,
                     generator_clip=1000.0, discriminator_clip=10.0),
      sharding=sharding,
      batch_size=28,
      # The reference does not publish its length; 0.999996**800k ≈ 0.04 of the initial rate.
      train=dict(num_steps=800_000, log_every=100, eval_every=5_000,
                 checkpoint_every=5_000, keep_checkpoints=3, eval_batches=16,
                 eval_batch_size=8),
  ), "vae")

  # Reference §4-§5, with a diffusion transformer in place of the release's U-Net.
  model = dit.model_config(args.variant)  # bfloat16 compute, float32 parameters
  model.in_channels = stems.NUM_STEMS * config.vae.model.latent_dim  # 320
  config.ldm.model = model
  _override(config.ldm, dict(
      latents_per_shard=256,
      sigma_data=0.4, sigma_distribution="uniform", sigma_max_train=3.0,
      # Adam at a constant rate, as the release (warmup_steps 0: no schedule).
      optimizer=dict(learning_rate=2e-5, warmup_steps=0, b1=0.9, b2=0.99, weight_decay=0.0,
                     clip=1.0),
      # The release keeps no EMA; ours does (sampling uses it, sample.use_ema).
      ema_decay=0.9999,
      sharding=sharding,
      batch_size=16,
      train=dict(num_steps=600_000, log_every=100, sample_every=20_000,
                 checkpoint_every=5_000, keep_checkpoints=3, sample_steps=50),
  ), "ldm")

  # Reference §6: the release's sampler.
  _override(config.sample, dict(
      sampler="euler_churn", num_steps=150, sigma_min=0.01, sigma_max=3.0, rho=7.0,
      s_churn=20.0, num_pieces=8, batch_size=4, log_every_steps=25,
  ), "sample")

  # Reference §9: FAD on the test split; the 14 partial-generation rows each generate one
  # piece per conditioning chunk (14 × partial_chunks pieces in all).
  _override(config.evaluate, dict(
      reference_split="test", max_reference_chunks=256, partial_chunks=16,
  ), "evaluate")
  return config
