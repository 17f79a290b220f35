"""SGLang servers (or the embedded worker, which speaks the same API) as a :class:`RolloutEngine`.

``SGLangEngine(base_url, worker_urls=...)``: ``/generate`` goes to ``base_url`` (a server, or
sglang-router, which load-balances and retries on another worker when one dies). Control requests
go to every worker directly, because the router does not forward them (see
:mod:`dapo_megatron.rollout.sglang_api`): abort, pause/continue, flush, memory release, weight
updates. A worker that refuses connections during a control request is marked dead and skipped.

Weight update (``update_weights``): pause (in-flight requests come back aborted) -> flush_cache ->
per bucket: POST ``/update_weights_from_distributed`` with the metas **while** the trainer broadcasts
-> continue. The POST and the broadcast must overlap: the server blocks in its receive until rank 0
broadcasts, and rank 0's broadcast blocks until every receiver has joined. So the POSTs run as tasks,
the broadcast runs in a thread, then both are awaited.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import httpx
from torch import Tensor

from dapo_megatron.rollout import sglang_api as api
from dapo_megatron.rollout.base import (
    Completion,
    EngineDeadError,
    EngineError,
    NamedTensors,
    RequestTimeout,
    SamplingParams,
)

_DEAD = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def launch_sglang_server(
    model_path: str,
    *,
    host: str = "0.0.0.0",
    port: int = 30000,
    tp: int = 1,
    mem_fraction_static: float = 0.7,
    base_gpu_id: int = 0,
    dtype: Optional[str] = None,
    seed: Optional[int] = None,
    enable_memory_saver: bool = False,
    weight_version: Optional[int] = None,
    extra: Sequence[str] = (),
    python: str = "python",
) -> List[str]:
    """argv of ``python -m sglang.launch_server`` (flag names as in SGLang 0.5.6's server_args).
    ``enable_memory_saver`` is needed by colocated engines for release/resume_memory_occupation."""
    argv = [
        python,
        "-m",
        "sglang.launch_server",
        "--model-path",
        model_path,
        "--host",
        host,
        "--port",
        str(port),
        "--tp-size",
        str(tp),
        "--mem-fraction-static",
        str(mem_fraction_static),
        "--base-gpu-id",
        str(base_gpu_id),
    ]
    if dtype:
        argv += ["--dtype", dtype]
    if seed is not None:
        argv += ["--random-seed", str(seed)]
    if enable_memory_saver:
        argv += ["--enable-memory-saver"]
    if weight_version is not None:
        argv += ["--weight-version", str(weight_version)]
    return argv + list(extra)


def _buckets(named: NamedTensors, bucket_bytes: int) -> List[List[Tuple[str, Tensor]]]:
    """Consecutive groups of tensors of at most ``bucket_bytes`` each (a bigger tensor goes alone)."""
    out: List[List[Tuple[str, Tensor]]] = [[]]
    size = 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if out[-1] and size + nbytes > bucket_bytes:
            out.append([])
            size = 0
        out[-1].append((name, t))
        size += nbytes
    return [b for b in out if b]


class SGLangEngine:
    """:class:`RolloutEngine` over SGLang's HTTP API.

    Args:
        base_url: where ``/generate`` goes (a server or sglang-router).
        worker_urls: the servers behind it, for control requests (default: ``[base_url]``).
        client: a shared ``httpx.AsyncClient`` (closed by its owner), or None for a private one.
        timeout_s: default timeout of control requests.
        engine_tp: TP ranks per worker (rank offsets in the weight-update group).
        bucket_bytes: weight-update bucket size.
        pause_mode: SGLang pause mode used around weight updates ("abort": in-flight requests return).
    """

    def __init__(
        self,
        base_url: str,
        *,
        worker_urls: Optional[Sequence[str]] = None,
        client: Optional[httpx.AsyncClient] = None,
        timeout_s: float = 600.0,
        engine_tp: int = 1,
        bucket_bytes: int = 512 << 20,
        pause_mode: str = "abort",
    ):
        self.base_url = base_url.rstrip("/")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [base_url])]
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._own_client = client is None
        self.timeout_s, self.engine_tp, self.bucket_bytes, self.pause_mode = (
            timeout_s,
            engine_tp,
            bucket_bytes,
            pause_mode,
        )
        self.dead_workers: set = set()
        self._version = 0
        self._sender: Any = None
        self._group_name = api.DEFAULT_GROUP_NAME

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def live_workers(self) -> List[str]:
        return [u for u in self.worker_urls if u not in self.dead_workers]

    # ------------------------------------------------------------------ transport
    async def _request(self, method: str, url: str, payload: Any = None, timeout_s: Optional[float] = None) -> Any:
        """One HTTP call; maps failures onto the engine error types and returns the JSON (or None)."""
        try:
            r = await self._client.request(method, url, json=payload, timeout=timeout_s or self.timeout_s)
        except httpx.TimeoutException as e:
            raise RequestTimeout(f"{method} {url}: no answer within {timeout_s or self.timeout_s} s") from e
        except _DEAD as e:
            raise EngineDeadError(f"{method} {url}: {type(e).__name__}: {e}") from e
        if r.status_code >= 400:
            raise api.SGLangRequestError(f"{method} {url}: HTTP {r.status_code}: {r.text[:500]}")
        try:
            return r.json() if r.content else None
        except ValueError:
            return r.text

    async def _control(self, method: str, path: str, payload: Any = None) -> List[Any]:
        """``path`` on every live worker concurrently. Refused connections mark a worker dead (and are
        not errors unless every worker is dead); any other failure raises."""
        workers = self.live_workers
        results = await asyncio.gather(
            *(self._request(method, w + path, payload) for w in workers), return_exceptions=True
        )
        out = []
        for w, res in zip(workers, results):
            if isinstance(res, EngineDeadError):
                self.dead_workers.add(w)
            elif isinstance(res, BaseException):
                raise res
            else:
                out.append(res)
        if not self.live_workers:
            raise EngineDeadError(f"every worker of {self.base_url} is unreachable")
        return out

    # ------------------------------------------------------------------ RolloutEngine
    async def generate(self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: float) -> List[Completion]:
        body = api.generate_request(prompt_ids, params, rid=uuid.uuid4().hex)
        data = await self._request("POST", self.base_url + "/generate", body, timeout_s)
        return api.parse_generate_response(data, params.n)

    async def abort_all(self) -> None:
        await self._control("POST", "/abort_request", api.abort_request(abort_all=True))

    async def pause(self) -> None:
        await self._control("POST", "/pause_generation", api.pause_generation(self.pause_mode))

    async def resume(self) -> None:
        await self._control("POST", "/continue_generation", api.continue_generation())

    async def flush_cache(self) -> None:
        await self._control("POST", "/flush_cache")

    async def release_memory(self) -> None:
        await self._control("POST", "/release_memory_occupation", api.release_memory_occupation())

    async def resume_memory(self) -> None:
        await self._control("POST", "/resume_memory_occupation", api.resume_memory_occupation())

    async def health(self) -> bool:
        """``/health_generate`` on ``base_url`` answers 200 within 10 s (never raises)."""
        try:
            r = await self._client.get(self.base_url + "/health_generate", timeout=10.0)
            return r.status_code == 200
        except httpx.HTTPError:
            return False

    async def shutdown(self) -> None:
        if self._own_client:
            await self._client.aclose()

    # ------------------------------------------------------------------ weights
    async def init_weight_group(
        self,
        master_address: str,
        master_port: int,
        *,
        world_size: Optional[int] = None,
        rank_offset: int = 1,
        group_name: str = api.DEFAULT_GROUP_NAME,
        backend: str = "gloo",
        timeout_s: float = 300.0,
    ) -> Any:
        """Build the trainer->engines update group: the trainer is rank 0 (created here, in this
        process), worker i joins as ``rank_offset + i * engine_tp``. Both sides block in the
        rendezvous, so the joins are POSTed as tasks before the trainer side is created."""
        from dapo_megatron.weights.transports import BroadcastSender, create_update_group

        workers = self.live_workers
        world_size = world_size or 1 + len(workers) * self.engine_tp
        joins = [
            asyncio.ensure_future(
                self._request(
                    "POST",
                    w + "/init_weights_update_group",
                    api.init_weights_update_group(
                        master_address=master_address,
                        master_port=master_port,
                        rank_offset=rank_offset + i * self.engine_tp,
                        world_size=world_size,
                        group_name=group_name,
                        backend=backend,
                    ),
                    timeout_s,
                )
            )
            for i, w in enumerate(workers)
        ]
        group = await asyncio.to_thread(
            create_update_group,
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            rank=0,
            backend=backend,
            timeout_s=timeout_s,
        )
        for res in await asyncio.gather(*joins):
            api.parse_success(res, "init_weights_update_group")
        self._sender, self._group_name = BroadcastSender(group), group_name
        return group

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """pause -> flush_cache -> buckets over the broadcast group -> continue; then stamp ``version``.
        ``continue`` runs even if a bucket fails, so the engine is never left paused."""
        if self._sender is None:
            raise EngineError("update_weights needs init_weight_group() first (the broadcast group)")
        await self.pause()
        try:
            await self.flush_cache()
            for bucket in _buckets(list(named_tensors), self.bucket_bytes):
                await self.update_weights_bucket(bucket, version)
        finally:
            await self.resume()
        self._version = int(version)

    async def update_weights_bucket(self, bucket: NamedTensors, version: int) -> None:
        """One bucket: the POSTs (metas) in flight first, then the broadcast, then await both.

        Hazard: a gloo/NCCL broadcast cannot be cancelled. If a worker rejects the POST before it
        starts receiving, the broadcast only returns at the group timeout; the POST error is raised
        then. Metas are checked here first so a malformed bucket fails before anything is sent."""
        from dapo_megatron.weights.transports import metas_of

        metas = metas_of(bucket)
        payload = api.update_weights_from_distributed(metas, version=version, group_name=self._group_name)
        posts = [
            asyncio.ensure_future(self._request("POST", w + "/update_weights_from_distributed", payload))
            for w in self.live_workers
        ]
        await asyncio.sleep(0)  # let the POSTs start before this coroutine blocks on the broadcast
        await asyncio.to_thread(self._sender.send, bucket)
        for res in await asyncio.gather(*posts):
            api.parse_success(res, "update_weights_from_distributed")

    async def update_weights_from_tensor(
        self, named_tensors: NamedTensors, version: int, *, serialize: Callable[[Dict[str, Any]], str]
    ) -> None:
        """Colocated path: one flattened bucket by CUDA IPC (``serialize``: see
        :func:`sglang_api.update_weights_from_tensor`). The buffers live until every POST returned."""
        payload = api.update_weights_from_tensor(
            list(named_tensors), version=version, tp_size=self.engine_tp, serialize=serialize
        )
        for res in await self._control("POST", "/update_weights_from_tensor", payload):
            api.parse_success(res, "update_weights_from_tensor")
        self._version = int(version)
