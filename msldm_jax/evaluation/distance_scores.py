"""Distances between generated and real embedding sets, with how sure they are.

Every score is reported as
- the value: KAD ×100 (`kernel_distance`) or the Fréchet distance (`frechet`) between the
  generated windows and the reference windows;
- a bootstrap 95 % interval: pieces (not windows: a piece's windows are not independent) are
  resampled with replacement on both sides, `bootstrap_samples` times, seeded;
- the floor: the same distance between two disjoint halves of the reference pieces (a seeded
  split), with its own interval. A perfect model scores about the floor at this sample size:
  a score whose interval overlaps the floor's cannot be told from real audio, and two models
  whose intervals overlap cannot be told apart;
- with the reference's reconstructions through the system's VAE, the codec's ceiling: the
  same distance from the first half's reconstructions to the second half (the floor's pairs,
  with only the codec between them). A generator that decodes through that VAE cannot be
  expected below it: how far a score lies above it is the latent model's, how far the
  ceiling lies above the floor is the codec's;
- the number of windows on each side.

The Fréchet distance of a set with fewer windows than the embedding has dimensions rests on
a singular covariance and is biased by the sample size far beyond any model difference, so it
is REFUSED (value None, with the reason) rather than reported; KAD has no such limit.

Embeddings come as `[pieces, windows, d]`: every piece of a set has the same length, so the
same number of windows.
"""

import dataclasses
from typing import Optional

import numpy as np

from msldm_jax.evaluation import frechet
from msldm_jax.evaluation import kernel_distance

