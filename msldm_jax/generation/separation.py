r"""The `--mode=separate` stage: a user's mixture → its bass, drums, guitar and piano.

  python -m msldm_jax.main --config=configs/demo.py --workdir=runs/demo --mode=separate \
      --mix=song.wav [--out_dir=DIR]

Separation is posterior sampling of the joint latent given the mixture, with the diffusion
model trained for generation as the prior: at every sampler step the denoised joint latent is
pulled towards the mixture through the frozen decoder (`diffusion/mixture_guidance.py`:
`separate.method` "dps", or MSDM's cheaper "dirac", where `separate.dirac_stem` is the
mixture minus the others). The sampler and its settings are `config.sample`'s, with
`separate.num_steps` steps when that is set.

The mixture is read like a given stem (`conditions.read_given_stems`: WAV/FLAC/OGG/MP3, any
rate, channels averaged); a mixture longer than the model's window is separated window by
window, each continuing the previous one (`long_form.py`, `config.sample.overlap`). Output,
in `--out_dir` (`separate.output_dir`; empty: WORKDIR/separated/<file name>), at the
mixture's own rate and length:

  stems/{bass,drums,guitar,piano}.wav   the separated stems (32-bit float)
  mix.wav                               their sum
  input.wav                             the mixture as read (mono), for comparison
  spectrogram.png, piece.json           as generated pieces (outputs.py), with the method,
                                        the sampler and how far the stems' sum is from the
                                        mixture (SI-SDR of the sum against it)

`separate_chunks` (one window per mixture, batched) is what `--mode=evaluate` scores
(`evaluation/separation.py`).
"""

import os
import shutil
from collections.abc import Sequence

from absl import logging
import jax
import ml_collections
import numpy as np
import soundfile as sf

from msldm_jax import paper_config
from msldm_jax import stems as stems_lib
from msldm_jax.audio import resampling
from msldm_jax.data import audio_files
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import mixture_guidance
from msldm_jax.generation import conditions
from msldm_jax.generation import long_form
from msldm_jax.generation import outputs
from msldm_jax.generation import stage as generation_stage
from msldm_jax.losses import vae_losses
from msldm_jax.models import loading
from msldm_jax.models import source_vae


def guidance_from_config(config: ml_collections.ConfigDict,
                         method: str | None = None) -> mixture_guidance.Guidance:
  """The `separate` section's method (or `method`), strength and Dirac stem."""
  separate = config.separate
  try:
    return mixture_guidance.Guidance(method=str(method or separate.method),
                                     strength=float(separate.strength),
                                     dirac_stem=str(separate.dirac_stem))
  except ValueError as e:
    raise ValueError(f"config section separate: {e}") from None


def separation_spec(config: ml_collections.ConfigDict, vae, denoiser,
                    latent_scale: Sequence[float] = ()) -> generation_program.GenerationSpec:
  """The one-window program (every stem sampled) at `separate.num_steps` steps when set
  (`latent_scale`: the denoiser's, `loading.latent_scale`)."""
  if paper_config.latent_sources(config) != stems_lib.STEM_NAMES:
    raise ValueError(f"config key system={config.system!r} models the mixture alone: "
                     "separating into stems needs a model of the stems (msldm, isldm)")
  derived = ml_collections.ConfigDict(config.to_dict())
  steps = int(config.separate.num_steps)
  if steps > 0:
    derived.sample.num_steps = steps
  return generation_stage.make_spec(derived, vae, denoiser, stems_lib.STEM_NAMES, latent_scale)


def separate_chunks(spec: generation_program.GenerationSpec, vae_params, denoiser_params,
                    mixtures: np.ndarray, *, guidance: mixture_guidance.Guidance, seed: int,
                    batch_size: int, overlap_frames: int | None = None) -> np.ndarray:
  """Separates each mixture [n, samples] (any length); returns stems [n, stems, samples].

  Mixture i uses the key fold_in(key(seed), i). Mixtures of one window or less are one
  compiled call per batch; longer ones go window by window (`overlap_frames`).
  """
  mixtures = np.asarray(mixtures, np.float32)
  num, num_samples = mixtures.shape
  overlap_frames = (long_form.overlap_frames_for(spec.num_frames, 0.25)
                    if overlap_frames is None else overlap_frames)
  plan = long_form.plan_for(spec, num_samples, overlap_frames)
  out = np.zeros((num, stems_lib.NUM_STEMS, num_samples), np.float32)
  batch_size = max(1, min(int(batch_size), num))  # No padding rows beyond the mixtures.
  for start in range(0, num, batch_size):
    rows = list(range(start, min(start + batch_size, num)))
    padded = rows + [rows[-1]] * (batch_size - len(rows))
    keys = generation_program.piece_keys(seed, padded)
    windows = []
    for _, _, waveforms in long_form.generate_long(
        spec, vae_params, denoiser_params, keys, plan, num_samples,
        mixture=mixtures[padded], guidance=guidance, progress=plan.num_windows > 1):
      windows.append(waveforms)
    joined = long_form.join_windows(windows, plan, num_samples)
    if guidance.method == "dirac" and plan.num_windows > 1:
      # The crossfade of residual stems is the residual of the crossfaded others: exact.
      joined = np.asarray(jax.vmap(mixture_guidance.residual_stem, in_axes=(0, 0, None))(
          joined, mixtures[padded], guidance.dirac_index))
    out[rows] = joined[:len(rows)]
  return out


