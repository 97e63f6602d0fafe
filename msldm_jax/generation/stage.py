r"""The `--mode=sample` stage: total and partial generation of four-stem pieces (or of
mixtures alone, for a MixLDM checkpoint: `config.system=mixldm`).

  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample \
      --condition_dir=DIR --generate=bass,drums
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample \
      --condition=bass=my_bass.flac,piano=my_piano.mp3 [--pad]
  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=sample \
      --seconds=60

Total generation (`config.sample.generate` empty): `num_pieces` pieces, all four stems
sampled jointly from x = σ_max·ε on the joint latent (reference §6), each stem decoded by the
frozen SourceVAE; the mix is the sum of the stems. One chunk long, or `sample.seconds`.

Partial generation (reference §7): the stems not named in `generate` are given
(`condition_dir` or `condition`; see `conditions.py` for formats, resampling, downmix and
lengths), encoded with the frozen VAE (posterior mean), held by the sampler's inpainting mask,
and the named stems are sampled and decoded. The mix is the given stems' ORIGINAL waveforms
plus the generated ones; each of the `num_pieces` pieces is another draw given the same stems.
Pieces are as long as the given stems, written at their rate when they share one.

A piece of up to one chunk (`data.chunks.samples`) is one compiled call; a longer one is
generated window by window (`long_form.py`).

Piece i uses the key fold_in(key(config.sample.seed), i): same seed, same pieces.
Output: `config.sample.output_dir` (empty: WORKDIR/samples), laid out as in `outputs.py`.
Checkpoints (`load_models`, through `models/loading.py`): the denoiser from
`config.ldm.denoiser_checkpoint` (e.g. the release's U-Net imported by
`msldm_jax.tools.import_release`), else WORKDIR (`load_denoiser`, EMA parameters when
`config.sample.use_ema`); the SourceVAE from `config.ldm.vae_checkpoint`, else the VAE the
denoiser's checkpoint records (the one whose latents it learned), else WORKDIR; its
parameters' sha256 must equal the recorded one. Only an imported denoiser may record no VAE
(a release checkpoint imported without its SourceVAE): then config.ldm.vae_checkpoint must
name one, and a warning says that nothing checks it is the right one.

The functions below take the modules and parameters as arguments (`generate_pieces`,
`generate_to_dir`), so tests and notebooks run generation without checkpoints.
"""

import dataclasses
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from msldm_jax import paper_config
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.audio import resampling
from msldm_jax.data import audio_files
from msldm_jax.diffusion import generation_program
from msldm_jax.generation import conditions
from msldm_jax.generation import long_form
from msldm_jax.generation import outputs
from msldm_jax.models import loading
from msldm_jax.models import source_vae


@dataclasses.dataclass(frozen=True)
class Task:
  """What a run generates.

  Attributes:
    generate_stems: the stems to sample (the mixture alone for a MixLDM checkpoint).
    given: the given stems (partial generation), or None.
    num_samples: each piece's length at the model's rate: the given stems' length, else
      `config.sample.seconds` (0: one chunk, `config.data.chunks.samples`).
  """
  generate_stems: tuple[str, ...]
  given: conditions.GivenStems | None = None
  num_samples: int = 0

  @property
  def is_partial(self) -> bool:
    return self.given is not None


@dataclasses.dataclass(frozen=True)
class Piece:
  """One generated piece.

  Attributes:
    index: its index (its key is fold_in(key(seed), index)).
    latents: float32 [stems·latent_dim, frames], the sampler's output before decoding; the
      given stems' channels equal their encodings exactly. For a piece of several windows,
      the windows' latents laid end to end along time (overlaps once).
    stems: every stem by name, float32 [num_samples]: decoded for generated stems, the
      original waveform for given ones; {"mix": ...} alone for a mixture latent.
    generated: the stems that were sampled.
  """
  index: int
  latents: np.ndarray
  stems: dict[str, np.ndarray]
  generated: tuple[str, ...]

  @property
  def mix(self) -> np.ndarray:
    return outputs.mixture(self.stems)


