"""Symbolic-equivalence reward with math-verify, run in worker processes under a hard timeout.

Why processes: math-verify bounds its own work with ``signal.alarm``, which only works on the main
thread of the main interpreter, and a sympy computation stuck on a huge number (``9^{9^{9^9}}``)
cannot be interrupted from another thread at all. So each call is shipped to a worker process
(:mod:`.math_verify_worker`) that runs ``parse``/``verify`` with math-verify's own timeouts off, and
the caller waits at most ``timeout_s`` for the reply; a worker that overruns is killed (SIGKILL) and
replaced. The caller only slices strings and does pipe I/O, so the scorer works from any thread.

Workers are plain ``subprocess`` children running ``python -c``: ``multiprocessing``'s spawn and
forkserver modes would re-import the trainer's ``__main__`` in every worker, and forking a process
that holds threads (torch, HTTP clients) is unsafe. A fresh worker needs about a second to import
sympy. The first worker's import is bounded separately by ``startup_timeout_s`` (paid once per scorer,
up front by ``warmup()``); after that every start-up counts inside a call's ``timeout_s``. To keep
that from costing answers, the pool keeps a warm spare: whenever a call takes the last idle worker,
another one starts importing, so the call after a kill finds a ready worker instead of waiting for a
replacement's imports on top of its own timeout.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import selectors
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Optional

from dapo_megatron.rewards.base import MAX_GROUND_TRUTH_CHARS, RewardResult, wrong
from dapo_megatron.rewards.dapo_math import ANSWER_PATTERN, TAIL_CHARS

_MISSING = (
    "The math_verify reward needs the `math_verify` package; install the extra with "
    "`pip install 'dapo_megatron[math_verify]'` (or `pip install math-verify`)."
)


_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_WORKER_CODE = (
    f"import sys; sys.path.insert(0, {_PACKAGE_ROOT!r}); "
    "from dapo_megatron.rewards.math_verify_worker import main; main()"
)


def _require_math_verify() -> None:
    try:
        found = importlib.util.find_spec("math_verify") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ImportError(_MISSING)


def prediction_text(response: str) -> tuple[str, bool]:
    """The text handed to math-verify for a response, and whether it came from an ``Answer:`` line.

    Like the DAPO scorer, only the last ``TAIL_CHARS`` characters count and the last ``Answer: ...``
    line wins; without one, the whole tail is passed so math-verify can find a ``\\boxed{}`` in it.
    """
    tail = response[-TAIL_CHARS:]
    matches = ANSWER_PATTERN.findall(tail)
    if matches:
        return matches[-1].strip(), True
    return tail, False


class _Worker:
    """One worker process and the parent's ends of its pipes (JSON lines, see the worker module)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._stdin = self.proc.stdin
        self._fd = self.proc.stdout.fileno()
        self._selector = selectors.DefaultSelector()  # poll/epoll: no FD_SETSIZE limit, unlike select()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buf = b""
        self.ready = False
        self.started = time.monotonic()

    def read_message(self, timeout_s: float) -> Optional[dict[str, Any]]:
        """The next JSON line from the worker, or None if none is complete within ``timeout_s``
        (0: only what is already in the pipe).

        Raises EOFError when the worker has exited.
        """
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            if not self._selector.select(max(0.0, deadline - time.monotonic())):
                return None
            chunk = os.read(self._fd, 65536)
            if not chunk:
                raise EOFError("math-verify worker exited")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        message = json.loads(line)
        return message if isinstance(message, dict) else None

    def wait_ready(self, timeout_s: float) -> bool:
        """Whether the worker has imported math-verify, waiting at most ``timeout_s``.

        Raises EOFError when it has exited, RuntimeError when it reported that the import failed.
        """
        if not self.ready:
            message = self.read_message(timeout_s)
            if message is not None and message.get("ready") is not True:
                raise RuntimeError(f"math-verify worker failed to start: {message.get('error')}")
            self.ready = message is not None
        return self.ready

    def send(self, message: dict[str, Any]) -> None:
        self._stdin.write(json.dumps(message).encode("ascii") + b"\n")
        self._stdin.flush()

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(timeout=2.0)
        with contextlib.suppress(Exception):
            self._selector.close()
            self._stdin.close()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


_POLL_S = 0.05
"""How often a call waiting for its worker's imports checks whether another worker became idle."""


def _kill_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().kill()


