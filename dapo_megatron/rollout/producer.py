"""The rollout producer of asynchronous DAPO (``rollout.max_staleness = K >= 1``), below the loop.

The loop stays generate -> train -> sync; the producer makes the generation of step t + 1 overlap
the training of step t. Timeline on trainer rank 0 (versions: the engines serve version t - 1 while
step t is collected and trained; the sync of step t stamps version t)::

    batch(t)   finish step t's batch with the streaming rollout (dynamic sampling as always): first
               continue the groups in progress and offer the finished unused ones, then refill.
               Work whose oldest token is older than t - 1 - K is dropped (finished groups) or
               re-generated (groups in progress), and counted. Then start the head start of t + 1:
                 overlap: in a background thread driving the session's event loop, while the actor
                          trains (the engines decode in their own threads or processes, so the two
                          really run at once);
                 fixed:   right now, every request stopping at a fixed point (half of the response
                          budget), so a run is reproducible.
    pause()    before the weight sync: interrupt the head start (in-flight requests are aborted and
               keep their tokens: partial rollouts), wait for the thread. Engines are then idle, the
               update cannot interleave with a decode step, and the event loop is free again for the
               sync and evaluation on the main thread.

Invariant (checked on every batch): every token of a batch trained at step t has a version in
``[t - 1 - K, t - 1]``. A batch's tokens are as old as one head start allows, so staleness is at most 1
unless a trajectory in progress survives several updates (up to K).

Resume: the head start is paused before every checkpoint (the sync precedes the save), so the
rollout's state (carried groups, groups in progress with tokens, log-probs and per-token versions,
group ids, dynamic-sampling counters) is complete in ``StreamingRollout.state_dict``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from dapo_megatron.algo.staleness import staleness_histogram
from dapo_megatron.types import Group


class AsyncProducer:
    """Drives ``rollout`` (a ``StreamingRollout`` built with ``keep_partial=True``) on ``loop``.

    Args:
        rollout: the streaming rollout; its ``state_dict`` is the producer's checkpoint state.
        prompts: the prompt source ``source(k) -> List[PromptItem]``.
        loop: the session's private event loop (owned by the main thread except during a head start).
        max_staleness: K >= 1.
        interleave: ``overlap`` or ``fixed`` (see the module docstring).
        max_response_len: the response budget; ``fixed`` interrupts requests at half of it.
    """

    def __init__(self, rollout: Any, prompts: Callable, loop: asyncio.AbstractEventLoop, *, max_staleness: int,
                 interleave: str, max_response_len: int):  # fmt: skip
        if max_staleness < 1 or interleave not in ("overlap", "fixed"):
            raise ValueError(f"AsyncProducer: need max_staleness >= 1 and interleave overlap|fixed, got "
                             f"{max_staleness}, {interleave!r}")  # fmt: skip
        self.rollout, self.prompts, self.loop = rollout, prompts, loop
        self.max_staleness, self.interleave = max_staleness, interleave
        self.segment_cap = max(1, max_response_len // 2)
        self._thread: Optional[threading.Thread] = None
        self._interrupt: Optional[asyncio.Event] = None
        self._head: Dict[str, Any] = {}  # the last head start's metrics, or its exception

    def batch(self, step: int) -> Tuple[List[Group], Dict[str, float]]:
        """Step ``step``'s groups (sorted by prompt index) and metrics; then the next head start."""
        self.pause()  # normally done by the weight sync already
        self.rollout.min_version = step - 1 - self.max_staleness
        groups, stats = self.loop.run_until_complete(self.rollout.run(self.prompts))
        stats.update(version_metrics(groups, current=step - 1, max_staleness=self.max_staleness))
        stats.update({f"async/{k}": float(v) for k, v in self.rollout.stale.items()})
        self.rollout.stale = dict.fromkeys(self.rollout.stale, 0)
        self._start_head_start()
        return groups, stats

    def _start_head_start(self) -> None:
        self._interrupt, self._head = asyncio.Event(), {}
        if self.interleave == "fixed":
            coro = self.rollout.head_start(self.prompts, self._interrupt, segment_cap=self.segment_cap)
            self._head = self.loop.run_until_complete(coro)
            return
        self._thread = threading.Thread(target=self._head_start_thread, name="dapo-head-start", daemon=True)
        self._thread.start()

    def _head_start_thread(self) -> None:
        assert self._interrupt is not None
        try:
            self._head = self.loop.run_until_complete(self.rollout.head_start(self.prompts, self._interrupt))
        except BaseException as e:  # noqa: BLE001 - re-raised on the main thread by pause()
            self._head = {"error": e}

    def pause(self) -> Dict[str, float]:
        """Stop the head start (abort in flight, keep tokens) and return its metrics: how long it ran
        (``async/head_start_s``: generation concurrent with the trainer in ``overlap``), the tokens
        it produced, and how long the trainer waited for the interruption (``async/pause_wait_s``)."""
        start = time.perf_counter()
        if self._thread is not None:
            if self._thread.is_alive() and self._interrupt is not None:
                self.loop.call_soon_threadsafe(self._interrupt.set)
            self._thread.join()
            self._thread = None
        head, self._head = self._head, {}
        if "error" in head:
            raise head["error"]
        if not head:
            return {}
        return {**head, "async/pause_wait_s": time.perf_counter() - start}

    def close(self) -> None:
        """Stop a running head start (errors are moot at teardown)."""
        with contextlib.suppress(Exception):  # closing after a failure must not mask it
            self.pause()


def version_metrics(groups: List[Group], *, current: int, max_staleness: int) -> Dict[str, float]:
    """Per-token staleness (``current`` minus the token's weight version) of a batch: the
    ``staleness/*`` histogram (``algo/staleness.py``: token counts per staleness ``0..K``, mean, max)
    and ``async/mixed_version_samples``, the fraction of samples whose tokens mix versions (partial
    rollouts continued across an update). Raises ``RuntimeError`` when a token is newer than
    ``current`` or older than ``K`` allows: the off-policy correction assumes the bound."""
    samples = [s for g in groups for s in g.samples]
    versions = [v for s in samples for v in s.versions()]
    try:
        hist = staleness_histogram(versions, current, max_staleness)
    except ValueError as e:
        raise RuntimeError(f"a batch breaks rollout.max_staleness={max_staleness}: {e}") from None
    mixed = sum(len(set(s.versions())) > 1 for s in samples)
    return {**hist.metrics(), "async/mixed_version_samples": mixed / len(samples) if samples else 0.0}
