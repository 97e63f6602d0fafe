"""VGGish (Hershey et al. 2017) in flax.linen, its log-mel frontend, and a weights loader.

FAD (Kilgour et al. 2019) is the Fréchet distance between Gaussian fits of VGGish
embeddings. The network is AudioSet's VGGish: 0.96 s examples of 96 frames × 64 log-mel bands
from 16 kHz audio, conv64-pool-conv128-pool-conv256-conv256-pool-conv512-conv512-pool
(3×3 convs, 2×2 max pools, ReLU) then fc4096-fc4096-fc128, each followed by ReLU as in the
PyTorch port we load weights from (harritaylor/torchvggish).

Weights: nothing is downloaded at run time; the user passes a path. The supported file is the
PyTorch port's state dict `vggish-10086976.pth` (from that project's GitHub releases), read
without torch by `msldm_jax.models.torch_checkpoint.read_torch_checkpoint`, which reads only
torch's zip format: a file saved by torch < 1.6 must be re-saved once with a recent torch
(`torch.save(torch.load(p), p)`). The optional PCA/quantisation postprocessing takes the
port's `vggish_pca_params-970ea276.pth` ({'pca_eigen_vectors': [128, 128], 'pca_means':
[128]}) or an .npz with those two keys. The original TensorFlow checkpoint
(`vggish_model.ckpt`) is not supported.

Frontend, as the original's `vggish_input.py`/`mel_features.py`: mono, resampled to 16 kHz
(here with soxr through librosa, where the original uses resampy: a small difference),
frames of 400 samples (25 ms) every 160 (10 ms) without centring, periodic Hann of 400,
512-point |rfft|, an HTK-scale mel matrix of 64 bands over 125–7500 Hz whose triangles are
built on the mel axis (not librosa's Slaney filters), log(mel + 0.01), then non-overlapping
examples of 96 frames.
"""

from typing import Any, NamedTuple, Optional, Sequence

from absl import logging
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax.audio import resampling
from msldm_jax.audio import spectral
from msldm_jax.models import torch_checkpoint

SAMPLE_RATE = 16000
WINDOW_LENGTH = 400  # 25 ms at 16 kHz.
HOP_LENGTH = 160  # 10 ms.
N_FFT = 512  # The next power of two above the window, as mel_features.log_mel_spectrogram.
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
NUM_FRAMES = 96  # 0.96 s of 10 ms frames per example; examples do not overlap.
EMBEDDING_SIZE = 128
QUANTIZE_MIN_VAL = -2.0
QUANTIZE_MAX_VAL = 2.0
EMBEDDING_NAME = "vggish"

CONV_CHANNELS = (64, 128, 256, 256, 512, 512)
FC_FEATURES = (4096, 4096, EMBEDDING_SIZE)
# Index of each conv in the port's `features` nn.Sequential (conv, ReLU and pool layers are
# counted alike) and of each linear layer in its `embeddings` nn.Sequential.
TORCH_CONV_INDICES = (0, 3, 6, 8, 11, 13)
TORCH_FC_INDICES = (0, 2, 4)
POOL_AFTER = (0, 1, 3, 5)  # Convs followed by a 2×2 max pool.


def _hertz_to_mel(frequencies_hertz):
  # HTK's natural-log form, as mel_features.hertz_to_mel.
  return 1127.0 * np.log(1.0 + np.asarray(frequencies_hertz, np.float64) / 700.0)


