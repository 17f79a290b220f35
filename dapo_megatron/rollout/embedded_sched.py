"""Continuous batching for the embedded engine: one decode thread steps every request in flight.

Newly admitted requests are prefilled together, up to ``PREFILL_ROWS`` prompts of one padded width
per forward (a prompt's keys/values are copied into its ``n`` slots and its last logits give each
row's first token), and join the next decode step. Each decode step is one forward pass over the
first ``rows`` slots of the :class:`SlotCache` (``[rows, 1]`` tokens, each row its last sampled token),
``rows`` the smallest batch-invariant decode shape that holds every running row (rows past it move
down first: ``_compact``), so a step over a few requests stays small. A finished row frees its slot at
once; an aborted request leaves at the next step boundary with the tokens it has.

Reproducibility: a request owns a ``torch.Generator`` seeded with its seed and draws ``n`` uniforms at
its prefill and at each of its decode steps (one per row, finished rows included, so the stream
depends only on the step count). The prefill runs in a shape fixed by the request's own prompt
length, the decode step in shapes checked at start-up to give every row the same bits, and the
sampler is row-wise (see ``embedded_cache``). So
a request's completions depend on its prompt, parameters, seed and the weights, never on which other
requests share the batch or when they arrived.

Locking: ``cv`` (a ``threading.Condition``) guards the queues, slots, ``loading`` and the request
states; the forward runs outside it (under ``model_lock``) so submissions and aborts never wait for a
step. Weights change only while no request is active (see ``EmbeddedEngine.update_weights_sync``).
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import torch

from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.embedded_sampling import sample_rows

_IDLE_EXIT_S = 2.0  # an idle decode thread exits (and frees the engine for GC); a request restarts it
_POLL_S = 0.05  # a waiting decode thread re-checks cancellations this often


@dataclass(eq=False)
class Request:
    """One prompt's ``n`` rows in the scheduler. ``tokens/logps/reasons`` are per row; a reason of
    None means the row is still running. ``limit``: max new tokens that fit the cache width."""

    prompt: List[int]
    params: SamplingParams
    generator: torch.Generator
    aborted: Callable[[], bool]
    limit: int
    stop: frozenset
    tokens: List[List[int]] = field(default_factory=list)
    logps: List[List[float]] = field(default_factory=list)
    reasons: List[Optional[str]] = field(default_factory=list)
    slots: List[Optional[int]] = field(default_factory=list)  # slot of row j, None once it left
    fed: int = 0  # positions in the cache so far (the next decode step writes position ``fed``)
    version: int = 0
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)
    callbacks: List[Callable[[], None]] = field(default_factory=list)
    # return_routed_experts: the prompt's [P, layers, k] ids (set by the prefill), and per row one
    # [layers, k] per decode step (the routing of the token that step fed); see embedded_routing.
    prompt_routes: Optional[torch.Tensor] = None
    routes: List[List[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = self.params.n
        self.tokens, self.logps, self.reasons = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        self.routes = [[] for _ in range(n)]

    def draw(self) -> List[float]:
        """The ``n`` uniforms of this request's next sampling step."""
        return torch.rand(self.params.n, generator=self.generator, dtype=torch.float64).tolist()


def _first_tokens(logits: torch.Tensor, req: Request) -> Tuple[list, list]:
    """Each of the request's ``n`` rows draws its first token from the prompt's last ``logits`` ``[V]``."""
    p, rows = req.params, req.params.n
    logp = torch.log_softmax(logits.float()[None, :].expand(rows, -1) / p.temperature, dim=-1)
    dev = logp.device
    top_p = torch.full((rows,), p.top_p, dtype=torch.float32, device=dev)
    top_k = torch.full((rows,), p.top_k, dtype=torch.long, device=dev)
    tokens = sample_rows(logp, top_p, top_k, torch.tensor(req.draw(), dtype=torch.float64, device=dev))
    return tokens.tolist(), logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()


