"""The client of an embedded engine in a worker process of its own
(:mod:`~dapo_megatron.rollout.embedded_worker`): :class:`EmbeddedWorkerEngine` implements
:class:`~dapo_megatron.rollout.base.RolloutEngine` with the in-process engine's semantics.

It starts the worker (``python -m dapo_megatron.rollout.embedded_worker --fd N``, its own session, one
end of a ``socketpair`` inherited) and stops it by its PID. Many concurrent ``generate`` calls are in
flight on the one connection; weights go through a shared-memory buffer
(:class:`~dapo_megatron.rollout.embedded_ipc.SharedBucketWriter`).

Failure: the worker holds the only other end of the socket, so its death is the end of our stream;
the reader thread then fails every pending call, and every later one, with :class:`EngineDeadError`
(never a hang). A request past its ``timeout_s`` raises :class:`RequestTimeout` and is cancelled in
the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Any, Callable, Dict, List, Optional

import torch

from dapo_megatron.rollout.base import (
    Completion,
    EngineDeadError,
    EngineError,
    NamedTensors,
    RequestTimeout,
    SamplingParams,
)
from dapo_megatron.rollout.embedded_ipc import SharedBucketWriter, encode, error_from, recv_frame
from dapo_megatron.rollout.process import stop_process


def _reap(proc: subprocess.Popen, sock: socket.socket) -> None:
    """Finaliser (also at interpreter exit): the worker never outlives a client that was not shut down."""
    try:
        sock.close()
    finally:
        stop_process(proc, timeout_s=5.0)


class EmbeddedWorkerEngine:
    """:class:`~dapo_megatron.rollout.base.RolloutEngine` backed by an embedded engine in a worker
    process. Build it with :meth:`start` (blocks until the worker's engine is built).

    Thread model: a reader thread owns the receiving side and resolves the pending calls (asyncio
    futures on whatever loop made the call, or ``concurrent.futures`` for the blocking calls); sends
    are serialised by a lock. So the client works from any event loop and from sync code.
    """

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, *, weight_version: int, control_timeout_s: float):
        self.proc, self.sock = proc, sock
        self.control_timeout_s = control_timeout_s
        self._version = int(weight_version)
        self._ids = itertools.count(1)
        self._pending: Dict[int, Callable[[bool, Any], None]] = {}
        self._lock = threading.Lock()  # guards _pending and _dead together: no call registers after the failure
        self._send_lock = threading.Lock()
        self._dead: Optional[str] = None
        self._updating = False
        self._shared = SharedBucketWriter()
        self._finalizer = weakref.finalize(self, _reap, proc, sock)
        self._reader = threading.Thread(target=self._read_loop, name=f"embedded-worker-{proc.pid}", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------------ start
    @classmethod
    def start(
        cls,
        hf_config: Any = None,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        device: str = "cpu",
        pretrained: Optional[str] = None,
        engine_kwargs: Optional[Dict[str, Any]] = None,
        log_path: Optional[str] = None,
        start_timeout_s: float = 300.0,
        control_timeout_s: float = 600.0,
    ) -> EmbeddedWorkerEngine:
        """Start the worker and build its engine (``EmbeddedEngine(hf_config, dtype=, seed=, device=)``,
        or ``EmbeddedEngine.from_pretrained(pretrained, ...)``), with ``engine_kwargs`` (e.g.
        ``max_batch_rows``, ``max_seq_len``) passed on. ``hf_config``: a dict with
        ``model_type``, a ``PretrainedConfig`` or a path. The worker's output goes to ``log_path``
        (appended), else to this process's stderr. Raises ``EngineError`` if the engine cannot be
        built or the worker is not ready within ``start_timeout_s``."""
        if hasattr(hf_config, "to_dict"):
            hf_config = hf_config.to_dict()
        spec = dict(hf_config=hf_config, dtype=str(dtype).removeprefix("torch."), seed=int(seed), device=device,
                    pretrained=pretrained, engine_kwargs=dict(engine_kwargs or {}))  # fmt: skip
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-m", "dapo_megatron.rollout.embedded_worker", "--fd", str(theirs.fileno())]
        with open(log_path, "a") if log_path else contextlib.nullcontext() as log:
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log or subprocess.DEVNULL,
                                        stderr=log, pass_fds=(theirs.fileno(),), start_new_session=True)  # fmt: skip
            finally:
                theirs.close()  # the child holds its copy: its death is our end of stream
        try:
            ready = _handshake(proc, ours, spec, start_timeout_s)
        except BaseException as e:
            ours.close()
            stop_process(proc, timeout_s=5.0)
            if log_path and isinstance(e, EngineError):
                raise EngineError(f"{e} (its output is in {log_path})") from None
            raise
        return cls(proc, ours, weight_version=ready["weight_version"], control_timeout_s=control_timeout_s)

    @classmethod
    def from_pretrained(cls, path: str, **kwargs: Any) -> EmbeddedWorkerEngine:
        return cls.start(None, pretrained=path, **kwargs)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def weight_version(self) -> int:
        return self._version

    # ------------------------------------------------------------------ transport
    def _read_loop(self) -> None:
        try:
            while True:
                rid, ok, value = recv_frame(self.sock)
                with self._lock:
                    resolve = self._pending.pop(rid, None)
                if resolve is not None:
                    resolve(ok, value)
        except Exception as e:  # end of stream, the socket closed by close(), or a garbled frame: all fatal
            self._fail(self._death_reason(e))

    def _death_reason(self, e: BaseException) -> str:
        if self._dead is not None:
            return self._dead
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        state = f"exited with {code}" if code is not None else f"closed its connection ({type(e).__name__})"
        return f"embedded worker (pid {self.proc.pid}) {state}"

    def _fail(self, reason: str) -> None:
        with self._lock:
            if self._dead is None:
                self._dead = reason
            pending, self._pending = list(self._pending.values()), {}
        for resolve in pending:
            resolve(False, ("EngineDeadError", reason))

    def _submit(self, op: str, args: Any, resolve: Callable[[bool, Any], None]) -> int:
        rid = next(self._ids)
        with self._lock:
            if self._dead is not None:
                raise EngineDeadError(self._dead)
            self._pending[rid] = resolve
        try:
            with self._send_lock:
                self.sock.sendall(encode((op, rid, args)))
        except OSError as e:
            self._fail(self._death_reason(e))
            raise EngineDeadError(self._dead or "embedded worker is gone") from None
        return rid

    def _forget(self, rid: int, op: str) -> None:
        with self._lock:
            self._pending.pop(rid, None)
        if op == "generate" and self._dead is None:
            try:
                with self._send_lock:
                    self.sock.sendall(encode(("cancel", rid, None)))
            except OSError:
                pass  # the reader thread reports the death

    async def _call(self, op: str, args: Any = None, *, timeout_s: Optional[float] = None) -> Any:
        """Send one request and wait for its answer; ``RequestTimeout`` after ``timeout_s``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def resolve(ok: bool, value: Any) -> None:
            with contextlib.suppress(RuntimeError):  # that loop is closed: its caller is gone
                loop.call_soon_threadsafe(_settle, fut, ok, value)

        rid = self._submit(op, args, resolve)
        try:
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            self._forget(rid, op)
            raise RequestTimeout(f"embedded worker: {op} exceeded {timeout_s} s") from None
        except asyncio.CancelledError:
            self._forget(rid, op)
            raise

    def _call_sync(self, op: str, args: Any = None, *, timeout_s: float) -> Any:
        """The blocking twin of :meth:`_call` (start-up weights, shutdown from sync code)."""
        fut: Future = Future()
        rid = self._submit(op, args, lambda ok, value: _settle(fut, ok, value))
        try:
            return fut.result(timeout=timeout_s)
        except TimeoutError:
            self._forget(rid, op)
            raise RequestTimeout(f"embedded worker: {op} exceeded {timeout_s} s") from None

    # ------------------------------------------------------------------ RolloutEngine
    async def generate(
        self, prompt_ids: List[int], params: SamplingParams, *, timeout_s: Optional[float] = None
    ) -> List[Completion]:
        return await self._call("generate", (list(prompt_ids), params, timeout_s), timeout_s=timeout_s)

    async def abort_all(self) -> None:
        await self._call("abort_all", timeout_s=self.control_timeout_s)

    async def pause(self) -> None:
        await self._call("pause", timeout_s=self.control_timeout_s)

    async def resume(self) -> None:
        await self._call("resume", timeout_s=self.control_timeout_s)

    async def release_memory(self) -> None:
        await self._call("release_memory", timeout_s=self.control_timeout_s)

    async def resume_memory(self) -> None:
        await self._call("resume_memory", timeout_s=self.control_timeout_s)

    async def update_weights(self, named_tensors: NamedTensors, version: int) -> None:
        """Copy the bucket into shared memory, let the worker's engine load it, stamp ``version``.
        The engine checks every name and shape before it loads anything; its ``KeyError`` /
        ``ValueError`` is raised here."""
        path, layout = self._begin_update(named_tensors)
        try:
            self._version = await self._call("update_weights", (path, layout, int(version)),
                                             timeout_s=self.control_timeout_s)  # fmt: skip
        finally:
            self._end_update()

    def update_weights_sync(self, named_tensors: NamedTensors, version: int) -> None:
        path, layout = self._begin_update(named_tensors)
        try:
            self._version = self._call_sync("update_weights", (path, layout, int(version)),
                                            timeout_s=self.control_timeout_s)  # fmt: skip
        finally:
            self._end_update()

    def _begin_update(self, named_tensors: NamedTensors) -> Any:
        # One shared buffer: a second update while the worker still reads the first would overwrite it.
        with self._lock:
            if self._updating:
                raise EngineError("embedded worker: update_weights is already in progress (one at a time)")
            self._updating = True
        try:
            return self._shared.pack(list(named_tensors))
        except BaseException:
            self._updating = False
            raise

    def _end_update(self) -> None:
        self._shared.mapped()
        self._updating = False

    async def health(self) -> bool:
        if self._dead is not None:
            return False
        try:
            return bool(await self._call("health", timeout_s=min(10.0, self.control_timeout_s)))
        except EngineError:
            return False

    async def shutdown(self) -> None:
        await asyncio.to_thread(self.close)

    def close(self) -> None:
        """Stop the worker (a polite ``shutdown`` first, then SIGTERM/SIGKILL by PID) and free the
        shared buffer; later calls raise :class:`EngineDeadError`. Idempotent."""
        if self._dead is None and self.proc.poll() is None:
            with contextlib.suppress(EngineError, subprocess.TimeoutExpired):  # dead or stuck: signals end it
                self._call_sync("shutdown", timeout_s=10.0)
                self.proc.wait(timeout=10.0)  # it exits by itself once it answered
        stop_process(self.proc, timeout_s=5.0)
        self._fail(f"embedded worker (pid {self.proc.pid}) was shut down")
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5.0)
        self._finalizer()  # closes the socket; the process is already reaped
        self._shared.close()