def mel_matrix(num_mel_bins: int = NUM_MEL_BINS, num_spectrogram_bins: int = N_FFT // 2 + 1,
               sample_rate: int = SAMPLE_RATE, lower_edge_hertz: float = MEL_MIN_HZ,
               upper_edge_hertz: float = MEL_MAX_HZ) -> np.ndarray:
  """VGGish's mel matrix `[num_spectrogram_bins, num_mel_bins]` (mel_features' formula).

  Triangles of unit height, linear on the HTK mel axis between equally spaced mel edges,
  without area normalisation; the DC bin gets no weight.
  """
  bins_mel = _hertz_to_mel(np.linspace(0.0, sample_rate / 2.0, num_spectrogram_bins))
  edges = np.linspace(_hertz_to_mel(lower_edge_hertz), _hertz_to_mel(upper_edge_hertz),
                      num_mel_bins + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
  lower_slope = (bins_mel[:, None] - lower) / (center - lower)
  upper_slope = (upper - bins_mel[:, None]) / (upper - center)
  weights = np.maximum(0.0, np.minimum(lower_slope, upper_slope))
  weights[0, :] = 0.0
  return weights


def log_mel(waveform_16k) -> np.ndarray:
  """log(mel + 0.01) `[frames, 64]` (float32) of 16 kHz mono audio `[samples]`."""
  waveform_16k = jnp.asarray(waveform_16k, jnp.float32)
  if waveform_16k.shape[-1] < WINDOW_LENGTH:
    return np.zeros((0, NUM_MEL_BINS), np.float32)
  # spectral.stft ties the window length to n_fft and centres frames; VGGish frames 400
  # samples uncentred and zero-pads each to 512, so the pieces are assembled here.
  frames = spectral.frame(waveform_16k, WINDOW_LENGTH, HOP_LENGTH)
  frames = frames * spectral.hann_window(WINDOW_LENGTH)
  spectrum_mag = spectral.magnitude(jnp.fft.rfft(frames, n=N_FFT, axis=-1))
  mel = jnp.matmul(spectrum_mag, jnp.asarray(mel_matrix(), jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return np.asarray(jnp.log(mel + LOG_OFFSET))


def waveform_to_examples(waveform, sample_rate: int) -> np.ndarray:
  """Log-mel examples `[n_examples, 96, 64]`; the trailing partial 0.96 s is dropped."""
  logmel = log_mel(resampling.to_mono(waveform, sample_rate, SAMPLE_RATE, user="VGGish"))
  count = logmel.shape[0] // NUM_FRAMES
  return logmel[:count * NUM_FRAMES].reshape(count, NUM_FRAMES, NUM_MEL_BINS)


class VGGish(nn.Module):
  """VGGish: log-mel examples `[n, 96, 64]` -> embeddings `[n, fc_features[-1]]`.

  Submodules are named after the port's state-dict entries (`features_0` holds
  `features.0.*`). The widths are fields so that tests can build a small twin.
  """
  conv_channels: Sequence[int] = CONV_CHANNELS
  fc_features: Sequence[int] = FC_FEATURES

  @nn.compact
  def __call__(self, examples: jax.Array) -> jax.Array:
    chex.assert_rank(examples, 3)
    x = examples[..., None]  # NHWC: H = 96 frames, W = 64 bands, one channel.
    for i, (channels, index) in enumerate(zip(self.conv_channels, TORCH_CONV_INDICES)):
      x = nn.relu(nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)),
                          name=f"features_{index}")(x))
      if i in POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    # The port permutes NCHW to NHWC before flattening (to match the TF original), which is
    # flax's native layout: a plain reshape gives its order.
    x = x.reshape(x.shape[0], -1)
    for features, index in zip(self.fc_features, TORCH_FC_INDICES):
      x = nn.relu(nn.Dense(features, name=f"embeddings_{index}")(x))
    return x


class PcaParams(NamedTuple):
  """AudioSet's PCA (with whitening): matrix `[128, 128]`, means `[128]`."""
  matrix: np.ndarray
  means: np.ndarray


def _expected_shapes(model: VGGish) -> dict[str, tuple[tuple[str, str], tuple[int, ...]]]:
  """Torch key -> (flax path, flax shape), from the model's abstract parameters."""
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, NUM_FRAMES, NUM_MEL_BINS), jnp.float32))["params"]
  expected = {}
  for module, leaves in abstract.items():
    prefix = module.replace("_", ".")
    expected[f"{prefix}.weight"] = ((module, "kernel"), leaves["kernel"].shape)
    expected[f"{prefix}.bias"] = ((module, "bias"), leaves["bias"].shape)
  return expected


def _to_flax(array: np.ndarray) -> np.ndarray:
  if array.ndim == 4:  # Conv weight OIHW -> HWIO.
    return np.transpose(array, (2, 3, 1, 0))
  if array.ndim == 2:  # Linear weight [out, in] -> Dense kernel [in, out].
    return array.T
  return array  # Biases; a wrong rank or size is caught by the caller's shape check.


def convert_state_dict(state_dict: dict[str, Any], model: Optional[VGGish] = None,
                       source: str = "state dict") -> dict:
  """The port's VGG state dict -> flax variables `{'params': ...}` for `model`.

  Every key is mapped explicitly; a missing or unknown key or a shape that disagrees with
  the model raises, naming the key. The port's postprocessor entries (`pproc.*`) are ignored
  here (see `load_pca_params`).
  """
  model = model or VGGish()
  expected = _expected_shapes(model)
  state = {k: v for k, v in state_dict.items() if not k.startswith("pproc.")}
  unknown = sorted(set(state) - set(expected))
  missing = sorted(set(expected) - set(state))
  if unknown:
    raise KeyError(f"{source}: unknown VGGish key(s) {unknown}")
  if missing:
    raise KeyError(f"{source}: missing VGGish key(s) {missing}")
  params = {}
  for key, ((module, leaf), flax_shape) in expected.items():
    value = np.asarray(state[key], np.float32)
    converted = _to_flax(value)
    if converted.shape != tuple(flax_shape):
      raise ValueError(f"{source}: {key} has shape {value.shape}, which converts to "
                       f"{converted.shape}; the model needs {tuple(flax_shape)}")
    params.setdefault(module, {})[leaf] = jnp.asarray(converted)
  return {"params": params}