class Scheduler:
    """The decode thread and its queues for one engine (``engine`` gives model, version, liveness)."""

    def __init__(self, engine: Any, slots: int, width: int):
        self.engine, self.slots, self.width = engine, slots, width
        self.cv = threading.Condition()
        self.model_lock = threading.Lock()
        self.pending: Deque[Request] = deque()
        self.active: List[Request] = []
        self.free: List[int] = list(range(slots))
        self.loading = 0  # weight loads waiting or running: admission stops
        self.forwards = 0  # decode steps run (tests count them)
        self.prefills = 0  # prefill forwards run (each up to PREFILL_ROWS prompts)
        self.rows_decoded = 0  # rows computed by the decode steps (busy or idle)
        self.rows_busy = 0  # of those, rows of a running request
        self._cache: Any = None
        self._shapes: List[int] = [slots]  # decode row counts, ascending (set with the cache)
        self._recorder: Any = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------------ called by the engine
    def submit(self, reqs: List[Request]) -> None:
        """Queue ``reqs`` together (so the decode thread can admit and prefill them in one go)."""
        with self.cv:
            self.pending.extend(reqs)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="embedded-decode", daemon=True)
                self._thread.start()
            self.cv.notify_all()

    def kick(self) -> None:
        """Wake the decode thread (an abort or a cancellation to act on)."""
        with self.cv:
            self.cv.notify_all()

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.active or self.loading)

    # ------------------------------------------------------------------ the decode thread
    def _run(self) -> None:
        with torch.no_grad():  # grad mode is per thread
            while True:
                admitted = self._next_admissions()
                if admitted is None:
                    return
                try:
                    self._prefill(admitted)
                    plan = self._plan()
                    if plan is None:
                        continue
                    routes = any(r.params.return_routed_experts for r in plan[0])
                    out = self._forward(*plan[1:], routes=routes)
                except Exception as e:  # noqa: BLE001 - a failed step fails its requests, not the thread
                    self._fail(e)
                    continue
                self._apply(plan[0], out)

    def _next_admissions(self) -> Optional[List[Request]]:
        """Drop aborted requests and admit pending ones (returned, to prefill); None: the thread exits."""
        with self.cv:
            while True:
                self._drop_aborted()
                admitted = self._admit()
                if self.active:
                    return admitted
                if not self.engine.alive and not self.pending:
                    self._thread = None
                    return None
                if not self.cv.wait(_IDLE_EXIT_S if not self.pending else _POLL_S) and not self.pending:
                    self._thread = None
                    return None

    def _drop_aborted(self) -> None:
        for req in [r for r in self.active if r.aborted()]:
            self._finish(req, "abort")
        for req in [r for r in self.pending if r.aborted() or not self.engine.alive]:
            self.pending.remove(req)
            req.version = self.engine.weight_version
            self._finish(req, "abort")

    def _admit(self) -> List[Request]:
        """FIFO: the head request enters once ``n`` slots are free, never while weights load."""
        admitted = []
        while self.pending and not self.loading and len(self.free) >= self.pending[0].params.n:
            req = self.pending.popleft()
            self.free.sort()
            taken: List[Optional[int]] = list(self.free[: req.params.n])
            req.slots, self.free = taken, self.free[req.params.n :]
            req.version = self.engine.weight_version
            self.active.append(req)
            admitted.append(req)
        return admitted

    def _prefill(self, admitted: List[Request]) -> None:
        """The new requests' prompts, :data:`PREFILL_ROWS` of one padded width per forward: keys/values
        into each request's slots, each row's first token."""
        from dapo_megatron.rollout.embedded_cache import PREFILL_ROWS, prefill_width

        by_width: Dict[int, List[Request]] = {}
        for req in admitted:
            by_width.setdefault(prefill_width(len(req.prompt), self.width), []).append(req)
        for reqs in by_width.values():
            for start in range(0, len(reqs), PREFILL_ROWS):
                self._prefill_pass(reqs[start : start + PREFILL_ROWS])

    def _prefill_pass(self, reqs: List[Request]) -> None:
        from dapo_megatron.rollout.embedded_cache import PREFILL_ROWS

        slots = [[s for s in req.slots if s is not None] for req in reqs]
        with self.model_lock:
            cache = self._slot_cache()  # outside the recorder: its shape probe must record no routes
            with self._record(any(r.params.return_routed_experts for r in reqs)) as routes:
                logits = cache.prefill(self.engine.model, [r.prompt for r in reqs], slots, pad_id=self.engine.pad_id)
            self.prefills += 1
        # Routes come flattened over the pass's [PREFILL_ROWS, W] tokens: prompt i owns row i's first len_i.
        rows = routes[0].unflatten(0, (PREFILL_ROWS, -1)) if routes else None
        for i, req in enumerate(reqs):
            req.prompt_routes = rows[i, : len(req.prompt)].clone() if rows is not None else None
            tokens, chosen = _first_tokens(logits[i], req)
            with self.cv:
                req.fed = len(req.prompt)
                self._record_rows(req, dict(zip(slots[i], zip(tokens, chosen))))
                self._complete_if_done(req)

    def _plan(self) -> Optional[Tuple[Any, ...]]:
        """The decode step's per-slot inputs (free slots: pad token at position 0, temperature 1);
        None when no active request has a running row."""
        with self.cv:
            if not self.active:
                return None
            return self._layout()

    def _compact(self) -> int:
        """The step's row count: the smallest decode shape that holds every running row. Rows in slots
        at or past it move (keys/values copied) into the free slots below it first, so requests that
        finished low in the cache do not leave a late one paying for the whole batch. A row's numerics
        do not depend on its slot, so a move changes no bits."""
        busy = [(req, j, s) for req in self.active for j, s in enumerate(req.slots) if s is not None]
        rows = next(n for n in self._shapes if n >= len(busy))
        movers = [(req, j, s) for req, j, s in busy if s >= rows]
        if movers:  # only once the shapes were probed, which built the cache (before that: [slots])
            targets = sorted(t for t in self.free if t < rows)[: len(movers)]
            self._cache.move([s for _, _, s in movers], targets)
            for (req, j, _), t in zip(movers, targets):
                req.slots[j] = t
            taken = set(targets)
            self.free = [f for f in self.free if f not in taken] + [s for _, _, s in movers]
        self.rows_decoded, self.rows_busy = self.rows_decoded + rows, self.rows_busy + len(busy)
        return rows

    def _layout(self) -> Tuple[Any, ...]:
        rows = self._compact()
        ids, pos = [self.engine.pad_id] * rows, [0] * rows
        temp, top_p, top_k, u = [1.0] * rows, [1.0] * rows, [-1] * rows, [0.0] * rows
        for req in self.active:
            p = req.params
            draws = req.draw()
            for j, s in enumerate(req.slots):
                if s is None:
                    continue
                ids[s], pos[s], u[s] = req.tokens[j][-1], req.fed, draws[j]
                temp[s], top_p[s], top_k[s] = p.temperature, p.top_p, p.top_k
        dev = self.engine.device
        as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=dev)  # noqa: E731
        return (list(self.active), as_t(ids, torch.long), as_t(pos, torch.long), as_t(temp, torch.float32),
                as_t(top_p, torch.float32), as_t(top_k, torch.long), as_t(u, torch.float64))  # fmt: skip

    def _forward(self, ids, pos, temp, top_p, top_k, u, *, routes: bool = False) -> Tuple[list, list, Any]:
        """One forward over the first ``rows = len(ids)`` slots, then a draw per slot: (tokens, log-probs)
        as lists ``[rows]``, and with ``routes`` the ``[rows, layers, k]`` expert ids of the tokens fed
        (else None)."""
        from dapo_megatron.rollout.embedded_cache import decode_logits

        with self.model_lock:
            cache = self._slot_cache()
            with self._record(routes) as recorded:
                logits = decode_logits(self.engine.model, cache, ids, pos)
            self.forwards += 1
        logp = torch.log_softmax(logits.float() / temp[:, None], dim=-1)
        tokens = sample_rows(logp, top_p, top_k, u)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)
        return tokens.tolist(), chosen.tolist(), (recorded[0] if recorded else None)

    def _record(self, enabled: bool) -> Any:
        """The routing recorder's block (hooks installed on first use; see ``embedded_routing``)."""
        if enabled and self._recorder is None:
            from dapo_megatron.rollout.embedded_routing import RouteRecorder

            self._recorder = RouteRecorder(self.engine.model, self.engine.config)
        if self._recorder is None:
            return contextlib.nullcontext([])
        return self._recorder.record(enabled)

    def _slot_cache(self) -> Any:
        """The KV cache, built on first use together with the decode shapes it may run in (probed on
        a scratch cache of the same shape, freed after)."""
        if self._cache is None:
            from dapo_megatron.rollout.embedded_cache import SlotCache, batch_invariant_shapes

            e = self.engine
            make = lambda: SlotCache.for_config(e.config, self.slots, self.width, e.dtype, e.device)  # noqa: E731
            self._shapes = batch_invariant_shapes(e.model, make(), e.config.vocab_size)
            self._cache = make()
        return self._cache

    def _apply(self, stepped: List[Request], out: Tuple[list, list, Any]) -> None:
        """Record the step's draws for the requests it ran (one aborted meanwhile stays aborted)."""
        tokens, logps, routes = out
        with self.cv:
            for req in stepped:
                if req.done.is_set():
                    continue
                if routes is not None and req.params.return_routed_experts:
                    for j, s in enumerate(req.slots):
                        if s is not None:  # the row fed its last token at this step
                            req.routes[j].append(routes[s])
                self._record_rows(req, {s: (tokens[s], logps[s]) for s in req.slots if s is not None})
                req.fed += 1
                self._complete_if_done(req)
            self.cv.notify_all()

    def _complete_if_done(self, req: Request) -> None:
        if all(r is not None for r in req.reasons):
            self.active.remove(req)
            self._complete(req)

    def _record_rows(self, req: Request, drawn: dict) -> None:
        """Append ``drawn[slot] = (token, logprob)`` to each running row; a finished row leaves."""
        for j, s in enumerate(req.slots):
            if s is None:
                continue
            token, logp = drawn[s]
            req.tokens[j].append(token)
            req.logps[j].append(logp)
            if token in req.stop:
                req.reasons[j] = "stop"
            elif len(req.tokens[j]) >= req.limit:
                req.reasons[j] = "length"
            if req.reasons[j] is not None:  # the row leaves the batch now
                self.free.append(s)
                req.slots[j] = None

    def _finish(self, req: Request, reason: str) -> None:
        """End ``req`` now: its running rows get ``reason``; its slots are freed."""
        for j, s in enumerate(req.slots):
            if s is not None:
                self.free.append(s)
                req.slots[j] = None
        req.reasons = [r or reason for r in req.reasons]
        if req in self.active:
            self.active.remove(req)
        self._complete(req)

    def _fail(self, error: BaseException) -> None:
        """A prefill or step raised: every active request ends with the error."""
        with self.cv:
            for req in list(self.active):
                req.error = error
                self._finish(req, "abort")
            self.cv.notify_all()

    def _complete(self, req: Request) -> None:
        req.done.set()
        for callback in req.callbacks:
            callback()
