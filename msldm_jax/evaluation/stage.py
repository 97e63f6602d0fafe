"""The `--mode=evaluate` stage: generated pieces against real chunks, as tables and plots.

Reads the total-generation pieces of the sample stage (`piece.json` mode 'total') and the
same number of real four-stem chunks (or up to `evaluate.max_reference_chunks`) from
`evaluate.reference_split` of the built dataset, then writes into WORKDIR/evaluation:

  total_generation.{md,csv,png}   Fréchet distance of the mixture and of each stem
  partial_generation.{md,csv,png} for each of the 14 proper subsets of stems, generated
                                  given the others (`evaluate.partial_chunks` real chunks
                                  of the split as the given stems): the distance of the
                                  whole mixture (MSDM's sub-FAD) and of the generated stems
                                  alone; partial/<subset>/ holds the first such piece
  music_measures.{md,csv}         empty-stem rate and cross-stem coherence, generated vs real
  vae_reconstruction.{md,csv}     SI-SDR and multi-scale mel distance per stem (frozen VAE)
  metrics.json                    everything above, with the embedding that scored it

The embedding is VGGish when `evaluate.vggish_weights` names the weights file (FAD as in the
literature), else the download-free log-mel/MFCC/chroma statistics, whose scores are
labelled as such so that nobody mistakes them for VGGish FAD.
"""

import functools
import glob
import json
import os

from absl import logging
import jax
import ml_collections
import numpy as np
import soundfile as sf

from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.data import input_iterator
from msldm_jax.data import pipeline
from msldm_jax.evaluation import music_metrics
from msldm_jax.evaluation import partial_generation
from msldm_jax.evaluation import statistics_embedding
from msldm_jax.evaluation import tables
from msldm_jax.generation import outputs
from msldm_jax.generation import stage as generation_stage
from msldm_jax.models import loading
from msldm_jax.models import source_vae


def read_total_generation(samples_dir: str) -> np.ndarray:
  """Generated pieces `[pieces, stems, samples]` from the sample stage's total generation."""
  pieces = []
  for piece_json in sorted(glob.glob(os.path.join(samples_dir, "piece_*", "piece.json"))):
    with open(piece_json) as f:
      if json.load(f).get("mode") != "total":
        continue
    folder = os.path.dirname(piece_json)
    audio = []
    for name in stems_lib.STEM_NAMES:
      path = os.path.join(folder, "stems", f"{name}.wav")
      waveform, rate = sf.read(path, dtype="float32")
      if rate != stems_lib.SAMPLE_RATE or waveform.ndim != 1:
        raise ValueError(f"{path}: expected mono {stems_lib.SAMPLE_RATE} Hz, got {rate} Hz "
                         f"with shape {waveform.shape}")
      audio.append(waveform)
    pieces.append(np.stack(audio))
  if not pieces:
    raise FileNotFoundError(f"no total-generation pieces (piece_*/piece.json with mode "
                            f"'total') in {samples_dir}: run --mode=sample first")
  return np.stack(pieces)


def read_reference_chunks(config: ml_collections.ConfigDict, workdir: str, split: str,
                          max_chunks: int) -> np.ndarray:
  """Real four-stem chunks `[chunks, stems, samples]`, the first `max_chunks` in track order."""
  dataset_dir = workdir_layout.dataset_dir(config, workdir)
  dataset_fn = functools.partial(
      pipeline.diffusion_chunks, dataset_dir, split,
      data_config=config.data, batch_size=1, train=False)
  chunks = []
  for batch in input_iterator.InputIterator(dataset_fn, num_epochs=1):
    chunks.extend(np.asarray(batch[pipeline.AUDIO])[np.asarray(batch[pipeline.VALID])])
    if len(chunks) >= max_chunks:
      break
  if not chunks:
    raise ValueError(f"split {split!r} of {dataset_dir} has no "
                     f"chunk of {config.data.chunks.samples} samples")
  return np.stack(chunks[:max_chunks])


def _embedding(evaluate_config):
  """(embed_fn, score label)."""
  if evaluate_config.vggish_weights:
    from msldm_jax.evaluation import vggish  # pylint: disable=g-import-not-at-top
    variables = vggish.load_vggish_params(evaluate_config.vggish_weights)
    pca = (vggish.load_pca_params(evaluate_config.vggish_pca)
           if evaluate_config.vggish_pca else None)
    return (functools.partial(vggish.embed, variables, sample_rate=stems_lib.SAMPLE_RATE,
                              pca=pca), vggish.SCORE_LABEL)
  return functools.partial(statistics_embedding.embed, sample_rate=stems_lib.SAMPLE_RATE), \
      statistics_embedding.SCORE_LABEL


def music_measures(audio: np.ndarray) -> dict[str, float]:
  """Empty-stem rate and cross-stem coherence of a set `[pieces, stems, samples]`."""
  rates = music_metrics.empty_stem_rates(audio)
  measures = {f"empty stem rate ({name})": float(value) for name, value in rates.items()}
  measures["harmonic chroma agreement"] = float(
      music_metrics.harmonic_chroma_agreement(audio, stems_lib.SAMPLE_RATE)["mean"])
  measures["drum-bass onset F-measure"] = float(
      music_metrics.drum_bass_onset_alignment(audio, stems_lib.SAMPLE_RATE))
  return measures


