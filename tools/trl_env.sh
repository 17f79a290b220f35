#!/usr/bin/env bash
# Create ./.venv-trl: Hugging Face TRL (GRPOTrainer with loss_type="dapo") on a CPU torch, for
# benchmarks/vs_trl.py. The benchmark runs TRL in this venv as a subprocess (benchmarks/trl_grpo_run.py);
# nothing of dapo_megatron is installed here, so TRL gets its own transformers/accelerate/datasets.
#
# Order matters (see the platform notes): torch (the CPU build: TORCH_SPEC, found through
# PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL) first and alone, then TRL against a constraints file that pins
# that torch, otherwise pip resolves a CUDA torch plus ~20 nvidia wheels. psutil is for the benchmark's
# memory sampler. Idempotent: a finished venv carries a .ready marker and the script exits at once.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-trl
trl_spec=${TRL_SPEC:-trl==1.16.0}
if [ -f "$venv/.ready" ]; then echo "trl env ready (cached: $venv)"; exit 0; fi
# shellcheck source=tools/torch_venv.sh
. tools/torch_venv.sh
torch_venv "$venv"  # sets $py and $constraints
"$py" -m pip install -q "$trl_spec" psutil -c "$constraints"
"$py" - <<'PY'
import inspect

import torch
import transformers
import trl
from trl import GRPOConfig

# the benchmark needs the DAPO loss and Clip-Higher; fail here, not an hour later
src = inspect.getsource(GRPOConfig)
missing = [k for k in ("epsilon_high", '"dapo"') if k not in src]
if missing or torch.version.cuda is not None:
    raise SystemExit(f"trl env unusable: GRPOConfig lacks {missing} or torch is a CUDA build ({torch.__version__})")
print(f"trl env ready: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")
PY
touch "$venv/.ready"
