"""VGGish: frontend, shapes, the .pth loader and equivalence with the PyTorch port.

The equivalence test runs tests/reference/vggish_reference.py in the PyTorch reference
interpreter ($MSLDM_REFERENCE_PYTHON, else <repo>/.venv-reference/bin/python; skipped without
it, failed under CI): it writes a small-width VGGish state dict with torch.save and the port's
outputs on our log-mel examples. The other tests need no torch: they write torch's zip-pickle
format themselves.
"""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_env
from msldm_jax.evaluation import vggish

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_SCRIPT = os.path.join(REPO_ROOT, "tests", "reference", "vggish_reference.py")
SMALL = dict(conv_channels=(4, 8, 8, 8, 16, 16), fc_features=(32, 32, 128))


reference_python = reference_env.reference_python


# -- torch's zip-pickle format without torch ---------------------------------------------------


def _fake_torch_modules():
  """Stand-ins for torch.FloatStorage and torch._utils._rebuild_tensor_v2, so that pickle
  writes the same GLOBAL references torch.save writes."""
  torch_module = types.ModuleType("torch")
  utils_module = types.ModuleType("torch._utils")

  class FloatStorage:
    pass

  FloatStorage.__module__, FloatStorage.__qualname__ = "torch", "FloatStorage"
  torch_module.FloatStorage = FloatStorage

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called while writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  utils_module._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_module._utils = utils_module
  return {"torch": torch_module, "torch._utils": utils_module}


class _Storage:

  def __init__(self, key, array):
    self.key, self.array = key, array


class _Tensor:

  def __init__(self, storage, shape):
    self.storage, self.shape = storage, shape

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
    strides = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
    return rebuild, (self.storage, 0, self.shape, strides, False, collections.OrderedDict())


def write_torch_state_dict(path, state, monkeypatch):
  """Writes {key: float32 array} as torch.save would (zip, data.pkl, data/<key>)."""
  for name, module in _fake_torch_modules().items():
    monkeypatch.setitem(sys.modules, name, module)
  storages, tensors = [], collections.OrderedDict()
  for i, (key, value) in enumerate(state.items()):
    storage = _Storage(str(i), np.ascontiguousarray(value, np.float32))
    storages.append(storage)
    tensors[key] = _Tensor(storage, tuple(value.shape))

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      if isinstance(obj, _Storage):
        return ("storage", sys.modules["torch"].FloatStorage, obj.key, "cpu", obj.array.size)
      return None

  buffer = io.BytesIO()
  Pickler(buffer, protocol=2).dump(tensors)
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", buffer.getvalue())
    archive.writestr("archive/byteorder", "little")
    for storage in storages:
      archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())


def _random_torch_state(model, seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for key, (_, flax_shape) in vggish._expected_shapes(model).items():
    if len(flax_shape) == 4:  # HWIO -> OIHW.
      shape = (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    elif len(flax_shape) == 2:
      shape = flax_shape[::-1]
    else:
      shape = flax_shape
    state[key] = (0.1 * rng.normal(size=shape)).astype(np.float32)
  return state


# -- tests -------------------------------------------------------------------------------------


def test_full_size_shapes():
  model = vggish.VGGish()
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x)[0],
                       jnp.zeros((3, 96, 64)))
  assert out.shape == (3, 128)
  expected = vggish._expected_shapes(model)
  assert len(expected) == 18
  assert expected["features.0.weight"][1] == (3, 3, 1, 64)
  assert expected["embeddings.0.weight"][1] == (512 * 4 * 6, 4096)


def _mel_features_log_mel(x):
  # Independent numpy transcription of the original mel_features.log_mel_spectrogram.
  n = 1 + (len(x) - 400) // 160
  frames = np.stack([x[i * 160:i * 160 + 400] for i in range(n)]).astype(np.float64)
  window = 0.5 - 0.5 * np.cos(2 * np.pi / 400 * np.arange(400))
  spec = np.abs(np.fft.rfft(frames * window, 512))
  to_mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
  bins_mel = to_mel(np.linspace(0.0, 8000.0, 257))
  edges = np.linspace(to_mel(125.0), to_mel(7500.0), 66)
  weights = np.empty((257, 64))
  for i in range(64):
    lo, c, hi = edges[i:i + 3]
    weights[:, i] = np.maximum(0.0, np.minimum((bins_mel - lo) / (c - lo),
                                               (hi - bins_mel) / (hi - c)))
  weights[0, :] = 0.0
  return np.log(spec @ weights + 0.01)


