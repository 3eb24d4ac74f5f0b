#!/usr/bin/env bash
# Fresh-machine install: a virtual environment in .venv with torch (from this machine's local
# wheels), dfqkern built with its C++/CUDA extension, and the dev extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pinned to the wheels on local disk; a looser spec would download a newer multi-GB CUDA torch.
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}
python -m pip install -q --no-build-isolation -e ".[dev]"
python -c "import dfqkern, dfqkern.kernels as k; print('dfqkern', dfqkern.__version__, 'backends:', k.available_backends())"
