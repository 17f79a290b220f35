"""Rollout engines for a run, chosen by ``rollout.engine``; built on trainer rank 0 only.

* ``embedded``: ``rollout.num_engines`` transformers engines (the CPU default), in this process, or
  each in a worker process of its own with ``rollout.embedded_process`` (weights then reach it through
  shared memory inside its ``update_weights``);
* ``vllm``: in-process ``vllm.LLM`` engines on ``model.hf_path``;
* ``sglang``: real SGLang servers. Under sbatch they were started by ``dapo-megatron engines`` from the
  saved placement plan (``<run.dir>/placement.json``) and are reached through the sglang-router; with
  no plan, trainer rank 0 starts ``rollout.num_engines`` servers on this machine itself
  (:class:`~dapo_megatron.rollout.sglang_server.LocalSGLangFleet`, behind a router when there are
  several) and stops them at the end. Weights travel by ``update_weights_from_tensor`` when colocated
  and over broadcast groups (NCCL on GPU, gloo on CPU) when disaggregated: one per pipeline stage
  and server, opened by every stage leader (:mod:`dapo_megatron.controller.stage_link`).

Whatever the kind, the trainer pushes its own weights before the first rollout, so an engine's
initial weights never matter: SGLang servers start from dummy weights.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

from dapo_megatron.config import Config

PLACEMENT_FILE = "placement.json"


def read_hf_config(hf_path: str) -> dict:
    """``config.json`` of ``model.hf_path`` as a dict; the error names the config key."""
    from dapo_megatron.weights.hf_io import HFCheckpointError
    from dapo_megatron.weights.hf_io import read_hf_config as read_folder_config

    try:
        if not hf_path:
            raise HFCheckpointError("empty")
        return read_folder_config(hf_path)
    except HFCheckpointError as e:
        raise ValueError(
            f"model.hf_path={hf_path!r}: expected an HF model folder with config.json and tokenizer files "
            f"(`dapo-megatron demo` writes one for the tiny demo model): {e}"
        ) from None


def build_engines(cfg: Config, run_dir: str) -> List[Any]:
    """The engine pool of ``cfg.rollout`` (see the module docstring)."""
    kind, n = cfg.rollout.engine, cfg.rollout.num_engines
    if kind == "embedded":
        from dapo_megatron.rollout.embedded import EmbeddedEngine

        hf = read_hf_config(cfg.model.hf_path)
        if cfg.rollout.embedded_process:
            return _embedded_workers(cfg, hf, run_dir)
        return [EmbeddedEngine(hf, seed=cfg.rollout.seed + i, **embedded_shape(cfg)) for i in range(n)]
    if kind == "vllm":
        from dapo_megatron.rollout.vllm import VLLMEngine

        read_hf_config(cfg.model.hf_path)  # the named error for a bad folder, before vLLM's own
        max_len = cfg.rollout.max_prompt_len + cfg.rollout.max_response_len
        # Random initial weights: the trainer pushes its own before the first rollout, so reading the
        # checkpoint from disk would only cost start-up time (and the folder may hold no weights at all).
        options = dict(max_model_len=max_len, load_format="dummy", colocated=cfg.rollout.mode == "colocated",
                       gpu_memory_utilization=cfg.rollout.mem_fraction_static)  # fmt: skip
        return [VLLMEngine(cfg.model.hf_path, seed=cfg.rollout.seed + i, **options) for i in range(n)]
    if kind == "sglang":
        read_hf_config(cfg.model.hf_path)
        plan_path = os.path.join(run_dir, PLACEMENT_FILE)
        if os.path.isfile(plan_path):
            return [_sglang_from_placement(cfg, plan_path, run_dir)]
        return [_local_sglang_fleet(cfg, run_dir)]
    raise ValueError(f"rollout.engine={kind!r}: expected embedded, vllm or sglang")


def embedded_shape(cfg: Config) -> Dict[str, int]:
    """The embedded engine's decode batch: ``max_batch_rows`` (``rollout.embedded_batch_rows``, or a
    whole generation round) and ``max_seq_len``, the longest prompt plus the longest response of
    training or evaluation (the cache width every step attends over: no wider than needed)."""
    r = cfg.rollout
    rows = r.embedded_batch_rows or min(r.max_concurrency, r.gen_prompts_per_round) * r.n_samples_per_prompt
    return {"max_batch_rows": rows,
            "max_seq_len": r.max_prompt_len + max(r.max_response_len, cfg.eval.max_response_len)}  # fmt: skip


def _embedded_workers(cfg: Config, hf: dict, run_dir: str) -> List[Any]:
    """``rollout.num_engines`` embedded engines, each in a worker process of its own, started
    together (each spends most of its start-up importing torch and transformers); their logs go to
    ``<run.dir>/logs/embedded_worker<i>.log``. If one fails to start, the others are stopped."""
    from concurrent.futures import ThreadPoolExecutor

    from dapo_megatron.rollout.embedded_client import EmbeddedWorkerEngine

    logs = os.path.join(run_dir, "logs")
    os.makedirs(logs, exist_ok=True)

    def start(i: int) -> Any:
        log = os.path.join(logs, f"embedded_worker{i}.log")
        timeout = cfg.rollout.server_start_timeout_s
        return EmbeddedWorkerEngine.start(hf, seed=cfg.rollout.seed + i, start_timeout_s=timeout, log_path=log,
                                          engine_kwargs=embedded_shape(cfg))  # fmt: skip

    n = cfg.rollout.num_engines
    with ThreadPoolExecutor(max_workers=n) as pool:
        futures = [pool.submit(start, i) for i in range(n)]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [e for e in (f.exception() for f in futures) if e is not None]
    if failed:
        for engine in started:
            engine.close()
        raise failed[0]
    return started


def sglang_device(cfg: Config) -> str:
    """``rollout.sglang_device`` with ``auto`` resolved on this machine."""
    if cfg.rollout.sglang_device != "auto":
        return cfg.rollout.sglang_device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def sglang_server_options(cfg: Config, *, host: str, api_key: Optional[str]) -> Any:
    """The server options every launcher uses for this run (one code path: local fleet and sbatch)."""
    from dapo_megatron.rollout.sglang_server import ServerOptions

    r = cfg.rollout
    return ServerOptions(
        model_path=cfg.model.hf_path, host=host, tp=r.engine_tensor_parallel, mem_fraction_static=r.mem_fraction_static,
        device=sglang_device(cfg), enable_memory_saver=r.mode == "colocated", api_key=api_key, seed=r.seed,
        max_total_tokens=r.sglang_max_total_tokens, extra=("--load-format", "dummy"),
        return_routed_experts=cfg.algo.routing_replay == "rollout",
    )  # fmt: skip


def _routing_topk(cfg: Config) -> Optional[int]:
    """Experts per token of the MoE model when the run replays the engine's routing (R3), else None:
    the SGLang adapter needs it to decode the routed-expert ids the servers return."""
    if cfg.algo.routing_replay != "rollout":
        return None
    return int(read_hf_config(cfg.model.hf_path)["num_experts_per_tok"])


def _transport(cfg: Config) -> str:
    return "tensor" if cfg.rollout.mode == "colocated" else "distributed"


def _local_sglang_fleet(cfg: Config, run_dir: str) -> Any:
    import sys

    from dapo_megatron.rollout.sglang import SGLangEngine
    from dapo_megatron.rollout.sglang_server import LocalSGLangFleet, new_api_key

    r = cfg.rollout
    opts = sglang_server_options(cfg, host="127.0.0.1", api_key=new_api_key(run_dir))
    fleet = LocalSGLangFleet(opts, r.num_engines, python=r.sglang_python or sys.executable,
                             log_dir=os.path.join(run_dir, "logs"))  # fmt: skip
    fleet.start(timeout_s=r.server_start_timeout_s)
    return SGLangEngine(fleet.base_url, worker_urls=fleet.worker_urls, engine_tp=r.engine_tensor_parallel,
                        api_key=opts.api_key, transport=_transport(cfg), owner=fleet,
                        routing_topk=_routing_topk(cfg))  # fmt: skip


def _sglang_from_placement(cfg: Config, path: str, run_dir: str) -> Any:
    """The servers `dapo-megatron engines` started from the plan: wait until each answers and the router
    lists a healthy worker (it registers them only once they loaded), within rollout.server_start_timeout_s."""
    from dapo_megatron.controller.placement import load_placement
    from dapo_megatron.rollout.process import wait_http_ok
    from dapo_megatron.rollout.sglang import SGLangEngine
    from dapo_megatron.rollout.sglang_api import auth_headers
    from dapo_megatron.rollout.sglang_server import read_api_key

    plan = load_placement(path)
    if not plan.engines:
        raise ValueError(f"{path}: the plan lists no engine servers")
    api_key = read_api_key(run_dir)
    headers = auth_headers(api_key)
    workers = [e.url for e in plan.engines]
    deadline = time.monotonic() + cfg.rollout.server_start_timeout_s
    router = f"http://{plan.router_host}:{plan.router_port}"
    for url in [*(f"{w}/health" for w in workers), f"{router}/readiness"]:
        wait_http_ok(url, timeout_s=max(1.0, deadline - time.monotonic()), headers=headers)
    return SGLangEngine(router, worker_urls=workers, engine_tp=cfg.rollout.engine_tensor_parallel,
                        api_key=api_key, transport=_transport(cfg),
                        routing_topk=_routing_topk(cfg))  # fmt: skip
