#!/usr/bin/env bash
# Creates the PyTorch reference environment that the parity tests and the VAE benchmark run
# as a subprocess:
#   bash tests/reference/install_reference_env.sh [VENV_DIR]      (default: .venv-reference)
# Safe to run again. Then `pytest tests/test_source_vae_parity.py` finds it at
# .venv-reference/bin/python, or wherever MSLDM_REFERENCE_PYTHON points.
#
# Why a second environment: torch pins a protobuf that clashes with TensorFlow's, and the main
# environment must stay torch-free.
#
# What goes in, and why only this:
# - torch==2.13.0+cpu, the CPU wheel that lies in the machine's local wheel directory (pip's
#   find-links). The `+cpu` local label cannot be satisfied by the public index, so pip can
#   never pull another torch (a CUDA build, or another version) instead: without the local
#   wheel the install fails here, loudly.
# - descript-audio-codec==1.0.0 with --no-deps: the SourceVAE of the MSLDM release is built
#   from this package's blocks (dac.nn.layers, dac.model.dac). Its declared dependencies
#   (torchaudio, descript-audiotools, argbind) are NOT installed: torchaudio must match the
#   torch build exactly and audiotools drags in a large audio stack, and none of them is used
#   by the blocks we compare against. The package's own __init__ files import audiotools, so
#   tests/reference/dac_reference.py imports the two module files without running those
#   __init__ files and stubs the two audiotools names that dac/model/{dac,base}.py import at
#   module level (AudioSignal, ml.BaseModel) — see load_dac() there.
# - einops (imported by dac/nn/layers.py), tqdm (dac/model/base.py), numpy (exchange format).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV_DIR="${1:-.venv-reference}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0+cpu"

if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PYTHON" -m venv "$VENV_DIR"
fi
PIP=("$VENV_DIR/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install -q "$TORCH_SPEC"
"${PIP[@]}" install -q "numpy>=1.26,<3" "einops>=0.7,<1" "tqdm>=4.66,<5"
"${PIP[@]}" install -q --no-deps "descript-audio-codec==1.0.0"

# Check: the exact torch, and the DAC blocks importable the way the tests import them.
"$VENV_DIR/bin/python" - <<'PY'
import sys
import torch
sys.path.insert(0, "tests/reference")
import dac_reference
assert torch.__version__ == "2.13.0+cpu", f"unexpected torch {torch.__version__}"
layers, model = dac_reference.load_dac()
print(f"reference env ready: torch {torch.__version__}, "
      f"dac blocks from {model.__file__}")
PY
# The release's denoiser for tests/test_unet1d_parity.py and benchmarks/ldm.py (UNet1d; its
# modules import only torch, einops, einops_exts): no deps, so nothing pulls another torch.
"${PIP[@]}" install -q --no-deps "audio-diffusion-pytorch==0.0.43" "einops-exts==0.0.4"
