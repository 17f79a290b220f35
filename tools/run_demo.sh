#!/usr/bin/env bash
# The main command of README.md: set up ./.venv (CPU torch + dapo_megatron[cpu]) and run the
# embedded demo end to end. Extra arguments are config overrides, e.g. `run.dir=runs/demo2`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh cpu
# shellcheck disable=SC1091
. .venv/bin/activate
dapo-megatron demo --config examples/demo_cpu.yaml "$@"
