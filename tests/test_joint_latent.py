"""The joint-latent layout: stem-major stacking, its inverse, and the partial-generation mask."""

import jax.numpy as jnp
import numpy as np
import pytest

from msldm_jax import joint_latent
from msldm_jax import stems


def test_stack_split_round_trip_numpy_and_jax():
  latents_bsct = np.random.default_rng(0).normal(size=(2, 4, 80, 16)).astype(np.float32)
  joint = joint_latent.stack_sources(latents_bsct)
  assert joint.shape == (2, 320, 16)
  np.testing.assert_array_equal(joint_latent.split_sources(joint), latents_bsct)
  joint_jax = joint_latent.stack_sources(jnp.asarray(latents_bsct))
  np.testing.assert_array_equal(np.asarray(joint_jax), joint)
  np.testing.assert_array_equal(np.asarray(joint_latent.split_sources(joint_jax)),
                                latents_bsct)


def test_channel_blocks_are_stem_major_in_stem_order():
  # Source s filled with the value s: its block must be channels [80·s, 80·s + 80).
  latents_bsct = np.broadcast_to(np.arange(4.0)[None, :, None, None], (1, 4, 80, 3))
  joint = joint_latent.stack_sources(latents_bsct)
  for s, name in enumerate(stems.STEM_NAMES):
    block = joint[0, 80 * s:80 * (s + 1)]
    assert np.all(block == s), name
  # Channel c of source s is joint channel 80·s + c.
  latents_bsct = np.arange(4 * 80, dtype=np.float32).reshape(1, 4, 80, 1)
  np.testing.assert_array_equal(joint_latent.stack_sources(latents_bsct)[0, :, 0],
                                np.arange(320))


def test_split_rejects_indivisible_channels():
  with pytest.raises(ValueError, match="num_sources=4"):
    joint_latent.split_sources(np.zeros((1, 321, 4)))


def test_source_mask_marks_known_stems_channels():
  mask = joint_latent.source_mask("bass,guitar")
  assert mask.shape == (320, 1) and mask.dtype == bool
  expected = np.zeros(320, bool)
  expected[0:80] = True
  expected[160:240] = True
  np.testing.assert_array_equal(mask[:, 0], expected)
  # Names in any order, indices and a smaller latent give the same layout.
  np.testing.assert_array_equal(joint_latent.source_mask(["guitar", "bass"]), mask)
  np.testing.assert_array_equal(joint_latent.source_mask([0, 2]), mask)
  small = joint_latent.source_mask(["drums"], latent_dim=8, num_sources=2)
  np.testing.assert_array_equal(small[:, 0], [False] * 8 + [True] * 8)
  assert not joint_latent.source_mask([]).any()
  # It broadcasts against a joint latent, and splits back to whole sources.
  per_source = joint_latent.split_sources(np.broadcast_to(mask, (1, 320, 5)))
  np.testing.assert_array_equal(per_source.all(axis=(2, 3))[0], [True, False, True, False])


def test_source_mask_errors_name_the_stem():
  with pytest.raises(ValueError, match="vocals"):
    joint_latent.source_mask("vocals")
  with pytest.raises(ValueError, match="guitar"):
    joint_latent.source_mask(["guitar"], num_sources=2)
