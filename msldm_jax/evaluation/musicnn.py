"""musicnn (Pons & Serra 2019) in flax.linen: log-mel frontend, network and weights loader.

musicnn is a music-tagging CNN trained on the Million Song Dataset (MSD_musicnn) or on
MagnaTagATune (MTT_musicnn). Its 200-unit penultimate layer is a music embedding trained on
music rather than on AudioSet's mostly non-music sounds (VGGish): a Fréchet distance between
penultimate embeddings is a second, music-specific audio-quality score, and the MTT tagger's
instrument tags say whether a generated stem sounds like its instrument.

What follows is the `musicnn` 0.1.0 package (`extractor.py`, `models.py`), whose TF1 code is
not imported (it needs TF1's graph mode); its trained checkpoints are read:

Frontend (`extractor.batch_data`): mono audio at 16 kHz (resampled with soxr HQ, as
`librosa.load(sr=16000)` does), `librosa.feature.melspectrogram` with n_fft 512, hop 256, a
periodic Hann window, centred frames, power 2 and 96 Slaney mel bands over 0–8 kHz, computed
here in JAX. Centring pads with `PAD_MODE`, the default of the installed librosa (zeros since
librosa 0.10; the models were trained in 2019 under librosa's then-default reflect padding,
which changes only the first frame, and a last frame if a whole patch reaches it). The package
then rounds the mel power to float16 and takes log10(10000·x + 1) in float16. Here the float16
rounding is kept (the network was trained on float16-rounded inputs) but the logarithm is
taken in float32: in float16, 10000·x overflows to inf once x > 6.55 (loud audio), which makes
every tag NaN. A mel power above float16's largest value saturates there instead of becoming
inf. Patches of 187 frames (3 s) do not overlap; a trailing partial patch is dropped (the
package's `input_overlap=False`).

Network (`models.build_musicnn`, inference mode: batch norms use their moving statistics,
with TF's epsilon 1e-3; dropout is off):
  front end: batch norm of the input; timbral blocks (kernels 7×38 and 7×67 over
    time×frequency, 204 filters, time zero-padded by 3 then 'valid') and temporal blocks
    (128×1, 64×1, 32×1, 51 filters, 'same'), each conv → ReLU → batch norm → max over
    frequency; concatenated: [patch, 187, 561].
  mid end: three 7-tap convolutions over time (64 filters, zero 'same' padding) → ReLU →
    batch norm, the 2nd and 3rd residual; the front end and the three outputs concatenated:
    [patch, 187, 753].
  back end: max and mean over time, interleaved per feature as TF's flatten of
    [753, 2] orders them; batch norm; dense 200 → ReLU → batch norm (the penultimate
    embedding); dense 50 (logits); sigmoid (tags).
The front end's convolutions are 2-D over [time, mel] with one channel, as TF's: on XLA:CPU
that beat 1-D convolutions with frequency offsets or mel bands folded into the batch. The mid
end's, whose kernels span the whole feature axis, are 1-D over time with the features as
channels: the same arithmetic as TF's 'valid' 2-D conv, and faster on XLA:CPU.

Weights: TF1 checkpoints shipped in the package (`musicnn/MSD_musicnn/`, `MTT_musicnn/`, files
named `.index`, `.data-00000-of-00001`, i.e. the checkpoint prefix is the folder plus '/').
Install with `pip install --no-deps musicnn==0.1.0` (its dependencies pin TF1). Submodules are
named after the checkpoint's variable scopes (`conv2d_5`, `batch_normalization_9`, `dense_1`).
"""

import functools
import importlib.util
import os
from typing import Any, NamedTuple, Optional

from absl import logging
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from msldm_jax.audio import resampling
from msldm_jax.audio import spectral

