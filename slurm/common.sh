# shellcheck shell=bash
# Shared environment of the dapo_megatron sbatch scripts. Sourced, never run.
#
# Variables a user may set before `sbatch` (sbatch exports the submitting shell's environment):
#   DAPO_REPO         repository root (default: the folder sbatch was called from, SLURM_SUBMIT_DIR)
#   CONFIG            YAML config of the run (each script has its own default)
#   RUN_DIR           run directory (default: runs/<job name>-<job id> under DAPO_REPO)
#   DAPO_NET_IFNAME   network interface for NCCL and gloo traffic between nodes, e.g. ib0 or eth0.
#                     Default: the interface of this node's default route (read from /proc/net/route);
#                     left unset when there is none, so NCCL/gloo choose themselves. An explicit
#                     NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME in the environment is kept as it is.
#   MASTER_PORT       rendezvous port (default: 20000 + job id modulo 20000, so two jobs sharing a
#                     node do not collide)
#   OMP_NUM_THREADS   default: the CPUs per task (SLURM_CPUS_PER_TASK), else 1
#   DAPO_VENV         a virtual environment to activate (default: use the exported PATH as it is)
#
# Folders the cluster recipes (examples/dapo_qwen2.5_*.yaml) read as ${MODELS}, ${CKPT} and ${DATA}.
# No script sets them (they are site paths, with no sensible default); export them before sbatch:
#   MODELS            folder holding the HF model folders (model.hf_path: ${MODELS}/Qwen2.5-7B)
#   CKPT              folder of converted megatron checkpoints (model.load: ${CKPT}/qwen2.5-7b-mcore)
#   DATA              folder of the prepared parquet files (data.train_files, data.eval_files)
#   e.g. MODELS=<hf folder> CKPT=<ckpt folder> DATA=<data folder> sbatch slurm/multi_node_colocated.sbatch
# An unset one stops the job at its first command (`dapo-megatron plan`), naming variable, key and file.

: "${SLURM_JOB_ID:?common.sh runs inside a SLURM job (sbatch/salloc)}"

DAPO_REPO=${DAPO_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$DAPO_REPO" || { echo "common.sh: cannot enter DAPO_REPO=$DAPO_REPO" >&2; exit 1; }
export DAPO_REPO

if [ -n "${DAPO_VENV:-}" ]; then
  # shellcheck disable=SC1091
  . "$DAPO_VENV/bin/activate"
fi

# The interface of the default route: the row of /proc/net/route whose destination is 00000000.
dapo_default_ifname() {
  awk '$2 == "00000000" { print $1; exit }' /proc/net/route 2>/dev/null
}

DAPO_NET_IFNAME=${DAPO_NET_IFNAME:-$(dapo_default_ifname)}
if [ -n "$DAPO_NET_IFNAME" ]; then
  export NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-$DAPO_NET_IFNAME}
  export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$DAPO_NET_IFNAME}
fi

# Rendezvous: the first host of the allocation, as the trainer's own init also derives it.
MASTER_ADDR=${MASTER_ADDR:-$(timeout 60 scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

RUN_DIR=${RUN_DIR:-$DAPO_REPO/runs/${SLURM_JOB_NAME:-dapo}-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR/logs"
export RUN_DIR

echo "dapo_megatron job $SLURM_JOB_ID on $SLURM_JOB_NODELIST: master $MASTER_ADDR:$MASTER_PORT," \
     "net ${DAPO_NET_IFNAME:-auto}, run dir $RUN_DIR"

# True when the saved plan has engine servers (false for the embedded engine).
dapo_plan_has_engines() {
  python -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["engines"] else 1)' "$1"
}

# One top-level field of the saved plan (e.g. trainer_ranks_per_node). Args: plan JSON, field name.
dapo_plan_field() {
  python -c 'import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' "$1" "$2"
}

# Start one srun step per node of a node range that launches the engines planned for that node,
# in the background. Args: first node index (relative to the allocation), node count, plan JSON, then
# the run's config and overrides (the servers' model, memory and device options come from them).
# Sets ENGINES_PID to the srun's PID, so the caller can stop it by PID when training ends.
dapo_start_engines() {
  local first=$1 count=$2 plan=$3
  shift 3
  srun --overlap --relative="$first" --nodes="$count" --ntasks="$count" --ntasks-per-node=1 \
       --kill-on-bad-exit=1 --output="$RUN_DIR/logs/engines-%N.log" \
       bash "$DAPO_REPO/slurm/engines_on_node.sh" "$plan" "$@" &
  ENGINES_PID=$!
}

# Stop the engine step started by dapo_start_engines, by its PID: srun forwards the signal to
# its tasks; escalate to SIGKILL after a grace period.
dapo_stop_engines() {
  [ -n "${ENGINES_PID:-}" ] || return 0
  kill -TERM "$ENGINES_PID" 2>/dev/null || true
  for _ in $(seq 30); do kill -0 "$ENGINES_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL "$ENGINES_PID" 2>/dev/null || true
  wait "$ENGINES_PID" 2>/dev/null || true
}