def _settle(fut: Any, ok: bool, value: Any) -> None:
    if fut.done():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(error_from(value))


def _handshake(proc: subprocess.Popen, sock: socket.socket, spec: Dict[str, Any], timeout_s: float) -> Any:
    """Send the engine spec, wait for the worker's ready answer (or its death, or the deadline)."""
    sock.sendall(encode(("init", 0, spec)))
    deadline = time.monotonic() + timeout_s
    result: List[Any] = []
    waiter = threading.Thread(target=lambda: result.append(_recv_or_error(sock)), daemon=True)
    waiter.start()
    while waiter.is_alive():
        waiter.join(timeout=0.2)
        if proc.poll() is not None and waiter.is_alive():
            waiter.join(timeout=1.0)  # its answer may still be in the socket
            break
        if time.monotonic() > deadline:
            raise EngineError(f"embedded worker (pid {proc.pid}) not ready after {timeout_s} s")
    if not result or isinstance(result[0], BaseException):
        raise EngineError(f"embedded worker (pid {proc.pid}) exited with {proc.poll()} before it was ready")
    _, ok, value = result[0]
    if not ok:
        raise EngineError(f"embedded worker could not build its engine: {value[0]}: {value[1]}")
    return value


def _recv_or_error(sock: socket.socket) -> Any:
    try:
        return recv_frame(sock)
    except (OSError, EOFError) as e:
        return e
