"""Wall time per phase of a training step.

    timer = PhaseTimer()
    with timer("generate"):
        groups = engine.generate(...)
    with timer("train"):
        actor.train_step(batch)
    logger.log(step, {**stats, **timer.metrics()})   # {"time/generate_s": 41.2, "time/train_s": 30.7}
    timer.reset()

Entering the same phase twice in one step adds up (dynamic sampling generates several rounds).
GPU work is asynchronous: pass ``synchronize=torch.cuda.synchronize`` so a phase's time includes
the kernels it launched rather than only their launch.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, Optional

from dapo_megatron.observability.metric_names import time_key


class PhaseTimer:
    """Accumulates seconds per phase name until :meth:`reset`.

    Args:
        synchronize: called before the clock is read on entry and exit (e.g. ``torch.cuda.synchronize``).
        clock: monotonic seconds; ``time.perf_counter`` unless a test injects one.
    """

    def __init__(
        self,
        synchronize: Optional[Callable[[], None]] = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._sync = synchronize
        self._clock = clock
        self._totals: Dict[str, float] = {}
        self._open: set = set()

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        """Time the ``with`` body and add it to ``phase`` (also when the body raises)."""
        if phase in self._open:
            raise RuntimeError(f"phase {phase!r} is already being timed; nested timing would count it twice")
        self._open.add(phase)
        start = self._now()
        try:
            yield
        finally:
            self._totals[phase] = self._totals.get(phase, 0.0) + (self._now() - start)
            self._open.discard(phase)

    def seconds(self, phase: str) -> float:
        """Accumulated seconds of ``phase`` (0.0 when it has not run)."""
        return self._totals.get(phase, 0.0)

    def metrics(self) -> Dict[str, float]:
        """``{"time/<phase>_s": seconds}`` for every phase timed since the last reset."""
        return {time_key(phase): total for phase, total in self._totals.items()}

    def reset(self) -> None:
        """Forget all totals (call once per step, after logging)."""
        self._totals.clear()

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return self._clock()
