"""The embedded engine as its own process, serving the subset of SGLang's HTTP API that RL uses.

Run: ``python -m dapo_megatron.rollout.worker --host 127.0.0.1 --port P --model-config PATH --seed S``
where PATH is an HF directory with weights, or a ``config.json`` (file or directory) for random
weights that the trainer then fills through ``/update_weights_from_distributed``.

Request and response shapes come from :mod:`dapo_megatron.rollout.sglang_api`, so
:class:`~dapo_megatron.rollout.sglang.SGLangEngine` and sglang-router cannot tell this worker from a
real SGLang server (for these endpoints). Decoding runs in a thread, off the event loop, so
``/abort_request``, ``/health`` and ``/pause_generation`` answer while a request is generating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import threading
import uuid
from typing import Any, Dict, List

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from dapo_megatron.rollout import sglang_api as api
from dapo_megatron.rollout.embedded import EmbeddedEngine

WORKER_VERSION = f"dapo_megatron-embedded (sglang api {api.SGLANG_VERSION})"


class _WorkerState:
    """What the HTTP handlers share: the engine, per-request cancel flags, weight-update groups."""

    def __init__(self, engine: EmbeddedEngine, model_path: str):
        self.engine, self.model_path = engine, model_path
        self.cancels: Dict[str, threading.Event] = {}
        self.groups: Dict[str, Any] = {}

    def abort(self, rid: str, abort_all: bool) -> None:
        if abort_all:
            self.engine.abort_all_sync()
        for key, ev in list(self.cancels.items()):
            # SGLang expands a batch rid "r" into "r_0", "r_1", ...; aborting "r" aborts them all.
            if abort_all or key == rid or key.startswith(f"{rid}_"):
                ev.set()


def _ordered_items(state: _WorkerState, req: api.ParsedGenerate, results: List[list], rid: str) -> Any:
    """SGLang's response order: inputs expanded as ``input_ids * n`` -> item k is prompt ``k % B``,
    sample ``k // B``. One dict for a single prompt with n == 1, else a list."""
    n_prompts, n = len(req.prompts), req.params.n
    items = []
    for k in range(n_prompts * n):
        p, j = k % n_prompts, k // n_prompts
        item_rid = rid if (req.is_single and n == 1) else f"{rid}_{k}"
        items.append(
            api.generate_response_item(
                results[p][j], rid=item_rid, prompt_tokens=len(req.prompts[p]), return_logprob=req.return_logprob
            )
        )
    return items[0] if (req.is_single and n == 1) else items


def _add_generate_routes(app: FastAPI, state: _WorkerState) -> None:
    engine = state.engine

    @app.api_route("/generate", methods=["POST", "PUT"])
    async def generate(request: Request):
        try:
            req = api.parse_generate_request(await request.json())
        except (ValueError, KeyError, TypeError) as e:
            return JSONResponse(api.error_response(str(e)), status_code=400)
        rid = req.rid or uuid.uuid4().hex
        cancel = threading.Event()
        state.cancels[rid] = cancel
        # Read the abort epoch before queueing so an abort_all issued while we wait applies to us.
        epoch = engine.abort_epoch
        try:
            results = await asyncio.to_thread(engine.generate_sync, req.prompts, req.params, cancel=cancel, epoch=epoch)
        except Exception as e:  # noqa: BLE001 - any engine failure is a 400 with SGLang's error body
            return JSONResponse(api.error_response(f"{type(e).__name__}: {e}"), status_code=400)
        finally:
            state.cancels.pop(rid, None)
        return JSONResponse(_ordered_items(state, req, results, rid))

    @app.post("/abort_request")
    async def abort_request(request: Request):
        body = await request.json()
        state.abort(str(body.get("rid") or ""), bool(body.get("abort_all", False)))
        return Response(status_code=200)

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await _json_or_empty(request)
        mode = body.get("mode", "abort")
        if mode == "abort":
            state.abort("", abort_all=True)
        await engine.pause()
        return {"message": "Generation paused successfully.", "status": "ok"}

    @app.post("/continue_generation")
    async def continue_generation():
        await engine.resume()
        return {"message": "Generation continued successfully.", "status": "ok"}