SAMPLE_RATE = 16000
N_FFT = 512
HOP_LENGTH = 256
N_MELS = 96
# librosa.feature.melspectrogram's default centring pad in the installed librosa (>= 0.10).
PAD_MODE = "constant"
LOG_SCALE = 10000.0  # log10(LOG_SCALE · mel + 1), the package's 'logC' preprocessing.
FLOAT16_MAX = float(np.finfo(np.float16).max)
PATCH_SECONDS = 3.0
# librosa.time_to_frames(3, sr=16000, n_fft=512, hop_length=256) + 1, as extractor.py.
PATCH_FRAMES = int((PATCH_SECONDS * SAMPLE_RATE - N_FFT // 2) // HOP_LENGTH) + 1  # 187
EMBEDDING_DIM = 200
NUM_TAGS = 50
BATCH_NORM_EPSILON = 1e-3  # tf.compat.v1.layers.batch_normalization's default.
# Patches go through the network in batches of this size (the last padded), so that one
# compiled program serves every call.
BATCH_SIZE = 4

MODELS = ("MSD_musicnn", "MTT_musicnn")
DEFAULT_EMBEDDING = "MSD_musicnn"
TAGGER = "MTT_musicnn"
INSTALL_COMMAND = "pip install --no-deps musicnn==0.1.0"
CHECKPOINT_FILES = (".index", ".data-00000-of-00001")

MTT_LABELS = (
    "guitar", "classical", "slow", "techno", "strings", "drums", "electronic", "rock", "fast",
    "piano", "ambient", "beat", "violin", "vocal", "synth", "female", "indian", "opera", "male",
    "singing", "vocals", "no vocals", "harpsichord", "loud", "quiet", "flute", "woman",
    "male vocal", "no vocal", "pop", "soft", "sitar", "solo", "man", "classic", "choir",
    "voice", "new age", "dance", "male voice", "female vocal", "beats", "harp", "cello",
    "no voice", "weird", "country", "metal", "female voice", "choral")
MSD_LABELS = (
    "rock", "pop", "alternative", "indie", "electronic", "female vocalists", "dance", "00s",
    "alternative rock", "jazz", "beautiful", "metal", "chillout", "male vocalists",
    "classic rock", "soul", "indie rock", "Mellow", "electronica", "80s", "folk", "90s",
    "chill", "instrumental", "punk", "oldies", "blues", "hard rock", "ambient", "acoustic",
    "experimental", "female vocalist", "guitar", "Hip-Hop", "70s", "party", "country",
    "easy listening", "sexy", "catchy", "funk", "electro", "heavy metal", "Progressive rock",
    "60s", "rnb", "indie pop", "sad", "House", "happy")
LABELS = {"MSD_musicnn": MSD_LABELS, "MTT_musicnn": MTT_LABELS}
EMBEDDING_NAMES = {"MSD_musicnn": "musicnn-msd-penultimate",
                   "MTT_musicnn": "musicnn-mtt-penultimate"}
EMBEDDING_NAME = EMBEDDING_NAMES[DEFAULT_EMBEDDING]

TIMBRAL_FILTERS = int(1.6 * 128)  # 204
TIMBRAL_BANDS = (int(0.4 * N_MELS), int(0.7 * N_MELS))  # 38 and 67 mel bands.
TIMBRAL_TAPS = 7
TEMPORAL_FILTERS = int(1.6 * 32)  # 51
TEMPORAL_LENGTHS = (128, 64, 32)
MIDEND_FILTERS = 64
MIDEND_TAPS = 7
BACKEND_UNITS = EMBEDDING_DIM


# ---------------------------------------------------------------------------------------------
# Frontend.


def num_patches(num_samples_16k: int) -> int:
  """Whole 3 s patches in a 16 kHz signal of `num_samples_16k` samples."""
  if num_samples_16k <= 0:
    return 0
  return (1 + num_samples_16k // HOP_LENGTH) // PATCH_FRAMES


@jax.jit
def _mel_power(waveforms_16k: jax.Array) -> jax.Array:
  spectrum = spectral.stft(waveforms_16k, N_FFT, HOP_LENGTH, center=True, pad_mode=PAD_MODE)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  filters = jnp.asarray(spectral.mel_filterbank(SAMPLE_RATE, N_FFT, N_MELS))
  # HIGHEST: accelerators' default f32 matmul rounds to tf32/bf16, far coarser than float16.
  return jnp.einsum("...tf,mf->...tm", power, filters, precision=jax.lax.Precision.HIGHEST)


def mel_power(waveforms_16k) -> np.ndarray:
  """librosa's mel power spectrogram `[..., frames, 96]` (float32) of 16 kHz `[..., samples]`.

  `librosa.feature.melspectrogram(y=..., sr=16000, n_fft=512, hop_length=256, n_mels=96)`,
  transposed to frames-first.
  """
  waveforms_16k = np.asarray(waveforms_16k, np.float32)
  if waveforms_16k.shape[-1] == 0:
    raise ValueError("musicnn's mel spectrogram needs at least one sample")
  return np.asarray(_mel_power(jnp.asarray(waveforms_16k)))


def log_compress(mel) -> np.ndarray:
  """The package's float16 rounding of the mel power, then log10(10000·x + 1) in float32.

  On the host, in numpy as the package does: XLA may drop a float32→float16→float32 round
  trip as "excess precision" on accelerators, and the rounding is part of what the network
  was trained on.
  """
  mel = np.minimum(np.asarray(mel, np.float32), FLOAT16_MAX)  # Saturate, not inf.
  rounded = mel.astype(np.float16).astype(np.float32)
  return np.log10(np.float32(LOG_SCALE) * rounded + np.float32(1.0))


def log_mel(waveforms_16k) -> np.ndarray:
  """The package's log-mel `[..., frames, 96]` (float32) of 16 kHz audio `[..., samples]`."""
  return log_compress(mel_power(waveforms_16k))


def patches_16k(waveforms_16k) -> np.ndarray:
  """Log-mel patches `[n, patches, 187, 96]` of 16 kHz mono waveforms `[n, samples]`."""
  waveforms_16k = np.asarray(waveforms_16k, np.float32)
  chex.assert_rank(waveforms_16k, 2)
  count = num_patches(waveforms_16k.shape[-1])
  n = waveforms_16k.shape[0]
  if count == 0:
    return np.zeros((n, 0, PATCH_FRAMES, N_MELS), np.float32)
  # Transform exactly the samples the kept frames see (frame t covers [t·hop - n_fft/2,
  # t·hop + n_fft/2)): cut, or zero-padded where the signal ends sooner, which is what the
  # 'constant' centring pads there anyway. The STFT's shape then depends on the number of
  # patches only, so pieces of different lengths share compiled programs.
  frames = count * PATCH_FRAMES
  needed = (frames - 1) * HOP_LENGTH + N_FFT // 2
  waveforms_16k = waveforms_16k[:, :needed]
  if waveforms_16k.shape[-1] < needed:
    assert PAD_MODE == "constant", "zero-padding equals the centring pad only for 'constant'"
    waveforms_16k = np.pad(waveforms_16k, ((0, 0), (0, needed - waveforms_16k.shape[-1])))
  logmel = log_mel(waveforms_16k)[:, :frames]
  return logmel.reshape(n, count, PATCH_FRAMES, N_MELS)


def _to_16k_rows(waveforms, sample_rate: int) -> np.ndarray:
  waveforms = np.asarray(waveforms, np.float32)
  if waveforms.ndim != 2:
    raise ValueError(f"musicnn takes waveforms [n, samples] (mono, time last); got shape "
                     f"{waveforms.shape}")
  return resampling.resample(waveforms, sample_rate, SAMPLE_RATE)


def patches(waveforms, sample_rate: int) -> np.ndarray:
  """Log-mel patches `[n, patches, 187, 96]` of mono waveforms `[n, samples]` at any rate."""
  return patches_16k(_to_16k_rows(waveforms, sample_rate))


# ---------------------------------------------------------------------------------------------
# Network.


def _batch_norm(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPSILON, name=name)


# Full float32 convolutions and products: on GPUs and TPUs the default rounds their inputs to
# tf32/bf16, ~1e-3 relative error, where this port matches the TF graph to ~1e-6 (no cost on
# CPUs, which always compute in float32).
_PRECISION = jax.lax.Precision.HIGHEST


class MusicnnNetwork(nn.Module):
  """musicnn: log-mel patches `[n, frames, 96]` -> (penultimate `[n, 200]`, logits `[n, 50]`).

  Inference only. Any number of frames works (the package's `input_length`), 187 (3 s) is
  what the models were trained on.
  """
  num_tags: int = NUM_TAGS

  @nn.compact
  def __call__(self, patches_ntf: jax.Array) -> tuple[jax.Array, jax.Array]:
    chex.assert_rank(patches_ntf, 3)
    n = patches_ntf.shape[0]
    x = _batch_norm("batch_normalization")(patches_ntf[..., None])[..., 0]

    features = []
    # Frequency is the conv's width with one channel, as in TF: a 7×bands 'valid' conv over
    # [time, mel] (time zero-padded by 3 after the input batch norm), then a max over the
    # remaining frequency offsets.
    padded = jnp.pad(x, ((0, 0), (3, 3), (0, 0)))[..., None]
    for index, bands in enumerate(TIMBRAL_BANDS):
      conv = nn.Conv(TIMBRAL_FILTERS, (TIMBRAL_TAPS, bands), padding="VALID",
                     precision=_PRECISION, name=("conv2d", "conv2d_1")[index])
      y = _batch_norm(f"batch_normalization_{1 + index}")(nn.relu(conv(padded)))
      features.append(jnp.max(y, axis=2))
    for index, length in enumerate(TEMPORAL_LENGTHS):
      # 'SAME' pads (length - 1) // 2 frames before and the rest after, as TF does.
      conv = nn.Conv(TEMPORAL_FILTERS, (length, 1), padding="SAME", precision=_PRECISION,
                     name=f"conv2d_{2 + index}")
      y = _batch_norm(f"batch_normalization_{3 + index}")(nn.relu(conv(x[..., None])))
      features.append(jnp.max(y, axis=2))
    frontend = jnp.concatenate(features, axis=-1)  # [n, frames, 561]

    dense = [frontend]
    previous = frontend
    for index in range(3):
      # TF's 7×width 'valid' 2-D conv over the zero-padded [time, features] map with one
      # channel spans every feature: a 7-tap 1-D conv with the features as channels.
      conv = nn.Conv(MIDEND_FILTERS, (MIDEND_TAPS,), padding=((3, 3),), precision=_PRECISION,
                     name=f"conv2d_{5 + index}")
      y = _batch_norm(f"batch_normalization_{6 + index}")(nn.relu(conv(previous)))
      previous = y if index == 0 else y + previous
      dense.append(previous)
    midend = jnp.concatenate(dense, axis=-1)  # [n, frames, 753]

    # TF flattens [max, mean] stacked on a last axis of 2: features interleaved.
    pooled = jnp.stack([jnp.max(midend, axis=1), jnp.mean(midend, axis=1)], axis=-1)
    pooled = _batch_norm("batch_normalization_9")(pooled.reshape(n, -1))
    hidden = nn.relu(nn.Dense(BACKEND_UNITS, precision=_PRECISION, name="dense")(pooled))
    penultimate = _batch_norm("batch_normalization_10")(hidden)
    logits = nn.Dense(self.num_tags, precision=_PRECISION, name="dense_1")(penultimate)
    return penultimate, logits


# ---------------------------------------------------------------------------------------------
# Weights.


class Musicnn(NamedTuple):
  """A loaded musicnn model: network, flax variables, tag labels, name and checkpoint."""
  module: MusicnnNetwork
  variables: Any
  labels: tuple[str, ...]
  model: str
  checkpoint: str


def default_directory(model: str) -> str:
  """The folder holding `model`'s checkpoint inside the installed musicnn package.

  Found without importing the package (its modules need TF1).
  """
  spec = importlib.util.find_spec("musicnn")
  if spec is None:
    raise FileNotFoundError(
        f"the musicnn package is not installed, so its {model} checkpoint cannot be read; "
        f"install it with `{INSTALL_COMMAND}`")
  if not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"`musicnn` resolves to {spec.origin}, not the musicnn package (a module of that name "
        f"earlier on sys.path shadows it); install the package with `{INSTALL_COMMAND}`")
  return os.path.join(list(spec.submodule_search_locations)[0], model)


def _abstract_variables(module: MusicnnNetwork):
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, PATCH_FRAMES, N_MELS), jnp.float32))


