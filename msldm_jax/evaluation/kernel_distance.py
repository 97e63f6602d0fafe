"""Kernel Audio Distance (KAD; Chung et al. 2025, "KAD: No More FAD!").

KAD is the unbiased estimate of the squared maximum mean discrepancy (MMD²) between two
embedding sets under a Gaussian kernel k(x, y) = exp(−||x − y||² / (2 h²)):

  MMD²_u = 1/(n(n−1)) Σ_{i≠j} k(x_i, x_j) + 1/(m(m−1)) Σ_{i≠j} k(y_i, y_j)
           − 2/(nm) Σ_{i,j} k(x_i, y_j)

Unlike the Fréchet distance it assumes no Gaussian, needs no more samples than dimensions,
and its expectation is exactly 0 when both sets come from one distribution (so it can come
out slightly negative). As in the authors' toolkit (kadtk), the bandwidth h is the median
pairwise distance of the reference set and the value is multiplied by `SCALE` = 100 for
readability; tables say "KAD ×100".

The weighted form (`kad_weighted`) is what the bootstrap needs: with integer weights
(resampling counts), pairs of a row with a copy of itself are left out exactly as i = j is
above, so a resampled estimate is as unbiased as the plain one.
"""

import numpy as np

SCALE = 100.0


def _as_embeddings(name: str, x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: embeddings must be [n, d]; got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"{name}: KAD needs at least 2 embeddings; got {x.shape[0]}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: embeddings of shape {x.shape} contain non-finite values")
  return x


def squared_distances(x, y) -> np.ndarray:
  """||x_i − y_j||² `[n, m]` (float64, clipped at 0 against round-off)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  d2 = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
  return np.maximum(d2, 0.0)


def median_bandwidth(reference) -> float:
  """The median distance between distinct rows of `reference` `[n, d]` (kadtk's choice)."""
  reference = _as_embeddings("reference", reference)
  d2 = squared_distances(reference, reference)
  # The median of the distances, not the root of the median of their squares: with an even
  # number of pairs the two differ.
  bandwidth = float(np.median(np.sqrt(d2[np.triu_indices(len(reference), k=1)])))
  if bandwidth <= 0.0:
    raise ValueError(f"reference embeddings {reference.shape}: median pairwise distance is 0 "
                     "(identical rows), no kernel bandwidth")
  return bandwidth


def gaussian_kernel(x, y, bandwidth: float) -> np.ndarray:
  """exp(−||x_i − y_j||² / (2 h²)) `[n, m]`."""
  return np.exp(-squared_distances(x, y) / (2.0 * float(bandwidth) ** 2))


def kad_weighted(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray, wx: np.ndarray,
                 wy: np.ndarray, scale: float = SCALE) -> np.ndarray:
  """KAD of weighted sets from precomputed kernel matrices; weights `[..., n]`, `[..., m]`.

  Row i with weight w_i stands for w_i copies of it; pairs of copies of one row are excluded
  (the weighted i ≠ j), so integer weights give the unbiased estimate of the resampled set.
  Leading weight axes are batch axes (one estimate per bootstrap draw).
  """
  wx, wy = np.asarray(wx, np.float64), np.asarray(wy, np.float64)

  def within(k, w):
    total = np.einsum("...i,ij,...j->...", w, k, w) - np.einsum("...i,i,...i->...", w,
                                                                np.diag(k), w)
    pairs = w.sum(-1) ** 2 - (w * w).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):  # No distinct pair: NaN.
      return total / pairs

  between = np.einsum("...i,ij,...j->...", wx, kxy, wy) / (wx.sum(-1) * wy.sum(-1))
  return scale * (within(kxx, wx) + within(kyy, wy) - 2.0 * between)


def kad(x, y, bandwidth: float | None = None, scale: float = SCALE) -> float:
  """KAD ×`scale` between embeddings x `[n, d]` and reference y `[m, d]`.

  `bandwidth` None: the median pairwise distance of y.
  """
  x, y = _as_embeddings("x", x), _as_embeddings("y", y)
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"embedding dimensions differ: x {x.shape}, y {y.shape}")
  h = median_bandwidth(y) if bandwidth is None else float(bandwidth)
  return float(kad_weighted(gaussian_kernel(x, x, h), gaussian_kernel(y, y, h),
                            gaussian_kernel(x, y, h), np.ones(len(x)), np.ones(len(y)),
                            scale))
