"""The `--mode=evaluate` stage: generated pieces against real chunks, as tables and plots.

Reads the total-generation pieces of the sample stage (`piece.json` mode 'total') and the
real four-stem chunks of `evaluate.reference_split` of the built dataset (all of them, or a
seeded random sample of `evaluate.max_reference_chunks`, never the first N in track order),
then writes into WORKDIR/evaluation:

  total_generation.{md,csv,png}   KAD and FD of the mixture and of each stem, each with a
                                  bootstrap 95 % interval, its floor (two halves of the
                                  real set), the same through the VAE (the first half's
                                  reconstructions against the second half: the codec's
                                  ceiling), and the windows counted on each side
  partial_generation.{md,csv,png} for each of the 14 proper subsets of stems, generated given
                                  the others (the given stems from `evaluate.partial_chunks`
                                  seeded random real chunks, as MSDM does): the whole
                                  mixture (MSDM's sub-FAD) and the generated stems alone;
                                  `evaluate.partial_disjoint_reference` leaves those chunks
                                  out of the reference (named in the table); partial/<subset>/
                                  holds the first such piece
  music_measures.{md,csv}         empty-stem rate (per 1 s window, the data's silence rule)
                                  and cross-stem coherence, generated vs real: each measure
                                  on a piece's own stems, on stems of different pieces (its
                                  value without dependence) and their difference
  cross_stem_dependence.{md,csv}  that difference with its bootstrap interval over pieces:
                                  how far the generated stems depend on each other, against
                                  the real stems' and their VAE reconstructions' (what a
                                  generator decoding through this VAE can reach at most)
                                  (music_metrics.cross_stem_dependence)
  cross_stem_information.{md,csv} the same question asked of the denoiser, in latents: per
                                  stem and σ, how much its loss on the held-out chunks of
                                  the reference splits grows when the other stems come from
                                  another chunk (0 for isldm; latent_dependence.py)
  levels.{md,csv}                 each stem's level (dB RMS), generated vs the real spread
                                  and the real stems through the VAE
  instrument_tags.{md,csv}        how often musicnn's MTT tagger ranks a guitar, piano or
                                  drums stem's own instrument first; real stems: the ceiling
  vae_reconstruction.{md,csv}     the frozen VAE's reconstructions of the reference chunks:
                                  SI-SDR, multi-scale mel distance and instrument tags per
                                  stem (evaluation/vae_quality.py)
  separation.{md,csv}             with `evaluate.separation`: SI-SDR improvement per stem of
                                  separating real mixtures (evaluation/separation.py), each
                                  method beside the VAE's reconstruction (the ceiling)
  metrics.json                    everything above, with the embedding that scored it

The embedding (`evaluate.embedding`): "musicnn" (default: the penultimate layer of the
shipped MSD musicnn, `musicnn.py`), "vggish" (FAD as in the literature, when
`evaluate.vggish_weights` names the weights), or "statistics" (log-mel/MFCC/chroma
statistics, no weights). Every table names it. Generated pieces with non-finite samples are
left out of every score and counted in the tables' notes; silent ones are scored (and show
as empty stems).
"""

import functools
import glob
import json
import os

from absl import logging
import ml_collections
import numpy as np
import soundfile as sf

from msldm_jax import atomic_files
from msldm_jax import paper_config
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.evaluation import distance_scores
from msldm_jax.evaluation import instrument_tags
from msldm_jax.evaluation import latent_dependence
from msldm_jax.evaluation import music_metrics
from msldm_jax.evaluation import musicnn
from msldm_jax.evaluation import partial_generation
from msldm_jax.evaluation import reference_set
from msldm_jax.evaluation import separation as separation_scores
from msldm_jax.evaluation import statistics_embedding
from msldm_jax.evaluation import tables
from msldm_jax.evaluation import vae_quality
from msldm_jax.generation import outputs
from msldm_jax.generation import separation
from msldm_jax.generation import stage as generation_stage
from msldm_jax.models import loading