def _checkpoint_keys(abstract) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Checkpoint variable name -> (flax path, flax shape) for every leaf of the network."""
  leaf_names = {("params", "kernel"): "kernel", ("params", "bias"): "bias",
                ("params", "scale"): "gamma", ("batch_stats", "mean"): "moving_mean",
                ("batch_stats", "var"): "moving_variance"}
  keys = {}
  for collection, modules in abstract.items():
    for module_name, leaves in modules.items():
      for leaf, value in leaves.items():
        if (collection, leaf) == ("params", "bias") and module_name.startswith("batch_norm"):
          tf_leaf = "beta"
        else:
          tf_leaf = leaf_names[(collection, leaf)]
        keys[f"{module_name}/{tf_leaf}"] = ((collection, module_name, leaf), value.shape)
  return keys


def _to_flax(name: str, value: np.ndarray, shape: tuple[int, ...], source: str) -> np.ndarray:
  """A checkpoint array in the flax layout of `shape`; a mismatch raises naming the key."""
  converted = value
  if value.ndim == 4 and len(shape) == 3 and value.shape[2] == 1:
    # The mid end's TF kernel [time, width, 1, out] -> 1-D kernel [time, width (channels), out].
    converted = value[:, :, 0, :]
  if converted.shape != tuple(shape):
    raise ValueError(f"{source}: {name} has shape {value.shape}; the network needs "
                     f"{tuple(shape)}")
  return converted


def read_checkpoint(prefix: str) -> dict[str, np.ndarray]:
  """Every variable of a TF checkpoint `prefix` (name -> float32 array).

  The prefix is read directly: the `checkpoint` file shipped next to musicnn's points at the
  authors' disk, so `tf.train.load_checkpoint(folder)` (which follows it) cannot be used.
  """
  for suffix in CHECKPOINT_FILES:
    path = prefix + suffix
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"musicnn checkpoint file {path} is missing; install the package that ships it "
          f"with `{INSTALL_COMMAND}`")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (slow; only loading needs it)
  try:
    reader = tf.compat.v1.train.NewCheckpointReader(prefix)
    return {name: np.asarray(reader.get_tensor(name), np.float32)
            for name in reader.get_variable_to_shape_map()}
  except Exception as e:  # TF raises several types (DataLossError, ValueError, ...).
    raise ValueError(
        f"musicnn checkpoint {prefix}{CHECKPOINT_FILES[0]} (with {prefix}{CHECKPOINT_FILES[1]}) "
        f"cannot be read ({type(e).__name__}: {e}); reinstall it with `{INSTALL_COMMAND}`"
    ) from None


def convert_checkpoint(values: dict[str, np.ndarray], module: Optional[MusicnnNetwork] = None,
                       source: str = "checkpoint") -> dict:
  """Checkpoint variables -> flax variables `{'params', 'batch_stats'}` for `module`.

  Every network variable is mapped by name; a missing one or a wrong shape raises, naming it.
  Optimizer slots (`*/Adam*`, `beta1_power`, ...) are ignored.
  """
  module = module or MusicnnNetwork()
  expected = _checkpoint_keys(_abstract_variables(module))
  missing = sorted(set(expected) - set(values))
  if missing:
    raise ValueError(f"{source}: missing musicnn variable(s) {missing}")
  variables: dict = {}
  for name, ((collection, module_name, leaf), shape) in expected.items():
    converted = _to_flax(name, np.asarray(values[name], np.float32), shape, source)
    variables.setdefault(collection, {}).setdefault(module_name, {})[leaf] = jnp.asarray(
        converted)
  return variables


@functools.lru_cache(maxsize=None)
def _load(model: str, directory: Optional[str]) -> Musicnn:
  if model not in MODELS:
    raise ValueError(f"unknown musicnn model {model!r}; known: {MODELS}")
  folder = default_directory(model) if directory is None else str(directory)
  prefix = os.path.join(folder, "")  # The checkpoint files have an empty basename.
  module = MusicnnNetwork(num_tags=len(LABELS[model]))
  variables = convert_checkpoint(read_checkpoint(prefix), module, source=prefix)
  logging.info("Loaded musicnn %s from %s.", model, prefix)
  return Musicnn(module, variables, LABELS[model], model, prefix)


def load(model: str = DEFAULT_EMBEDDING, directory: Optional[str] = None) -> Musicnn:
  """A musicnn model, cached per (model, directory).

  Args:
    model: one of MODELS.
    directory: the folder holding the model's checkpoint files (`.index`,
      `.data-00000-of-00001`); default the installed package's `musicnn/{model}/`.

  Raises:
    FileNotFoundError: the package or a checkpoint file is missing (the message names the
      file and the install command).
    ValueError: an unknown model, or a checkpoint that cannot be read or lacks a variable.
  """
  return _load(model, None if directory is None else os.fspath(directory))


# ---------------------------------------------------------------------------------------------
# Inference.


@functools.lru_cache(maxsize=None)
def _forward(module: MusicnnNetwork):
  def forward(variables, patches_ntf):
    penultimate, logits = module.apply(variables, patches_ntf)
    return penultimate, jax.nn.sigmoid(logits)
  return jax.jit(forward)


def apply_patches(loaded: Musicnn, patches_ntf, batch_size: int = BATCH_SIZE
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(penultimate `[n, 200]`, tag probabilities `[n, tags]`) of log-mel patches `[n, 187, 96]`.

  Patches go through in batches of `batch_size`, the last zero-padded: one compiled shape.
  """
  patches_ntf = np.asarray(patches_ntf, np.float32)
  chex.assert_rank(patches_ntf, 3)
  forward = _forward(loaded.module)
  count = patches_ntf.shape[0]
  padded = -count % batch_size
  if padded:
    patches_ntf = np.concatenate([patches_ntf, np.zeros((padded,) + patches_ntf.shape[1:],
                                                        np.float32)])
  # Every batch is dispatched before any result is fetched, so that the host does not wait.
  outputs = [forward(loaded.variables, jnp.asarray(patches_ntf[start:start + batch_size]))
             for start in range(0, count, batch_size)]
  embeddings = [np.zeros((0, EMBEDDING_DIM), np.float32)]
  tags = [np.zeros((0, len(loaded.labels)), np.float32)]
  embeddings += [np.asarray(penultimate) for penultimate, _ in outputs]
  tags += [np.asarray(probabilities) for _, probabilities in outputs]
  return np.concatenate(embeddings)[:count], np.concatenate(tags)[:count]


