"""Published SourceVAE weights, end to end, exactly as README.md "Published weights" says.

A small release-shaped SourceVAE is written with the PyTorch reference blocks
(tests/reference/dac_reference.py, the release trainer's `torch.save({'generator': ...})`),
imported with `python -m msldm_jax.tools.import_sourcevae`, and every later stage runs through
`python -m msldm_jax.main` with `--config.ldm.vae_checkpoint` pointing at the import:
encode_latents, train_ldm (a few steps, with its periodic sample), sample, evaluate (with
its separation table). The generated stems must equal the PyTorch decoder's output on the
same latents.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import reference_env
from msldm_jax import stems
from msldm_jax.data import synthetic
from msldm_jax.evaluation import separation
from msldm_jax.generation import outputs

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_SCRIPT = os.path.join(REPO_ROOT, "tests", "reference", "dac_reference.py")
RELATIVE_TOLERANCE = 1e-4


def _reference(*args):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "XLA_", "JAX_"))}
  result = subprocess.run(
      [reference_env.reference_python(), "-W", "ignore::FutureWarning", REFERENCE_SCRIPT,
       *args], capture_output=True, text=True, env=env, timeout=600, check=False)
  assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"


def _cli(*args):
  """`python -m ...` from the repository root, as a user types it."""
  result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=900, check=False)
  assert result.returncode == 0, f"{' '.join(args)}:\n{result.stdout}\n{result.stderr[-6000:]}"
  return result


@pytest.mark.reference
def test_imported_release_vae_through_every_stage(tmp_path):
  release = tmp_path / "release"
  release.mkdir()
  checkpoint = release / "g_00000001"
  _reference("checkpoint", str(checkpoint), str(release / "outputs.npz"))
  with np.load(release / "outputs.npz") as data:
    vae = json.loads(str(data["config"]))

  # README: python -m msldm_jax.tools.import_sourcevae --torch_checkpoint=FILE --out=DIR
  # (--model=KEY=VALUE: this checkpoint's widths are not the paper's).
  imported = str(tmp_path / "release_vae")
  _cli("msldm_jax.tools.import_sourcevae", f"--torch_checkpoint={checkpoint}",
       f"--out={imported}", f"--model=encoder_width={vae['encoder_width']}",
       f"--model=decoder_width={vae['decoder_width']}",
       f"--model=latent_dim={vae['latent_dim']}")

  # A built dataset, as --mode=data leaves it (synthetic tracks: no rendering needed here).
  tfds_dir = tmp_path / "tfds"
  synthetic.write_dataset(str(tfds_dir), {
      "train": synthetic.sine_tracks(8, 1.5),
      "test": synthetic.sine_tracks(2, 1.2, seed=1, prefix="Test")}, name="minislakh")

  # README: python -m msldm_jax.main --config=configs/demo.py --workdir=W \
  #     --config.ldm.vae_checkpoint=DIR --mode=MODE, for each mode in order.
  workdir = str(tmp_path / "work")
  common = ["msldm_jax.main", "--config=configs/demo.py:variant=tiny", f"--workdir={workdir}",
            f"--config.ldm.vae_checkpoint={imported}", f"--config.data.tfds_dir={tfds_dir}",
            # 72 latent frames: chunks just over the evaluation embedding's 1 s window.
            f"--config.data.chunks.samples={320 * 72 - 8}",
            # 0.52 s chunks: shorter than musicnn's 3 s patch, so the 1 s-window statistics.
            "--config.evaluate.embedding=statistics",
            "--config.ldm.train.num_steps=4", "--config.ldm.train.sample_every=4",
            # The separation table too (the tiny variant leaves it out): DPS and Dirac on the
            # imported decoder, beside its oracle.
            "--config.evaluate.separation=True", "--config.evaluate.separation_chunks=1"]
  for mode in ("encode_latents", "train_ldm", "sample", "evaluate"):
    _cli(*common, f"--mode={mode}")

  with open(os.path.join(workdir, "latents", "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["vae"]["checkpoint_dir"] == imported
  assert manifest["shape"][1] == vae["latent_dim"]

  # Every generated stem equals the PyTorch decoder's output on the piece's latents.
  piece = outputs.piece_dir(os.path.join(workdir, "samples"), 0)
  latents = np.load(os.path.join(piece, "latents.npy"))
  per_stem = latents.reshape(stems.NUM_STEMS, vae["latent_dim"], -1)
  np.savez(tmp_path / "latents.npz", latents=per_stem, config=np.array(json.dumps(vae)))
  _reference("decode", str(checkpoint), str(tmp_path / "latents.npz"),
             str(tmp_path / "decoded.npz"))
  with np.load(tmp_path / "decoded.npz") as data:
    torch_decoded = data["decoded"][:, 0]  # [stems, samples]
  ours = np.stack([sf.read(os.path.join(piece, "stems", f"{name}.wav"), dtype="float32")[0]
                   for name in stems.STEM_NAMES])
  assert ours.shape == torch_decoded.shape
  error = np.max(np.abs(ours - torch_decoded)) / np.max(np.abs(torch_decoded))
  assert error < RELATIVE_TOLERANCE, error

  with open(os.path.join(piece, "piece.json")) as f:
    record = json.load(f)
  assert record["checkpoints"]["vae"]["checkpoint_dir"] == imported
  assert record["checkpoints"]["vae"]["format"] == "imported"
  with open(os.path.join(workdir, "evaluation", "metrics.json")) as f:
    metrics = json.load(f)
  assert metrics["checkpoints"]["vae"]["checkpoint_dir"] == imported
  assert set(metrics["vae_reconstruction"]) == set(stems.STEM_NAMES)
  assert list(metrics["separation"]["table"]) == ["dps", "dirac", separation.ORACLE]
  assert os.path.exists(os.path.join(workdir, "evaluation", "separation.md"))