# evaluate.scope: every table, or the mixture's distances alone.
SCOPES = ("full", "mixture_distances")


def read_total_generation(samples_dir: str,
                          sources: tuple[str, ...] = stems_lib.STEM_NAMES) -> np.ndarray:
  """Generated pieces `[pieces, sources, samples]` from the sample stage's total generation:
  the four stems, or (sources ("mix",), MixLDM's pieces) the mixture alone."""
  pieces = []
  for piece_json in sorted(glob.glob(os.path.join(samples_dir, "piece_*", "piece.json"))):
    with open(piece_json) as f:
      if json.load(f).get("mode") != "total":
        continue
    folder = os.path.dirname(piece_json)
    audio = []
    for name in sources:
      path = (os.path.join(folder, "mix.wav") if name == stems_lib.MIXTURE else
              os.path.join(folder, "stems", f"{name}.wav"))
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


def _embedding(evaluate_config, sample_rate: int):
  """(batched embed_fn, the embedding's name for tables)."""
  kind = evaluate_config.embedding
  if kind == "musicnn":
    model = musicnn.load(evaluate_config.musicnn_model)
    return (functools.partial(musicnn.embed_batch, model, sample_rate=sample_rate),
            musicnn.EMBEDDING_NAMES[evaluate_config.musicnn_model])
  if kind == "vggish":
    if not evaluate_config.vggish_weights:
      raise ValueError("evaluate.embedding='vggish' needs evaluate.vggish_weights (the "
                       "weights file; see msldm_jax/evaluation/vggish.py)")
    from msldm_jax.evaluation import vggish  # pylint: disable=g-import-not-at-top
    variables = vggish.load_vggish_params(evaluate_config.vggish_weights)
    pca = (vggish.load_pca_params(evaluate_config.vggish_pca)
           if evaluate_config.vggish_pca else None)
    return (tables.per_waveform(functools.partial(vggish.embed, variables,
                                                  sample_rate=sample_rate, pca=pca)),
            vggish.EMBEDDING_NAME)
  if kind == "statistics":
    return (tables.per_waveform(functools.partial(statistics_embedding.embed,
                                                  sample_rate=sample_rate)),
            statistics_embedding.EMBEDDING_NAME)
  raise ValueError(f"evaluate.embedding={kind!r}: expected 'musicnn', 'vggish' or "
                   "'statistics'")


def protocol_of(evaluate_config) -> distance_scores.Protocol:
  """The bootstrap protocol of every interval in the evaluation (`evaluate` config keys)."""
  return distance_scores.Protocol(bootstrap_samples=int(evaluate_config.bootstrap_samples),
                                  seed=int(evaluate_config.seed))


def finite_pieces(audio: np.ndarray, what: str) -> tuple[np.ndarray, list[str]]:
  """(the pieces whose samples are all finite, notes saying how many were left out)."""
  finite = np.isfinite(audio).reshape(len(audio), -1).all(axis=1)
  if finite.all():
    return audio, []
  note = (f"{int((~finite).sum())} of {len(audio)} {what} have non-finite (NaN/inf) samples "
          "and are left out of every score.")
  logging.warning(note)
  if finite.sum() < 2:
    raise ValueError(f"{note} Fewer than 2 remain: nothing to score.")
  return audio[finite], [note]