KAD = "KAD ×100"
FD = "FD"
MEASURES = {"kad": KAD, "fd": FD}


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How scores are computed: which measures, how many bootstrap draws, the seed."""
  measures: tuple[str, ...] = ("kad", "fd")
  bootstrap_samples: int = 200
  confidence: float = 0.95
  seed: int = 0

  def __post_init__(self):
    unknown = [m for m in self.measures if m not in MEASURES]
    if unknown:
      raise ValueError(f"unknown measures {unknown} (known: {sorted(MEASURES)})")
    if self.bootstrap_samples < 1:
      raise ValueError(f"bootstrap_samples must be >= 1; got {self.bootstrap_samples}")


@dataclasses.dataclass(frozen=True)
class Score:
  """One distance with its interval and floor; value None when refused (`note` says why)."""
  measure: str
  value: Optional[float]
  low: Optional[float]
  high: Optional[float]
  floor: Optional[float]
  floor_low: Optional[float]
  floor_high: Optional[float]
  generated_windows: int
  reference_windows: int
  note: str = ""
  # The codec's ceiling (None when no reconstructions were given, or refused).
  through_vae: Optional[float] = None
  through_vae_low: Optional[float] = None
  through_vae_high: Optional[float] = None

  def cell(self) -> str:
    """'12.30 [10.10, 14.50]' or the reason it was refused."""
    return _cell(self.value, self.low, self.high, self.note)

  def floor_cell(self) -> str:
    return _cell(self.floor, self.floor_low, self.floor_high, "n/a")

  def through_vae_cell(self) -> str:
    return _cell(self.through_vae, self.through_vae_low, self.through_vae_high, "n/a")

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _cell(value, low, high, missing: str) -> str:
  if value is None:
    return missing
  return f"{value:.2f} [{low:.2f}, {high:.2f}]"


def _pieces(name: str, embeddings) -> np.ndarray:
  x = np.asarray(embeddings, np.float64)
  if x.ndim != 3:
    raise ValueError(f"{name}: embeddings must be [pieces, windows, d]; got shape {x.shape}")
  if x.shape[0] < 2 or x.shape[1] < 1:
    raise ValueError(f"{name}: need at least 2 pieces of at least 1 window; got {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: embeddings {x.shape} contain non-finite values")
  return x


def _piece_weights(rng: np.random.Generator, pieces: int, windows: int,
                   draws: int) -> np.ndarray:
  """Resampling counts `[draws, pieces · windows]`: pieces drawn with replacement."""
  counts = rng.multinomial(pieces, np.full(pieces, 1.0 / pieces), size=draws)
  return np.repeat(counts, windows, axis=1).astype(np.float64)


def _weighted_fd(x: np.ndarray, y: np.ndarray, wx: np.ndarray, wy: np.ndarray) -> float:
  def fit(z, w):
    total = w.sum()
    mean = (w[:, None] * z).sum(0) / total
    centred = z - mean
    return mean, (centred * w[:, None]).T @ centred / (total - 1.0)
  return frechet.frechet_distance(*fit(x, wx), *fit(y, wy))


def _estimate(measure: str, x: np.ndarray, y: np.ndarray, wx: np.ndarray,
              wy: np.ndarray, bandwidth: float) -> np.ndarray:
  """The measure for each row of weights `[draws, n]`, `[draws, m]`."""
  if measure == "kad":
    return kernel_distance.kad_weighted(
        kernel_distance.gaussian_kernel(x, x, bandwidth),
        kernel_distance.gaussian_kernel(y, y, bandwidth),
        kernel_distance.gaussian_kernel(x, y, bandwidth), wx, wy)
  return np.array([_weighted_fd(x, y, a, b) for a, b in zip(wx, wy)])


def _distance_with_interval(measure: str, x: np.ndarray, y: np.ndarray, bandwidth: float,
                            protocol: Protocol, rng: np.random.Generator):
  """(value, low, high) or None when FD is refused for these sizes."""
  (p, w, d), (q, v, _) = x.shape, y.shape
  if measure == "fd" and min(p * w, q * v) < d:
    return None
  xf, yf = x.reshape(p * w, d), y.reshape(q * v, d)
  value = float(_estimate(measure, xf, yf, np.ones((1, p * w)), np.ones((1, q * v)),
                          bandwidth)[0])
  draws = _estimate(measure, xf, yf, _piece_weights(rng, p, w, protocol.bootstrap_samples),
                    _piece_weights(rng, q, v, protocol.bootstrap_samples), bandwidth)
  # A draw of one piece repeated throughout has no pair of distinct windows (KAD's
  # within-set mean is 0/0) when pieces have one window: such draws carry no information.
  draws = draws[np.isfinite(draws)]
  if draws.size == 0:
    return value, float("nan"), float("nan")
  tail = 100.0 * (1.0 - protocol.confidence) / 2.0
  low, high = np.percentile(draws, [tail, 100.0 - tail])
  return value, float(low), float(high)


def reference_halves(pieces: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """A seeded split of `pieces` reference indices into two disjoint halves."""
  order = np.random.default_rng([seed, pieces]).permutation(pieces)
  return np.sort(order[:pieces // 2]), np.sort(order[pieces // 2:])


def score(generated, reference, protocol: Protocol = Protocol(),
          reconstructed=None) -> dict[str, Score]:
  """{measure label: Score} of generated `[p, w, d]` against reference `[q, v, d]`;
  with `reconstructed` (the reference's pieces through the VAE, `[q, v, d]` in the same
  order), each Score's `through_vae` too: the codec's ceiling (module docstring)."""
  x, y = _pieces("generated", generated), _pieces("reference", reference)
  if x.shape[-1] != y.shape[-1]:
    raise ValueError(f"embedding dimensions differ: generated {x.shape}, reference {y.shape}")
  r = None
  if reconstructed is not None:
    r = _pieces("reconstructed", reconstructed)
    if r.shape != y.shape:
      raise ValueError(f"reconstructed embeddings {r.shape} must pair with the reference's "
                       f"{y.shape}, piece by piece")
  d = y.shape[-1]
  # One kernel for the value, its bootstrap and the floor: the reference's median distance.
  bandwidth = (kernel_distance.median_bandwidth(y.reshape(-1, d))
               if "kad" in protocol.measures else None)
  first, second = reference_halves(len(y), protocol.seed)
  scores = {}
  for measure in protocol.measures:
    rng = np.random.default_rng([protocol.seed, list(MEASURES).index(measure)])
    result = _distance_with_interval(measure, x, y, bandwidth, protocol, rng)
    halves = min(len(first), len(second)) >= 2
    floor = (_distance_with_interval(measure, y[first], y[second], bandwidth, protocol, rng)
             if halves else None)
    # Drawn after the floor from the same generator, so that the value and the floor do not
    # depend on whether reconstructions were given.
    ceiling = (_distance_with_interval(measure, r[first], y[second], bandwidth, protocol, rng)
               if halves and r is not None else None)
    note = ""
    if result is None:
      note = (f"refused: {min(x.shape[0] * x.shape[1], y.shape[0] * y.shape[1])} windows "
              f"< {d} dimensions")
    scores[MEASURES[measure]] = Score(
        measure=MEASURES[measure],
        value=None if result is None else result[0],
        low=None if result is None else result[1],
        high=None if result is None else result[2],
        floor=None if floor is None else floor[0],
        floor_low=None if floor is None else floor[1],
        floor_high=None if floor is None else floor[2],
        generated_windows=int(x.shape[0] * x.shape[1]),
        reference_windows=int(y.shape[0] * y.shape[1]),
        note=note,
        through_vae=None if ceiling is None else ceiling[0],
        through_vae_low=None if ceiling is None else ceiling[1],
        through_vae_high=None if ceiling is None else ceiling[2])
  return scores
