#!/usr/bin/env bash
# Create ./.venv (once) and install dapo_megatron into it with the given extras (default: cpu).
#
# torch goes in first and on its own: megatron-core and transformers only ask for "torch", and
# without a torch already present pip resolves a CUDA build plus ~20 nvidia wheels (several GB).
# TORCH_SPEC picks the build (default: the 2.13.0 CPU wheel). Where no local wheel directory is
# configured (PIP_FIND_LINKS), point PIP_EXTRA_INDEX_URL at PyTorch's CPU wheel index first.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-cpu}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[${extras}]"
python - <<'PY'
import torch
print(f"dapo_megatron env ready: torch {torch.__version__}, cuda={torch.cuda.is_available()}")
PY