def _piece_samples(config: ml_collections.ConfigDict) -> int:
  """Total generation's piece length: `sample.seconds` at the model's rate, or one chunk."""
  seconds = float(config.sample.get("seconds", 0.0))
  if seconds < 0:
    raise ValueError(f"config key sample.seconds={seconds}: must be >= 0 (0: one chunk)")
  if seconds == 0:
    return int(config.data.chunks.samples)
  return int(round(seconds * int(config.data.sample_rate)))


def prepare_task(config: ml_collections.ConfigDict) -> Task:
  """Parses `generate` and reads the given stems: every input error before any model loads."""
  sample_config = config.sample
  sources = paper_config.latent_sources(config)
  condition = str(sample_config.get("condition", "")).strip()
  if sources == (stems_lib.MIXTURE,):
    if sample_config.generate or sample_config.condition_dir or condition:
      raise ValueError(f"config key system={paper_config.check_system(config)!r} models "
                       "the mixture alone: it has no stems to give or generate "
                       "(config.sample.generate="
                       f"{sample_config.generate!r}, condition_dir="
                       f"{sample_config.condition_dir!r}, condition={condition!r})")
    return Task(sources, num_samples=_piece_samples(config))
  if condition:
    if sample_config.condition_dir:
      raise ValueError(f"config.sample.condition={condition!r} and condition_dir="
                       f"{sample_config.condition_dir!r}: give the stems one way")
    paths = conditions.parse_condition(condition)
    generate_stems = (conditions.parse_generate(sample_config.generate)
                      if str(sample_config.generate).strip() else
                      tuple(s for s in stems_lib.STEM_NAMES if s not in paths))
    given_stems = tuple(s for s in stems_lib.STEM_NAMES if s not in generate_stems)
    if tuple(paths) != given_stems:
      raise ValueError(f"config.sample.condition={condition!r} gives {', '.join(paths)}, but "
                       f"generating {', '.join(generate_stems)} needs exactly the others: "
                       f"{', '.join(given_stems) or 'none'}")
  else:
    generate_stems = conditions.parse_generate(sample_config.generate)
    given_stems = tuple(s for s in stems_lib.STEM_NAMES if s not in generate_stems)
    if not given_stems:
      if sample_config.condition_dir:
        logging.warning("config.sample.condition_dir=%r is not used: every stem is generated "
                        "(set config.sample.generate / --generate to the stems to generate)",
                        sample_config.condition_dir)
      return Task(generate_stems, num_samples=_piece_samples(config))
    paths = conditions.find_in_dir(sample_config.condition_dir, given_stems)
  given = conditions.read_given_stems(paths, int(config.data.sample_rate),
                                      pad=bool(sample_config.get("pad", False)))
  if float(sample_config.get("seconds", 0.0)):
    logging.warning("config.sample.seconds=%s is not used: partial generation follows the "
                    "given stems' length (%.2f s)", sample_config.seconds,
                    given.num_samples / int(config.data.sample_rate))
  return Task(generate_stems, given, num_samples=given.num_samples)


def make_spec(config: ml_collections.ConfigDict, vae, denoiser,
              generate_stems: Sequence[str] | None = None,
              latent_scale: Sequence[float] = ()) -> generation_program.GenerationSpec:
  """The compiled program's static description from the config and the two modules
  (`generate_stems` None: every source of the config's system; `latent_scale`: the
  denoiser's, `loading.latent_scale`)."""
  sources = paper_config.latent_sources(config)
  generate_stems = sources if generate_stems is None else generate_stems
  name, settings = generation_program.sampler_settings(config.sample)
  num_samples = int(config.data.chunks.samples)
  frames = generation_program.latent_frames(num_samples, vae, int(denoiser.frame_multiple))
  spec = generation_program.GenerationSpec(
      vae=vae, denoiser=denoiser, num_frames=frames, sampler_name=name,
      sampler_settings=tuple(sorted(settings.items())),
      sigma_data=float(config.ldm.sigma_data), generate_stems=tuple(generate_stems),
      resample_steps=int(config.sample.resample_steps),
      progress_every=int(config.sample.get("log_every_steps", 0)), sources=tuple(sources),
      latent_scale=tuple(float(s) for s in latent_scale))
  if spec.num_samples < num_samples:
    raise ValueError(f"config.data.chunks.samples={num_samples}: the VAE decodes its "
                     f"{frames} latent frames to only {spec.num_samples} samples")
  return spec


