"""The worker process of :class:`~dapo_megatron.rollout.embedded_client.EmbeddedWorkerEngine`: one
:class:`~dapo_megatron.rollout.embedded.EmbeddedEngine` served over the socket its client passed in
(``python -m dapo_megatron.rollout.embedded_worker --fd N``; the client starts and stops it).

Why a process: in the trainer's process the embedded engine's decoding and the trainer's compute share
one GIL, so an asynchronous rollout cannot overlap with training on CPU.

Wire (:mod:`~dapo_megatron.rollout.embedded_ipc`): requests ``(op, id, args)``, answers
``(id, ok, value)``. Every ``generate`` is a request of its own, so many concurrent calls are in flight
on the one connection and the engine sees them concurrently. Weights come through a shared-memory
buffer, the socket only carries their layout.

Ordering: requests are read in order; every small control request (abort, pause, resume, health) is
handled before the next one is read; a ``generate`` or an ``update_weights`` starts as a task that runs
up to its first wait (where the engine has registered it) before the next request is read. So an
``abort_all`` sent after a ``generate`` reaches that request, and one sent before it does not; and an
abort sent while an update waits for the running requests still reaches them.

Lifetime: the worker exits when its client says ``shutdown`` or when the client's end of the socket
closes (the trainer died), so no worker outlives its trainer.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import socket
import sys
import traceback
from typing import Any, Awaitable, Dict, List, Optional

import torch

from dapo_megatron.rollout.base import EngineError
from dapo_megatron.rollout.embedded_ipc import SharedBucketReader, encode, error_payload, read_frame

_CONTROL_OPS = ("abort_all", "pause", "resume", "release_memory", "resume_memory", "health")


def _build_engine(spec: Dict[str, Any]) -> Any:
    from dapo_megatron.rollout.embedded import EmbeddedEngine

    dtype = getattr(torch, spec["dtype"])
    if spec.get("pretrained"):
        return EmbeddedEngine.from_pretrained(spec["pretrained"], dtype=dtype, seed=spec["seed"], device=spec["device"],
                                              **spec.get("engine_kwargs", {}))  # fmt: skip
    return EmbeddedEngine(spec["hf_config"], dtype=dtype, seed=spec["seed"], device=spec["device"],
                          **spec.get("engine_kwargs", {}))  # fmt: skip


class _Worker:
    """The child's side: one engine, one connection, requests served as described in the module doc."""

    def __init__(self, engine: Any, writer: asyncio.StreamWriter):
        self.engine, self.writer = engine, writer
        self.tasks: Dict[int, asyncio.Task] = {}
        self.shared = SharedBucketReader()

    async def reply(self, rid: int, ok: bool, value: Any) -> None:
        self.writer.write(encode((rid, ok, value)))  # one write per answer: frames never interleave
        await self.writer.drain()

    async def answer(self, rid: int, call: Awaitable[Any]) -> None:
        """Await one request's work and send its answer (or its error)."""
        try:
            value, ok = await call, True
        except asyncio.CancelledError:
            return  # the client cancelled (timeout or its caller gave up): it waits for no answer
        except Exception as e:
            value, ok = error_payload(e), False
        await self.reply(rid, ok, value)

    async def update_weights(self, path: Any, layout: Any, version: int) -> int:
        await self.engine.update_weights(self.shared.views(path, layout), version)
        return self.engine.weight_version

    def spawn(self, rid: int, call: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(self.answer(rid, call))
        self.tasks[rid] = task
        task.add_done_callback(functools.partial(self._finished, rid))

    def _finished(self, rid: int, _task: asyncio.Task) -> None:
        self.tasks.pop(rid, None)

    async def serve(self, reader: asyncio.StreamReader) -> None:
        """Until the client says ``shutdown`` or closes its end."""
        while True:
            try:
                op, rid, args = await read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # the client is gone
            if op == "generate":
                prompt_ids, params, timeout_s = args
                self.spawn(rid, self.engine.generate(prompt_ids, params, timeout_s=timeout_s))
                await asyncio.sleep(0)  # let it register with the engine before the next request
            elif op == "update_weights":
                # A task too: the update waits for the running requests, and an abort read meanwhile
                # must still reach them, as it would in process.
                self.spawn(rid, self.update_weights(*args))
                await asyncio.sleep(0)
            elif op == "cancel":
                if rid in self.tasks:
                    self.tasks[rid].cancel()
            elif op == "shutdown":
                await self.engine.shutdown()
                await self.reply(rid, True, None)
                return
            elif op in _CONTROL_OPS:
                await self.answer(rid, getattr(self.engine, op)())
            else:
                await self.reply(rid, False, error_payload(EngineError(f"embedded worker: unknown request {op!r}")))

    async def close(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await self.engine.shutdown()
        self.shared.close()
        self.writer.close()


async def _serve(sock: socket.socket) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    _, rid, spec = await read_frame(reader)
    try:
        engine = _build_engine(spec)
    except Exception as e:
        writer.write(encode((rid, False, error_payload(e))))
        await writer.drain()
        return
    print(f"embedded worker {os.getpid()}: engine ready", flush=True)  # in the log before the client goes on
    writer.write(encode((rid, True, {"weight_version": engine.weight_version, "pid": os.getpid()})))
    await writer.drain()
    worker = _Worker(engine, writer)
    try:
        await worker.serve(reader)
    finally:
        await worker.close()


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="the embedded rollout engine's worker process (started by its client)")
    ap.add_argument("--fd", type=int, required=True, help="the inherited end of the client's socketpair")
    args = ap.parse_args(argv)
    code = 0
    try:
        asyncio.run(_serve(socket.socket(fileno=args.fd)))
    except BaseException:
        traceback.print_exc()
        code = 1
    # Exit now: the engine is shut down and nothing is left to save, while an orderly interpreter exit
    # would join the engine's threads (a decode step in flight) and unload torch, seconds on a busy CPU.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
