"""Any length: pieces, accompaniments and separations longer than the model's window.

The model was trained on chunks of F latent frames (1024 frames, 14.86 s at the paper's
size). A longer piece is generated window by window along time (`plan_windows`):

  - window 0 is sampled as one chunk;
  - each next window starts F − O frames later (O = the overlap) and is sampled with its
    first frames GIVEN: the previous windows' latents there, held by the same replacement
    inpainting as partial generation (`generation_program.sample_masked`, a mask along time
    instead of along stems), so the new window continues what is already there;
  - the last window is aligned to end at the piece's end (its overlap is then ≥ O), so no
    window is generated against padding;
  - every window is decoded by the frozen VAE on its own, and consecutive windows are joined
    by a linear crossfade over their overlap (`join_windows`), which hides the decoder's
    edge effects at a window's ends.

Partial generation adds the given stems' latents (each window's segment of the given audio,
encoded) to the known values; separation adds the window's segment of the mixture as the
guidance target. A piece of T frames costs 1 + ⌈(T − F)/(F − O)⌉ windows
(`WindowPlan.num_windows`): about T/F · (1 − O/F)⁻¹.

Keys: window w of piece i samples from fold_in(fold_in(key(seed), i), w), so a piece is the
same whatever the batch it falls in.
"""

import dataclasses
from collections.abc import Iterator, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax import stems as stems_lib
from msldm_jax.diffusion import generation_program
from msldm_jax.diffusion import mixture_guidance
from msldm_jax.models import source_vae


@dataclasses.dataclass(frozen=True)
class WindowPlan:
  """Where each window of a long piece lies, in latent frames.

  Attributes:
    total_frames: frames of the whole piece.
    window_frames: F, the model's window.
    overlap_frames: O, the least overlap of consecutive windows.
    starts: each window's first frame.
    hop: audio samples per latent frame.
  """
  total_frames: int
  window_frames: int
  overlap_frames: int
  starts: tuple[int, ...]
  hop: int

  @property
  def num_windows(self) -> int:
    return len(self.starts)

  def known_frames(self, window: int) -> int:
    """How many of the window's first frames the previous windows already hold."""
    if window == 0:
      return 0
    return self.starts[window - 1] + self.window_frames - self.starts[window]


