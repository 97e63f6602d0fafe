"""The partial-generation runs that the paper's sub-FAD table scores.

For every non-empty proper subset S of the stems (14 for four stems) and every conditioning
chunk (real four-stem chunks of the reference split), the stems outside S are given (the
chunk's own stems, encoded to their posterior means and held by the sampler, reference §7)
and the stems in S are generated. A run's audio is the chunk with S replaced by the decoded
generations, the given stems keeping their ORIGINAL waveforms, as `--mode=sample` writes a
partial piece's mix.

All 14·K pieces go through one compiled program (`generation_program.inpaint_batch`, which
takes each piece's given stems as data), `batch_size` pieces per call; piece j of the run
draws from fold_in(key(seed), j), j counting subsets in `tables.proper_subsets` order, then
chunks.
"""

from collections.abc import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from msldm_jax import stems as stems_lib
from msldm_jax.evaluation import tables
from msldm_jax.generation import conditions
from msldm_jax.diffusion import generation_program
from msldm_jax.parallel import mesh as mesh_lib


def partial_generation_runs(spec: generation_program.GenerationSpec, vae_params, denoiser_params,
                            chunks: np.ndarray, *, seed: int, batch_size: int,
                            subsets: Sequence[tuple[str, ...]] | None = None,
                            devices=None) -> dict[str, np.ndarray]:
  """Generates each subset of stems given the others, for every conditioning chunk.

  Args:
    spec: a total-generation `GenerationSpec` (every stem in `generate_stems`).
    vae_params, denoiser_params: the two modules' variables.
    chunks: float32 [K, stems, samples], the real chunks whose stems are given.
    seed: the run's seed.
    batch_size: pieces per compiled call, split over up to as many local devices.
    subsets: the stem subsets to generate (default: all 14 proper subsets).
    devices: the devices to use (default: all local ones).

  Returns:
    {subset label ('bass+drums'): float32 [K, stems, samples]}: the generated stems of the
    subset with the chunk's other stems as they were.
  """
  chunks = np.asarray(chunks, np.float32)
  if chunks.ndim != 3 or chunks.shape[1] != stems_lib.NUM_STEMS:
    raise ValueError(f"conditioning chunks: expected [chunks, {stems_lib.NUM_STEMS} stems, "
                     f"samples], got shape {chunks.shape}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  subsets = list(tables.proper_subsets() if subsets is None else subsets)
  num_chunks, _, num_samples = chunks.shape
  jobs = [(subset, k) for subset in subsets for k in range(num_chunks)]
  known = np.array([[name not in subset for name in stems_lib.STEM_NAMES]
                    for subset, _ in jobs])

  mesh = generation_program.generation_mesh(batch_size, devices)
  vae_params = generation_program.replicate(vae_params, mesh)
  denoiser_params = generation_program.replicate(denoiser_params, mesh)
  # Each chunk's four stems encoded once; a piece keeps the channels of its given stems.
  x_known = np.concatenate([np.asarray(generation_program.encode_given(
      vae_params, chunks[k:k + 1], vae=spec.vae, latent_scale=spec.latent_scale))
                            for k in range(num_chunks)])
  batch_sharding = mesh_lib.batch_sharding(mesh)
  logging.info("Partial generation for evaluation: %d subsets × %d chunks = %d pieces, %d "
               "per call", len(subsets), num_chunks, len(jobs), batch_size)

  generated = np.zeros((len(jobs), stems_lib.NUM_STEMS, num_samples), np.float32)
  for start in tqdm.tqdm(range(0, len(jobs), batch_size), unit="batch",
                         desc="partial generation", disable=jax.process_index() != 0):
    rows = list(range(start, min(start + batch_size, len(jobs))))
    padded = rows + [rows[-1]] * (batch_size - len(rows))  # One compiled shape.
    keys = generation_program.place_keys(generation_program.piece_keys(seed, padded), mesh)
    batch_known = jax.device_put(jnp.asarray(known[padded]), batch_sharding)
    batch_latents = jax.device_put(jnp.asarray(x_known[[jobs[j][1] for j in padded]]),
                                   batch_sharding)
    _, waveforms = jax.device_get(generation_program.inpaint_batch(
        vae_params, denoiser_params, keys, batch_latents, batch_known, spec=spec))
    for row, j in enumerate(rows):
      for s in range(stems_lib.NUM_STEMS):
        generated[j, s] = conditions.fit_to_length(waveforms[row, s], num_samples)

  runs = {}
  for i, subset in enumerate(subsets):
    audio = chunks.copy()
    for k in range(num_chunks):
      j = i * num_chunks + k
      for s, name in enumerate(stems_lib.STEM_NAMES):
        if name in subset:
          audio[k, s] = generated[j, s]
    runs[tables.subset_label(subset)] = audio
  return runs