def read_mixture(path: str, sample_rate: int) -> conditions.GivenStems:
  """The mixture file, read as a given stem is (any format, rate and channels)."""
  return conditions.read_given_stems({stems_lib.MIXTURE: path}, sample_rate)


def output_dir_for(config: ml_collections.ConfigDict, workdir: str, mix_path: str) -> str:
  if config.separate.output_dir:
    return config.separate.output_dir
  name = os.path.splitext(os.path.basename(mix_path))[0]
  return os.path.join(workdir, "separated", name)


def separate_to_dir(config: ml_collections.ConfigDict, mix_path: str, output_dir: str, vae,
                    vae_params, denoiser, denoiser_params, checkpoints=None,
                    latent_scale: Sequence[float] = ()) -> str:
  """Separates the mixture file `mix_path` into `output_dir`; returns it (`latent_scale`:
  the denoiser's, `loading.latent_scale`)."""
  sample_rate = int(config.data.sample_rate)
  mixture = read_mixture(mix_path, sample_rate)
  audio = mixture.waveforms[stems_lib.MIXTURE]
  hop = source_vae.hop_length(vae.encoder_strides)
  if len(audio) < hop:
    raise ValueError(f"{mix_path}: {len(audio)} samples at {sample_rate} Hz is shorter than "
                     f"one latent frame ({hop} samples): nothing to separate")
  guidance = guidance_from_config(config)
  spec = separation_spec(config, vae, denoiser, latent_scale)
  overlap_frames = long_form.overlap_frames_for(spec.num_frames, config.sample.overlap)
  plan = long_form.plan_for(spec, len(audio), overlap_frames)
  logging.info("separating %s (%.2f s, %d window%s) by %s with %s, %s steps", mix_path,
               len(audio) / sample_rate, plan.num_windows, "s" if plan.num_windows > 1 else "",
               guidance.method, spec.sampler_name, dict(spec.sampler_settings)["num_steps"])
  stems = separate_chunks(spec, vae_params, denoiser_params, audio[None], guidance=guidance,
                          seed=int(config.separate.seed), batch_size=1,
                          overlap_frames=overlap_frames)[0]
  rate = mixture.output_rate(sample_rate)
  length = mixture.output_length(sample_rate)
  if rate != sample_rate:
    stems = np.stack([resampling.resample(s, sample_rate, rate) for s in stems])
  stems = {name: conditions.fit_to_length(stems[k], length)
           for k, name in enumerate(stems_lib.STEM_NAMES)}
  total = outputs.mixture(stems)
  input_audio = conditions.fit_to_length(
      audio_files.read_mono(mix_path, rate), length)
  consistency = float(vae_losses.si_sdr(total, input_audio))
  if jax.process_index() == 0:
    record = dict(
        mode="separation", mix_file=os.path.abspath(mix_path), method=guidance.method,
        strength=guidance.strength,
        dirac_stem=guidance.dirac_stem if guidance.method == "dirac" else None,
        seed=int(config.separate.seed),
        sampler=dict(name=spec.sampler_name, **dict(spec.sampler_settings)),
        windows=plan.num_windows, window_frames=spec.num_frames,
        overlap=float(config.sample.overlap), input_rate=mixture.source_rates[stems_lib.MIXTURE],
        sum_si_sdr_to_mixture_db=consistency, checkpoints=dict(checkpoints or {}))
    # Written beside the output and moved into place whole: an error part-way leaves no
    # half-written folder that looks like a result.
    partial = output_dir.rstrip(os.sep) + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    outputs.write_piece(partial, stems, rate, record,
                        title=f"separated ({guidance.method}): {os.path.basename(mix_path)}")
    sf.write(os.path.join(partial, "input.wav"), input_audio, rate,
             subtype=outputs.WAV_SUBTYPE)
    if os.path.isdir(output_dir):
      shutil.rmtree(output_dir)
    os.replace(partial, output_dir)
  logging.info("separated stems in %s (their sum against the mixture: SI-SDR %.1f dB)",
               output_dir, consistency)
  return output_dir


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The `--mode=separate` stage; returns the output folder."""
  mix_path = str(config.separate.mix)
  if not mix_path:
    raise ValueError("--mode=separate needs a mixture: --mix=FILE (config.separate.mix)")
  guidance_from_config(config)  # Bad settings fail before any restore.
  read_mixture(mix_path, int(config.data.sample_rate))  # So does a bad file.
  vae, denoiser = generation_stage.load_models(config, workdir)
  output_dir = output_dir_for(config, workdir, mix_path)
  return separate_to_dir(config, mix_path, output_dir, vae.module, vae.params,
                         denoiser.module, denoiser.params,
                         checkpoints=generation_stage.checkpoint_identities(vae, denoiser),
                         latent_scale=loading.latent_scale(denoiser))