def plan_windows(total_samples: int, window_frames: int, overlap_frames: int,
                 hop: int, decoded_shortfall: int = 0) -> WindowPlan:
  """The windows covering `total_samples` audio samples (see the module docstring).

  `decoded_shortfall`: how many samples a window's decoding falls short of its frames ×
  hop (8 at the paper's strides: 320·F − 8); the plan covers those too, so the piece's last
  samples are decoded, not padding.

  Raises:
    ValueError naming the value when the overlap leaves no new frames per window, or the
      piece is shorter than one latent frame.
  """
  if total_samples < hop:
    raise ValueError(f"{total_samples} samples is shorter than one latent frame ({hop} "
                     "samples): nothing to generate")
  if not 0 <= overlap_frames < window_frames:
    raise ValueError(f"overlap of {overlap_frames} frames: must be at least 0 and less than "
                     f"the {window_frames}-frame window")
  total_frames = -(-(total_samples + decoded_shortfall) // hop)
  stride = window_frames - overlap_frames
  if total_frames <= window_frames:
    starts = (0,)
  else:
    count = 1 + -(-(total_frames - window_frames) // stride)
    starts = tuple(min(i * stride, total_frames - window_frames) for i in range(count))
  return WindowPlan(total_frames=total_frames, window_frames=window_frames,
                    overlap_frames=overlap_frames, starts=starts, hop=hop)


def plan_for(spec: generation_program.GenerationSpec, total_samples: int,
             overlap_frames: int) -> WindowPlan:
  """`plan_windows` for the program `spec`'s window, hop and decoded length."""
  hop = source_vae.hop_length(spec.vae.encoder_strides)
  return plan_windows(total_samples, spec.num_frames, overlap_frames, hop,
                      decoded_shortfall=hop * spec.num_frames - spec.num_samples)


def overlap_frames_for(window_frames: int, overlap: float, key: str = "config.sample.overlap"
                       ) -> int:
  """Overlap in frames from a fraction of the window, at least one frame."""
  if not 0.0 < float(overlap) < 1.0:
    raise ValueError(f"{key}={overlap}: the overlap is a fraction of the window in (0, 1)")
  return max(1, int(round(float(overlap) * window_frames)))


def segment(audio: np.ndarray, start_sample: int, length: int) -> np.ndarray:
  """audio[..., start : start + length], zero-padded past the end."""
  piece = audio[..., start_sample:start_sample + length]
  missing = length - piece.shape[-1]
  if missing:
    piece = np.pad(piece, [(0, 0)] * (piece.ndim - 1) + [(0, missing)])
  return piece


def crossfade_weights(length: int) -> np.ndarray:
  """The incoming window's weight over an overlap of `length` samples, rising linearly from
  just above 0 to just below 1 (the outgoing window's is 1 minus it)."""
  return ((np.arange(length) + 0.5) / length).astype(np.float32)


def join_windows(windows: Sequence[np.ndarray], plan: WindowPlan,
                 num_samples: int) -> np.ndarray:
  """Decoded windows [..., window samples] → the piece [..., num_samples], each overlap a
  linear crossfade from the earlier window to the later one."""
  hop = plan.hop
  out = None
  for w, (start, audio) in enumerate(zip(plan.starts, windows)):
    audio = np.asarray(audio, np.float32)
    if out is None:
      out = np.zeros(audio.shape[:-1] + (plan.total_frames * hop,), np.float32)
    begin = start * hop
    end = min(begin + audio.shape[-1], out.shape[-1])
    audio = audio[..., :end - begin]
    # The earlier windows are written up to their decoded end; crossfade over what they
    # cover of this one.
    covered = 0 if w == 0 else min(
        plan.starts[w - 1] * hop + np.shape(windows[w - 1])[-1], end) - begin
    if covered > 0:
      ramp = crossfade_weights(covered)
      out[..., begin:begin + covered] = ((1.0 - ramp) * out[..., begin:begin + covered]
                                         + ramp * audio[..., :covered])
    out[..., begin + max(covered, 0):end] = audio[..., max(covered, 0):]
  return out[..., :num_samples]


def lay_latents(windows: Sequence[np.ndarray], plan: WindowPlan) -> np.ndarray:
  """Windows' latents [..., channels, F] → the piece's [..., channels, total_frames]. Where
  windows overlap they hold the same values (a window keeps its given frames exactly)."""
  out = None
  for start, latents in zip(plan.starts, windows):
    latents = np.asarray(latents, np.float32)
    if out is None:
      out = np.zeros(latents.shape[:-1] + (plan.total_frames,), np.float32)
    out[..., start:start + plan.window_frames] = latents
  return out


def window_keys(piece_keys: jax.Array, window: int) -> jax.Array:
  """Window `window`'s keys of a batch of pieces: fold_in(piece key, window)."""
  return jax.vmap(jax.random.fold_in, in_axes=(0, None))(piece_keys, window)


def generate_long(spec: generation_program.GenerationSpec, vae_params, denoiser_params,
                  piece_keys: jax.Array, plan: WindowPlan, num_samples: int, *,
                  given: np.ndarray | None = None, given_stems: Sequence[str] = (),
                  mixture: np.ndarray | None = None,
                  guidance: mixture_guidance.Guidance | None = None,
                  progress: bool = False) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """Samples a batch of long pieces window by window; yields (window, latents, waveforms).

  Args:
    spec: the program (`generate_stems` every stem; `num_frames` the window's F).
    vae_params, denoiser_params: the modules' variables.
    piece_keys: [batch] keys, one per piece.
    plan: `plan_windows(...)` with `window_frames == spec.num_frames`.
    num_samples: the piece's length in samples.
    given: [stems, num_samples] audio of the given stems (zeros elsewhere), shared by the
      batch; with `given_stems` naming them.
    mixture: [batch, num_samples], each piece's mixture to separate, with `guidance`.
    guidance: `mixture_guidance.Guidance` for separation.
    progress: log each window.

  Yields:
    per window: its index, latents [batch, stems·latent, F] and decoded stems
    [batch, stems, window samples] (the caller joins them, `join_windows`).
  """
  if plan.window_frames != spec.num_frames:
    raise ValueError(f"the plan's {plan.window_frames}-frame windows differ from the "
                     f"program's {spec.num_frames} frames")
  batch = piece_keys.shape[0]
  frames = plan.window_frames
  window_samples = frames * plan.hop
  latent_dim = spec.vae.latent_dim
  given_flags = np.array([s in given_stems for s in stems_lib.STEM_NAMES])
  if given_flags.any() and given is None:
    raise ValueError(f"given stems {tuple(given_stems)} need their audio")
  # What is sampled so far, [batch, channels, total_frames].
  history = np.zeros((batch, spec.channels, plan.total_frames), np.float32)
  for w, start in enumerate(plan.starts):
    x_known = np.zeros((batch, spec.channels, frames), np.float32)
    known = np.zeros((batch, spec.channels, frames), bool)
    held = plan.known_frames(w)
    if held:
      x_known[:, :, :held] = history[:, :, start:start + held]
      known[:, :, :held] = True
    if given_flags.any():
      audio = segment(given, start * plan.hop, window_samples)[None]
      encoded = np.asarray(generation_program.encode_given(
          vae_params, audio, vae=spec.vae, latent_scale=spec.latent_scale))
      stem_known = np.asarray(generation_program.stem_mask(
          jnp.asarray(given_flags[None]), latent_dim, frames))[0]
      x_known = np.where(stem_known[None], encoded, x_known)
      known = known | stem_known[None]
    keys = window_keys(piece_keys, w)
    if guidance is None:
      latents, waveforms = generation_program.sample_masked(
          vae_params, denoiser_params, keys, x_known, known, spec=spec)
    else:
      target = segment(mixture, start * plan.hop, spec.num_samples)
      latents, waveforms = generation_program.sample_masked(
          vae_params, denoiser_params, keys, x_known, known, target, spec=spec,
          guidance=guidance)
    latents, waveforms = jax.device_get((latents, waveforms))
    history[:, :, start:start + frames] = latents
    if progress:
      logging.info("window %d of %d (frames %d-%d, %d given from the previous)", w + 1,
                   plan.num_windows, start, start + frames, held)
    yield w, np.asarray(latents), np.asarray(waveforms)
