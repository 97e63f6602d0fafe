"""KAD against a direct O(n²) computation, its unbiasedness, and scores with intervals/floors."""

import itertools

import numpy as np
import pytest

from msldm_jax.evaluation import distance_scores
from msldm_jax.evaluation import frechet
from msldm_jax.evaluation import kernel_distance


def _direct_kad(x, y, h):
  # The textbook formula, pair by pair.
  k = lambda a, b: np.exp(-np.sum((a - b) ** 2) / (2 * h * h))
  n, m = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
  yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
  xy = sum(k(a, b) for a in x for b in y) / (n * m)
  return 100.0 * (xx + yy - 2 * xy)


def test_kad_matches_direct_computation():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(13, 5)), rng.normal(0.5, 1.2, size=(9, 5))
  h = kernel_distance.median_bandwidth(y)
  direct_h = np.median([np.linalg.norm(a - b) for a, b in itertools.combinations(y, 2)])
  assert h == pytest.approx(direct_h, rel=1e-12)
  assert kernel_distance.kad(x, y) == pytest.approx(_direct_kad(x, y, h), rel=1e-10)


def test_kad_weighted_integer_weights_equal_dropping_self_pairs():
  # Weight 2 on a row = two copies of it, whose pair with each other is excluded like i = j.
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
  h = 1.3
  wx, wy = np.array([2, 0, 1, 1, 3, 0]), np.array([1, 1, 0, 2, 1])
  xr, yr = np.repeat(x, wx, axis=0), np.repeat(y, wy, axis=0)
  n, m = len(xr), len(yr)
  # Copies of one row are distinct items of the resampled set, but their kernel is 1
  # whatever the distribution: the estimator must not count those pairs.
  origin_x, origin_y = np.repeat(np.arange(6), wx), np.repeat(np.arange(5), wy)
  kx = kernel_distance.gaussian_kernel(xr, xr, h)
  ky = kernel_distance.gaussian_kernel(yr, yr, h)
  distinct_x = origin_x[:, None] != origin_x[None, :]
  distinct_y = origin_y[:, None] != origin_y[None, :]
  expected = 100 * (kx[distinct_x].sum() / (n * n - (wx ** 2).sum())
                    + ky[distinct_y].sum() / (m * m - (wy ** 2).sum())
                    - 2 * kernel_distance.gaussian_kernel(xr, yr, h).mean())
  got = kernel_distance.kad_weighted(kernel_distance.gaussian_kernel(x, x, h),
                                     kernel_distance.gaussian_kernel(y, y, h),
                                     kernel_distance.gaussian_kernel(x, y, h), wx, wy)
  assert got == pytest.approx(expected, rel=1e-10)


def test_kad_unbiased_for_one_distribution():
  # Two samples of one distribution: mean ≈ 0 (a biased MMD would sit clearly above 0).
  rng = np.random.default_rng(2)
  values = [kernel_distance.kad(rng.normal(size=(20, 8)), rng.normal(size=(20, 8)),
                                bandwidth=4.0) for _ in range(300)]
  standard_error = np.std(values) / np.sqrt(len(values))
  assert abs(np.mean(values)) < 3 * standard_error
  # And it separates shifted Gaussians by far more than its spread.
  shifted = kernel_distance.kad(rng.normal(size=(20, 8)), rng.normal(1.0, 1.0, size=(20, 8)),
                                bandwidth=4.0)
  assert shifted > 10 * np.std(values)


def test_kad_errors_name_the_input():
  with pytest.raises(ValueError, match="non-finite"):
    kernel_distance.kad(np.full((3, 2), np.nan), np.ones((3, 2)))
  with pytest.raises(ValueError, match="dimensions differ"):
    kernel_distance.kad(np.ones((3, 2)), np.random.default_rng(0).normal(size=(3, 4)))
  with pytest.raises(ValueError, match="median pairwise distance is 0"):
    kernel_distance.median_bandwidth(np.ones((4, 3)))