@functools.partial(jax.jit, static_argnames=("vae",))
def _reconstruct(vae_params, waveforms_bst, *, vae: source_vae.SourceVAE):
  # The parameters are an argument, not constants folded into the program.
  mean, _ = vae.apply(vae_params, waveforms_bst, method=vae.encode)
  return vae.apply(vae_params, mean, method=vae.decode)


def vae_reconstruction(vae: loading.Loaded, reference: np.ndarray) -> dict[str, dict[str, float]]:
  """SI-SDR and mel distance per stem of the frozen VAE's posterior-mean reconstructions."""
  recon = np.concatenate([
      np.asarray(_reconstruct(vae.params, reference[i:i + 1], vae=vae.module))
      for i in range(len(reference))])
  samples = min(recon.shape[-1], reference.shape[-1])
  return music_metrics.reconstruction_quality(recon[..., :samples], reference[..., :samples],
                                              stems_lib.SAMPLE_RATE)


def partial_generation_table(config: ml_collections.ConfigDict, vae: loading.Loaded,
                             denoiser: loading.Loaded, reference: np.ndarray, embed_fn,
                             score_label: str, out_dir: str) -> dict[str, dict[str, float]]:
  """Runs the 14 partial generations on the first `evaluate.partial_chunks` reference
  chunks, scores them against all of `reference`, writes the table and one piece per subset.
  """
  num_chunks = min(int(config.evaluate.partial_chunks), len(reference))
  spec = generation_stage.make_spec(config, vae.module, denoiser.module)
  runs = partial_generation.partial_generation_runs(
      spec, vae.params, denoiser.params, reference[:num_chunks],
      seed=int(config.sample.seed), batch_size=int(config.sample.batch_size))
  try:
    mixtures = tables.partial_generation_scores(runs, reference, embed_fn, mixture=True)
    generated = tables.partial_generation_scores(runs, reference, embed_fn)
  except ValueError as error:
    raise ValueError(f"partial-generation table: {error} (config.evaluate.partial_chunks="
                     f"{num_chunks} chunks of {reference.shape[-1]} samples; raise it)") from error
  table = {label: {"mixture": mixtures[label], "generated stems": generated[label]}
           for label in runs}
  tables.write_score_table(out_dir, "partial_generation", table, score_label,
                           row_label="generated stems")
  sample_rate = int(config.data.sample_rate)
  for label, audio in runs.items():
    outputs.write_piece(
        os.path.join(out_dir, "partial", label),
        {name: audio[0, s] for s, name in enumerate(stems_lib.STEM_NAMES)}, sample_rate,
        dict(mode="partial", generated=label.split("+"),
             given=[n for n in stems_lib.STEM_NAMES if n not in label.split("+")],
             conditioning=f"reference chunk 0 of split {config.evaluate.reference_split!r}",
             seed=int(config.sample.seed),
             checkpoints=generation_stage.checkpoint_identities(vae, denoiser)),
        title=f"evaluation: {label} generated given the others")
  return table


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=evaluate` stage; returns the metrics it wrote to metrics.json."""
  evaluate_config = config.evaluate
  out_dir = workdir_layout.evaluation_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  generated = read_total_generation(workdir_layout.samples_dir(config, workdir))
  reference = read_reference_chunks(config, workdir, evaluate_config.reference_split,
                                    int(evaluate_config.max_reference_chunks))
  samples = min(generated.shape[-1], reference.shape[-1])
  generated, reference = generated[..., :samples], reference[..., :samples]
  logging.info("Evaluating %d generated pieces against %d real chunks (%s split).",
               len(generated), len(reference), evaluate_config.reference_split)

  embed_fn, score_label = _embedding(evaluate_config)
  total = tables.total_generation_scores(generated, reference, embed_fn)
  tables.write_score_table(out_dir, "total_generation", total, score_label)

  # The VAE whose latents the diffusion model learned: it decoded the pieces, and its
  # reconstructions bound what generation can reach.
  vae, denoiser = generation_stage.load_models(config, workdir)
  partial = {}
  if int(evaluate_config.partial_chunks) > 0:
    partial = partial_generation_table(config, vae, denoiser, reference, embed_fn,
                                       score_label, out_dir)

  generated_measures, real_measures = music_measures(generated), music_measures(reference)
  tables.write_table(out_dir, "music_measures",
                     {k: {"generated": generated_measures[k], "real": real_measures[k]}
                      for k in generated_measures}, row_label="measure")

  reconstruction = vae_reconstruction(vae, reference)
  tables.write_table(out_dir, "vae_reconstruction",
                     {stem: dict(sorted(scores.items()))
                      for stem, scores in reconstruction.items()}, row_label="measure")

  metrics = dict(score_label=score_label, num_generated=len(generated),
                 num_reference=len(reference), total_generation=total,
                 partial_generation=partial,
                 partial_chunks=min(int(evaluate_config.partial_chunks), len(reference)),
                 music_measures=dict(generated=generated_measures, real=real_measures),
                 vae_reconstruction=reconstruction,
                 checkpoints=generation_stage.checkpoint_identities(vae, denoiser))
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=2)
  logging.info("Evaluation written to %s", out_dir)
  return metrics
