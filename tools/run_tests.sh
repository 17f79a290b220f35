#!/usr/bin/env bash
# The test command of README.md: set up ./.venv with the [test] extra, then run the whole suite.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh -k loss`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh test
# shellcheck disable=SC1091
. .venv/bin/activate
# One thread per process: the multi-process megatron tests run 2-4 gloo ranks on 2 cores.
export OMP_NUM_THREADS=1
python -m ruff check dapo_megatron tools tests benchmarks
python -m mypy
python -m pytest "$@"
