"""benchmarks/vae_levels.py: a decoder's level loss split by band and by frame loudness, checked
on reconstructions whose loss is known by construction."""

import numpy as np

from benchmarks import vae_levels
from msldm_jax import stems as stems_lib

_RATE = stems_lib.SAMPLE_RATE


def _noise(n: int = 6, seconds: float = 2.0, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(0, 0.1, (n, int(seconds * _RATE))).astype(np.float32)


def test_a_gain_shows_in_every_band_and_every_quintile():
  real = _noise()
  profile = vae_levels.level_profile((0.5 * real)[:, None], real[:, None], ("drums",))["drums"]
  expected = 20 * np.log10(0.5)
  np.testing.assert_allclose(profile["all"], expected, atol=1e-4)
  np.testing.assert_allclose(profile["bands"], expected, atol=1e-3)
  np.testing.assert_allclose(profile["loudness"], expected, atol=1e-3)


def test_missed_hits_lose_the_loudest_quintile_and_keep_the_quiet_ones():
  # A quiet bed with a loud hit every 0.25 s; the "reconstruction" keeps only the bed.
  bed = _noise(seed=1) * 0.05
  hits = np.zeros_like(bed)
  for start in range(0, bed.shape[-1] - 2048, _RATE // 4):
    hits[:, start:start + 2048] = _noise(seed=2)[:, :2048]
  profile = vae_levels.level_profile(bed[:, None], (bed + hits)[:, None], ("drums",))["drums"]
  q1, *_, q5 = profile["loudness"]
  assert abs(q1) < 0.5, profile
  assert q5 < -20.0, profile


def test_a_low_pass_loses_the_high_bands_only():
  real = _noise(seed=3)
  spectrum = np.fft.rfft(real, axis=-1)
  freqs = np.fft.rfftfreq(real.shape[-1], 1.0 / _RATE)
  spectrum[:, freqs > 2000.0] = 0.0
  low_passed = np.fft.irfft(spectrum, n=real.shape[-1], axis=-1).astype(np.float32)
  bands = vae_levels.level_profile(low_passed[:, None], real[:, None], ("piano",))["piano"][
      "bands"]
  labels = vae_levels.band_labels()
  assert labels[0] == "0-0.1 kHz" and len(labels) == len(bands)
  np.testing.assert_allclose(bands[:3], 0.0, atol=0.1)  # below 1 kHz: untouched
  assert all(b < -20.0 for b in bands[4:]), bands  # 3 kHz and up: gone


def test_silent_sources_are_left_out():
  real = np.stack([_noise(), np.zeros_like(_noise())], axis=1)
  profile = vae_levels.level_profile(real, real, ("bass", "drums"))
  assert list(profile) == ["bass"]
  np.testing.assert_allclose(profile["bass"]["bands"], 0.0, atol=1e-6)