def _run(loaded: Musicnn, waveforms, sample_rate: int, batch_size: int):
  patches_nptf = patches(waveforms, sample_rate)
  n, count = patches_nptf.shape[:2]
  flat = patches_nptf.reshape((n * count, PATCH_FRAMES, N_MELS))
  embeddings, tags = apply_patches(loaded, flat, batch_size)
  return (embeddings.reshape(n, count, EMBEDDING_DIM),
          tags.reshape(n, count, len(loaded.labels)))


def embed_batch(loaded: Musicnn, waveforms, sample_rate: int,
                batch_size: int = BATCH_SIZE) -> np.ndarray:
  """Penultimate embeddings `[n, patches, 200]` (float32) of mono waveforms `[n, samples]`.

  One embedding per whole 3 s of audio; a waveform shorter than 3 s has none.
  """
  return _run(loaded, waveforms, sample_rate, batch_size)[0]


def embed(loaded: Musicnn, waveform, sample_rate: int,
          batch_size: int = BATCH_SIZE) -> np.ndarray:
  """Penultimate embeddings `[patches, 200]` of one waveform `[samples]` or `[channels, samples]`.

  `functools.partial(embed, loaded, sample_rate=44100)` is an evaluation `embed_fn`.
  """
  mono = resampling.to_mono(waveform, sample_rate, SAMPLE_RATE, user="musicnn")
  return embed_batch(loaded, mono[None], SAMPLE_RATE, batch_size)[0]


def tag_batch(loaded: Musicnn, waveforms, sample_rate: int,
              batch_size: int = BATCH_SIZE) -> np.ndarray:
  """Tag probabilities `[n, patches, len(loaded.labels)]` of mono waveforms `[n, samples]`."""
  return _run(loaded, waveforms, sample_rate, batch_size)[1]
