"""Rank-0-only work that the other trainer ranks wait out on the rendezvous store, not in a collective.

Trainer rank 0 drives the engines: it generates a step's rollout, evaluates, starts the engines.
That can take an hour at 20k-token responses. A rank that waited for it inside a collective
(``broadcast_object_list``) would be killed by the collective timeout (and, on GPUs, by the NCCL
watchdog) long before. So the waiting ranks poll a key of rank 0's TCP store instead:

    rank 0:  outcome = run the work; store.set(key, "ok" | "error:<message>")
    others:  store.wait([key], poll) until it is there; raise if it says "error"

A store wait has its own timeout per poll (:data:`POLL_S`), retried without limit, and no process
group is involved. A rank 0 that dies takes its store server with it, so the waiting ranks get a
connection error at their next poll and raise :class:`Rank0LostError` instead of waiting forever.

Keys are per phase and step (``dapo/generate/3``), written once; each is a few bytes in rank 0's
store (kept: deleting needs to know that every rank has read it, which costs another round).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any, Optional, TypeVar

__all__ = ["POLL_S", "Rank0Failed", "Rank0LostError", "publish", "rank0_then_all", "wait_for_rank0"]

POLL_S = 5.0  # one blocking store wait per POLL_S per waiting rank: cheap for rank 0's store server
_OK = b"ok"
_ERROR = b"error:"
T = TypeVar("T")


class Rank0Failed(RuntimeError):
    """On a rank other than 0: rank 0's work raised; the message quotes rank 0's error."""


class Rank0LostError(RuntimeError):
    """On a rank other than 0: rank 0's store stopped answering while this rank waited (rank 0 died)."""


def publish(store: Any, key: str, error: Optional[str]) -> None:
    """Rank 0: say that the work under ``key`` is done (``error`` None) or failed with ``error``."""
    store.set(key, _OK if error is None else _ERROR + error.encode("utf-8", "replace"))


def wait_for_rank0(store: Any, key: str, *, what: str, poll_s: float = POLL_S) -> None:
    """A rank other than 0: block until rank 0 publishes ``key``; raise :class:`Rank0Failed` with its
    error, or :class:`Rank0LostError` when its store is gone. ``what`` names the work in messages."""
    import torch.distributed as dist

    while True:
        try:
            store.wait([key], timedelta(seconds=poll_s))
            break
        except dist.DistStoreError:  # this poll's timeout: rank 0 is still working
            continue
        except dist.DistNetworkError as e:
            raise Rank0LostError(
                f"trainer rank 0 stopped answering while this rank waited for its {what} ({key}): "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
            ) from e
    value = store.get(key)
    if value.startswith(_ERROR):
        raise Rank0Failed(f"{what} failed on trainer rank 0: {value[len(_ERROR) :].decode('utf-8', 'replace')}")


def rank0_then_all(store: Any, key: str, rank0: bool, work: Callable[[], T], *, what: str) -> Optional[T]:
    """Run ``work`` on rank 0 while the other ranks wait on ``store``; every rank learns the outcome.

    Returns ``work()``'s value on rank 0 and ``None`` elsewhere. Rank 0 re-raises its own exception
    (after publishing it); the others raise :class:`Rank0Failed` quoting it. ``store`` None means a
    single rank: ``work`` runs and raises as it is.
    """
    if store is None:
        return work() if rank0 else None
    if not rank0:
        wait_for_rank0(store, key, what=what)
        return None
    try:
        out = work()
    except Exception as e:  # noqa: BLE001 - re-raised right after telling the other ranks
        publish(store, key, f"{type(e).__name__}: {e}")
        raise
    publish(store, key, None)
    return out


def world_store() -> Any:
    """The rendezvous store when several trainer ranks run, else ``None`` (nothing to wait for)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return None
    from dapo_megatron.parallel.init import rendezvous_store

    return rendezvous_store()
