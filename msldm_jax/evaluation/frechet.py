"""Fréchet distance between Gaussian fits of two embedding sets (FAD's formula).

FD = ||μ1 − μ2||² + tr Σ1 + tr Σ2 − 2 tr (Σ1^½ Σ2 Σ1^½)^½.

The usual implementation takes `scipy.linalg.sqrtm(Σ1 Σ2)`: a square root of a non-symmetric
product, which goes complex or NaN when a covariance is singular (fewer embeddings than
dimensions, common for per-stem sets). Σ1^½ Σ2 Σ1^½ is symmetric positive semi-definite and
has the same eigenvalues as Σ1 Σ2, so its trace-sqrt is the sum of the square roots of its
eigenvalues: two symmetric eigen-decompositions in float64, no complex arithmetic, and
singular covariances are handled exactly (round-off eigenvalues are set to 0).
"""

import numpy as np


def gaussian_fit(embeddings) -> tuple[np.ndarray, np.ndarray]:
  """Mean `[d]` and unbiased covariance `[d, d]` (float64) of embeddings `[n, d]`."""
  x = np.asarray(embeddings, dtype=np.float64)
  if x.ndim != 2:
    raise ValueError(f"embeddings must be [n, d]; got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"need at least 2 embeddings to fit a covariance; got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"embeddings of shape {x.shape} contain non-finite values")
  return x.mean(axis=0), np.cov(x, rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])


def _symmetric(a: np.ndarray) -> np.ndarray:
  return 0.5 * (a + a.T)


def _clip_null_space(eigenvalues: np.ndarray) -> np.ndarray:
  # Eigenvalues below the round-off level (numpy's matrix_rank tolerance: d·eps·max) are
  # zeros of a singular matrix: their square roots (~1e-8 of the scale, not 0) would add up
  # over the null space to a visible error.
  tolerance = eigenvalues.size * np.finfo(np.float64).eps * np.max(np.abs(eigenvalues))
  return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def sqrtm_psd(matrix) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix (round-off eigenvalues set to 0)."""
  eigenvalues, eigenvectors = np.linalg.eigh(_symmetric(np.asarray(matrix, np.float64)))
  return (eigenvectors * np.sqrt(_clip_null_space(eigenvalues))) @ eigenvectors.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr (Σ1 Σ2)^½ computed as tr (Σ1^½ Σ2 Σ1^½)^½ (same eigenvalues, but symmetric PSD)."""
  root1 = sqrtm_psd(sigma1)
  eigenvalues = np.linalg.eigvalsh(_symmetric(root1 @ np.asarray(sigma2, np.float64) @ root1))
  return float(np.sum(np.sqrt(_clip_null_space(eigenvalues))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), clipped at 0 from below."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  d = mu1.shape[-1]
  for name, value, shape in (("mu1", mu1, (d,)), ("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)),
                             ("sigma2", sigma2, (d, d))):
    if value.shape != shape:
      raise ValueError(f"{name} has shape {value.shape}; expected {shape} (d = {d} from mu1)")
  diff = mu1 - mu2
  distance = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
              - 2.0 * trace_sqrt_product(sigma1, sigma2))
  # Identical fits give ±1e-12-sized round-off; a distance is never negative.
  return max(float(distance), 0.0)


def embedding_distance(embeddings1, embeddings2) -> float:
  """Fréchet distance between the Gaussian fits of two embedding sets `[n1, d]`, `[n2, d]`."""
  return frechet_distance(*gaussian_fit(embeddings1), *gaussian_fit(embeddings2))
