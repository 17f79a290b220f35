#!/usr/bin/env bash
# Create ./.venv-sglang: the real SGLang server (sglang 0.5.23) on its CPU backend, plus sglang-router,
# for the `sglang`-marked tests and for `rollout.engine=sglang` on a CPU machine. The trainer stays in
# ./.venv and starts the servers as processes of this venv's python (rollout.sglang_python).
#
# GPU users do not need this script: they install the normal CUDA SGLang (`pip install sglang`) and point
# rollout.sglang_python at that interpreter; the adapter code is the same.
#
# SGLang's CPU kernels (the `sgl_kernel` module) are not on the package registries. They are optional: they
# speed SGLang up on AVX-512 CPUs, and without them it runs its torch paths. Give them as one of:
#   SGLANG_KERNEL_WHEEL=/path/to/sglang_kernel_cpu-*.whl   a built wheel;
#   SGLANG_KERNEL_WHEELS=/dir                              a find-links directory holding it;
#   SGLANG_SOURCE=/path/to/sglang                          an SGLang source checkout: the wheel is built from
#                                                          python/sglang/kernels/aot (pyproject_cpu.toml),
#                                                          about 25 minutes on 2 cores.
# Order matters: torch (CPU build) first, then sglang's requirements against a constraints file that pins
# it, then sglang itself with --no-deps (its metadata asks for CUDA-only packages and a newer torch).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-sglang
if [ -f "$venv/.ready" ]; then echo "sglang env ready (cached: $venv)"; exit 0; fi
# shellcheck source=tools/torch_venv.sh
. tools/torch_venv.sh
torch_venv "$venv"  # sets $py and $constraints
"$py" -m pip install -q -r tools/sglang_cpu_requirements.txt -c "$constraints"
"$py" -m pip install -q --no-deps "sglang==0.5.23" "sglang-router==0.3.2"
# SGLang imports torchvision while reading model configs. The registry's torchvision is a CUDA build whose
# ops library cannot load beside the CPU torch; the server's start-up shim
# (dapo_megatron/rollout/sglang_cpu_shim) lets its import finish for text models. --no-deps keeps torch.
"$py" -m pip install -q --no-deps "${TORCHVISION_SPEC:-torchvision==0.28.0}"

# The CPU kernels.
if [ -n "${SGLANG_KERNEL_WHEEL:-}" ]; then
    "$py" -m pip install -q --no-deps "$SGLANG_KERNEL_WHEEL"
elif [ -n "${SGLANG_KERNEL_WHEELS:-}" ]; then
    "$py" -m pip install -q --no-deps --no-index --find-links "$SGLANG_KERNEL_WHEELS" sglang-kernel-cpu
elif [ -n "${SGLANG_SOURCE:-}" ]; then
    "$py" -m pip install -q scikit-build-core wheel setuptools setuptools-scm cmake -c "$constraints"
    build=$(mktemp -d)
    cp -r "$SGLANG_SOURCE/python/sglang/kernels/aot/." "$build/"
    cp "$build/pyproject_cpu.toml" "$build/pyproject.toml"
    MAX_JOBS=${MAX_JOBS:-2} CMAKE_BUILD_PARALLEL_LEVEL=${MAX_JOBS:-2} \
        "$py" -m pip wheel "$build" --no-build-isolation --no-deps -w "$build/dist"
    "$py" -m pip install -q --no-deps "$build"/dist/*.whl
    rm -rf "$build"
else
    echo "tools/sglang_env.sh: no CPU kernels given (SGLANG_KERNEL_WHEEL, SGLANG_KERNEL_WHEELS or SGLANG_SOURCE);"\
         "SGLang will run its torch paths only"
fi
# The kernels are compiled for AVX-512/AMX CPUs (Xeon Sapphire Rapids and newer) and die with SIGILL on
# others (AMD Zen 3, for one). Probe them in a child process; where they cannot load, leave them out:
# SGLang then runs its torch paths (the shim answers the few import-time references), slower but whole.
if bash -c '"$0" -c "import torch, sgl_kernel"' "$py" >/dev/null 2>&1; then
    kernels="native CPU kernels"
else
    "$py" -m pip uninstall -y -q sglang-kernel-cpu
    kernels="no native kernels (this CPU cannot run them: $(grep -o -m1 'avx512f' /proc/cpuinfo || echo 'no AVX-512'))"
fi
"$py" - "$kernels" <<'PY'
import importlib.metadata as md
import sys

import torch
print(f"sglang env ready: torch {torch.__version__}, sglang {md.version('sglang')}, "
      f"sglang-router {md.version('sglang-router')}, {sys.argv[1]}")
PY
touch "$venv/.ready"
