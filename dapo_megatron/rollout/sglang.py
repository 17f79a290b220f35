"""Real SGLang servers (behind sglang-router or alone) as a :class:`RolloutEngine`.

``SGLangEngine(base_url, worker_urls=...)``: ``/generate`` goes to ``base_url`` (a server, or
sglang-router, which load-balances and retries on another worker when one dies). Control requests
go to every worker directly, because the router does not forward them (see
:mod:`dapo_megatron.rollout.sglang_api`): abort, pause/continue, flush, memory release, weight
updates, versions. A worker that refuses connections during a control request is marked dead and skipped.

One weight sync (:meth:`SGLangEngine.begin_weight_sync`, :meth:`load_bucket` per bucket,
:meth:`finish_weight_sync`): pause (in-flight requests come back aborted) -> flush_cache ->
begin_weight_update -> the buckets -> end_weight_update -> update_weight_version -> continue. The
version is stamped only after every bucket arrived, and ``continue`` runs even when a bucket fails,
so an engine is never left paused. Two transports, chosen by the caller from ``rollout.mode``:

* ``tensor`` (colocated): ``update_weights_from_tensor`` with the tensors shared, not copied: CUDA IPC
  handles on a GPU, shared-memory files on CPU;
* ``distributed`` (disaggregated): ``update_weights_from_distributed``; the trainer broadcasts each
  bucket's bytes once over the update group (NCCL on GPU, gloo on CPU) while the POSTs are in flight.
  The POST and the broadcast must overlap: the server blocks in its receive until rank 0 broadcasts,
  and rank 0's broadcast blocks until every receiver has joined. So the POSTs run as tasks, the
  broadcast runs in a thread, then both are awaited.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from typing import Any, List, Optional, Sequence, Tuple

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
# abort_all follow-up: how often, and how far apart, requests still unanswered are aborted by id.
_STRAGGLER_ROUNDS, _STRAGGLER_WAIT_S = 20, 0.25
_IDLE_WAIT_S = 60  # a paused worker's scheduler finishes its aborted requests within this (see flush_cache)


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
        engine_tp: TP ranks per worker (rank offsets in the weight-update group; payload copies).
        bucket_bytes: weight-update bucket size for :meth:`update_weights`.
        pause_mode: SGLang pause mode used around weight updates ("abort": in-flight requests return).
        api_key: sent as ``Authorization: Bearer`` on every request (the servers' ``--api-key``).
        transport: ``tensor`` or ``distributed`` (see the module docstring).
        owner: an object with ``stop()`` (the local fleet of servers and router) stopped by :meth:`shutdown`.
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
        api_key: Optional[str] = None,
        transport: str = "distributed",
        owner: Any = None,
        routing_topk: Optional[int] = None,
    ):
        if transport not in ("tensor", "distributed"):
            raise ValueError(f"transport must be 'tensor' or 'distributed', got {transport!r}")
        self.base_url = base_url.rstrip("/")
        self.worker_urls = [u.rstrip("/") for u in (worker_urls or [base_url])]
        self._client = client or httpx.AsyncClient(timeout=timeout_s, headers=api.auth_headers(api_key))
        self._own_client = client is None
        self.timeout_s, self.engine_tp, self.bucket_bytes = timeout_s, engine_tp, bucket_bytes
        self.pause_mode, self.transport, self.owner = pause_mode, transport, owner
        self.routing_topk = routing_topk  # the model's num_experts_per_tok: decodes routed experts
        self.api_key = api_key  # shared with the stage leaders, which reach the workers themselves
        self.dead_workers: set = set()
        self._version = 0
        self._sender: Any = None
        self._group_name = api.DEFAULT_GROUP_NAME
        self._in_flight: set = set()  # rids of this engine's /generate requests still unanswered
        self._released = False  # memory handed back by release_memory, not yet resumed

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def live_workers(self) -> List[str]:
        return [u for u in self.worker_urls if u not in self.dead_workers]

    @property
    def num_workers(self) -> int:
        """Live servers behind ``base_url``: the generator allows ``max_concurrency`` groups per worker."""
        return len(self.live_workers)

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
        """``params.n`` completions. With a seed and n > 1, each sample is its own request with seed
        ``seed + i``: one request carries one ``sampling_seed``, and n samples drawn under the same seed
        can all be the same response under deterministic sampling."""
        if params.seed is None or params.n == 1:
            return await self._generate_one(prompt_ids, params, timeout_s)
        singles = [replace(params, n=1, seed=(params.seed + i) % (2**31)) for i in range(params.n)]
        parts = await asyncio.gather(*(self._generate_one(prompt_ids, p, timeout_s) for p in singles))
        return [c for part in parts for c in part]

    async def _generate_one(self, prompt_ids: List[int], params: SamplingParams, timeout_s: float) -> List[Completion]:
        rid = uuid.uuid4().hex
        self._in_flight.add(rid)
        try:
            body = api.generate_request(prompt_ids, params, rid=rid, return_routed_experts=self._routes(params))
            data = await self._request("POST", self.base_url + "/generate", body, timeout_s)
        finally:
            self._in_flight.discard(rid)
        completions = api.parse_generate_response(data, params.n)
        for c in completions:  # base64 from the server -> nested lists (Completion.meta's convention)
            encoded = c.meta.pop("routed_experts", None)  # absent when asked: the rollout names the engine
            if encoded is not None and c.token_ids and params.return_routed_experts:  # no token: none routed
                positions = len(prompt_ids) + len(c.token_ids) - 1
                c.meta["routed_experts"] = api.decode_routed_experts(encoded, positions, self._topk())
        return completions

    def _routes(self, params: SamplingParams) -> bool:
        if params.return_routed_experts:
            self._topk()
        return params.return_routed_experts

    def _topk(self) -> int:
        if self.routing_topk is None:
            raise ValueError("SGLangEngine: return_routed_experts needs routing_topk (the model's num_experts_per_tok)")
        return self.routing_topk

    async def abort_all(self) -> None:
        """Abort everything running on every worker, then by id each request of ours that is still
        unanswered: one still on its way through the router when ``abort_all`` reached the workers would
        otherwise run to its full length."""
        await self._control("POST", "/abort_request", api.abort_request(abort_all=True))
        for _ in range(_STRAGGLER_ROUNDS):
            if not self._in_flight:
                return
            await asyncio.sleep(_STRAGGLER_WAIT_S)
            rids = list(self._in_flight)
            await asyncio.gather(*(self._control("POST", "/abort_request", api.abort_request(rid=r)) for r in rids))

    async def pause(self) -> None:
        await self._control("POST", "/pause_generation", api.pause_generation(self.pause_mode))

    async def resume(self) -> None:
        await self._control("POST", "/continue_generation", api.continue_generation())

    async def flush_cache(self) -> None:
        """Flush every worker's cache once its scheduler is idle (it waits up to ``_IDLE_WAIT_S``).

        After ``pause_generation`` in ``abort`` mode the aborted requests may still be in a running
        batch for a scheduler step or two: the pause returns when the tokenizer side is done, not the
        scheduler. The deferred flush (SGLang's ``timeout``) succeeds only once the scheduler is idle,
        so a memory release or a weight update after it never meets a running request (SGLang's
        scheduler exits on a release that is not idle). A worker still busy at the deadline answers
        400, which raises here instead."""
        await self._control("POST", f"/flush_cache?timeout={_IDLE_WAIT_S}")

    async def release_memory(self) -> None:
        """Hand the weights and KV cache memory back (colocated); a second release is a no-op.

        Paused, then flushed, first: SGLang's scheduler asserts it is idle at a release and exits
        otherwise, and a request aborted by the end of a rollout (or a router's straggler) may still
        be running when the release arrives. ``pause_generation`` holds new requests until
        :meth:`resume_memory` continues the engine; :meth:`flush_cache` waits until the scheduler
        has finished the aborted ones."""
        if not self._released:
            await self.pause()
            await self.flush_cache()  # waits until the scheduler is idle
            await self._control("POST", "/release_memory_occupation", api.release_memory_occupation())
            self._released = True

    async def resume_memory(self) -> None:
        """Take the memory back and continue the engine paused by :meth:`release_memory`. Only after a
        release: SGLang's scheduler dies (KeyError on the tag) when asked to resume memory it never
        released."""
        if self._released:
            await self._control("POST", "/resume_memory_occupation", api.resume_memory_occupation())
            self._released = False
            await self.resume()

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
        if self.owner is not None:
            await asyncio.to_thread(self.owner.stop)
            self.owner = None

    # ------------------------------------------------------------------ weights
    async def init_weight_group(
        self,
        master_address: str,
        master_port: int,
        *,
        backend: str = "gloo",
        group_name: str = api.DEFAULT_GROUP_NAME,
        timeout_s: float = 300.0,
    ) -> Any:
        """Build the trainer->engines update group: the trainer is rank 0 (created here, in this
        process), worker i's TP ranks join from ``1 + i * engine_tp``. Both sides block in the
        rendezvous, so the joins are POSTed as tasks before the trainer side is created."""
        from dapo_megatron.weights.transports import BroadcastSender, create_update_group

        workers = self.live_workers
        world_size = 1 + len(workers) * self.engine_tp
        joins = [
            asyncio.ensure_future(
                self._request(
                    "POST",
                    w + "/init_weights_update_group",
                    api.init_weights_update_group(
                        master_address=master_address,
                        master_port=master_port,
                        rank_offset=1 + i * self.engine_tp,
                        world_size=world_size,
                        group_name=group_name,
                        backend=backend,
                    ),  # fmt: skip
                    timeout_s,
                )
            )
            for i, w in enumerate(workers)
        ]
        await asyncio.sleep(0)  # let the joins start before this coroutine blocks in the rendezvous
        group = await asyncio.to_thread(
            create_update_group, master_address=master_address, master_port=master_port, world_size=world_size,
            rank=0, backend=backend, timeout_s=timeout_s, group_name=group_name,
        )  # fmt: skip
        for res in await asyncio.gather(*joins):
            api.parse_success(res, "init_weights_update_group")
        device = "cuda" if backend == "nccl" else "cpu"
        self._sender, self._group_name = BroadcastSender(group, device=device), group_name
        return group

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """One whole sync of ``named_tensors`` in buckets of ``bucket_bytes``, stamped ``version``."""
        await self.begin_weight_sync()
        ok = False
        try:
            for bucket in _buckets(list(named_tensors), self.bucket_bytes):
                await self.load_bucket(bucket, version)
            ok = True
        finally:
            await self.finish_weight_sync(version, ok=ok)

    async def begin_weight_sync(self) -> None:
        """pause -> flush_cache -> begin_weight_update, on every live worker. Needs no update group:
        in the per-stage sync rank 0 opens the session and the stage leaders' engines send."""
        await self.pause()
        try:
            await self.flush_cache()
            for res in await self._control("POST", "/begin_weight_update", api.begin_weight_update()):
                api.parse_success(res, "begin_weight_update")
        except BaseException:
            await self.resume()
            raise

    async def finish_weight_sync(self, version: int, *, ok: bool = True) -> None:
        """end_weight_update -> update_weight_version (only when every bucket arrived) -> continue."""
        try:
            for res in await self._control("POST", "/end_weight_update", api.end_weight_update()):
                api.parse_success(res, "end_weight_update")
            if ok:
                await self._control("POST", "/update_weight_version", api.update_weight_version(version))
                self._version = int(version)
        finally:
            await self.resume()

    async def load_bucket(self, bucket: NamedTensors, version: Optional[int]) -> None:
        """One bucket between :meth:`begin_weight_sync` and :meth:`finish_weight_sync` (on this or another
        process's engine object: the per-stage sync sends from every stage leader while rank 0 holds
        the session). ``version`` None: the bucket leaves the engine's version alone. No flush per
        bucket: :meth:`begin_weight_sync` flushed the paused engine, which caches nothing until
        :meth:`finish_weight_sync` continues it."""
        if self.transport == "tensor":
            # Share copies, never the trainer's own storages: sharing moves a CPU storage into a
            # shared-memory file in place (and exports a CUDA block by IPC), after which the trainer's
            # offload can no longer free it (resizing such a storage crashes the process).
            copies = [(name, t.detach().clone()) for name, t in bucket]
            payload = api.update_weights_from_tensor(
                api.serialize_named_tensors(copies), version=version, tp_size=self.engine_tp, flush_cache=False
            )
            for res in await self._control("POST", "/update_weights_from_tensor", payload):
                api.parse_success(res, "update_weights_from_tensor")
            return
        await self._broadcast_bucket(bucket, version)

    async def _broadcast_bucket(self, bucket: NamedTensors, version: Optional[int]) -> None:
        """The POSTs (metas) in flight first, then one broadcast of the bucket's bytes, then await both.

        Hazard: a gloo/NCCL broadcast cannot be cancelled. If a worker rejects the POST before it
        starts receiving, the broadcast only returns at the group timeout; the POST error is raised
        then. The bucket is flattened (and checked) first, so a malformed bucket fails before anything
        is sent."""
        from dapo_megatron.weights.transports import metas_of

        if self._sender is None:
            raise EngineError("the distributed weight transport needs init_weight_group() first")
        flat = api.flatten_bucket(bucket)
        payload = api.update_weights_from_distributed(
            metas_of(bucket), version=version, group_name=self._group_name, flush_cache=False
        )
        posts = [
            asyncio.ensure_future(self._request("POST", w + "/update_weights_from_distributed", payload))
            for w in self.live_workers
        ]
        await asyncio.sleep(0)  # let the POSTs start before this coroutine blocks on the broadcast
        await asyncio.to_thread(self._sender.send_flat, flat)
        for res in await asyncio.gather(*posts):
            api.parse_success(res, "update_weights_from_distributed")
