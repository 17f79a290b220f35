#!/usr/bin/env bash
# Start the rollout engines (and the router) that the saved placement plan puts on this node, then
# wait. Run as one srun task per engine node by dapo_start_engines (common.sh). Usage:
#   engines_on_node.sh PLAN_JSON
#
# ENGINE_CMD is the server command line, run with bash once per engine slot with these set:
#   ENGINE_PORT   the slot's HTTP port
#   ENGINE_TP     its tensor-parallel degree
#   CUDA_VISIBLE_DEVICES  its GPUs (node-local ids), so the server sees exactly its devices
# Default (SGLang; DAPO_MODEL = HF model folder):
#   python -m sglang.launch_server --model-path "$DAPO_MODEL" --host 0.0.0.0 --port "$ENGINE_PORT" --tp-size "$ENGINE_TP"
# The trainer talks to these servers with SGLang's HTTP API (rollout.engine=sglang), so ENGINE_CMD must
# start a server that speaks it. vLLM is not started here: rollout.engine=vllm runs vLLM inside the
# trainer's rank-0 process (dapo_megatron/rollout/vllm.py) and needs no engine nodes.
# ROUTER_CMD runs on the plan's router node with ROUTER_PORT and WORKER_URLS (space-separated) set.
set -euo pipefail
plan=${1:?usage: engines_on_node.sh PLAN_JSON}
node=${SLURMD_NODENAME:-$(hostname -s)}
: "${ENGINE_CMD:=python -m sglang.launch_server --model-path \"\$DAPO_MODEL\" --host 0.0.0.0 --port \"\$ENGINE_PORT\" --tp-size \"\$ENGINE_TP\"}"
: "${ROUTER_CMD:=python -m sglang_router.launch_router --host 0.0.0.0 --port \"\$ROUTER_PORT\" --worker-urls \$WORKER_URLS}"
export ENGINE_CMD ROUTER_CMD

# One line per slot on this node: "port tp gpu,ids"; then "router PORT url url ..." if it is ours.
slots=$(python - "$plan" "$node" <<'PY'
import json, sys
plan, node = json.load(open(sys.argv[1])), sys.argv[2]
for e in plan["engines"]:
    if e["node"] == node:
        print(e["port"], e["tp"], ",".join(map(str, e["gpu_ids"])))
if plan["router_host"] == node:
    urls = " ".join(f"http://{e['node']}:{e['port']}" for e in plan["engines"])
    print("router", plan["router_port"], urls)
PY
)

pids=()
stop_children() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}
trap stop_children TERM INT EXIT

while read -r first second rest; do
  [ -n "$first" ] || continue
  if [ "$first" = router ]; then
    echo "engines_on_node: $node starts the router on port $second"
    ROUTER_PORT=$second WORKER_URLS=$rest bash -c "$ROUTER_CMD" &
  else
    echo "engines_on_node: $node starts an engine on port $first (TP $second, GPUs $rest)"
    ENGINE_PORT=$first ENGINE_TP=$second CUDA_VISIBLE_DEVICES=$rest bash -c "$ENGINE_CMD" &
  fi
  pids+=($!)
done <<< "$slots"

[ "${#pids[@]}" -gt 0 ] || { echo "engines_on_node: the plan puts nothing on $node" >&2; exit 1; }
# Any engine exiting ends this task (and, with --kill-on-bad-exit, the step): no half-served run.
wait -n "${pids[@]}"
