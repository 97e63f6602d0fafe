"""Equivalence with the PyTorch reference (descript-audio-codec 1.0.0's blocks) and the importer.

The torch side runs in a second interpreter (tests/reference/install_reference_env.sh makes
it): tests/reference/dac_reference.py writes the DAC modules' state dicts, inputs and outputs
to an .npz, and a release-shaped generator checkpoint with `torch.save`. This side converts
the weights with the importer's own key maps (msldm_jax/models/source_vae_import.py), runs our
modules and compares in float32.

The interpreter: $MSLDM_REFERENCE_PYTHON, else <repo>/.venv-reference/bin/python. Without it
these tests skip — except under CI (the CI variable set), where its absence fails them, so
that CI can never pass by silently skipping the comparison.

Where the package's model differs from the release: DAC's Decoder ends in Tanh (the
release's does not: we compare against the decoder without it, and tanh(ours) against DAC's
full decoder); the release's Encoder is DAC's with d_latent = 2·latent_dim (mean, logvar),
which is how the reference builds it here.
"""

import json
import math
import os
import pickle
import subprocess
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_env
from msldm_jax.models import audio_layers
from msldm_jax.models import source_vae as sv
from msldm_jax.models import loading
from msldm_jax.models import source_vae_import as imp
from msldm_jax.models import torch_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_SCRIPT = os.path.join(REPO_ROOT, "tests", "reference", "dac_reference.py")
RELATIVE_TOLERANCE = 1e-4


reference_python = reference_env.reference_python


