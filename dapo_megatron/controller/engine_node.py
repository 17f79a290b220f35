"""``dapo-megatron engines``: serve the SGLang servers (and the router) that a saved placement plan puts
on this node, until SIGTERM. Run once per engine node by ``slurm/engines_on_node.sh``.

It uses the same launcher as the trainer's local fleet (:mod:`dapo_megatron.rollout.sglang_server`),
with the options of :func:`~dapo_megatron.controller.engines.sglang_server_options`:
* each server binds the node's cluster address (its name as the plan lists it, resolved here), never
  0.0.0.0, and sees only its planned GPUs;
* every server and the router require the per-job key that ``dapo-megatron plan --json`` wrote next
  to the plan (``engine_api_key``, mode 0600);
* a server that fails to start ends the launcher with the tail of its log, and any server exiting
  later ends it too (with ``--kill-on-bad-exit`` the whole step stops: no half-served run).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from dataclasses import replace
from typing import Any, Callable, List, Optional

from dapo_megatron.config import Config


def node_server_options(
    cfg: Config, plan: Any, node: str, api_key: Optional[str], *, resolve: Callable[[str], str] = socket.gethostbyname
) -> List[Any]:
    """The :class:`ServerOptions` of every slot the plan puts on ``node``, bound to ``resolve(node)``."""
    from dapo_megatron.controller.engines import sglang_server_options

    host = resolve(node)
    base = sglang_server_options(cfg, host=host, api_key=api_key)
    return [replace(base, port=s.port, tp=s.tp, gpu_ids=tuple(s.gpu_ids)) for s in plan.engines_on(node)]


def serve_plan_on_node(cfg: Config, plan_path: str, node: str) -> int:
    """Start this node's servers (and the router when it is this node's), serve until SIGTERM or until
    one of them exits; stop everything by PID. Returns the exit code for the launcher."""
    from dapo_megatron.controller.placement import PlacementError, load_placement
    from dapo_megatron.rollout.sglang_server import SGLangServer, read_api_key, start_servers

    plan = load_placement(plan_path)
    if not plan.engines_on(node) and plan.router_host != node:
        raise PlacementError(f"{plan_path}: the plan puts nothing on {node}")
    run_dir = os.path.dirname(os.path.abspath(plan_path))
    api_key = read_api_key(run_dir)
    options = node_server_options(cfg, plan, node, api_key)
    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    python = cfg.rollout.sglang_python or sys.executable
    servers = [SGLangServer(o, python=python, log_path=f"{logs}/sglang-{node}-{o.port}.log") for o in options]
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start_servers(servers, timeout_s=cfg.rollout.server_start_timeout_s)
    router = None
    try:
        if plan.router_host == node:
            router = _start_router(plan, node, api_key, logs, cfg.rollout.server_start_timeout_s)
        print(f"dapo-megatron engines: {node} serves {[s.url for s in servers]}"
              + (f" and the router {router.url}" if router else ""), flush=True)  # fmt: skip
        while not stop.wait(1.0):
            dead = [s.url for s in servers if not s.alive()]
            if dead:
                print(f"dapo-megatron engines: server(s) {dead} exited; stopping {node}", file=sys.stderr)
                return 1
        return 0
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()


def _start_router(plan: Any, node: str, api_key: Optional[str], logs: str, timeout_s: float) -> Any:
    """The real sglang-router on this node, with every planned server registered once it is healthy
    (servers on other nodes may still be loading: registration waits for them)."""
    from dapo_megatron.rollout.router import SGLangRouter

    router = SGLangRouter(host=socket.gethostbyname(node), port=plan.router_port, api_key=api_key,
                          log_path=os.path.join(logs, f"router-{node}.log"), health_failure_threshold=3)  # fmt: skip
    router.start()
    try:
        for slot in plan.engines:
            router.add_worker(slot.url, timeout_s=timeout_s)
    except BaseException:
        router.stop()
        raise
    return router