def generate_pieces(spec: generation_program.GenerationSpec, vae_params, denoiser_params, *,
                    seed: int, piece_indices: Sequence[int], batch_size: int,
                    num_samples: int, given: conditions.GivenStems | None = None,
                    devices=None) -> Iterator[Piece]:
  """Generates the pieces `piece_indices`, `batch_size` per compiled call; yields each.

  Args:
    spec: the program (`make_spec`, or built directly in tests).
    vae_params, denoiser_params: the two modules' variables.
    seed: the run's seed; piece i uses fold_in(key(seed), i).
    piece_indices: which pieces.
    batch_size: pieces per call, split over up to as many local devices (the last batch is
      padded with repeats of its last piece, so the program compiles once).
    num_samples: samples per stem in the output (decoded stems cropped or zero-padded).
    given: the given stems, required for partial generation.
    devices: the devices to use (default: all local ones).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  piece_indices = [int(i) for i in piece_indices]
  mesh = generation_program.generation_mesh(batch_size, devices)
  vae_params = generation_program.replicate(vae_params, mesh)
  denoiser_params = generation_program.replicate(denoiser_params, mesh)
  x_known = None
  if spec.is_partial:
    if given is None or given.names != spec.given_stems:
      raise ValueError(f"partial generation of {spec.generate_stems} needs the given stems "
                       f"{spec.given_stems}, got {None if given is None else given.names}")
    # One window: the given stems fitted to it (the output is cropped to them again).
    x_known = generation_program.encode_given(vae_params, given.stacked(spec.num_samples),
                                              vae=spec.vae, latent_scale=spec.latent_scale)
    if x_known.shape != (1, spec.channels, spec.num_frames):
      raise ValueError(f"the given stems encode to {x_known.shape}, but the program samples "
                       f"{(1, spec.channels, spec.num_frames)}")
    x_known = generation_program.replicate(x_known, mesh)

  for start in range(0, len(piece_indices), batch_size):
    indices = piece_indices[start:start + batch_size]
    padded = indices + [indices[-1]] * (batch_size - len(indices))
    keys = generation_program.place_keys(generation_program.piece_keys(seed, padded), mesh)
    latents, waveforms = generation_program.generate_batch(vae_params, denoiser_params, keys,
                                                           x_known, spec=spec)
    latents, waveforms = jax.device_get((latents, waveforms))
    for row, index in enumerate(indices):
      stems = {name: conditions.fit_to_length(waveforms[row, k], num_samples)
               for k, name in enumerate(spec.generate_stems)}
      if spec.is_partial:
        stems.update({name: conditions.fit_to_length(audio, num_samples)
                      for name, audio in given.waveforms.items()})
      yield Piece(index=index, latents=np.asarray(latents[row]),
                  stems={name: stems[name] for name in spec.sources},
                  generated=spec.generate_stems)


def generate_long_pieces(spec: generation_program.GenerationSpec, vae_params,
                         denoiser_params, *, seed: int, piece_indices: Sequence[int],
                         batch_size: int, num_samples: int, overlap_frames: int,
                         generate_stems: Sequence[str] = stems_lib.STEM_NAMES,
                         given: conditions.GivenStems | None = None) -> Iterator[Piece]:
  """Pieces of any length, window by window (`long_form.py`); yields each.

  Args:
    spec: the one-window program with every stem generated (`make_spec(..., STEM_NAMES)`);
      the given stems are held as known values.
    vae_params, denoiser_params, seed, piece_indices, batch_size: as `generate_pieces`.
    num_samples: each piece's length at the model's rate.
    overlap_frames: the least overlap of consecutive windows, in latent frames.
    generate_stems: the stems sampled; the others are `given`.
    given: the given stems at `num_samples` (partial generation).
  """
  if spec.is_mixture:
    raise ValueError("pieces longer than one window are generated for stems (msldm, isldm); "
                     "a mixture-only model generates one window (config.sample.seconds=0)")
  generate_stems = tuple(generate_stems)
  given_stems = tuple(s for s in stems_lib.STEM_NAMES if s not in generate_stems)
  if given_stems and (given is None or given.names != given_stems):
    raise ValueError(f"generating {generate_stems} needs the given stems {given_stems}, got "
                     f"{None if given is None else given.names}")
  plan = long_form.plan_for(spec, num_samples, overlap_frames)
  logging.info("%d windows of %d frames (overlap ≥ %d) for %.2f s per piece", plan.num_windows,
               plan.window_frames, overlap_frames, num_samples / stems_lib.SAMPLE_RATE)
  given_audio = None if not given_stems else given.stacked(num_samples)[0]
  piece_indices = [int(i) for i in piece_indices]
  for start in range(0, len(piece_indices), batch_size):
    indices = piece_indices[start:start + batch_size]
    padded = indices + [indices[-1]] * (batch_size - len(indices))
    keys = generation_program.piece_keys(seed, padded)
    latents, windows = [], []
    for _, window_latents, waveforms in long_form.generate_long(
        spec, vae_params, denoiser_params, keys, plan, num_samples, given=given_audio,
        given_stems=given_stems, progress=True):
      latents.append(window_latents)
      windows.append(waveforms)
    joined = long_form.join_windows(windows, plan, num_samples)  # [batch, stems, samples]
    laid = long_form.lay_latents(latents, plan)  # [batch, channels, total frames]
    for row, index in enumerate(indices):
      stems = {name: joined[row, k] for k, name in enumerate(stems_lib.STEM_NAMES)
               if name in generate_stems}
      if given_stems:
        stems.update({name: given_audio[stems_lib.stem_index(name)] for name in given_stems})
      yield Piece(index=index, latents=laid[row], stems=stems, generated=generate_stems)


def _piece_metadata(config, spec, task: Task, piece: Piece, checkpoints,
                    windows: int = 1) -> dict[str, Any]:
  seed = int(config.sample.seed)
  record = dict(
      piece_index=piece.index,
      seed=seed,
      key=f"fold_in(key({seed}), {piece.index})",
      mode="partial" if task.is_partial else "total",
      generated=list(task.generate_stems),
      given=[s for s in spec.sources if s not in task.generate_stems],
      sampler=dict(name=spec.sampler_name, **dict(spec.sampler_settings)),
      sigma_data=spec.sigma_data,
      latent_scale=list(spec.latent_scale),
      latent_frames=int(piece.latents.shape[-1]),
      window_frames=spec.num_frames,
      windows=windows,
      use_ema=bool(config.sample.use_ema),
      checkpoints=dict(checkpoints or {}),
  )
  if windows > 1:
    record.update(overlap=float(config.sample.overlap))
  if task.is_partial:
    record.update(resample_steps=spec.resample_steps,
                  condition_dir=(os.path.abspath(config.sample.condition_dir)
                                 if config.sample.condition_dir else ""),
                  given_files={k: os.path.abspath(v) for k, v in task.given.files.items()},
                  given_original_samples=dict(task.given.original_samples),
                  given_rates=dict(task.given.source_rates),
                  padded=list(task.given.padded))
  return record


def output_stems(piece: Piece, task: Task, sample_rate: int) -> tuple[dict[str, np.ndarray],
                                                                      int]:
  """(stems, rate) as written: at the given stems' own rate and length when they share a
  rate other than the model's (a user's recordings), the given ones as read from their
  files; else the piece's stems as they are."""
  if not task.is_partial or task.given.output_rate(sample_rate) == sample_rate:
    return piece.stems, sample_rate
  rate = task.given.output_rate(sample_rate)
  length = task.given.output_length(sample_rate)
  stems = {}
  for name, audio in piece.stems.items():
    if name in task.given.files:
      audio = audio_files.read_mono(task.given.files[name], rate)
    else:
      audio = resampling.resample(audio, sample_rate, rate)
    stems[name] = conditions.fit_to_length(audio, length)
  return stems, rate