def music_measures(audio: np.ndarray, empty_share: float, protocol: distance_scores.Protocol
                   ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """Empty-stem rate (per 1 s window) and cross-stem coherence of `[pieces, stems, samples]`:
  the measures, and each coherence measure's dependence with its interval
  (`music_metrics.cross_stem_dependence`)."""
  rates = music_metrics.empty_stem_rates(audio, empty_share=empty_share)
  measures = {f"empty stem rate ({name})": float(value) for name, value in rates.items()}
  dependence = music_metrics.cross_stem_dependence(
      audio, stems_lib.SAMPLE_RATE, bootstrap_samples=protocol.bootstrap_samples,
      confidence=protocol.confidence, seed=protocol.seed)
  for name, scores in dependence.items():
    measures[name] = scores["same pieces"]
    measures[f"{name}, stems of other pieces"] = scores["other pieces"]
    measures[f"{name}, dependence (own − other pieces)"] = scores["dependence"]
  return measures, dependence


def level_table(generated: np.ndarray, reference: np.ndarray, audible_generated: np.ndarray,
                audible_reference: np.ndarray,
                stem_names: tuple[str, ...] = stems_lib.STEM_NAMES,
                reconstructed: np.ndarray | None = None) -> dict[str, dict[str, float]]:
  """Per stem: the generated stems' median level and the real stems' 5th/50th/95th
  percentiles (dB RMS, audible stems only), and the share of generated levels in that range;
  with `reconstructed` (the real chunks through the VAE), their median level over the same
  audible chunks: how much of a generated stem's shortfall the decoder alone already has."""
  generated_db, reference_db = music_metrics.levels_db(generated), music_metrics.levels_db(
      reference)
  reconstructed_db = None if reconstructed is None else music_metrics.levels_db(reconstructed)
  rows = {}
  for i, name in enumerate(stem_names):
    gen = generated_db[audible_generated[:, i], i]
    real = reference_db[audible_reference[:, i], i]
    p5, p50, p95 = (np.percentile(real, [5, 50, 95]) if real.size
                    else (float("nan"),) * 3)
    rows[name] = {
        "generated median dB": float(np.median(gen)) if gen.size else float("nan"),
        **({} if reconstructed_db is None else {"reconstructed median dB": (
            float(np.median(reconstructed_db[audible_reference[:, i], i])) if real.size
            else float("nan"))}),
        "real 5th pct dB": float(p5), "real median dB": float(p50),
        "real 95th pct dB": float(p95),
        "generated within real 5-95 %": (float(np.mean((gen >= p5) & (gen <= p95)))
                                         if gen.size and real.size else float("nan")),
        "audible generated": float(gen.size), "audible real": float(real.size),
    }
  return rows


def partial_generation_table(config: ml_collections.ConfigDict, vae: loading.Loaded,
                             denoiser: loading.Loaded, reference: np.ndarray, embed_fn,
                             embedding: str, out_dir: str) -> tuple[dict, dict]:
  """Runs the 14 partial generations given `evaluate.partial_chunks` seeded random reference
  chunks, scores them, writes the table and one piece per subset; returns (scores, protocol
  facts)."""
  evaluate_config = config.evaluate
  num_chunks = min(int(evaluate_config.partial_chunks), len(reference))
  chosen = np.sort(np.random.default_rng([int(evaluate_config.seed), num_chunks]).choice(
      len(reference), num_chunks, replace=False))
  disjoint = bool(evaluate_config.partial_disjoint_reference)
  scored_against = (np.delete(reference, chosen, axis=0) if disjoint else reference)
  spec = generation_stage.make_spec(config, vae.module, denoiser.module,
                                    latent_scale=loading.latent_scale(denoiser))
  runs = partial_generation.partial_generation_runs(
      spec, vae.params, denoiser.params, reference[chosen],
      seed=int(config.sample.seed), batch_size=int(config.sample.batch_size))
  notes = []
  for label in list(runs):
    runs[label], dropped = finite_pieces(runs[label], f"pieces of the {label} run")
    notes += dropped
  protocol = protocol_of(evaluate_config)
  try:
    mixtures = tables.partial_generation_scores(runs, scored_against, embed_fn, protocol,
                                                mixture=True)
    generated = tables.partial_generation_scores(runs, scored_against, embed_fn, protocol)
  except ValueError as error:
    raise ValueError(f"partial-generation table: {error} (config.evaluate.partial_chunks="
                     f"{num_chunks} chunks of {reference.shape[-1]} samples against "
                     f"{len(scored_against)} reference chunks)") from error
  table = {label: {"mixture": mixtures[label], "generated stems": generated[label]}
           for label in runs}
  facts = dict(partial_chunks=num_chunks, conditioning_chunks=[int(i) for i in chosen],
               disjoint_reference=disjoint, reference_chunks=len(scored_against))
  tables.write_distance_table(
      out_dir, "partial_generation", table, embedding, row_label="generated stems",
      notes=[f"Given stems from {num_chunks} seeded random real chunks of "
             f"{reference_set.splits_label(evaluate_config.reference_split)} (MSDM's "
             "protocol); the mixture column scores given + generated stems against real "
             "mixtures. Reference: "
             + (f"the other {len(scored_against)} chunks (disjoint: conditioning chunks "
                "left out)." if disjoint else
                f"all {len(scored_against)} chunks, the conditioning ones included "
                "(evaluate.partial_disjoint_reference=False).")] + notes)
  sample_rate = int(config.data.sample_rate)
  for label, audio in runs.items():
    outputs.write_piece(
        os.path.join(out_dir, "partial", label),
        {name: audio[0, s] for s, name in enumerate(stems_lib.STEM_NAMES)}, sample_rate,
        dict(mode="partial", generated=label.split("+"),
             given=[n for n in stems_lib.STEM_NAMES if n not in label.split("+")],
             conditioning=(f"reference chunk {int(chosen[0])} of split "
                           f"{evaluate_config.reference_split!r}"),
             seed=int(config.sample.seed),
             checkpoints=generation_stage.checkpoint_identities(vae, denoiser)),
        title=f"evaluation: {label} generated given the others")
  return table, facts


def separation_table(config: ml_collections.ConfigDict, vae: loading.Loaded,
                     denoiser: loading.Loaded, reference: np.ndarray, out_dir: str) -> dict:
  """Separates the mixtures of `evaluate.separation_chunks` seeded random reference chunks
  by each method, scores SI-SDRi per stem beside the VAE's oracle, writes separation.md/csv;
  returns the table and its facts."""
  evaluate_config = config.evaluate
  chosen = separation_scores.choose_chunks(len(reference), evaluate_config.separation_chunks,
                                           evaluate_config.seed)
  truth = reference[chosen]
  audible = separation_scores.audible_stems(truth, float(evaluate_config.empty_share))
  spec = separation.separation_spec(config, vae.module, denoiser.module,
                                    loading.latent_scale(denoiser))
  methods = [m.strip() for m in str(evaluate_config.separation_methods).split(",") if m.strip()]
  if not methods:
    raise ValueError("config key evaluate.separation_methods is empty: name dps, dirac or both")
  results = {}
  for method in methods:
    guidance = separation.guidance_from_config(config, method)
    logging.info("separation table: %s on %d chunks", method, len(truth))
    estimates = separation.separate_chunks(
        spec, vae.params, denoiser.params, truth.sum(axis=1), guidance=guidance,
        seed=int(config.separate.seed), batch_size=int(config.sample.batch_size))
    results[method] = separation_scores.improvement(estimates, truth, audible)
  oracle = vae_quality.reconstruct(vae, truth)
  results[separation_scores.ORACLE] = separation_scores.improvement(oracle, truth, audible)
  rows = separation_scores.table_rows(results)
  paths = tables.write_table(out_dir, "separation", rows, row_label="method")
  steps = dict(spec.sampler_settings)["num_steps"]
  note = separation_scores.describe(methods, len(truth), steps, spec.sampler_name,
                                    float(config.separate.strength),
                                    str(config.separate.dirac_stem))
  with open(paths["md"], "a") as f:
    f.write(f"\n{note}\n")
  return dict(table=rows, chunks=[int(i) for i in chosen], steps=int(steps),
              sampler=spec.sampler_name, methods=methods, note=note)


def latent_information_table(config: ml_collections.ConfigDict, denoiser: loading.Loaded,
                             out_dir: str) -> dict:
  """The denoiser's cross-stem information on the held-out latents of the reference splits
  (latent_dependence.py), written as cross_stem_information.{md,csv}; {} for a denoiser
  that records no latent store (an import), or one without the reference splits."""
  evaluate_config = config.evaluate
  protocol = protocol_of(evaluate_config)
  splits = reference_set.split_names(evaluate_config.reference_split)
  try:
    latents, sources = latent_dependence.held_out_latents(
        denoiser, splits, int(evaluate_config.max_reference_chunks), protocol.seed)
  except ValueError as e:  # no store, or none with those splits: the other tables stand
    logging.warning("No cross-stem information table: %s", e)
    return {}
  if len(latents) < 2:
    logging.warning("No cross-stem information table: the latent store's %s hold %d chunk(s), "
                    "and pairing needs 2", "+".join(splits), len(latents))
    return {}
  rows = latent_dependence.cross_stem_information(
      denoiser, latents, stem_names=sources, seed=protocol.seed,
      bootstrap_samples=protocol.bootstrap_samples, confidence=protocol.confidence,
      sigma_data=float(config.ldm.sigma_data))
  tables.write_table(out_dir, "cross_stem_information", rows, row_label="stem at σ")
  return rows


def _as_json(scores):
  return {row: {column: {m: s.as_dict() for m, s in measures.items()}
                for column, measures in columns.items()} for row, columns in scores.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=evaluate` stage; returns the metrics it wrote to metrics.json.

  For a mixture-only system (`config.system=mixldm`) every table is of the mixture alone:
  its distances, empty rate, level and its VAE's reconstructions; nothing per stem, no
  partial generation, no tags.
  """
  evaluate_config = config.evaluate
  sample_rate = stems_lib.SAMPLE_RATE
  out_dir = workdir_layout.evaluation_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  sources = paper_config.latent_sources(config)
  mixture_only = sources == (stems_lib.MIXTURE,)
  generated = read_total_generation(workdir_layout.samples_dir(config, workdir), sources)
  reference, split_chunks = reference_set.read_reference_chunks(
      config, workdir, evaluate_config.reference_split,
      int(evaluate_config.max_reference_chunks), int(evaluate_config.seed))
  if mixture_only:
    reference = reference.sum(axis=1, keepdims=True)
  samples = min(generated.shape[-1], reference.shape[-1])
  generated, reference = generated[..., :samples], reference[..., :samples]
  generated, notes = finite_pieces(generated, "generated pieces")
  reference_note = "Reference: " + reference_set.describe(
      len(reference), split_chunks, evaluate_config.reference_split,
      int(evaluate_config.seed)) + "."
  logging.info("Evaluating %d generated pieces against %d real chunks. %s", len(generated),
               len(reference), reference_note)

  embed_fn, embedding = _embedding(evaluate_config, sample_rate)
  protocol = protocol_of(evaluate_config)
  scope = str(evaluate_config.get("scope", "full"))
  if scope not in SCOPES:
    raise ValueError(f"config key evaluate.scope={scope!r}: one of {', '.join(SCOPES)}")
  if scope == "mixture_distances" and not mixture_only:
    generated = generated.sum(axis=1, keepdims=True)
    reference = reference.sum(axis=1, keepdims=True)
    sources = (stems_lib.MIXTURE,)
  vae = denoiser = reconstructed = None
  if scope != "mixture_distances":
    # The VAE whose latents the diffusion model learned: it decoded the pieces, and its
    # reconstructions bound what generation can reach (each distance's codec ceiling).
    vae, denoiser = generation_stage.load_models(config, workdir)
    reconstructed = vae_quality.reconstruct(vae, reference, sources)
  total = tables.total_generation_scores(generated, reference, embed_fn, protocol, sources,
                                         reconstructed)
  tables.write_distance_table(out_dir, "total_generation",
                              {row: {"": scores} for row, scores in total.items()}, embedding,
                              notes=[f"{len(generated)} generated pieces. {reference_note}"]
                              + notes)

  metrics = dict(embedding=embedding, sources=list(sources), num_generated=len(generated),
                 num_reference=len(reference), reference_split_chunks=split_chunks,
                 notes=notes, scope=scope,
                 protocol=dict(bootstrap_samples=protocol.bootstrap_samples,
                               confidence=protocol.confidence, seed=protocol.seed),
                 total_generation=_as_json({r: {"": s} for r, s in total.items()}))
  if scope == "mixture_distances":
    atomic_files.write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
    logging.info("Evaluation (the mixture's distances only) written to %s", out_dir)
    return metrics

  partial, partial_facts = {}, {}
  if int(evaluate_config.partial_chunks) > 0 and not mixture_only:
    partial, partial_facts = partial_generation_table(config, vae, denoiser, reference,
                                                      embed_fn, embedding, out_dir)

  information = ({} if mixture_only else
                 latent_information_table(config, denoiser, out_dir))

  empty_share = float(evaluate_config.empty_share)
  dependence = {}
  if mixture_only:
    generated_measures, real_measures = (
        {f"empty stem rate ({name})": float(value) for name, value in
         music_metrics.empty_stem_rates(audio, sources, empty_share=empty_share).items()}
        for audio in (generated, reference))
  else:
    generated_measures, generated_dependence = music_measures(generated, empty_share,
                                                              protocol)
    real_measures, real_dependence = music_measures(reference, empty_share, protocol)
    # The real stems through the VAE too: the dependence its decoder keeps, so that a
    # generated piece's shortfall can be told apart from the codec's.
    dependence = {"generated": generated_dependence, "real": real_dependence,
                  "reconstructed": music_metrics.cross_stem_dependence(
                      reconstructed, sample_rate, bootstrap_samples=protocol.bootstrap_samples,
                      confidence=protocol.confidence, seed=protocol.seed)}
    tables.write_table(out_dir, "cross_stem_dependence",
                       {f"{name} ({side})": scores for side, measures in dependence.items()
                        for name, scores in measures.items()}, row_label="measure")
  tables.write_table(out_dir, "music_measures",
                     {k: {"generated": generated_measures[k], "real": real_measures[k]}
                      for k in generated_measures}, row_label="measure")

  audible_generated = ~music_metrics.empty_stems(generated, sources, empty_share=empty_share)
  audible_reference = ~music_metrics.empty_stems(reference, sources, empty_share=empty_share)
  levels = level_table(generated, reference, audible_generated, audible_reference, sources,
                       reconstructed)
  tables.write_table(out_dir, "levels", levels, row_label="stem")

  recognised, tag_fn = {}, None
  if not mixture_only:
    tag_fn = instrument_tags.musicnn_tagger(sample_rate)
    recognised = {
        "generated": instrument_tags.recognition(generated, tag_fn, audible_generated),
        "real": instrument_tags.recognition(reference, tag_fn, audible_reference)}
    tables.write_table(out_dir, "instrument_tags",
                       {stem: {f"{side} {k}": float(recognised[side][stem][k])
                               for side in recognised for k in ("recognised", "stems")}
                        for stem in instrument_tags.STEM_TAGS}, row_label="stem")

  reconstruction = vae_quality.reconstruction_scores(reconstructed, reference, sources, tag_fn,
                                                     empty_share)
  tables.write_table(out_dir, "vae_reconstruction", reconstruction, row_label="source")

  separation_facts = {}
  if bool(evaluate_config.separation) and not mixture_only:
    separation_facts = separation_table(config, vae, denoiser, reference, out_dir)

  metrics.update(partial_generation=_as_json(partial), partial=partial_facts,
                 separation=separation_facts,
                 music_measures=dict(generated=generated_measures, real=real_measures),
                 cross_stem_dependence=dependence, cross_stem_information=information,
                 levels=levels, instrument_tags=recognised,
                 vae_reconstruction=reconstruction,
                 checkpoints=generation_stage.checkpoint_identities(vae, denoiser))
  atomic_files.write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
  logging.info("Evaluation written to %s", out_dir)
  return metrics
