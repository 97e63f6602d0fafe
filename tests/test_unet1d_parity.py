"""The release's U-Net in our code: parity with the PyTorch module, its checkpoint imported,
its sampler reproduced step by step, and `--mode=sample`/`--mode=evaluate` run on the import.

The torch side runs in the reference interpreter (tests/reference/unet_reference.py, with
audio-diffusion-pytorch 0.0.43's UNet1d; tests/reference/dac_reference.py for a
release-shaped SourceVAE). Without that interpreter these tests skip, except under CI, where
they fail (tests/reference_env.py).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import reference_env
from msldm_jax import joint_latent
from msldm_jax import stems
from msldm_jax.data import synthetic
from msldm_jax.diffusion import edm
from msldm_jax.diffusion import samplers
from msldm_jax.generation import outputs
from msldm_jax.models import loading
from msldm_jax.models import unet1d
from msldm_jax.models import unet1d_import

pytestmark = pytest.mark.reference

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET_SCRIPT = os.path.join(REPO_ROOT, "tests", "reference", "unet_reference.py")
DAC_SCRIPT = os.path.join(REPO_ROOT, "tests", "reference", "dac_reference.py")
RELATIVE_TOLERANCE = 1e-4
# The release-shaped SourceVAE that dac_reference.py's `checkpoint` writes: 3 latent channels,
# so the U-Net takes 4 × 3 = 12.
VAE_WIDTHS = dict(encoder_width=4, latent_dim=3, decoder_width=32)
TINY = unet1d.model_config("tiny", in_channels=stems.NUM_STEMS * VAE_WIDTHS["latent_dim"])


def _reference(script, *args) -> str:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
  result = subprocess.run(
      [reference_env.reference_python(), "-W", "ignore::FutureWarning", script, *args],
      capture_output=True, text=True, env=env, timeout=900, check=False)
  assert result.returncode == 0, f"{script} {args[0]}:\n{result.stdout}\n{result.stderr}"
  return result.stdout


def _kwargs(config) -> str:
  return json.dumps(unet1d.package_kwargs(config))


def _cli(*args, check=True):
  """`python -m ...` from the repository root, as a user types it."""
  result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=900, check=False)
  if check:
    assert result.returncode == 0, (f"{' '.join(args)}:\n{result.stdout}\n"
                                    f"{result.stderr[-6000:]}")
  return result


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


# -- The network ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant,frames", [("tiny", 16), ("release", 64)])
def test_forward_matches_the_package(variant, frames, tmp_path):
  """Same weights (through the importer's key map), same inputs at σ 0.02, 0.5 and 3."""
  config = TINY if variant == "tiny" else unet1d.model_config("release")
  _reference(UNET_SCRIPT, "parity", _kwargs(config), str(tmp_path / "parity.npz"),
             f"--frames={frames}")
  with np.load(tmp_path / "parity.npz") as data:
    arrays = {k: data[k] for k in data.files}
  meta = json.loads(str(arrays.pop("meta")))
  state = {k[len("state/"):]: v for k, v in arrays.items() if k.startswith("state/")}
  model = unet1d.build_model(config)
  assert unet1d.count_params(model) == meta["num_params"]
  if variant == "release":
    assert meta["num_params"] == unet1d.RELEASE_PARAMS["release"]
  params = unet1d_import.convert(state, model, "parity")
  ours = jax.jit(model.apply)(params, arrays["x"], arrays["c_noise"])
  error = relative_error(ours, arrays["output"])
  assert error < RELATIVE_TOLERANCE, error


def test_large_parameter_count_matches_the_package():
  config = unet1d.model_config("large")
  count = int(_reference(UNET_SCRIPT, "count", _kwargs(config)).strip().splitlines()[-1])
  assert count == unet1d.RELEASE_PARAMS["large"] == unet1d.count_params(
      unet1d.build_model(config))


# -- The release's checkpoint, imported --------------------------------------------------------


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
  """A tiny U-Net saved as the release's Lightning checkpoint, and a release-shaped
  SourceVAE generator file."""
  directory = tmp_path_factory.mktemp("release")
  _reference(UNET_SCRIPT, "checkpoint", _kwargs(TINY), str(directory / "msldm.ckpt"),
             str(directory / "unet_outputs.npz"), "--frames=16")
  _reference(DAC_SCRIPT, "checkpoint", str(directory / "sourcevae_ckpt"),
             str(directory / "vae_outputs.npz"))
  return directory


def _import_args(files, out):
  return ["msldm_jax.tools.import_release", f"--checkpoint={files / 'msldm.ckpt'}",
          f"--sourcevae={files / 'sourcevae_ckpt'}", f"--out={out}",
          *(f"--sourcevae_model={k}={v}" for k, v in VAE_WIDTHS.items())]


@pytest.fixture(scope="module")
def imported(release_files, tmp_path_factory):
  """README: python -m msldm_jax.tools.import_release --checkpoint=… --sourcevae=… --out=DIR"""
  out = str(tmp_path_factory.mktemp("imports") / "msldm")
  _cli(*_import_args(release_files, out))
  return out


def test_import_gives_the_release_network(release_files, imported):
  loaded = loading.load_denoiser(imported)
  assert isinstance(loaded.module, unet1d.UNet1d)
  # The size was recognised from the tensors' shapes alone.
  assert loaded.module == unet1d.build_model(TINY)
  with np.load(release_files / "unet_outputs.npz") as data:
    ours = jax.jit(loaded.module.apply)(loaded.params, data["x"], data["c_noise"])
    error = relative_error(ours, data["output"])
  assert error < RELATIVE_TOLERANCE, error

  identity = loaded.identity
  assert identity["format"] == loading.FORMAT_IMPORTED and identity["sigma_data"] == 0.4
  source = identity["imported_from"]
  assert source["epoch"] == 12 and source["global_step"] == 48_000
  distribution = source["hyper_parameters"]["diffusion_sigma_distribution"]
  assert distribution == {"class": "main.diffusion.UniformDistribution", "vmin": 0.0,
                          "vmax": 3.0}
  # The SourceVAE came along, and the denoiser's record names it (relative to the import).
  vae = loading.load_vae(identity["latents"]["vae"]["checkpoint_dir"])
  assert vae.identity["checkpoint_dir"] == os.path.join(imported, loading.IMPORTED_VAE_DIR)
  assert vae.identity["params_sha256"] == identity["latents"]["vae"]["params_sha256"]
  assert vae.module.latent_dim == VAE_WIDTHS["latent_dim"]


@pytest.mark.parametrize("given", [(), ("bass", "guitar")])
def test_sampler_matches_the_release_step_by_step(imported, release_files, given, tmp_path):
  """Our euler_churn against the release notebook's generate_track on the same noise."""
  loaded = loading.load_denoiser(imported)
  num_steps, shape = 8, (1, TINY.in_channels, 16)
  key = jax.random.key(5)
  inpaint, extra = None, {}
  if given:
    source = 0.5 * jax.random.normal(jax.random.key(6), shape)
    mask = joint_latent.source_mask(given, VAE_WIDTHS["latent_dim"])  # [channels, 1]
    inpaint = samplers.Inpaint(source, mask)
    extra = dict(source=np.asarray(source),
                 mask=np.broadcast_to(np.asarray(mask, np.float32), shape).copy())
  denoise_fn = edm.make_denoise_fn(loaded.module.apply, loaded.params, sigma_data=0.4)
  output, trajectory = jax.jit(lambda k: samplers.euler_churn(
      denoise_fn, k, shape, num_steps=num_steps, inpaint=inpaint, trajectory=True))(key)
  noise = samplers.drawn_noise(key, shape, num_steps)
  np.savez(tmp_path / "inputs.npz", sigmas=np.asarray(samplers.karras_sigmas(num_steps)),
           **{k: np.asarray(v) for k, v in noise.items()}, **extra)
  _reference(UNET_SCRIPT, "sample", str(release_files / "msldm.ckpt"), _kwargs(TINY),
             str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz"))
  with np.load(tmp_path / "outputs.npz") as data:
    theirs_trajectory, theirs = data["trajectory"], data["output"]
  for step in range(num_steps):
    error = relative_error(trajectory[step], theirs_trajectory[step])
    assert error < RELATIVE_TOLERANCE, (step, error)
  assert relative_error(output, theirs) < RELATIVE_TOLERANCE
  if given:
    np.testing.assert_array_equal(np.where(extra["mask"] > 0, np.asarray(output), 0),
                                  np.where(extra["mask"] > 0, extra["source"], 0))


# -- Bad input -----------------------------------------------------------------------------


def _assert_refused(result, out, *fragments):
  assert result.returncode != 0
  message = result.stderr
  for fragment in fragments:
    assert fragment in message, message[-3000:]
  assert not os.path.exists(out)
  parent = os.path.dirname(out)
  assert not [n for n in os.listdir(parent) if ".partial-" in n], os.listdir(parent)


def test_import_refuses_what_is_not_the_release(release_files, tmp_path):
  out = str(tmp_path / "msldm")
  # Another model's Lightning checkpoint.
  _reference(UNET_SCRIPT, "checkpoint", _kwargs(TINY), str(tmp_path / "other.ckpt"),
             str(tmp_path / "other.npz"), "--frames=16", "--other_model")
  result = _cli("msldm_jax.tools.import_release", f"--checkpoint={tmp_path / 'other.ckpt'}",
                f"--out={out}", check=False)
  _assert_refused(result, out, "not the MSLDM release's Lightning module", "model.encoder.")
  # The release's, with a tensor missing: no preset fits, the nearest is named.
  _reference(UNET_SCRIPT, "checkpoint", _kwargs(TINY), str(tmp_path / "cut.ckpt"),
             str(tmp_path / "cut.npz"), "--frames=16",
             "--drop_key=downsamples.1.transformer.attention.fn.to_q.weight")
  result = _cli("msldm_jax.tools.import_release", f"--checkpoint={tmp_path / 'cut.ckpt'}",
                f"--out={out}", check=False)
  _assert_refused(result, out, "nearest is 'tiny'",
                  "missing downsamples.1.transformer.attention.fn.to_q.weight")
  # Other shapes than the settings given.
  result = _cli("msldm_jax.tools.import_release", f"--checkpoint={release_files / 'msldm.ckpt'}",
                f"--out={out}", "--variant=tiny", "--unet=channels=64", check=False)
  _assert_refused(result, out, "does not fit the U-Net",
                  "bottleneck.attention.fn.norm.g: checkpoint (32,), U-Net (64,)")
  # Not a checkpoint at all.
  (tmp_path / "notes.txt").write_text("not a checkpoint")
  result = _cli("msldm_jax.tools.import_release", f"--checkpoint={tmp_path / 'notes.txt'}",
                f"--out={out}", check=False)
  _assert_refused(result, out, "notes.txt", "not a zip-format PyTorch checkpoint")


# -- End to end: the import through `python -m msldm_jax.main` ---------------------------------


@pytest.mark.slow
def test_sample_and_evaluate_with_the_imported_release(imported, release_files, tmp_path):
  """README "The authors' model": import, then --mode=sample (and evaluate) with
  --config.ldm.denoiser_checkpoint. The sampled latents of piece 0 equal the release's own
  sampler and U-Net on the same noise."""
  tfds_dir = tmp_path / "tfds"
  synthetic.write_dataset(str(tfds_dir), {
      "train": synthetic.sine_tracks(2, 1.2),
      "test": synthetic.sine_tracks(2, 1.2, seed=1, prefix="Test")}, name="minislakh")
  workdir = str(tmp_path / "work")
  num_steps = 6
  common = ["msldm_jax.main", "--config=configs/demo.py:variant=tiny", f"--workdir={workdir}",
            f"--config.ldm.denoiser_checkpoint={imported}",
            f"--config.data.tfds_dir={tfds_dir}",
            # 72 latent frames (a multiple of the tiny U-Net's 8): just over the evaluation
            # embedding's 1 s window.
            f"--config.data.chunks.samples={320 * 72 - 8}",
            "--config.evaluate.embedding=statistics",
            f"--config.sample.num_steps={num_steps}", "--config.sample.num_pieces=2",
            "--config.evaluate.partial_chunks=2"]
  _cli(*common, "--mode=sample")
  piece = outputs.piece_dir(os.path.join(workdir, "samples"), 0)
  latents = np.load(os.path.join(piece, "latents.npy"))
  with open(os.path.join(piece, "piece.json")) as f:
    record = json.load(f)
  assert record["checkpoints"]["ldm"]["checkpoint_dir"] == imported
  assert record["checkpoints"]["ldm"]["format"] == "imported"
  assert record["checkpoints"]["vae"]["checkpoint_dir"] == os.path.join(imported, "vae")

  # The release's sampler and U-Net, fed the noise that piece 0 drew (key fold_in(key(0), 0)).
  shape = (1,) + latents.shape
  noise = samplers.drawn_noise(jax.random.fold_in(jax.random.key(0), 0), shape, num_steps)
  np.savez(tmp_path / "inputs.npz", sigmas=np.asarray(samplers.karras_sigmas(num_steps)),
           **{k: np.asarray(v) for k, v in noise.items()})
  _reference(UNET_SCRIPT, "sample", str(release_files / "msldm.ckpt"), _kwargs(TINY),
             str(tmp_path / "inputs.npz"), str(tmp_path / "outputs.npz"))
  with np.load(tmp_path / "outputs.npz") as data:
    error = relative_error(latents, data["output"][0])
  assert error < RELATIVE_TOLERANCE, error

  _cli(*common, "--mode=evaluate")
  with open(os.path.join(workdir, "evaluation", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["checkpoints"]["ldm"]["format"] == "imported"
  assert metrics["checkpoints"]["ldm"]["checkpoint_dir"] == imported
