"""How much a trained denoiser's estimate of each stem relies on the other stems, in latents.

The audio measures of cross-stem dependence (`music_metrics.cross_stem_dependence`) read
decoded pieces: they need a denoiser whose pieces are music already, and they mix the latent
model's dependence with the sampler's and the codec's. This reads the network itself, on
held-out joint latents x (chunks no latent model trained on): for a noise level σ and a stem
s, the EDM-weighted loss on stem s's channels (training's loss, restricted to one stem) when
the noisy input's other stems are the chunk's own, and when they are another chunk's, under
the same noise. The increase is what the network's estimate of stem s takes from the other
stems being the right ones:

  - isldm: exactly 0 (each network sees only its own stem), the check that the measure
    sees nothing where there is nothing;
  - a joint model that learned how the stems go together: above 0, most where σ hides a
    stem's own detail but leaves the others' (the middle buckets);
  - a joint model that treats the stems as independent: 0 up to noise, however good its
    per-stem losses.

The 'other chunk' is each chunk's partner in a seeded derangement (no chunk is its own), so
every stem keeps its own marginal distribution; only the pairing is broken. Intervals are
percentile bootstraps over chunks, paired (a resample draws chunks with both their losses).
"""

from collections.abc import Sequence
import functools

import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax import joint_latent
from msldm_jax import stems as stems_lib
from msldm_jax.diffusion import edm
from msldm_jax.latents import store
from msldm_jax.models import loading

# One σ per bucket of training's loss logs: each bucket's geometric centre.
SIGMAS = tuple(float(np.sqrt(lo * hi)) for lo, hi in
               zip(edm.SIGMA_BUCKET_EDGES[:-1], edm.SIGMA_BUCKET_EDGES[1:]))


def derangement(count: int, seed: int) -> np.ndarray:
  """partner[i] != i for every i: a seeded random cycle through all `count` chunks."""
  if count < 2:
    raise ValueError(f"cross-stem information needs at least 2 chunks to pair, got {count}")
  order = np.random.default_rng(seed).permutation(count)
  partner = np.empty(count, np.int64)
  partner[order] = np.roll(order, -1)
  return partner


@functools.partial(jax.jit, static_argnames=("apply_fn", "sigma_data"))
def _per_stem_losses(params, own_bsct, partner_bsct, noise_bsct, sigma, *, apply_fn,
                     sigma_data: float):
  """([b, S] loss with the chunk's own stems, [b, S] with stem s alone its own), one σ."""
  num_sources = own_bsct.shape[1]

  def losses(x_bsct):
    x = joint_latent.stack_sources(x_bsct)
    noise = joint_latent.stack_sources(noise_bsct)
    sigma_b = jnp.full((x.shape[0],), sigma, jnp.float32)
    sigma_x = sigma_b[:, None, None]
    f = apply_fn(params, edm.c_in(sigma_x, sigma_data) * (x + sigma_x * noise),
                 edm.c_noise(sigma_b))
    target = edm.training_target(x, noise, sigma_x, sigma_data)
    error = joint_latent.split_sources(jnp.square(f.astype(jnp.float32) - target),
                                       num_sources)
    return jnp.mean(error, axis=(2, 3))

  own = losses(own_bsct)
  swapped = []
  for s in range(num_sources):
    # Stem s from the chunk itself, every other stem from its partner.
    mixed = partner_bsct.at[:, s].set(own_bsct[:, s])
    swapped.append(losses(mixed)[:, s])
  return own, jnp.stack(swapped, axis=1)