def test_frontend_matches_mel_features():
  rng = np.random.default_rng(0)
  x = (0.1 * rng.normal(size=16000)).astype(np.float32)
  ours = vggish.log_mel(x)
  np.testing.assert_allclose(ours, _mel_features_log_mel(x), atol=2e-4)
  examples = vggish.waveform_to_examples(rng.normal(size=44100).astype(np.float32), 22050)
  assert examples.shape == (2, 96, 64)  # 2 s -> 198 frames -> two 0.96 s examples.


def test_loader_without_torch(tmp_path, monkeypatch):
  model = vggish.VGGish(**SMALL)
  state = _random_torch_state(model)
  path = tmp_path / "vggish.pth"
  write_torch_state_dict(path, state, monkeypatch)
  variables = vggish.load_vggish_params(str(path), model)
  np.testing.assert_array_equal(variables["params"]["features_3"]["kernel"],
                                state["features.3.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables["params"]["embeddings_2"]["kernel"],
                                state["embeddings.2.weight"].T)
  waveform = np.random.default_rng(1).normal(size=32000).astype(np.float32)
  emb = vggish.embed(variables, waveform, 16000, model=model)
  assert emb.shape == (2, 128) and np.all(np.isfinite(emb))

  pca_path = tmp_path / "pca.npz"
  np.savez(pca_path, pca_eigen_vectors=np.eye(128), pca_means=np.zeros(128))
  post = vggish.embed(variables, waveform, 16000, model=model,
                      pca=vggish.load_pca_params(str(pca_path)))
  np.testing.assert_array_equal(post, np.round((np.clip(emb, -2, 2) + 2) * 255 / 4))

  for bad, match, error in (
      ({k: v for k, v in state.items() if k != "features.8.bias"}, r"features\.8\.bias",
       KeyError),
      (dict(state, **{"features.99.weight": np.zeros(3)}), r"features\.99\.weight", KeyError),
      (dict(state, **{"embeddings.4.bias": np.zeros(7)}), r"embeddings\.4\.bias", ValueError)):
    with pytest.raises(error, match=match):
      vggish.convert_state_dict(bad, model)


def test_equivalence_with_pytorch_port(tmp_path):
  python = reference_python()
  rng = np.random.default_rng(2)
  waveform = (0.2 * rng.normal(size=3 * 22050)).astype(np.float32)
  examples = vggish.waveform_to_examples(waveform, 22050)
  np.save(tmp_path / "examples.npy", examples)
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
  result = subprocess.run(
      [python, REFERENCE_SCRIPT, json.dumps(SMALL), str(tmp_path / "examples.npy"),
       str(tmp_path)], capture_output=True, text=True, env=env, timeout=300, check=False)
  if result.returncode != 0:
    pytest.fail(f"reference script failed:\n{result.stdout}\n{result.stderr}", pytrace=False)
  with np.load(tmp_path / "outputs.npz") as data:
    reference = {k: data[k] for k in data.files}
  model = vggish.VGGish(**SMALL)
  variables = vggish.load_vggish_params(str(tmp_path / "vggish.pth"), model)
  ours = vggish.embed_examples(variables, examples, model)
  assert np.abs(reference["embeddings"]).max() > 0
  relative = np.linalg.norm(ours - reference["embeddings"]) / np.linalg.norm(
      reference["embeddings"])
  assert relative < 1e-4
  pca = vggish.load_pca_params(str(tmp_path / "pca.pth"))
  post = vggish.postprocess(ours, pca)
  # Quantisation: compare away from rounding boundaries only.
  safe = np.abs(reference["pre_round"] - np.round(reference["pre_round"])) < 0.45
  np.testing.assert_array_equal(post[safe], reference["postprocessed"][safe])