def _add_weight_routes(app: FastAPI, state: _WorkerState) -> None:
    from dapo_megatron.weights.transports import BroadcastReceiver, TensorMeta, create_update_group

    engine = state.engine

    @app.post("/init_weights_update_group")
    async def init_group(request: Request):
        body = await request.json()
        try:
            if body.get("backend", "nccl") != "gloo" and not torch.cuda.is_available():
                raise RuntimeError(f"backend {body.get('backend')!r} needs CUDA; this CPU worker supports 'gloo'")
            # Blocks until every rank (the trainer's rank 0 included) has joined the rendezvous.
            group = await asyncio.to_thread(
                create_update_group,
                master_address=body["master_address"],
                master_port=int(body["master_port"]),
                world_size=int(body["world_size"]),
                rank=int(body["rank_offset"]),
                backend=body.get("backend", "gloo"),
            )
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"success": False, "message": f"{type(e).__name__}: {e}"}, status_code=400)
        state.groups[body.get("group_name", api.DEFAULT_GROUP_NAME)] = group
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    @app.post("/destroy_weights_update_group")
    async def destroy_group(request: Request):
        body = await _json_or_empty(request)
        found = state.groups.pop(body.get("group_name", api.DEFAULT_GROUP_NAME), None) is not None
        return JSONResponse(
            {"success": found, "message": "destroyed" if found else "no such group"}, status_code=200 if found else 400
        )

    @app.post("/update_weights_from_distributed")
    async def update_from_distributed(request: Request):
        try:
            body = await request.json()
            metas, version, group_name = api.parse_update_weights_from_distributed(body)
            receiver, metas = BroadcastReceiver(state.groups[group_name]), [TensorMeta(*m) for m in metas]
            # recv blocks until the trainer broadcasts; it runs in a thread so the loop stays live.
            if body.get("load_format") == "flattened_bucket":
                named = api.unflatten_bucket(await asyncio.to_thread(receiver.recv_flat, metas), metas)
            else:
                named = await asyncio.to_thread(receiver.recv, metas)
            new_version = int(version) if version is not None else engine.weight_version
            await asyncio.to_thread(engine.update_weights_sync, named, new_version)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"success": False, "message": f"{type(e).__name__}: {e}"}, status_code=400)
        return {"success": True, "message": "Succeeded to update parameter online."}

    @app.post("/begin_weight_update")
    async def begin_weight_update():
        return {"success": True, "message": "Success"}  # SGLang 0.5.23's session; nothing to restore here

    @app.post("/end_weight_update")
    async def end_weight_update():
        return {"success": True, "message": "Success"}

    @app.post("/update_weight_version")
    async def update_weight_version(request: Request):
        body = await request.json()
        engine.set_weight_version(int(body["new_version"]))
        return {"success": True, "message": f"Weight version updated to {body['new_version']}"}

    @app.post("/update_weights_from_tensor")
    async def update_from_tensor():
        msg = "update_weights_from_tensor (CUDA IPC, colocated) is not supported by the CPU embedded worker"
        return JSONResponse({"success": False, "message": msg}, status_code=400)

    @app.api_route("/release_memory_occupation", methods=["GET", "POST"])
    async def release_memory():
        await engine.release_memory()  # no-op on CPU; SGLang answers 200 with a null body

    @app.api_route("/resume_memory_occupation", methods=["GET", "POST"])
    async def resume_memory():
        await engine.resume_memory()


def _add_info_routes(app: FastAPI, state: _WorkerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health():
        return Response(status_code=200 if await engine.health() else 503)

    @app.get("/health_generate")
    async def health_generate():
        # Like SGLang: when busy, the running requests prove liveness; when idle, generate one token.
        if not await engine.health():
            return Response(status_code=503)
        if not engine.busy:
            from dapo_megatron.rollout.base import SamplingParams

            await asyncio.to_thread(engine.generate_sync, [[0]], SamplingParams(max_new_tokens=1))
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return PlainTextResponse("Cache flushed.\n")  # no prefix cache in the embedded engine

    def model_info():
        cfg = engine.config
        return {
            "model_path": state.model_path,
            "tokenizer_path": None,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(engine.weight_version),
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": cfg.model_type,
            "architectures": getattr(cfg, "architectures", None),
        }

    def server_info():
        return {
            "model_path": state.model_path,
            "tp_size": 1,
            "dp_size": 1,
            "version": WORKER_VERSION,
            "weight_version": str(engine.weight_version),
            "internal_states": [],
        }

    for path in ("/get_model_info", "/model_info"):
        app.add_api_route(path, model_info, methods=["GET"])
    for path in ("/get_server_info", "/server_info"):
        app.add_api_route(path, server_info, methods=["GET"])
    for path in ("/get_weight_version", "/weight_version"):
        app.add_api_route(path, lambda: {"weight_version": str(engine.weight_version)}, methods=["GET"])


async def _json_or_empty(request: Request) -> dict:
    raw = await request.body()
    return json.loads(raw) if raw.strip() else {}


def create_app(engine: EmbeddedEngine, *, model_path: str = "") -> FastAPI:
    """The FastAPI app serving ``engine`` with SGLang's endpoint names and payloads."""
    app = FastAPI(title="dapo_megatron embedded rollout worker")
    state = _WorkerState(engine, model_path)
    _add_generate_routes(app, state)
    _add_weight_routes(app, state)
    _add_info_routes(app, state)
    app.state.worker = state
    return app


def load_engine(model_config: str, *, seed: int, dtype: torch.dtype) -> EmbeddedEngine:
    """An HF dir with weights -> those weights; a config.json (file or dir) -> random init from seed."""
    path = pathlib.Path(model_config)
    if path.is_dir() and (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
        return EmbeddedEngine.from_pretrained(str(path), dtype=dtype, seed=seed)
    cfg_file = path / "config.json" if path.is_dir() else path
    return EmbeddedEngine(json.loads(cfg_file.read_text()), dtype=dtype, seed=seed)


def main(argv: List[str] | None = None) -> None:
    import uvicorn

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model-config", required=True, help="HF dir with weights, or config.json (file or dir)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    engine = load_engine(args.model_config, seed=args.seed, dtype=getattr(torch, args.dtype))
    app = create_app(engine, model_path=args.model_config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=2)


if __name__ == "__main__":
    main()
