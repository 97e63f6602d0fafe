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

import ml_collections

from msldm_jax import config_loading
from msldm_jax import paper_config

LAYOUTS = ("slakh_raw", "stems")


def get_config(arg=None) -> ml_collections.ConfigDict:
  args = config_loading.parse_arg(arg, variant="base", layout="slakh_raw", source_dir="",
                                  tfds_dir="", fsdp=False)
  if args.variant not in paper_config.VARIANTS:
    raise ValueError(f"configs/slakh.py: unknown variant {args.variant!r} "
                     f"({', '.join(paper_config.VARIANTS)})")
  if args.layout not in LAYOUTS:
    raise ValueError(f"configs/slakh.py: unknown layout {args.layout!r} ({', '.join(LAYOUTS)})")
  sharding = "fsdp" if args.fsdp else "replicate"
  return config_loading.override(paper_config.get_paper_config(args.variant), dict(
      data=dict(layout=args.layout, source_dir=args.source_dir, tfds_dir=args.tfds_dir),
      vae=dict(sharding=sharding),
      ldm=dict(sharding=sharding),
  ), "configs/slakh.py")
