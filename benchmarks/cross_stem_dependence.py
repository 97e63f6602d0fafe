r"""Cross-stem dependence of a finished study's systems: do their stems belong together?

  python -m benchmarks.cross_stem_dependence --config=configs/study.py --workdir=runs/study
  python -m benchmarks.cross_stem_dependence --config=configs/study.py --workdir=runs/study \
      --systems=msldm,isldm

`--config` and its `--config.KEY=VALUE` overrides are the study's, as `--mode=study` ran.

For the real reference chunks, their reconstructions by the stems' VAE (what a generator
decoding through it can reach at most) and each system's generated pieces (WORKDIR/systems/
NAME/samples, total generation), `music_metrics.cross_stem_dependence`: each cross-stem measure
(harmonic chroma agreement, drum-bass onset F-measure) on a piece's own stems, on stems of
different pieces (its value without dependence) and the difference with its bootstrap
interval over pieces, under the config's evaluate protocol and reference set. The same
numbers `--mode=evaluate` writes to cross_stem_dependence.md; this reads an existing
study's samples, without re-running its evaluation (partial generation, separation).
isldm generates each stem alone, so its dependence is 0 up to noise: the check that the
measure sees nothing where there is nothing.

Prints a markdown table; the numbers belong in benchmarks/RESULTS.md with the machine, the
command and the commit.
"""

import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from msldm_jax import paper_config
from msldm_jax import workdir_layout
from msldm_jax.evaluation import music_metrics
from msldm_jax.evaluation import reference_set
from msldm_jax.evaluation import stage as evaluation_stage
from msldm_jax.evaluation import vae_quality
from msldm_jax.models import loading
from msldm_jax.study import report
from msldm_jax.study import runner

_CONFIG = config_flags.DEFINE_config_file("config", "configs/study.py",
                                          "The study's config script (configs/study.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/study", "The study's workdir.")
_SYSTEMS = flags.DEFINE_string(
    "systems", "", "Systems to score (default: the config's study.systems that have stems).")


def main(argv):
  del argv
  config = _CONFIG.value
  workdir = os.path.abspath(_WORKDIR.value)
  names = (runner.parse_list(_SYSTEMS.value, "--systems") if _SYSTEMS.value
           else runner.study_systems(config))
  columns = {}
  for name in names:
    derived = runner.system_config(config, workdir, name)
    sources = paper_config.latent_sources(derived)
    if len(sources) == 1:
      logging.info("%s models the mixture alone: no stems to relate, left out", name)
      continue
    if not columns:
      reference, _ = reference_set.read_reference_chunks(
          derived, workdir, derived.evaluate.reference_split,
          int(derived.evaluate.max_reference_chunks), int(derived.evaluate.seed))
      columns[f"real ({len(reference)} chunks)"] = reference
      # Every system with stems decodes through the study's one stems' VAE.
      columns["real through the VAE"] = vae_quality.reconstruct(
          loading.load_vae(derived.ldm.vae_checkpoint), reference, sources)
    samples = workdir_layout.samples_dir(derived, runner.system_dir(workdir, name))
    generated, _ = evaluation_stage.finite_pieces(
        evaluation_stage.read_total_generation(samples, sources), "generated pieces")
    columns[f"{name} ({len(generated)} pieces)"] = generated
  protocol = evaluation_stage.protocol_of(config.evaluate)
  scores = {}
  for column, audio in columns.items():
    logging.info("cross-stem dependence of %s", column)
    samples = min(a.shape[-1] for a in columns.values())
    scores[column] = music_metrics.cross_stem_dependence(
        audio[..., :samples], bootstrap_samples=protocol.bootstrap_samples,
        confidence=protocol.confidence, seed=protocol.seed)
  print(f"Cross-stem dependence in {workdir}: own − other pieces "
        f"[{protocol.confidence:.0%} bootstrap interval over pieces] (own / other)\n")
  print("| measure | " + " | ".join(scores) + " |")
  print("|---|" + "---|" * len(scores))
  for measure in (music_metrics.HARMONIC_CHROMA, music_metrics.DRUM_BASS_ONSETS):
    print(f"| {measure} | " + " | ".join(report.dependence_cell(s[measure])
                                         for s in scores.values()) + " |")


if __name__ == "__main__":
  app.run(main)