def generate_to_dir(config: ml_collections.ConfigDict, output_dir: str, vae, vae_params,
                    denoiser, denoiser_params, *, task: Task | None = None,
                    checkpoints: Mapping[str, Any] | None = None, devices=None,
                    latent_scale: Sequence[float] = ()) -> str:
  """Generates `config.sample.num_pieces` pieces into `output_dir`; returns it.

  A piece of one chunk (`config.data.chunks.samples`) or less is one compiled call of the
  sampler and decoder; a longer one (`config.sample.seconds`, or given stems longer than a
  chunk) is generated window by window (`long_form.py`, `config.sample.overlap`).

  Args:
    config: the full config (`sample`, `data.chunks.samples`, `data.sample_rate`,
      `ldm.sigma_data`).
    output_dir: where the piece folders go (created).
    vae, vae_params: the SourceVAE module and its variables.
    denoiser, denoiser_params: the denoiser network (e.g. the DiT) and its variables.
    task: from `prepare_task(config)` (read here when None).
    checkpoints: identities of the checkpoints used, recorded in each piece.json.
    devices: devices to generate on (default: all local ones).
    latent_scale: the denoiser's (`loading.latent_scale`), () for latents as stored.
  """
  task = task or prepare_task(config)
  sample_config = config.sample
  num_pieces = int(sample_config.num_pieces)
  chunk_samples = int(config.data.chunks.samples)
  num_samples = task.num_samples or chunk_samples
  sample_rate = int(config.data.sample_rate)
  batch_size = min(int(sample_config.get("batch_size", 1)), max(num_pieces, 1))
  long = num_samples > chunk_samples
  spec = make_spec(config, vae, denoiser, None if long else task.generate_stems,
                   latent_scale)
  windows = 1
  if long:
    overlap_frames = long_form.overlap_frames_for(spec.num_frames, sample_config.overlap)
    windows = long_form.plan_for(spec, num_samples, overlap_frames).num_windows
  given_stems = [s for s in spec.sources if s not in task.generate_stems]
  logging.info("%s generation of %d pieces (%s; given: %s) with %s %s, %.2f s each "
               "(%d window%s of %d latent frames), into %s",
               "partial" if task.is_partial else "total", num_pieces,
               ",".join(task.generate_stems), ",".join(given_stems) or "none",
               spec.sampler_name, dict(spec.sampler_settings), num_samples / sample_rate,
               windows, "s" if windows > 1 else "", spec.num_frames, output_dir)
  if num_samples < source_vae.hop_length(vae.encoder_strides):
    raise ValueError(f"a piece of {num_samples} samples is shorter than one latent frame "
                     f"({source_vae.hop_length(vae.encoder_strides)} samples at "
                     f"{sample_rate} Hz)")
  writer = jax.process_index() == 0  # Every process generates; one writes.
  if writer:
    os.makedirs(output_dir, exist_ok=True)
  common = dict(seed=int(sample_config.seed), piece_indices=range(num_pieces),
                batch_size=batch_size, num_samples=num_samples, given=task.given)
  if long:
    pieces = generate_long_pieces(spec, vae_params, denoiser_params,
                                  overlap_frames=overlap_frames,
                                  generate_stems=task.generate_stems, **common)
  else:
    pieces = generate_pieces(spec, vae_params, denoiser_params, devices=devices, **common)
  for piece in tqdm.tqdm(pieces, total=num_pieces, unit="piece", desc="generating",
                         disable=not writer):
    if writer:
      stems, rate = output_stems(piece, task, sample_rate)
      outputs.write_piece(
          outputs.piece_dir(output_dir, piece.index), stems, rate,
          _piece_metadata(config, spec, task, piece, checkpoints, windows),
          title=f"piece {piece.index:03d} ({'generated: ' + ','.join(piece.generated)})",
          latents=piece.latents)
  return output_dir


