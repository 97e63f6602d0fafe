"""What one example of a built stem dataset holds: one whole track, all four stems aligned.

Tracks (not pre-cut windows) are stored so that both views (VAE windows, diffusion chunks)
come from the same build, with windowing done in the tf.data pipeline. Audio is float32 at
the project's sample rate, stem-major `[NUM_STEMS, samples]`: float, because stems summed from
several Slakh instruments may exceed int16's range and must not be clipped.
"""

import numpy as np
import tensorflow_datasets as tfds

from msldm_jax import stems

# Keys of one example.
TRACK_ID = "track_id"            # e.g. 'Track00001' (the source folder's name)
AUDIO = "audio"                  # float32 [NUM_STEMS, num_samples], stems in STEM_NAMES order
NUM_SAMPLES = "num_samples"      # int64, the length of every stem
STEM_PRESENT = "stem_present"    # bool [NUM_STEMS]: False where the track lacks that class

SPLITS = ("train", "validation", "test")


def features_dict() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      TRACK_ID: tfds.features.Text(),
      # Raw bytes, not a float list: about 7x faster to serialise and smaller on disk.
      AUDIO: tfds.features.Tensor(shape=(stems.NUM_STEMS, None), dtype=np.float32,
                                  encoding=tfds.features.Encoding.BYTES),
      NUM_SAMPLES: tfds.features.Scalar(dtype=np.int64),
      STEM_PRESENT: tfds.features.Tensor(shape=(stems.NUM_STEMS,), dtype=np.bool_),
  })