def load_vggish_params(path: str, model: Optional[VGGish] = None) -> dict:
  """Flax variables from the PyTorch port's `vggish-10086976.pth` (see the module doc)."""
  state = torch_checkpoint.read_torch_checkpoint(path)
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}")
  variables = convert_state_dict(state, model, source=path)
  logging.info("Loaded VGGish weights from %s (%d tensors).", path,
               2 * len(variables["params"]))
  return variables


def load_pca_params(path: str) -> PcaParams:
  """AudioSet PCA params from the port's `vggish_pca_params-970ea276.pth` or an .npz.

  Keys `pca_eigen_vectors` [128, 128] and `pca_means` [128] (or [128, 1]); a full VGGish
  state dict with `pproc.pca_matrix`/`pproc.pca_means` is accepted too.
  """
  if path.endswith(".npz"):
    with np.load(path) as data:
      state = {k: data[k] for k in data.files}
  else:
    state = torch_checkpoint.read_torch_checkpoint(path)
  for matrix_key, means_key in (("pca_eigen_vectors", "pca_means"),
                                ("pproc.pca_matrix", "pproc.pca_means")):
    if matrix_key in state and means_key in state:
      matrix = np.asarray(state[matrix_key], np.float32)
      means = np.asarray(state[means_key], np.float32).reshape(-1)
      if matrix.shape != (EMBEDDING_SIZE, EMBEDDING_SIZE):
        raise ValueError(f"{path}: {matrix_key} has shape {matrix.shape}; expected "
                         f"{(EMBEDDING_SIZE, EMBEDDING_SIZE)}")
      if means.shape != (EMBEDDING_SIZE,):
        raise ValueError(f"{path}: {means_key} has {means.size} values; expected "
                         f"{EMBEDDING_SIZE}")
      return PcaParams(matrix, means)
  raise KeyError(f"{path}: no 'pca_eigen_vectors'/'pca_means' (or 'pproc.pca_matrix'/"
                 f"'pproc.pca_means') entries; found {sorted(state)}")


def postprocess(embeddings, pca: PcaParams) -> np.ndarray:
  """AudioSet's PCA, clipping to [-2, 2] and 8-bit quantisation (values 0..255, float32)."""
  embeddings = np.asarray(embeddings, np.float32)
  applied = (embeddings - pca.means) @ pca.matrix.T
  clipped = np.clip(applied, QUANTIZE_MIN_VAL, QUANTIZE_MAX_VAL)
  return np.round((clipped - QUANTIZE_MIN_VAL)
                  * (255.0 / (QUANTIZE_MAX_VAL - QUANTIZE_MIN_VAL))).astype(np.float32)


def _apply(model: VGGish):
  return jax.jit(model.apply)


_APPLY_CACHE: dict = {}


def embed_examples(variables: dict, examples, model: Optional[VGGish] = None,
                   batch_size: int = 64) -> np.ndarray:
  """Network outputs `[n, fc_features[-1]]` of log-mel examples `[n, 96, 64]`."""
  model = model or VGGish()
  apply = _APPLY_CACHE.setdefault(model, _apply(model))
  examples = np.asarray(examples, np.float32)
  outputs = [np.zeros((0, model.fc_features[-1]), np.float32)]
  for start in range(0, examples.shape[0], batch_size):
    batch = examples[start:start + batch_size]
    count = batch.shape[0]
    if count < batch_size and examples.shape[0] > batch_size:
      # Pad the last batch to the common size: one compiled shape for every batch.
      batch = np.concatenate([batch, np.zeros((batch_size - count,) + batch.shape[1:],
                                              np.float32)])
    outputs.append(np.asarray(apply(variables, jnp.asarray(batch)))[:count])
  return np.concatenate(outputs)


def embed(variables: dict, waveform, sample_rate: int, *, pca: Optional[PcaParams] = None,
          model: Optional[VGGish] = None, batch_size: int = 64) -> np.ndarray:
  """VGGish embeddings `[n_examples, 128]` of a waveform (one per whole 0.96 s at 16 kHz).

  Raw embeddings unless `pca` is given (then AudioSet's postprocessing: quantised 0..255).
  """
  embeddings = embed_examples(variables, waveform_to_examples(waveform, sample_rate), model,
                              batch_size)
  return embeddings if pca is None else postprocess(embeddings, pca)
