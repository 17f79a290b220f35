#!/usr/bin/env bash
# The main command of README.md: set up ./.venv (CPU torch + dapo_megatron[cpu]) and run the
# embedded demo end to end. Extra arguments are config overrides, e.g. `run.dir=runs/demo2`.
# With `rollout.engine=sglang` the rollouts come from a real SGLang server on the CPU: ./.venv-sglang is
# built first (tools/sglang_env.sh) and the server runs from it unless rollout.sglang_python is given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh cpu
# shellcheck disable=SC1091
. .venv/bin/activate
# One intra-op thread unless the caller chooses: decoding the tiny model is a long series of small
# ops, where a second thread costs more in synchronisation than it gains (2-core sandbox, first 20
# DAPO steps: generation 28.1 s with 2 threads, 17.0 s with 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=("$@")
if printf '%s\n' "$@" | grep -qx 'rollout.engine=sglang' && ! printf '%s\n' "$@" | grep -q '^rollout.sglang_python='; then
    bash tools/sglang_env.sh
    args+=("rollout.sglang_python=$PWD/.venv-sglang/bin/python")
fi
dapo-megatron demo --config examples/demo_cpu.yaml "${args[@]}"
