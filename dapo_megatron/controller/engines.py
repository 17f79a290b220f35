"""Rollout engines for a run, chosen by ``rollout.engine``; built on trainer rank 0 only.

* ``embedded``: ``rollout.num_engines`` in-process transformers engines (the CPU default);
* ``vllm``: in-process ``vllm.LLM`` engines on ``model.hf_path``;
* ``sglang``: servers started by the sbatch script from the saved placement plan
  (``<run.dir>/placement.json``), reached through the sglang-router.

Whatever the kind, the trainer pushes its own weights before the first rollout, so an engine's
initial weights never matter.
"""

from __future__ import annotations

import os
import time
from typing import Any, List

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
        return [EmbeddedEngine(hf, seed=cfg.rollout.seed + i) for i in range(n)]
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
        return [_sglang_from_placement(os.path.join(run_dir, PLACEMENT_FILE), cfg.rollout.engine_tensor_parallel)]
    raise ValueError(f"rollout.engine={kind!r}: expected embedded, vllm or sglang")


def _sglang_from_placement(path: str, engine_tp: int, *, ready_timeout_s: float = 1800.0) -> Any:
    from dapo_megatron.controller.placement import load_placement
    from dapo_megatron.rollout.process import wait_http_ok
    from dapo_megatron.rollout.sglang import SGLangEngine

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: rollout.engine=sglang reads the engine plan saved by `dapo-megatron plan --json` "
            "(the sbatch scripts write it before starting the engines)"
        )
    plan = load_placement(path)
    if not plan.engines:
        raise ValueError(f"{path}: the plan lists no engine servers")
    workers = [e.url for e in plan.engines]
    deadline = time.monotonic() + ready_timeout_s
    for url in workers:  # servers load the model for minutes; wait for each before the first step
        wait_http_ok(f"{url}/health", timeout_s=max(1.0, deadline - time.monotonic()))
    router = f"http://{plan.router_host}:{plan.router_port}"
    return SGLangEngine(router, worker_urls=workers, engine_tp=engine_tp)