def per_chunk_losses(denoiser: loading.Loaded, latents_nsct: np.ndarray, partner: np.ndarray,
                     *, sigmas: Sequence[float] = SIGMAS, noise_draws: int = 2,
                     batch_size: int = 16, seed: int = 0,
                     sigma_data: float = edm.SIGMA_DATA) -> tuple[np.ndarray, np.ndarray]:
  """Each chunk's per-stem loss, own stems and partner's, averaged over `noise_draws`.

  `latents_nsct` are in the denoiser's scale (what it trained on). Returns two float64
  arrays [len(sigmas), n, S]: own, swapped.
  """
  latents_nsct = np.asarray(latents_nsct, np.float32)
  count, num_sources = latents_nsct.shape[:2]
  own = np.zeros((len(sigmas), count, num_sources))
  swapped = np.zeros_like(own)
  key = jax.random.key(seed)
  for start in range(0, count, batch_size):
    rows = np.arange(start, min(start + batch_size, count))
    # Pad the last batch to the batch size: one compiled program for every batch.
    padded = np.resize(rows, batch_size)
    x_own = jnp.asarray(latents_nsct[padded])
    x_partner = jnp.asarray(latents_nsct[partner[padded]])
    for i, sigma in enumerate(sigmas):
      for draw in range(noise_draws):
        noise = jax.random.normal(jax.random.fold_in(key, (start * len(sigmas) + i)
                                                     * noise_draws + draw),
                                  x_own.shape, jnp.float32)
        a, b = _per_stem_losses(denoiser.params, x_own, x_partner, noise,
                                jnp.float32(sigma), apply_fn=denoiser.module.apply,
                                sigma_data=float(sigma_data))
        own[i, rows] += np.asarray(a)[:len(rows)] / noise_draws
        swapped[i, rows] += np.asarray(b)[:len(rows)] / noise_draws
  return own, swapped


def cross_stem_information(denoiser: loading.Loaded, latents_nsct: np.ndarray, *,
                           stem_names: Sequence[str] = stems_lib.STEM_NAMES,
                           sigmas: Sequence[float] = SIGMAS, noise_draws: int = 2,
                           batch_size: int = 16, seed: int = 0, bootstrap_samples: int = 200,
                           confidence: float = 0.95,
                           sigma_data: float = edm.SIGMA_DATA) -> dict[str, dict[str, float]]:
  """Rows 'STEM at σ=…' (and 'all stems at σ=…'): the stem's loss with its own chunk's other
  stems ("own"), with its partner's ("swapped"), their difference ("information") with its
  bootstrap interval ("low", "high"), and the difference relative to "own" ("relative")."""
  if len(stem_names) != np.shape(latents_nsct)[1]:
    raise ValueError(f"{len(stem_names)} stem names for latents of "
                     f"{np.shape(latents_nsct)[1]} sources")
  count = len(latents_nsct)
  partner = derangement(count, seed)
  own, swapped = per_chunk_losses(denoiser, latents_nsct, partner, sigmas=sigmas,
                                  noise_draws=noise_draws, batch_size=batch_size, seed=seed,
                                  sigma_data=sigma_data)
  draws = np.random.default_rng(seed).integers(0, count, (bootstrap_samples, count))
  tail = 100.0 * (1.0 - confidence) / 2.0
  rows = {}
  for i, sigma in enumerate(sigmas):
    columns = [(name, own[i, :, s], swapped[i, :, s]) for s, name in enumerate(stem_names)]
    columns.append(("all stems", own[i].mean(axis=1), swapped[i].mean(axis=1)))
    for name, a, b in columns:
      difference = b - a
      low, high = np.percentile(difference[draws].mean(axis=1), [tail, 100.0 - tail])
      rows[f"{name} at σ={sigma:.3g}"] = {
          "own": float(a.mean()), "swapped": float(b.mean()),
          "information": float(difference.mean()), "low": float(low), "high": float(high),
          "relative": float(difference.mean() / a.mean()) if a.mean() > 0 else float("nan")}
  return rows


def held_out_latents(denoiser: loading.Loaded, splits: Sequence[str], max_chunks: int = 0,
                     seed: int = 0) -> tuple[np.ndarray, tuple[str, ...]]:
  """The held-out chunks of the latent store the denoiser trained from, in its scale.

  Returns ([n, S, D, T] latents, the store's source names). `max_chunks` > 0 keeps a seeded
  random sample of that many.
  """
  record = denoiser.identity.get("latents")
  if not record or not record.get("latents_dir"):
    raise ValueError(f"the denoiser at {denoiser.identity.get('checkpoint_dir', '?')} records "
                     "no latent store (an import?): cross-stem information needs the latents "
                     "it trained from")
  directory = record["latents_dir"]
  manifest = store.load_manifest(directory)
  parts = [store.LatentStore(directory, split, manifest).read_all() for split in splits]
  latents = np.concatenate(parts) if parts else np.zeros((0,))
  if max_chunks and len(latents) > max_chunks:
    keep = np.sort(np.random.default_rng(seed).choice(len(latents), max_chunks,
                                                      replace=False))
    latents = latents[keep]
  latents = np.asarray(joint_latent.unscale_sources(latents, loading.latent_scale(denoiser)))
  return latents, tuple(record.get("sources") or stems_lib.STEM_NAMES)
