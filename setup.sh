#!/usr/bin/env bash
# Sets up a fresh machine: the system packages the renderer needs and a virtual environment
# (.venv) with msldm_jax installed. Safe to run again.
#   bash setup.sh              the main environment
#   bash setup.sh --reference  also .venv-reference (PyTorch CPU) for equivalence tests
set -euo pipefail
cd "$(dirname "$0")"

WITH_REFERENCE=0
for arg in "$@"; do
  case "$arg" in
    --reference) WITH_REFERENCE=1 ;;
    *) echo "setup.sh: unknown option $arg (known: --reference)" >&2; exit 2 ;;
  esac
done

# fluidsynth renders the mini dataset's MIDI stems to audio; libsndfile reads/writes audio;
# jemalloc is the allocator `python -m msldm_jax.main` restarts on (msldm_jax/host_allocator.py).
PACKAGES=()
command -v fluidsynth >/dev/null 2>&1 || PACKAGES+=(fluidsynth libsndfile1)
# grep without -q reads all of ldconfig's output: under pipefail, -q's early exit could
# end ldconfig with SIGPIPE and count a present library as missing.
/sbin/ldconfig -p | grep 'libjemalloc\.so\.2 ' >/dev/null || PACKAGES+=(libjemalloc2)
if [ "${#PACKAGES[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    "${PACKAGES[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# musicnn ships the trained TF1 checkpoints that msldm_jax/evaluation/musicnn.py reads (its
# Python code, never imported, pins TF1, hence --no-deps, which install_requires cannot say).
.venv/bin/python -m pip install -q --no-deps musicnn==0.1.0
if [ "$WITH_REFERENCE" = 1 ]; then
  bash tests/reference/install_reference_env.sh .venv-reference
fi
# Byte-compile the environments once: where PYTHONDONTWRITEBYTECODE is set (as on CI
# machines) nothing else writes .pyc files, and every process (each test worker, each
# command-line test) would compile TensorFlow's and JAX's Python again: measured on a 2-core
# AMD EPYC, importing tensorflow, jax, flax, optax, orbax and librosa took 37 s before,
# 14 s after. Some packages ship files this Python cannot compile (templates, Python 2
# fixtures), for which compileall exits non-zero: that is not a set-up failure.
for venv in .venv $([ "$WITH_REFERENCE" = 1 ] && echo .venv-reference); do
  "$venv/bin/python" -m compileall -q -j 0 "$venv/lib" >/dev/null 2>&1 || true
done
echo "setup.sh: ready (.venv$([ "$WITH_REFERENCE" = 1 ] && echo ', .venv-reference'))"
