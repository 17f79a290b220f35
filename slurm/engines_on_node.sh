#!/usr/bin/env bash
# Serve the rollout engines (and the router) that the saved placement plan puts on this node, until the
# step is stopped. Run as one srun task per engine node by dapo_start_engines (common.sh). Usage:
#   engines_on_node.sh PLAN_JSON CONFIG [section.key=value ...]
# It is `dapo-megatron engines`: the same launcher as the trainer's local fleet
# (dapo_megatron/rollout/sglang_server.py). Each SGLang server binds this node's address from the plan,
# sees only its planned GPUs, and requires the per-job key that `dapo-megatron plan --json` wrote next to
# the plan (engine_api_key, mode 0600). The servers run under rollout.sglang_python (default: this
# environment's python). A server that fails to start ends the task with the tail of its log.
set -euo pipefail
plan=${1:?usage: engines_on_node.sh PLAN_JSON CONFIG [overrides...]}
config=${2:?usage: engines_on_node.sh PLAN_JSON CONFIG [overrides...]}
shift 2
node=${SLURMD_NODENAME:-$(hostname -s)}
exec dapo-megatron engines --plan "$plan" --node "$node" --config "$config" "$@"
