#!/usr/bin/env bash
# The main command of README.md: set up ./.venv (CPU torch + dapo_megatron[cpu]) and run the
# embedded demo end to end. Extra arguments are config overrides, e.g. `run.dir=runs/demo2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh cpu
# shellcheck disable=SC1091
. .venv/bin/activate
# One intra-op thread unless the caller chooses: decoding the tiny model is a long series of small
# ops, where a second thread costs more in synchronisation than it gains (2-core sandbox, first 20
# DAPO steps: generation 28.1 s with 2 threads, 17.0 s with 1).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
dapo-megatron demo --config examples/demo_cpu.yaml "$@"