def _run_reference(*args):
  python = reference_python()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
  result = subprocess.run([python, "-W", "ignore::FutureWarning", REFERENCE_SCRIPT, *args],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
  if result.returncode != 0:
    pytest.fail(f"reference script failed ({python} {REFERENCE_SCRIPT} {' '.join(args)}):\n"
                f"{result.stdout}\n{result.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def parity_data(tmp_path_factory):
  path = tmp_path_factory.mktemp("reference") / "parity.npz"
  _run_reference("parity", str(path))
  with np.load(path) as data:
    arrays = {k: data[k] for k in data.files}
  return json.loads(str(arrays.pop("meta"))), arrays


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("release")
  _run_reference("checkpoint", str(directory / "g_00000001"), str(directory / "outputs.npz"))
  with np.load(directory / "outputs.npz") as data:
    outputs = {k: data[k] for k in data.files}
  return directory / "g_00000001", outputs


def relative_error(ours, theirs) -> float:
  """max |ours − theirs| / max |theirs|."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _ncw_to_nwc(x):
  return jnp.asarray(np.swapaxes(x, 1, 2))


def _module_and_keys(spec):
  """Our module and the importer's key map for one reference case."""
  kind = spec["kind"]
  if kind == "snake":
    return audio_layers.Snake(), imp.snake_keys()
  if kind == "wnconv1d":
    return audio_layers.WNConv1d(spec["out_channels"], spec["kernel_size"],
                                 stride=spec["stride"], dilation=spec["dilation"],
                                 padding=spec["padding"]), imp.wnconv_keys()
  if kind == "wnconvtranspose1d":
    return audio_layers.WNConvTranspose1d(spec["out_channels"], spec["kernel_size"],
                                          stride=spec["stride"],
                                          padding=spec["padding"]), imp.wnconv_keys()
  if kind == "residual_unit":
    return audio_layers.ResidualUnit(spec["dilation"]), imp.residual_unit_keys()
  if kind == "encoder_block":
    return sv.EncoderBlock(spec["dim"], spec["stride"]), imp.encoder_block_keys()
  if kind == "decoder_block":
    return sv.DecoderBlock(spec["output_dim"], spec["stride"]), imp.decoder_block_keys()
  if kind == "encoder":
    return (sv.Encoder(spec["d_model"], tuple(spec["strides"]), spec["d_latent"]),
            imp.encoder_keys(len(spec["strides"])))
  if kind == "decoder":
    return (sv.Decoder(spec["channels"], tuple(spec["rates"])),
            imp.decoder_keys(len(spec["rates"])))
  raise ValueError(f"unknown reference case kind {kind!r}")


def _run_case(meta, arrays, name, **module_overrides):
  module, key_map = _module_and_keys(meta[name])
  if module_overrides:
    module = module.clone(**module_overrides)
  x = _ncw_to_nwc(arrays[f"{name}/input"])
  abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
  prefix = f"{name}/state/"
  state = {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}
  params = imp.convert_state_dict(state, key_map, abstract, source=name)
  y = jax.jit(module.apply)({"params": params}, x)
  return np.swapaxes(np.asarray(y), 1, 2)


CASES = ["snake", "wnconv1d", "wnconv1d_strided", "wnconvtranspose1d_s2",
         "wnconvtranspose1d_s4", "wnconvtranspose1d_s5", "wnconvtranspose1d_s8",
         "residual_unit", "encoder_block", "decoder_block", "encoder", "decoder"]


@pytest.mark.reference
@pytest.mark.parametrize("name", CASES)
def test_matches_dac_module(parity_data, name):
  meta, arrays = parity_data
  error = relative_error(_run_case(meta, arrays, name), arrays[f"{name}/output"])
  assert error < RELATIVE_TOLERANCE, f"{name}: relative error {error:.2e}"


@pytest.mark.reference
@pytest.mark.parametrize("name", ["wnconvtranspose1d_s5", "wnconvtranspose1d_s8"])
def test_dilated_conv_transpose_matches_too(parity_data, name):
  meta, arrays = parity_data
  ours = _run_case(meta, arrays, name, implementation="dilated")
  assert relative_error(ours, arrays[f"{name}/output"]) < RELATIVE_TOLERANCE


@pytest.mark.reference
def test_dac_decoder_is_ours_plus_tanh(parity_data):
  meta, arrays = parity_data
  error = relative_error(np.tanh(_run_case(meta, arrays, "decoder")),
                         arrays["decoder/output_tanh"])
  assert error < RELATIVE_TOLERANCE


@pytest.mark.reference
def test_imported_release_checkpoint_reproduces_torch(release_checkpoint, tmp_path):
  path, outputs = release_checkpoint
  config = sv.model_config("paper")
  config.update({k: tuple(v) if isinstance(v, list) else v
                 for k, v in json.loads(str(outputs["config"])).items()})
  config.num_stems = 1

  # The command-line path: torch-free reader, conversion, orbax save; then the loader.
  imp.import_checkpoints([str(path)], str(tmp_path / "imported"), config)
  loaded = loading.load_vae(str(tmp_path / "imported"))
  model, variables = loaded.module, loaded.params
  assert model.latent_dim == config.latent_dim and model.num_groups == 1

  mean, logvar = jax.jit(lambda v, x: model.apply(v, x, method=sv.SourceVAE.encode))(
      variables, outputs["waveform"])  # [batch, 1 stem, samples]
  moments = outputs["moments"]  # torch encoder: [batch, 2·latent, frames]
  latent_dim = config.latent_dim
  assert relative_error(mean[:, 0], moments[:, :latent_dim]) < RELATIVE_TOLERANCE
  assert relative_error(logvar[:, 0], np.clip(moments[:, latent_dim:], -30, 20)) < (
      RELATIVE_TOLERANCE)
  decoded = jax.jit(lambda v, z: model.apply(v, z, method=sv.SourceVAE.decode))(
      variables, outputs["latents"][:, None])
  assert relative_error(decoded[:, 0], outputs["decoded"][:, 0]) < RELATIVE_TOLERANCE


@pytest.mark.reference
def test_per_source_import_tiles_or_stacks(release_checkpoint):
  path, _ = release_checkpoint
  state = imp.read_generator_state_dict(str(path))
  config = sv.model_config("tiny")
  config.update(encoder_width=4, encoder_strides=(2, 4, 5, 8), latent_dim=3,
                decoder_width=32, decoder_strides=(8, 5, 4, 2), per_source=True)
  model = sv.SourceVAE.from_config(config)
  tiled = imp.convert_release_state_dict(state, model)["params"]
  weight = tiled["decoder"]["conv_in"]["weight_v"]
  assert weight.shape[0] == 4
  np.testing.assert_array_equal(weight[3], state["decoder.model.0.weight_v"])
  other = {k: v + 1.0 for k, v in state.items()}
  stacked = imp.convert_release_state_dict([state, other, state, other], model)["params"]
  np.testing.assert_array_equal(stacked["decoder"]["conv_in"]["bias"][1],
                                other["decoder.model.0.bias"])


# -- The importer's strictness (no reference needed) ------------------------------------------


def _tiny_state_dict():
  """A state dict with the release's key names for the tiny SourceVAE, from our own init."""
  model = sv.SourceVAE.from_config(sv.model_config("tiny"))
  params = sv.init_params(model, jax.random.key(0), samples=64)["params"]
  state = {}
  for path, torch_key in imp.source_vae_key_map(model).items():
    value = params
    for name in path:
      value = value[name]
    value = np.asarray(value[0])
    state[torch_key] = value[None, :, None] if path[-1] == "alpha" else value
  return model, state


def test_key_errors_name_the_key():
  model, state = _tiny_state_dict()
  imp.convert_release_state_dict(state, model)  # The complete dict converts.

  missing = dict(state)
  del missing["decoder.model.1.block.1.weight_g"]
  with pytest.raises(KeyError, match=r"decoder\.model\.1\.block\.1\.weight_g"):
    imp.convert_release_state_dict(missing, model)

  unknown = dict(state, **{"encoder.block.9.weight_v": np.zeros(3, np.float32)})
  with pytest.raises(KeyError, match=r"encoder\.block\.9\.weight_v"):
    imp.convert_release_state_dict(unknown, model)

  wrong = dict(state)
  wrong["encoder.block.1.block.0.block.0.alpha"] = np.ones((1, 5, 1), np.float32)
  with pytest.raises(ValueError, match=r"encoder\.block\.1\.block\.0\.block\.0\.alpha"):
    imp.convert_release_state_dict(wrong, model)


def _write_fake_checkpoint(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", payload)
    archive.writestr("archive/byteorder", "little")


def test_reader_refuses_code(tmp_path):
  path = tmp_path / "evil.pt"
  _write_fake_checkpoint(path, pickle.dumps({"generator": os.getcwd}, protocol=2))
  with pytest.raises(pickle.UnpicklingError, match="refusing"):
    torch_checkpoint.read_torch_checkpoint(str(path))


def test_reader_needs_generator_entry(tmp_path):
  path = tmp_path / "plain.pt"
  _write_fake_checkpoint(path, pickle.dumps({"discriminator": {}}, protocol=2))
  with pytest.raises(KeyError, match="generator"):
    imp.read_generator_state_dict(str(path))
  not_a_zip = tmp_path / "legacy.pt"
  not_a_zip.write_bytes(pickle.dumps({"generator": {}}, protocol=2))
  with pytest.raises(ValueError, match="zip"):
    torch_checkpoint.read_torch_checkpoint(str(not_a_zip))


def test_reader_rebuilds_strided_tensors():
  storage = np.arange(12, dtype=np.float32)
  # A transposed [3, 4] view of a [4, 3] tensor at offset 0: strides (1, 3).
  tensor = torch_checkpoint._rebuild_tensor_v2(storage, 0, (3, 4), (1, 3))  # pylint: disable=protected-access
  np.testing.assert_array_equal(tensor, np.arange(12, dtype=np.float32).reshape(4, 3).T)
  assert math.prod(tensor.shape) == 12
