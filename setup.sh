#!/usr/bin/env bash
# Sets up a fresh machine: the system packages the renderer needs and a virtual environment
# (.venv) with msldm_jax installed. Safe to run again.
#   bash setup.sh
set -euo pipefail
cd "$(dirname "$0")"

# fluidsynth renders the mini dataset's MIDI stems to audio; libsndfile reads/writes audio.
if ! command -v fluidsynth >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    fluidsynth libsndfile1 >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
echo "setup.sh: ready (.venv)"
