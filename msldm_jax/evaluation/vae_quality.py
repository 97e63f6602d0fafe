r"""How well a frozen SourceVAE reconstructs real chunks: what every generated score is bounded
by, measured before a latent model is trained on the VAE's latents.

  python -m msldm_jax.main --config=CONFIG --workdir=DIR --mode=evaluate_vae

The `--mode=evaluate_vae` stage reconstructs (posterior mean, then decode) the real chunks of
`evaluate.vae_split` (all, or a seeded random sample of `evaluate.max_reference_chunks`),
with the VAE of `ldm.vae_checkpoint` or WORKDIR's, and writes into WORKDIR/evaluation/vae:

  reconstruction.{md,csv}   per source: SI-SDR (dB), multi-scale mel distance and the level
                            change (dB; both other measures ignore gain), over the
                            chunks where the real source is audible; for guitar, piano and
                            drums also how often musicnn's MTT tagger names the
                            reconstruction's instrument, beside how often it names the real
                            stem's (the ceiling on this data)
  spectrogram.png           one chunk, each source real above reconstructed
  metrics.json              the above, with the split, the chunks and the VAE's identity

For a mixture system (`config.system=mixldm`) the source is the mixture and there are no tags.
`--mode=evaluate` writes the same table (vae_reconstruction) for its own reference set.
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from msldm_jax import atomic_files
from msldm_jax import paper_config
from msldm_jax import plotting
from msldm_jax import recent
from msldm_jax import stems as stems_lib
from msldm_jax import workdir_layout
from msldm_jax.evaluation import instrument_tags
from msldm_jax.evaluation import music_metrics
from msldm_jax.evaluation import reference_set
from msldm_jax.evaluation import tables
from msldm_jax.models import loading
from msldm_jax.models import source_vae

FOLDER = "vae"
TABLE = "reconstruction"
# Columns of the tag share; NaN for a source without an MTT tag (bass, the mixture).
TAGGED_RECONSTRUCTED = "tagged right (reconstructed)"
TAGGED_REAL = "tagged right (real)"


def output_dir(workdir: str) -> str:
  return os.path.join(workdir_layout.evaluation_dir(workdir), FOLDER)


@functools.partial(jax.jit, static_argnames=("vae",))
def _reconstruct_stems(vae_params, waveforms_bst, *, vae: source_vae.SourceVAE):
  # The parameters are an argument, not constants folded into the program.
  mean, _ = source_vae.encode_sources(vae, vae_params, waveforms_bst)
  return source_vae.decode_sources(vae, vae_params, mean)


@functools.partial(jax.jit, static_argnames=("vae",))
def _reconstruct_mixture(vae_params, waveforms_bt, *, vae: source_vae.SourceVAE):
  stem = jnp.zeros(waveforms_bt.shape[:1], jnp.int32)
  mean, _ = vae.apply(vae_params, waveforms_bt, stem, method=vae.encode_stem)
  return vae.apply(vae_params, mean, stem, method=vae.decode_stem)


# The last two reconstructions, under what determines them (the VAE's parameters by their
# hash and its module, the sources, the reference's bytes): the study's systems that share
# a VAE evaluate against the same reference set in one process, and each decoded it again
# (139 s of msldm's 635 s evaluation at the study's size on 2 CPU cores). Two: mixldm's
# mixture VAE comes between the systems of the stems' VAE.
_recent_reconstructions = recent.Recent(kept=2)


def reconstruct(vae: loading.Loaded, reference: np.ndarray,
                sources: tuple[str, ...] = stems_lib.STEM_NAMES) -> np.ndarray:
  """The posterior-mean reconstructions of `reference` `[n, sources, samples]`, chunk by
  chunk, cut or padded to its length (sources ("mix",): MixLDM's VAE on mixtures).

  Read-only: the same array comes back for the same VAE and reference within a process."""
  def compute():
    recon = _reconstruct(vae, reference, sources)
    recon.setflags(write=False)
    return recon

  params_hash = vae.identity.get("params_sha256")
  if params_hash is None:
    return compute()
  key = (params_hash, vae.module, tuple(sources), recent.array_digest(reference))
  if key in _recent_reconstructions:
    logging.info("Reusing this process's reconstructions of these %d chunks by this VAE",
                 len(reference))
  return _recent_reconstructions.get(key, compute)


def _reconstruct(vae: loading.Loaded, reference: np.ndarray, sources: tuple[str, ...]
                 ) -> np.ndarray:
  if sources == (stems_lib.MIXTURE,):
    recon = np.concatenate([
        np.asarray(_reconstruct_mixture(vae.params, reference[i], vae=vae.module))[None]
        for i in range(len(reference))])
  else:
    recon = np.concatenate([
        np.asarray(_reconstruct_stems(vae.params, reference[i:i + 1], vae=vae.module))
        for i in range(len(reference))])
  samples = reference.shape[-1]
  if recon.shape[-1] < samples:
    recon = np.pad(recon, [(0, 0)] * (recon.ndim - 1) + [(0, samples - recon.shape[-1])])
  return recon[..., :samples]


def reconstruction_scores(reconstructed: np.ndarray, reference: np.ndarray,
                          sources: tuple[str, ...], tag_fn=None, empty_share: float = 1.0
                          ) -> dict[str, dict[str, float]]:
  """{source: {"si_sdr", "mel_distance", TAGGED_RECONSTRUCTED, TAGGED_REAL}}.

  The tag shares are over the chunks whose real stem is audible (an empty stem has no
  instrument), with `tag_fn` (`instrument_tags.musicnn_tagger`); NaN where the source has no
  MTT tag, where no `tag_fn` is given, or where the chunks are shorter than a tagger patch.
  """
  scores = music_metrics.reconstruction_quality(reconstructed, reference,
                                                stems_lib.SAMPLE_RATE, sources)
  tagged = {}
  if tag_fn is not None and sources != (stems_lib.MIXTURE,):
    audible = ~music_metrics.empty_stems(reference, sources, empty_share=empty_share)
    tagged = {side: instrument_tags.recognition(audio, tag_fn, audible, sources)
              for side, audio in ((TAGGED_RECONSTRUCTED, reconstructed),
                                  (TAGGED_REAL, reference))}
  for name in sources:
    for side in (TAGGED_RECONSTRUCTED, TAGGED_REAL):
      scores[name][side] = float(tagged.get(side, {}).get(name, {}).get("recognised",
                                                                         float("nan")))
  return scores


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The `--mode=evaluate_vae` stage; returns the metrics it wrote to metrics.json."""
  evaluate_config = config.evaluate
  sources = paper_config.latent_sources(config)
  vae = loading.load_vae(config.ldm.vae_checkpoint or workdir)
  split = str(evaluate_config.vae_split)
  reference, split_chunks = reference_set.read_reference_chunks(
      config, workdir, split, int(evaluate_config.max_reference_chunks),
      int(evaluate_config.seed))
  if sources == (stems_lib.MIXTURE,):
    reference = reference.sum(axis=1, keepdims=True)
  logging.info("Reconstructing %d real chunks of %s with the VAE of %s", len(reference),
               reference_set.splits_label(split), vae.identity["checkpoint_dir"])
  reconstructed = reconstruct(vae, reference, sources)
  tag_fn = (instrument_tags.musicnn_tagger(stems_lib.SAMPLE_RATE)
            if sources != (stems_lib.MIXTURE,) else None)
  scores = reconstruction_scores(reconstructed, reference, sources, tag_fn,
                                 float(evaluate_config.empty_share))
  out_dir = output_dir(workdir)
  paths = tables.write_table(out_dir, TABLE, scores, row_label="source")
  note = (reference_set.describe(len(reference), split_chunks, split,
                                 int(evaluate_config.seed))
          + f"; VAE {vae.identity['checkpoint_dir']}"
          + (f" (step {vae.identity['step']})" if vae.identity.get("step") is not None else "")
          + ". "
          "SI-SDR, mel distance and level change (median dB, reconstructed minus real) "
          "over the chunks where the real source is audible; "
          "'tagged right': the share of audible stems whose own instrument musicnn's MTT "
          "tagger ranks first among its instrument tags (real stems: the ceiling).")
  with open(paths["md"], "a") as f:
    f.write(f"\n{note}\n")
  plotting.save_spectrograms(
      os.path.join(out_dir, "spectrogram.png"),
      {f"{name} {side}": audio[0, i] for i, name in enumerate(sources)
       for side, audio in (("real", reference), ("reconstructed", reconstructed))},
      stems_lib.SAMPLE_RATE, title=f"VAE reconstruction, chunk 0 of {split}")
  metrics = dict(split=split, num_chunks=len(reference), split_chunks=split_chunks,
                 sources=list(sources), reconstruction=scores, note=note,
                 vae=vae.identity)
  atomic_files.write_json_atomic(os.path.join(out_dir, "metrics.json"), metrics)
  logging.info("VAE reconstruction written to %s", out_dir)
  return metrics
