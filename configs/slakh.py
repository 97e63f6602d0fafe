r"""Slakh2100 at the paper's sizes: the 61 M SourceVAE, then a DiT over its 320-channel latents.

The paper's configuration (msldm_jax/paper_config.py) with this script's options below; every
other key is the paper's.

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

The authors' model, exactly their inference (README.md "The authors' model"): import their
checkpoints, then sample and evaluate with them (no training):
  python -m msldm_jax.tools.import_release --checkpoint=msldm.ckpt \
      --sourcevae=sourcevae_ckpt --out=weights/msldm
  python -m msldm_jax.main --config=configs/slakh.py:release --workdir=runs/release \
      --config.ldm.denoiser_checkpoint=weights/msldm --mode=sample
`release` selects the release's U-Net (models/unet1d.py; variant=large: MSLDM-Large) as the
denoiser, its sampler (Euler with churn, Karras 3 → 0.01, ρ 7, 150 steps, s_churn 20: the
paper config's defaults, restated here so that the variant pins them), its partial generation
(one re-noising pass per step) and no EMA (the release keeps none). Training under it trains
that U-Net on our pipeline (Adam 2e-5, betas 0.9/0.99, batch 16, bfloat16 compute).

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
                         (with release: the release's U-Net at MSLDM or MSLDM-Large size)
  release                the release's denoiser, sampler and partial generation (above)
  layout=slakh_raw|stems the Slakh2100 release, or MSDM's converted four-stem folders
  source_dir=PATH        the dataset's root (required by --mode=data)
  tfds_dir=PATH          where the TFDS dataset is built (default WORKDIR/tfds)
  fsdp                   shard parameters and optimiser state (both stages) instead of
                         replicating them
"""

import ml_collections

from msldm_jax import config_loading
from msldm_jax import paper_config
from msldm_jax.diffusion import samplers
from msldm_jax.models import unet1d

LAYOUTS = ("slakh_raw", "stems")


def get_config(arg=None) -> ml_collections.ConfigDict:
  args = config_loading.parse_arg(arg, variant="base", layout="slakh_raw", source_dir="",
                                  tfds_dir="", fsdp=False, release=False)
  if args.variant not in paper_config.VARIANTS:
    raise ValueError(f"configs/slakh.py: unknown variant {args.variant!r} "
                     f"({', '.join(paper_config.VARIANTS)})")
  if args.layout not in LAYOUTS:
    raise ValueError(f"configs/slakh.py: unknown layout {args.layout!r} ({', '.join(LAYOUTS)})")
  sharding = "fsdp" if args.fsdp else "replicate"
  config = config_loading.override(paper_config.get_paper_config(args.variant), dict(
      data=dict(layout=args.layout, source_dir=args.source_dir, tfds_dir=args.tfds_dir),
      vae=dict(sharding=sharding),
      ldm=dict(sharding=sharding),
  ), "configs/slakh.py")
  if args.release:
    config_loading.override(config, release_overrides(args.variant), "configs/slakh.py:release")
  return config


def release_overrides(variant: str) -> dict:
  """The release's inference: its U-Net, its sampler, its partial generation, no EMA."""
  unet_variant = {"base": "release", "large": "large"}[variant]
  return dict(
      ldm=dict(
          denoiser="unet",
          # bfloat16 compute for training, as the release (Lightning precision "bf16"); an
          # imported checkpoint samples with the settings it records (float32).
          unet=dict(unet1d.model_config(unet_variant, in_channels=0, dtype="bfloat16")),
          # The release keeps no EMA.
          ema_decay=0.0,
      ),
      sample=dict(
          sampler="euler_churn",
          **samplers.sampler_config("euler_churn"),
          resample_steps=1,
          use_ema=False,
      ),
  )
