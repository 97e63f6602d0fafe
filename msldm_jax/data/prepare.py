"""The `--mode=data` stage: get a source folder of tracks, then build its TFDS dataset.

With `config.data.source_dir` empty, the mini dataset is rendered into WORKDIR/minislakh
(cached by the renderer) and used as the source. The dataset lands in
`workdir_layout.dataset_dir(config, workdir)`, which later stages call to find it without
running this one.
"""


from absl import logging
import ml_collections

from msldm_jax import stems
from msldm_jax import workdir_layout
from msldm_jax.data import build


def run(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The `--mode=data` stage: renders the mini dataset if the config asks for it, builds the
  dataset; returns its folder."""
  data = config.data
  if data.sample_rate != stems.SAMPLE_RATE:
    raise ValueError(f"config key data.sample_rate={data.sample_rate}: datasets are built at "
                     f"{stems.SAMPLE_RATE} Hz (msldm_jax/stems.py SAMPLE_RATE)")
  if data.layout not in build.LAYOUTS:  # Checked before any rendering.
    raise ValueError(f"config key data.layout={data.layout!r}: expected one of "
                     f"{', '.join(build.LAYOUTS)}")
  source_dir = data.source_dir
  if not source_dir:
    if data.layout != "stems":
      raise ValueError(f"config key data.layout={data.layout!r}: the mini dataset rendered "
                       "when data.source_dir is empty has the 'stems' layout")
    source_dir = workdir_layout.minislakh_dir(workdir)
    # Imported here: only this branch needs the renderer (and its MIDI dependencies).
    from msldm_jax.data import minislakh  # pylint: disable=g-import-not-at-top
    logging.info("Rendering the mini dataset into %s", source_dir)
    minislakh.render_dataset(source_dir, num_pieces=data.render.num_pieces,
                             seed=data.render.seed, max_seconds=data.render.max_seconds)
  path = build.build_dataset(data.layout, source_dir, workdir_layout.tfds_dir(config, workdir),
                             name=data.name or None, min_duration=data.min_duration,
                             max_duration=data.max_duration)
  logging.info("Dataset ready: %s", path)
  return path