def load_models(config: ml_collections.ConfigDict, workdir: str
                ) -> tuple[loading.Loaded, loading.Loaded]:
  """(vae, denoiser): the denoiser (EMA when `config.sample.use_ema`) and the VAE whose
  latents it learned.

  Raises:
    ValueError when the VAE is not the one the denoiser's checkpoint records.
  """
  denoiser = loading.load_denoiser(config.ldm.get("denoiser_checkpoint") or workdir,
                                   use_ema=bool(config.sample.use_ema))
  learned = denoiser.identity.get("latents", {})
  what = f"the diffusion checkpoint {denoiser.identity['checkpoint_dir']}"
  unrecorded_import = (denoiser.identity["format"] == loading.FORMAT_IMPORTED
                       and not learned.get("vae"))
  if unrecorded_import and not config.ldm.vae_checkpoint:
    raise ValueError(f"{what} is an import that records no SourceVAE: set "
                     "config.ldm.vae_checkpoint to the VAE whose latents it learned (or "
                     "import both with python -m msldm_jax.tools.import_release --sourcevae)")
  vae_path = (config.ldm.vae_checkpoint or learned.get("vae", {}).get("checkpoint_dir")
              or workdir)
  vae = loading.load_vae(vae_path)
  recorded_sigma_data = denoiser.identity.get("sigma_data")
  if recorded_sigma_data is not None and recorded_sigma_data != float(config.ldm.sigma_data):
    raise ValueError(f"{what} was trained with sigma_data={recorded_sigma_data}, but config "
                     f"key ldm.sigma_data={config.ldm.sigma_data}: the preconditioning must "
                     "match the training's")
  if unrecorded_import:
    logging.warning("%s records no SourceVAE: decoding with %s, which nothing checks is the "
                    "VAE whose latents it learned", what, vae.identity["checkpoint_dir"])
  else:
    loading.check_same_vae(vae, learned.get("vae"), what=what)
  sources = paper_config.latent_sources(config)
  recorded_sources = tuple(learned.get("sources", stems_lib.STEM_NAMES))
  if recorded_sources != sources:
    raise ValueError(f"{what} learned latents of {recorded_sources}, but config key "
                     f"system={paper_config.check_system(config)!r} generates {sources}")
  channels = len(sources) * vae.module.latent_dim
  if denoiser.module.in_channels != channels:
    raise ValueError(f"the denoiser {denoiser.identity['checkpoint_dir']} takes "
                     f"{denoiser.module.in_channels} channels, the VAE {vae_path} makes "
                     f"{channels}")
  return vae, denoiser


def checkpoint_identities(vae: loading.Loaded, denoiser: loading.Loaded) -> dict[str, Any]:
  """What each piece.json records of the two checkpoints."""
  return {"vae": dict(vae.identity), "ldm": dict(denoiser.identity)}


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The `--mode=sample` stage; returns the output folder."""
  task = prepare_task(config)  # Bad --generate or given stems fail before any restore.
  vae, denoiser = load_models(config, workdir)
  return generate_to_dir(config, workdir_layout.samples_dir(config, workdir), vae.module,
                         vae.params, denoiser.module, denoiser.params, task=task,
                         checkpoints=checkpoint_identities(vae, denoiser),
                         latent_scale=loading.latent_scale(denoiser))