class MathVerifyScorer:
    """``RewardFn`` judging answers by symbolic equivalence (math-verify), bounded by ``timeout_s``.

    Args:
        timeout_s: wall-clock bound, in seconds, on one call once the scorer is warm, including any
            wait for a worker to finish its imports; on overrun the worker is killed (or, if it was
            still starting, left to finish) and the answer scored wrong.
        max_idle_workers: idle worker processes kept for reuse (the warm spare is one of them).
            Concurrent calls (from several threads) each get their own worker, so calls never queue
            behind each other.
        startup_timeout_s: bound on the *first* worker's imports (a cold scorer: ``warmup()`` or
            the first calls); also the age at which a worker still importing is presumed stuck.

    Raises:
        ImportError: at construction, when math-verify is not installed (the ``math_verify`` extra).
        ValueError: for a non-positive ``timeout_s`` or ``max_idle_workers`` < 1.

    Invariants: once warm, a call returns within ``timeout_s`` plus the few milliseconds of a kill
    and a spawn, also right after another call's worker was killed (a spare was already importing).
    Calls never raise: any failure (timeout, dead worker, non-string or over-long input) gives
    ``RewardResult(-1.0, False, pred)``; ``pred`` is the answer text math-verify extracted, or
    ``"[INVALID]"``. ``close()`` (or leaving a ``with`` block) stops the workers; they also stop at
    interpreter exit, when the scorer is garbage-collected, or when their parent dies.
    """

    def __init__(self, timeout_s: float, max_idle_workers: int = 4, startup_timeout_s: float = 120.0) -> None:
        if not timeout_s > 0:
            raise ValueError(f"reward.timeout_s must be > 0, got {timeout_s!r}")
        if max_idle_workers < 1:
            raise ValueError(f"max_idle_workers must be >= 1, got {max_idle_workers!r}")
        _require_math_verify()
        self.timeout_s = float(timeout_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._max_idle = max_idle_workers
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False
        self._warm = False  # a worker has been ready once: from then on start-ups count in the budget
        self._finalizer = weakref.finalize(self, _kill_all, self._idle)

    # Worker pool ----------------------------------------------------------------------------------

    def _take(self) -> _Worker:
        """An idle worker (a ready one first, else the oldest), or a new one; when this empties the
        pool, a spare starts importing now so that the next call finds it ready."""
        with self._lock:
            if self._closed:
                raise RuntimeError("MathVerifyScorer is closed")
            worker = self._pop_best_locked()
        if worker is None:
            worker = _Worker()
        self._ensure_spare()
        return worker

    def _pop_best_locked(self) -> Optional[_Worker]:
        best: Optional[_Worker] = None
        for w in list(self._idle):  # oldest first
            try:
                stuck = not w.wait_ready(0.0) and time.monotonic() - w.started > self.startup_timeout_s
            except Exception:  # exited, or reported a failed import
                stuck = True
            if stuck:
                self._idle.remove(w)
                w.kill()
            elif best is None or (w.ready and not best.ready):
                best = w
        if best is not None:
            self._idle.remove(best)
        return best

    def _ensure_spare(self) -> None:
        with self._lock:
            needed = not self._closed and not self._idle
        if needed:
            with contextlib.suppress(Exception):
                self._give_back(_Worker())

    def _give_back(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(worker)
                return
        worker.kill()

    def _discard(self, worker: _Worker) -> None:
        worker.kill()
        self._ensure_spare()

    def warmup(self) -> bool:
        """Start a worker (and the spare) and wait until it has imported math-verify; True on success."""
        worker = self._take()
        try:
            ok = worker.wait_ready(self.startup_timeout_s)
        except Exception:
            ok = False
        if ok:
            self._warm = True
            self._give_back(worker)
        else:
            self._discard(worker)
        return ok

    def close(self) -> None:
        """Stop the idle workers; later calls score wrong."""
        with self._lock:
            self._closed = True
        self._finalizer()

    def __enter__(self) -> MathVerifyScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Scoring --------------------------------------------------------------------------------------

    def _run(self, job: dict[str, Any]) -> Optional[dict[str, Any]]:
        """The worker's reply to ``job``, or None (timed out, no worker ready in time, or failed)."""
        deadline = time.monotonic() + self.timeout_s
        taken = self._take()
        worker: Optional[_Worker] = taken
        reply: Optional[dict[str, Any]] = None
        try:
            if not taken.ready:
                cold = not self._warm  # the first import is paid once, outside the budget
                worker = self._wait_for_ready(taken, time.monotonic() + self.startup_timeout_s if cold else deadline)
                if worker is None:
                    return None
                self._warm = True
                if cold:
                    deadline = time.monotonic() + self.timeout_s
            ready: _Worker = worker if worker is not None else taken
            ready.send(job)
            reply = ready.read_message(max(0.0, deadline - time.monotonic()))
        finally:
            if worker is not None and reply is not None:
                self._give_back(worker)
            elif worker is not None:
                self._discard(worker)  # timed out mid-job, failed to start, or died: never reuse it
        return reply

    def _wait_for_ready(self, worker: _Worker, end: float) -> Optional[_Worker]:
        """``worker`` once ready, or an idle one that becomes ready first (another thread's call
        ended), polling until ``end``; None when neither happens. A worker still importing is
        handed back to the pool, not killed: its start-up is not wasted."""
        while True:
            if worker.wait_ready(min(_POLL_S, max(0.0, end - time.monotonic()))):
                return worker
            other = self._pop_ready()
            if other is not None or time.monotonic() >= end:
                self._give_back(worker)
                return other

    def _pop_ready(self) -> Optional[_Worker]:
        with self._lock:
            for w in self._idle:
                with contextlib.suppress(Exception):
                    if w.wait_ready(0.0):
                        self._idle.remove(w)
                        return w
        return None

    def __call__(self, response: str, ground_truth: str) -> RewardResult:
        try:
            if not isinstance(response, str) or not isinstance(ground_truth, str):
                return wrong()
            if len(ground_truth) > MAX_GROUND_TRUTH_CHARS:  # refused at load time; keeps requests small
                return wrong()
            pred_text, answer_line = prediction_text(response)
            reply = self._run({"gold": ground_truth, "pred": pred_text, "answer_line": answer_line})
            if reply is None:
                return wrong()
            acc = reply.get("acc") is True
            pred = str(reply.get("pred", ""))
            return RewardResult(score=1.0 if acc else -1.0, acc=acc, pred=pred)
        except Exception:  # untrusted input must never take the trainer down
            return wrong()
