"""Run a function on N fresh processes that form one torch.distributed world (gloo on CPU).

    results = run_distributed(fn, 2, arg1, arg2)   # fn(rank, world_size, arg1, arg2) on each rank

``fn`` must be a module-level (picklable) function. Each rank is a fresh ``spawn`` interpreter with
``OMP_NUM_THREADS=1`` and torchrun-style variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` on a free port), so ``dapo_megatron.parallel.init.init_distributed()``
works unchanged inside it. ``fn`` itself creates (and should destroy) the process group.

Results come back per rank, in rank order, pickled by value through a queue (tensors included).
If any rank raises, the harness kills the others and raises :class:`DistributedFailure` carrying
that rank's traceback text. If the ranks do not all finish within ``timeout_s``, every rank is
killed and ``DistributedTimeout`` is raised.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")


class DistributedFailure(RuntimeError):
    """A rank raised; the message holds its traceback text."""


class DistributedTimeout(RuntimeError):
    """The ranks did not all finish in time; all were killed."""


def free_port() -> int:
    """A TCP port that was free a moment ago (bind port 0, read it back, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(rank, world_size, *args)
    except BaseException:  # noqa: BLE001 - everything goes back to the parent as text
        results.put((rank, False, traceback.format_exc()))
        return
    try:
        # Plain pickle bytes: tensors travel by value. The queue's own pickler would share tensor storage
        # through file descriptors that vanish when this process exits before the parent reads them.
        payload = pickle.dumps(value)
    except Exception:  # noqa: BLE001 - an unpicklable result is reported, not hung on
        results.put((rank, False, f"rank {rank}: result could not be pickled:\n{traceback.format_exc()}"))
        return
    results.put((rank, True, payload))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 300) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return results by rank."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # spawn children inherit os.environ at start; OMP_NUM_THREADS must be set before torch is imported
    # there, so set it (and nothing else) around the start and restore the parent's value after.
    saved = {k: os.environ.get(k) for k in _ENV_KEYS}
    procs = []
    try:
        for key in _ENV_KEYS:
            os.environ.pop(key, None)
        os.environ["OMP_NUM_THREADS"] = "1"
        for rank in range(world_size):
            p = ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, args, results), daemon=True)
            p.start()
            procs.append(p)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    try:
        return _collect(procs, results, world_size, timeout_s)
    finally:
        _kill_all(procs)
        results.close()


def _collect(procs: list, results: Any, world_size: int, timeout_s: float) -> list[Any]:
    deadline = time.monotonic() + timeout_s
    outcome: dict[int, Any] = {}
    dead_since: dict[int, float] = {}
    while len(outcome) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(outcome))
            raise DistributedTimeout(f"ranks {missing} did not finish within {timeout_s:.0f} s; all ranks killed")
        try:
            rank, ok, value = results.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            _check_dead(procs, outcome, dead_since)
            continue
        if not ok:
            raise DistributedFailure(f"rank {rank} of {world_size} raised:\n{value}")
        outcome[rank] = pickle.loads(value)
    return [outcome[r] for r in range(world_size)]


_DEAD_GRACE_S = 3.0


def _check_dead(procs: list, outcome: dict[int, Any], dead_since: dict[int, float]) -> None:
    """A rank that exited without reporting (segfault, os._exit, OOM kill) fails the run.

    A rank that reported and then exited may still have its result in flight in the queue, so a
    dead rank only counts as failed after a grace period of further queue reads.
    """
    now = time.monotonic()
    for rank, p in enumerate(procs):
        if rank in outcome or p.is_alive():
            continue
        first_seen = dead_since.setdefault(rank, now)
        if now - first_seen > _DEAD_GRACE_S:
            raise DistributedFailure(f"rank {rank} exited with code {p.exitcode} without reporting a result")


def _kill_all(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=10)
