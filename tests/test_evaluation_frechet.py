"""Fréchet distance: against scipy's sqrtm formula, closed forms, and singular covariances."""

import numpy as np
import pytest
import scipy.linalg

from msldm_jax.evaluation import frechet


def _scipy_fd(mu1, s1, mu2, s2):
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
               - 2 * np.trace(np.real(covmean)))


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.5 * np.eye(d)


def test_matches_scipy_on_well_conditioned_gaussians():
  rng = np.random.default_rng(0)
  for d in (2, 8, 32):
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
        _scipy_fd(mu1, s1, mu2, s2), rel=1e-9)


def test_diagonal_closed_form():
  rng = np.random.default_rng(1)
  v1, v2 = rng.uniform(0.1, 3, size=10), rng.uniform(0.1, 3, size=10)
  mu1, mu2 = rng.normal(size=10), rng.normal(size=10)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(
      expected, rel=1e-10)


def test_identical_sets_give_zero():
  x = np.random.default_rng(2).normal(size=(200, 16))
  assert frechet.embedding_distance(x, x) == pytest.approx(0.0, abs=1e-9)


def test_rank_deficient_equal_covariances_give_mean_distance():
  # 5 samples in 20 dimensions: rank-4 covariances, where sqrtm(Σ1 Σ2) is unreliable.
  x = np.random.default_rng(3).normal(size=(5, 20))
  shift = np.linspace(-1, 1, 20)
  mu1, s1 = frechet.gaussian_fit(x)
  mu2, s2 = frechet.gaussian_fit(x + shift)
  assert np.linalg.matrix_rank(s1) == 4
  assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(
      np.sum(shift ** 2), rel=1e-9)


def test_rank_deficient_different_covariances_close_to_regularised_scipy():
  rng = np.random.default_rng(4)
  mu1, s1 = frechet.gaussian_fit(rng.normal(size=(6, 24)))
  mu2, s2 = frechet.gaussian_fit(2 * rng.normal(size=(7, 24)) + 0.3)
  ours = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(ours)
  eps = 1e-10 * np.eye(24)
  reference = _scipy_fd(mu1, s1 + eps, mu2, s2 + eps)
  assert ours == pytest.approx(reference, rel=1e-4)


def test_errors_name_the_bad_input():
  with pytest.raises(ValueError, match="sigma2"):
    frechet.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4))
  with pytest.raises(ValueError, match="at least 2"):
    frechet.gaussian_fit(np.zeros((1, 3)))
