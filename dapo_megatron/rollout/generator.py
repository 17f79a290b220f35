"""Streaming rollout with dynamic sampling (DAPO): submit groups, score each as it completes, keep the
informative ones, refill, and abort what is still running once the batch is full.

One step (``await StreamingRollout.run(prompt_source)``)::

    while not full:
        if kept + in_flight < target:      # even keeping every running group would not fill the batch
            acc.begin_round()              # counts against max_num_gen_batches (raises when exhausted)
            submit a round (first: gen_prompts_per_round; refill: see _round_size), one task per group
        wait for any group -> score it (reward on decoded text + overlong penalty) -> acc.offer(group, acc values)
    stop: no request starts any more; abort_all on every engine; await the running tasks (never offered)
    return acc.take(), metrics

Stop invariant: once the batch is full, no ``engine.generate`` starts: tasks waiting for a slot are
woken and give up, and the stop check runs in the same event-loop step as the engine call's start, so
every request began before ``abort_all`` was called and is covered by it.

Fault handling: a request that fails or times out is retried on another engine (least loaded,
preferring engines it has not failed on), at most ``max_retries`` times; an engine whose health check
fails is skipped for the rest of the run (or replaced through ``restart_engine``). Each group gets an
id when submitted and is offered at most once, so no sample is lost or counted twice.

Partial rollouts (``keep_partial``, asynchronous DAPO): an aborted request is not retried from
scratch; its samples keep their tokens and continue from ``prompt + response so far`` with the
remaining budget (``rollout/partial.py``), so a response may mix weight versions. When a run stops
(batch full, or :meth:`StreamingRollout.head_start` interrupted by a weight sync), groups still in
progress are kept in ``partials`` and finished unused ones in ``carry``; the next run continues and
offers them first, unless older than ``min_version`` (then re-generated, or dropped, and counted).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from dapo_megatron.algo.dynamic_sampling import GroupAccumulator
from dapo_megatron.algo.overlong import overlong_penalty
from dapo_megatron.rollout.base import Completion, EngineError, RolloutEngine, SamplingParams
from dapo_megatron.rollout.partial import GID, extend, from_group, oldest_version, to_group, unfinished
from dapo_megatron.types import Group, Sample

_HEALTH_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PromptItem:
    """One prompt to sample a group for: token ids, the ground truth for the reward, free metadata."""

    prompt_index: int
    prompt_ids: List[int]
    ground_truth: str
    metadata: dict = field(default_factory=dict)


class RolloutFailed(RuntimeError):
    """A group could not be generated within ``max_retries`` retries, or no engine is healthy."""


@dataclass
class _Stats:
    tokens: int = 0
    retries: int = 0
    late_discarded: int = 0
    offered: int = 0  # groups generated in this step and offered (carried ones excluded)
    kept: int = 0  # of those, the ones the accumulator kept: kept / offered is the keep rate


class StreamingRollout:
    """Drives ``engines`` to fill one training batch of informative groups per :meth:`run`.

    Args:
        engines: the :class:`RolloutEngine` pool.
        reward_fn: ``(response_text, ground_truth) -> RewardResult(score, acc, pred)``.
        tokenizer_decode: response token ids -> text for the reward.
        sampling: sampling params; ``n`` is the group size G, ``seed`` the base of per-request seeds.
        max_response_len / overlong_enable / overlong_len / overlong_penalty_factor: DAPO Eq. 13.
        filter_metric: ``acc`` | ``score`` | ``seq_reward``: the per-sample value that must vary.
        filter_enable: dynamic sampling on (off: every completed group is kept).
        target_groups / max_num_gen_batches / on_exhausted: the accumulator.
        gen_prompts_per_round: prompts of a step's first round (the oversampling), and the cap of a
            refill round, which is sized from the observed keep rate (:meth:`_round_size`).
        max_concurrency: in-flight groups per server worker. An engine may front several workers
            behind a router (SGLang): its cap is ``max_concurrency * engine.num_workers``, read at every
            acquire so a dead worker lowers it (engines without ``num_workers`` count as one worker).
        request_timeout_s / max_retries: per-request bound and retries on other engines.
        keep_surplus: carry fully completed surplus groups into the next :meth:`run`.
        restart_engine: optional ``async (index) -> RolloutEngine | None`` called for an unhealthy engine.
        keep_partial: partial rollouts (asynchronous DAPO, see the module docstring); implies keeping
            finished surplus groups.
    """

    def __init__(
        self,
        engines: Sequence[RolloutEngine],
        reward_fn: Callable,
        *,
        tokenizer_decode: Callable[[List[int]], str],
        sampling: SamplingParams,
        max_response_len: int,
        target_groups: int,
        gen_prompts_per_round: int,
        overlong_enable: bool = True,
        overlong_len: int = 1,
        overlong_penalty_factor: float = 1.0,
        filter_metric: str = "acc",
        filter_enable: bool = True,
        max_num_gen_batches: int = 0,
        on_exhausted: str = "error",
        max_concurrency: int = 64,
        request_timeout_s: float = 3600.0,
        max_retries: int = 3,
        keep_surplus: bool = False,
        restart_engine: Optional[Callable[[int], Awaitable[Optional[RolloutEngine]]]] = None,
        keep_partial: bool = False,
    ):
        if filter_metric not in ("acc", "score", "seq_reward"):
            raise ValueError(f"filter_metric must be acc, score or seq_reward, got {filter_metric!r}")
        if not engines:
            raise ValueError("StreamingRollout needs at least one engine")
        self.engines = list(engines)
        self.reward_fn, self.decode, self.sampling = reward_fn, tokenizer_decode, sampling
        self.max_response_len = max_response_len
        self.overlong = (overlong_enable, overlong_len, overlong_penalty_factor)
        self.filter_metric, self.gen_prompts_per_round = filter_metric, gen_prompts_per_round
        self.acc = GroupAccumulator(target_groups, max_num_gen_batches, on_exhausted, enabled=filter_enable)
        self.max_concurrency, self.request_timeout_s = max_concurrency, request_timeout_s
        self.max_retries, self.keep_surplus, self.restart_engine = max_retries, keep_surplus, restart_engine
        self.healthy = [True] * len(self.engines)
        self.in_flight = [0] * len(self.engines)
        self.carry: List[Group] = []  # surplus kept for the next step (keep_surplus)
        self._next_gid = 0
        self._stopping = False
        self._cond: Optional[asyncio.Condition] = None
        self.keep_partial = keep_partial
        self.partials: List[Group] = []  # groups in progress (keep_partial), see rollout/partial.py
        self.min_version: Optional[int] = None  # staleness floor of carried and partial work (keep_partial)
        self.stale = {
            "dropped_stale_groups": 0,
            "regenerated_stale_groups": 0,
            "continued_groups": 0,
        }  # since last read
        self._segment_cap: Optional[int] = None  # per-request token cap of a fixed-interleave head start

    def state_dict(self) -> Dict[str, Any]:
        """What a resumed run needs to draw the same seeds and offer the same carried groups."""
        return {"next_gid": self._next_gid, "carry": list(self.carry), "acc": self.acc.state_dict(),
                "partials": list(self.partials)}  # fmt: skip

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._next_gid, self.carry = int(state["next_gid"]), list(state["carry"])
        self.partials = list(state.get("partials", []))  # absent in checkpoints of the synchronous loop
        self.acc.load_state_dict(state["acc"])

    # ------------------------------------------------------------------ engine pool
    def _capacity(self, idx: int) -> int:
        """Slots of engine ``idx``: ``max_concurrency`` per live worker. Zero workers still counts as one
        so a request reaches the engine, fails, and its health check drops or restarts it; a capacity
        of 0 everywhere would leave every task waiting for a slot that no release ever frees."""
        workers = int(getattr(self.engines[idx], "num_workers", 1))
        return self.max_concurrency * max(1, workers)

    async def _acquire(self, avoid: set) -> Optional[int]:
        """Index of the least-loaded healthy engine with a free slot, preferring ones not in ``avoid``;
        None once the step is stopping (``_stop`` wakes every waiter), so nothing starts after it."""
        async with self._cond:
            while True:
                if self._stopping:
                    return None
                live = [i for i, ok in enumerate(self.healthy) if ok]
                if not live:
                    raise RolloutFailed("no healthy rollout engine left")
                free = [i for i in live if self.in_flight[i] < self._capacity(i)]
                if free:
                    best = min(free, key=lambda i: (i in avoid, self.in_flight[i], i))
                    self.in_flight[best] += 1
                    return best
                await self._cond.wait()

    async def _release(self, idx: int) -> None:
        async with self._cond:
            self.in_flight[idx] -= 1
            self._cond.notify_all()

    async def _check_engine(self, idx: int, engine: RolloutEngine) -> None:
        """After ``engine`` (at ``idx``) failed: keep it if healthy, else restart it or drop it.

        Several requests may fail on the same engine at once; the per-index lock plus the identity
        check make only the first of them probe, restart or drop it."""
        async with self._check_locks[idx]:
            if self.engines[idx] is not engine or not self.healthy[idx]:
                return  # already replaced or already dropped by a concurrent failure
            try:
                ok = await asyncio.wait_for(engine.health(), _HEALTH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - a health check that errors is a failed health check
                ok = False
            if not ok and self.restart_engine is not None:
                replacement = await self.restart_engine(idx)
                if replacement is not None:
                    self.engines[idx], ok = replacement, True
            async with self._cond:
                self.healthy[idx] = ok
                self._cond.notify_all()

    # ------------------------------------------------------------------ one group
    def _params_for(self, gid: int, attempt: int, max_new_tokens: Optional[int] = None) -> SamplingParams:
        """Params of one request: a distinct, reproducible seed per (group, attempt), so engines started
        with the same seed do not produce identical groups for repeated prompts.

        The seed is the base of the whole group, not of one sample: an engine must give each of the
        ``n`` samples its own seed (the SGLang adapter sends ``seed + i`` for sample ``i``); sending the
        same seed to all ``n`` would make the group ``n`` copies of one response, zero variance."""
        base = self.sampling.seed or 0
        params = self.sampling.with_seed((base * 1_000_003 + gid * 7_919 + attempt) % (2**31))
        return params if max_new_tokens is None else dataclasses.replace(params, max_new_tokens=max_new_tokens)

    async def _start(
        self, engine: RolloutEngine, item: PromptItem, params: SamplingParams
    ) -> Optional[List[Completion]]:
        """``engine.generate``, or None when the step is stopping. No await between the check and the
        call: it runs up to its first suspension in this same event-loop step, so ``_stop`` cannot set
        ``_stopping`` and call ``abort_all`` in between (a request started then would not be aborted)."""
        if self._stopping:
            return None
        return await engine.generate(item.prompt_ids, params, timeout_s=self.request_timeout_s)

    async def _generate_group(self, item: PromptItem, gid: int) -> Optional[Tuple[List[Completion], dict]]:
        """The group's completions, retried across engines; None when the step stopped meanwhile."""
        failed_on: set = set()
        errors: List[str] = []
        for attempt in range(self.max_retries + 1):
            idx = await self._acquire(failed_on)
            if idx is None:
                return None
            engine = self.engines[idx]
            try:
                completions = await asyncio.wait_for(
                    self._start(engine, item, self._params_for(gid, attempt)), self.request_timeout_s
                )
            except (EngineError, asyncio.TimeoutError, OSError) as e:
                errors.append(f"engine {idx}: {type(e).__name__}: {e}")
                failed_on.add(idx)
                await self._release(idx)
                self.stats.retries += 1
                await self._check_engine(idx, engine)  # EngineDeadError included: a restart may bring it back
                continue
            await self._release(idx)
            if completions is None or self._stopping:
                return None  # not started, or finished/aborted after the batch was full: never offered
            if any(c.finish_reason == "abort" for c in completions):
                errors.append(f"engine {idx}: aborted")  # not ours (the step is running): retry
                self.stats.retries += 1
                continue
            return completions, {"group_id": gid, "engine": idx, "attempts": attempt + 1}
        raise RolloutFailed(
            f"group {gid} (prompt {item.prompt_index}) failed {self.max_retries + 1} times: " + "; ".join(errors)
        )

    # ------------------------------------------------------------------ partial rollouts (keep_partial)
    async def _request(self, item: PromptItem, params_of: Callable[[int], SamplingParams]) -> Optional[list]:
        """One request retried across engines (``params_of(attempt)``); None once the run is stopping.
        Aborted completions are returned as they are: the caller continues them."""
        failed_on: set = set()
        errors: List[str] = []
        for attempt in range(self.max_retries + 1):
            idx = await self._acquire(failed_on)
            if idx is None:
                return None
            engine = self.engines[idx]
            try:
                out = await asyncio.wait_for(self._start(engine, item, params_of(attempt)), self.request_timeout_s)
            except (EngineError, asyncio.TimeoutError, OSError) as e:
                errors.append(f"engine {idx}: {type(e).__name__}: {e}")
                failed_on.add(idx)
                await self._release(idx)
                self.stats.retries += 1
                await self._check_engine(idx, engine)
                continue
            await self._release(idx)
            return out
        raise RolloutFailed(f"prompt {item.prompt_index} failed {self.max_retries + 1} times: " + "; ".join(errors))

    def _budget(self, done: int) -> int:
        left = self.max_response_len - done
        return min(left, self._segment_cap) if self._segment_cap else left

    async def _continue(self, item: PromptItem, gid: int, i: int, c: Optional[Completion]) -> Optional[Completion]:
        """Sample ``i`` of group ``gid`` one segment further: prompt + its tokens so far, n=1, the
        remaining budget, a seed fixed by (group, sample, tokens so far) so a resumed run redraws it."""
        done = len(c.token_ids) if c else 0
        seed = ((self.sampling.seed or 0) * 1_000_003 + gid * 7_919 + (i + 1) * 104_729 + done * 31) % (2**31)
        cont = dataclasses.replace(item, prompt_ids=list(item.prompt_ids) + (list(c.token_ids) if c else []))

        def params_of(attempt: int) -> SamplingParams:
            return dataclasses.replace(self.sampling, n=1, max_new_tokens=self._budget(done), seed=seed + attempt)

        out = await self._request(cont, params_of)
        return None if out is None else extend(c, out[0], max_response_len=self.max_response_len)

    async def _partial_group(self, item: PromptItem, gid: int, parts: Optional[list]) -> Any:
        """``(completions, meta)`` once every sample finished (aborted ones continued with the weights of
        the moment); the group in progress as a :class:`Group` when the run stops first (or after one
        segment of a fixed-interleave head start)."""
        parts = list(parts) if parts else [None] * self.sampling.n
        segments = 0
        while any(unfinished(c) for c in parts):
            if self._stopping or (self._segment_cap and segments > 0):
                return to_group(item.prompt_index, item.prompt_ids, item.ground_truth, {**item.metadata, GID: gid},
                                parts)  # fmt: skip
            if all(c is None for c in parts):  # not started: one request for the whole group
                fresh = functools.partial(self._params_for, gid, max_new_tokens=self._budget(0))
                out = await self._request(item, fresh)
                if out is not None:
                    parts = [extend(None, c, max_response_len=self.max_response_len) for c in out]
                    self.stats.tokens += sum(len(c.token_ids) for c in out)
            else:
                todo = [i for i, c in enumerate(parts) if unfinished(c)]
                outs = await asyncio.gather(*(self._continue(item, gid, i, parts[i]) for i in todo))
                for i, c in zip(todo, outs):
                    if c is not None:
                        self.stats.tokens += len(c.token_ids) - len(parts[i].token_ids if parts[i] else [])
                        parts[i] = c
            segments += 1
        return parts, {"group_id": gid, "segments": segments}

    def _resubmit_partials(self, tasks: Dict[asyncio.Task, int]) -> None:
        """Continue the groups in progress first; one whose oldest token is below ``min_version`` is
        re-generated from its prompt (a fresh group id, so fresh seeds)."""
        partials, self.partials = self.partials, []
        for group in partials:
            meta, parts = from_group(group)
            gid = int(meta.pop(GID))
            item = PromptItem(group.prompt_index, list(group.samples[0].prompt_ids), group.ground_truth, meta)
            oldest = oldest_version(parts)
            if self.min_version is not None and oldest is not None and oldest < self.min_version:
                self.stale["regenerated_stale_groups"] += 1
                gid, self._next_gid, parts = self._next_gid, self._next_gid + 1, None
            else:
                self.stale["continued_groups"] += 1
            tasks[asyncio.ensure_future(self._run_group(item, gid, parts))] = gid

    def _too_stale(self, group: Group) -> bool:
        if self.min_version is None or min(s.weight_version for s in group.samples) >= self.min_version:
            return False
        self.stale["dropped_stale_groups"] += 1
        return True

    def _keep(self, group: Optional[Group]) -> None:
        """A group that finished or stopped outside a step's batch: carried (finished) or continued later."""
        if group is not None:
            (self.partials if is_partial(group) else self.carry).append(group)

    async def head_start(
        self, prompt_source: Callable[[int], List[PromptItem]], interrupt: asyncio.Event, *,
        segment_cap: Optional[int] = None,
    ) -> Dict[str, float]:  # fmt: skip
        """keep_partial: work on the next step while the actor trains. Continues the groups in progress
        and, unless the carried and running groups already fill a batch, submits one round
        (``gen_prompts_per_round`` prompts, not counted against ``max_num_gen_batches``); runs until
        all are done or ``interrupt`` is set (the weight sync), then aborts what runs, keeping tokens.
        ``segment_cap``: every request stops after that many tokens (a fixed interruption point)."""
        self._cond, self._stopping, self.stats = asyncio.Condition(), False, _Stats()
        self._check_locks = [asyncio.Lock() for _ in self.engines]
        self._segment_cap, start = segment_cap, time.monotonic()
        tasks: Dict[asyncio.Task, int] = {}
        stop = asyncio.ensure_future(interrupt.wait())
        try:
            self._resubmit_partials(tasks)
            if len(self.carry) + len(tasks) < self.acc.target_groups:
                self._submit_round(prompt_source, tasks, self.gen_prompts_per_round)
            while tasks and not interrupt.is_set():
                done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(done - {stop}, key=tasks.__getitem__):
                    tasks.pop(task)
                    self._keep(task.result())
        finally:
            stop.cancel()
            self._segment_cap = None
            await self._stop(tasks)
        return {"async/head_start_s": time.monotonic() - start, "async/head_start_tokens": float(self.stats.tokens)}

    def _score(self, item: PromptItem, completions: List[Completion], meta: dict) -> Group:
        """Reward on the decoded text, plus the overlong penalty (on lengths in tokens)."""
        enable, buffer_len, factor = self.overlong
        lengths = [len(c.token_ids) for c in completions]
        penalty = (
            overlong_penalty(
                lengths, max_response_len=self.max_response_len, buffer_len=buffer_len, penalty_factor=factor
            ).tolist()
            if enable
            else [0.0] * len(completions)
        )
        samples = []
        for c, pen in zip(completions, penalty):
            res = self.reward_fn(self.decode(c.token_ids), item.ground_truth)
            samples.append(
                Sample(
                    list(item.prompt_ids),
                    list(c.token_ids),
                    list(c.logprobs),
                    c.finish_reason,
                    weight_version=c.weight_version,
                    token_versions=list(c.meta.get("token_versions", [])),
                    score=float(res.score),
                    acc=bool(res.acc),
                    pred=res.pred,
                    reward=float(res.score) + pen,
                )
            )
        if not self.keep_partial:  # partial rollouts count each segment as it arrives (_partial_group)
            self.stats.tokens += sum(lengths)
        return Group(item.prompt_index, item.ground_truth, samples, metadata={**item.metadata, **meta})

    def metric_values(self, group: Group) -> List[float]:
        key = {"acc": "acc", "score": "score", "seq_reward": "reward"}[self.filter_metric]
        return [float(getattr(s, key)) for s in group.samples]

    async def _run_group(self, item: PromptItem, gid: int, parts: Optional[list] = None) -> Optional[Group]:
        """The scored group; None when the step stopped first; with ``keep_partial`` the unscored
        group in progress (:func:`is_partial`) when it stopped."""
        if self.keep_partial:
            out = await self._partial_group(item, gid, parts)
        else:
            out = await self._generate_group(item, gid)
        if out is None or isinstance(out, Group):
            return out
        # Scoring may be slow (math-verify workers): keep it off the event loop.
        return await asyncio.to_thread(self._score, item, *out)

    # ------------------------------------------------------------------ one step
    def _round_size(self, in_flight: int) -> int:
        """Prompts for the next round of this step (deterministic given the counts).

        Until a group generated in this step has been kept (always so for the first round):
        ``gen_prompts_per_round``, the user's oversampling. Then, with the step's keep rate
        ``r = kept / offered`` (carried groups excluded) and ``missing = target - kept_total``:
        ``need = ceil(missing / r) - in_flight`` prompts are expected to fill the batch together with
        the groups in flight (counted at rate r too, not as all kept); submit ``need + ceil(need / 4)``
        (a 25% margin), capped at ``gen_prompts_per_round``. Counting in-flight groups as all kept
        would size each refill for a single missing group and make one tiny round per dropped group,
        each counted against ``max_num_gen_batches``. Integer arithmetic keeps the size exact."""
        cap, kept, offered = self.gen_prompts_per_round, self.stats.kept, self.stats.offered
        if kept == 0:
            return cap
        missing = self.acc.target_groups - self.acc.kept
        need = -(-(missing * offered - in_flight * kept) // kept)  # ceil; >= 1 when kept + in_flight < target
        return max(1, min(cap, need + -(-need // 4)))

    def _submit_round(
        self, prompt_source: Callable[[int], List[PromptItem]], tasks: Dict[asyncio.Task, int], size: int
    ) -> None:
        items = prompt_source(size)
        if not items:
            raise RolloutFailed("the prompt source returned no prompts")
        for item in items:
            gid, self._next_gid = self._next_gid, self._next_gid + 1
            tasks[asyncio.ensure_future(self._run_group(item, gid))] = gid

    async def run(self, prompt_source: Callable[[int], List[PromptItem]]) -> Tuple[List[Group], Dict[str, float]]:
        """One step: ``acc.target_groups`` groups (ds/* metrics explain how many were generated)."""
        self._cond, self._stopping, self.stats = asyncio.Condition(), False, _Stats()
        self._check_locks = [asyncio.Lock() for _ in self.engines]
        start = time.monotonic()
        carried, self.carry = self.carry, []
        for group in carried:  # surplus of the last step (keep_surplus) is offered first
            if not self._too_stale(group):
                self.acc.offer(group, self.metric_values(group))
        tasks: Dict[asyncio.Task, int] = {}
        self._resubmit_partials(tasks)
        accepted: set = set()
        rounds_left = True
        try:
            while not self.acc.is_full:
                if rounds_left and self.acc.kept + len(tasks) < self.acc.target_groups:
                    # begin_round raises DynamicSamplingExhausted when out of rounds with "error";
                    # False means out of rounds with "pad": finish what runs, then take() pads.
                    rounds_left = self.acc.begin_round()
                    if rounds_left:
                        self._submit_round(prompt_source, tasks, self._round_size(len(tasks)))
                if not tasks:
                    break
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                # Offer in submission order within one wake-up, so a run is reproducible.
                for task in sorted(done, key=tasks.__getitem__):
                    gid = tasks.pop(task)
                    group = task.result()  # RolloutFailed propagates: the step cannot be completed
                    if group is not None and gid not in accepted:
                        accepted.add(gid)
                        self.stats.offered += 1
                        self.stats.kept += self.acc.offer(group, self.metric_values(group))
        finally:
            await self._stop(tasks)
        # Completion order is a race between engines; the trainer sees prompt order so a step's
        # batch (and its micro-batch split) does not depend on which request finished first.
        batch = sorted(self.acc.take(), key=lambda g: g.prompt_index)
        if self.keep_surplus or self.keep_partial:
            self.carry.extend(self.acc.surplus)
        return batch, self._metrics(batch, time.monotonic() - start)

    async def _stop(self, tasks: Dict[asyncio.Task, int]) -> None:
        """Abort what is still running; late results are discarded (or carried with keep_surplus).

        ``_stopping`` is set before ``abort_all`` and the slot waiters are woken, so they return
        instead of sending fresh requests that no abort covers (and that this wait would sit out)."""
        async with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if not tasks:
            return
        live = [e for e, ok in zip(self.engines, self.healthy) if ok]
        await asyncio.gather(*(e.abort_all() for e in live), return_exceptions=True)
        done, pending = await asyncio.wait(tasks, timeout=self.request_timeout_s)
        for task in pending:
            task.cancel()
        self.stats.late_discarded = len(tasks)
        for task in sorted(done, key=tasks.__getitem__):  # group order: a reproducible carry
            if task.cancelled() or task.exception() is not None:
                continue
            if self.keep_partial:
                self._keep(task.result())
            elif task.result() is not None and self.keep_surplus:
                self.carry.append(task.result())

    def _metrics(self, batch: List[Group], elapsed: float) -> Dict[str, float]:
        lengths = [len(s.response_ids) for g in batch for s in g.samples]
        truncated = [s.truncated for g in batch for s in g.samples]
        return {
            **self.acc.last_metrics,
            "rollout/generate_time_s": elapsed,
            "rollout/tokens_per_s": self.stats.tokens / elapsed if elapsed > 0 else 0.0,
            "rollout/response_len_mean": sum(lengths) / len(lengths) if lengths else 0.0,
            "rollout/response_len_max": float(max(lengths, default=0)),
            "rollout/truncation_rate": sum(truncated) / len(truncated) if truncated else 0.0,
            "rollout/retries": float(self.stats.retries),
            "rollout/aborted_groups": float(self.stats.late_discarded),
            "rollout/healthy_engines": float(sum(self.healthy)),
        }


def is_partial(group: Group) -> bool:
    """A group still in progress (some sample cut short), not yet scored."""
    return any(s.finish_reason == "abort" for s in group.samples)


# ---------------------------------------------------------------------- debug seam
def dump_groups(groups: Sequence[Group], path: str) -> None:
    """One JSON object per line per group (samples as dicts): replay a step with :func:`load_groups`.
    Written to a temporary name and renamed, so a crash never leaves a partial dump behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for g in groups:
            f.write(
                json.dumps(
                    {
                        "prompt_index": g.prompt_index,
                        "ground_truth": g.ground_truth,
                        "metadata": g.metadata,
                        "samples": [dataclasses.asdict(s) for s in g.samples],
                    }
                )
                + "\n"
            )
    os.replace(tmp, path)


def load_groups(path: str) -> List[Group]:
    """Inverse of :func:`dump_groups` (Sample validation runs again on load). A malformed line raises a
    ``ValueError`` naming the file and line."""
    groups = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                samples = [Sample(**s) for s in r["samples"]]
                groups.append(Group(r["prompt_index"], r["ground_truth"], samples, r["metadata"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{lineno}: not a dumped rollout group (expected prompt_index, ground_truth, metadata "
                    f"and samples as written by dump_groups): {type(e).__name__}: {e}"
                ) from None
    return groups