def test_fd_on_known_gaussians():
  # N(0, I) against N(μ, 4I) in d dims: FD = |μ|² + d(1 + 4 − 2·2) = |μ|² + d.
  rng = np.random.default_rng(3)
  d = 4
  mu = np.array([1.0, 0.0, -1.0, 2.0])
  x = rng.normal(size=(40, 100, d))
  y = mu + 2.0 * rng.normal(size=(40, 100, d))
  scores = distance_scores.score(x, y, distance_scores.Protocol(measures=("fd",),
                                                                bootstrap_samples=20))
  fd = scores[distance_scores.FD]
  assert fd.value == pytest.approx(mu @ mu + d, rel=0.03)
  assert fd.low <= fd.value <= fd.high
  # The floor: two halves of one distribution.
  assert fd.floor < 0.05 * fd.value


def test_scores_intervals_floors_and_refusal():
  rng = np.random.default_rng(4)
  reference = rng.normal(size=(24, 4, 8))
  same = rng.normal(size=(24, 4, 8))
  shifted = rng.normal(0.8, 1.0, size=(24, 4, 8))
  protocol = distance_scores.Protocol(bootstrap_samples=100, seed=7)
  good = distance_scores.score(same, reference, protocol)
  bad = distance_scores.score(shifted, reference, protocol)
  kad_good, kad_bad = good[distance_scores.KAD], bad[distance_scores.KAD]
  # A sample of the real distribution sits within the floor's range; a shifted one above.
  assert kad_good.low <= kad_good.floor_high and kad_good.floor_low <= kad_good.high
  assert kad_bad.low > kad_good.high and kad_bad.low > kad_bad.floor_high
  assert kad_bad.generated_windows == 96 and kad_bad.reference_windows == 96
  # Seeded: the same call gives the same numbers.
  assert distance_scores.score(shifted, reference, protocol) == bad
  # FD needs at least as many windows as dimensions: 3 pieces × 2 windows < 8 dimensions.
  small = distance_scores.score(shifted[:3, :2], reference, protocol)
  assert small[distance_scores.FD].value is None
  assert "6 windows < 8 dimensions" in small[distance_scores.FD].note
  assert small[distance_scores.FD].cell().startswith("refused")
  assert small[distance_scores.KAD].value is not None
  # Pieces, not windows, are resampled: intervals of one piece are undefined.
  with pytest.raises(ValueError, match="at least 2 pieces"):
    distance_scores.score(shifted[:1], reference, protocol)
  with pytest.raises(ValueError, match="non-finite"):
    distance_scores.score(np.full((3, 2, 8), np.nan), reference, protocol)


def test_through_the_vae_pairs_the_floors_halves_with_only_the_codec_between():
  rng = np.random.default_rng(5)
  reference = rng.normal(size=(24, 4, 8))
  generated = rng.normal(0.3, 1.0, size=(24, 4, 8))
  protocol = distance_scores.Protocol(bootstrap_samples=100, seed=7)
  alone = distance_scores.score(generated, reference, protocol)
  lossless = distance_scores.score(generated, reference, protocol, reconstructed=reference)
  blurred = distance_scores.score(generated, reference, protocol,
                                  reconstructed=0.3 * reference + 0.5)
  for measure in (distance_scores.KAD, distance_scores.FD):
    # The value, its interval and the floor do not move when reconstructions are given.
    for name in ("value", "low", "high", "floor", "floor_low", "floor_high"):
      assert getattr(lossless[measure], name) == getattr(alone[measure], name)
    assert alone[measure].through_vae is None
    assert alone[measure].through_vae_cell() == "n/a"
    # A lossless codec's ceiling is the floor: the same halves.
    assert lossless[measure].through_vae == pytest.approx(alone[measure].floor, rel=1e-12)
    # A codec that loses the data's spread lies above it, beyond the floor's interval.
    assert blurred[measure].through_vae_low > alone[measure].floor_high
  with pytest.raises(ValueError, match="pair with the reference"):
    distance_scores.score(generated, reference, protocol, reconstructed=reference[:20])


def test_weighted_fd_equals_repeated_rows():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(30, 3)), rng.normal(size=(25, 3))
  wx = rng.integers(0, 3, size=30).astype(float)
  wx[0] = 2  # at least a few rows
  got = distance_scores._weighted_fd(x, y, wx, np.ones(25))  # pylint: disable=protected-access
  expected = frechet.embedding_distance(np.repeat(x, wx.astype(int), axis=0), y)
  assert got == pytest.approx(expected, rel=1e-9)
