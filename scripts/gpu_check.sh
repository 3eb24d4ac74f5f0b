#!/usr/bin/env bash
# GPU verification kit: build dfqkern's extension for this GPU, run the GPU tests, then the GPU
# benchmarks, writing everything into one folder (default runs/gpu/). Run from anywhere:
#     bash scripts/gpu_check.sh [--quick] [--no-build] [--budget SECONDS] [--dry-run] [OUT_DIR]
# Uses $PYTHON (default python3): the GPU machine's own interpreter and its torch / triton; no venv,
# no downloads. The logic lives in scripts/gpu_check.py (standard library only); --help says more.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
py="${PYTHON:-python3}"
if ! command -v "$py" >/dev/null 2>&1; then
    echo "gpu_check: no Python interpreter '$py' (set PYTHON to the one that holds torch)" >&2
    exit 3
fi
export PYTHON="$py"
exec "$py" "$here/gpu_check.py" "$@"
