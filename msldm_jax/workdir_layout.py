"""Where every stage keeps what it makes inside one workdir: the one module that knows.

  WORKDIR/
    minislakh/            the rendered mini dataset (data stage, when data.source_dir is empty)
    tfds/NAME/VERSION/    the built TFDS dataset (data stage; data.tfds_dir overrides tfds/)
    vae/                  SourceVAE training: checkpoints/, logs/, metrics.jsonl, losses.png
    latents/              the latent store (encode_latents; ldm.latents_dir overrides it)
    ldm/                  diffusion training: checkpoints/, logs/, metrics.jsonl, loss.png,
                          latents.json
    samples/              generated pieces (sample; sample.output_dir overrides it)
    evaluation/           tables, plots and metrics.json (evaluate)
    stages/               --mode=all's markers of finished stages

Stages find each other's products through these functions (and the loaders in
`models/loading.py`), never through another stage's code.
"""

import os

import ml_collections

MINISLAKH = "minislakh"
TFDS = "tfds"
VAE = "vae"
LATENTS = "latents"
LDM = "ldm"
SAMPLES = "samples"
EVALUATION = "evaluation"
STAGE_MARKERS = "stages"

# A built dataset: DATA_DIR/NAME/DATASET_VERSION (TFDS's layout), NAME by default the
# source layout's.
DATASET_VERSION = "1.0.0"
DEFAULT_DATASET_NAMES = {"stems": "stems", "slakh_raw": "slakh2100"}

# Inside a trainer's folder (vae/, ldm/).
CHECKPOINTS = "checkpoints"
LOGS = "logs"
METRICS_FILE = "metrics.jsonl"


def minislakh_dir(workdir: str) -> str:
  return os.path.join(workdir, MINISLAKH)


def tfds_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  return config.data.tfds_dir or os.path.join(workdir, TFDS)


def dataset_path(data_dir: str, name: str) -> str:
  """The folder a dataset build writes (and tfds.builder_from_directory reads)."""
  return os.path.join(os.path.abspath(os.fspath(data_dir)), name, DATASET_VERSION)


def dataset_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The built dataset's folder for a config; a pure function of both."""
  layout = config.data.layout
  if not config.data.name and layout not in DEFAULT_DATASET_NAMES:
    raise ValueError(f"config key data.layout={layout!r}: expected one of "
                     f"{', '.join(DEFAULT_DATASET_NAMES)}")
  name = config.data.name or DEFAULT_DATASET_NAMES[layout]
  return dataset_path(tfds_dir(config, workdir), name)


def trainer_dir(workdir: str, stage: str) -> str:
  """A trainer's folder: WORKDIR/vae or WORKDIR/ldm."""
  if stage not in (VAE, LDM):
    raise ValueError(f"no trainer folder for stage {stage!r} (trainers: {VAE}, {LDM})")
  return os.path.join(workdir, stage)


def checkpoints_dir(workdir: str, stage: str) -> str:
  return os.path.join(trainer_dir(workdir, stage), CHECKPOINTS)


def latents_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The latent store's folder: `config.ldm.latents_dir`, or WORKDIR/latents."""
  return config.ldm.latents_dir or os.path.join(workdir, LATENTS)


def samples_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Generated pieces: `config.sample.output_dir`, or WORKDIR/samples."""
  return config.sample.output_dir or os.path.join(workdir, SAMPLES)


def evaluation_dir(workdir: str) -> str:
  return os.path.join(workdir, EVALUATION)


def stage_markers_dir(workdir: str) -> str:
  return os.path.join(workdir, STAGE_MARKERS)
