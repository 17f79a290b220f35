"""Streaming rollout with dynamic sampling (DAPO): submit groups, score each as it completes, keep the
informative ones, refill, and abort what is still running once the batch is full.

One step (``await StreamingRollout.run(prompt_source)``)::

    while not full:
        if kept + in_flight < target:      # even keeping every running group would not fill the batch
            acc.begin_round()              # counts against max_num_gen_batches (raises when exhausted)
            submit a round (first: gen_prompts_per_round; refill: see _round_size), one task per group
        wait for the next group (rollout.offer_order: in submission order, or as they finish)
            -> score it (reward on decoded text + overlong penalty) -> acc.offer(group, acc values)
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
import json
import os
import time
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from dapo_megatron.algo.dynamic_sampling import GroupAccumulator
from dapo_megatron.algo.overlong import overlong_penalty
from dapo_megatron.rollout.base import Completion, RolloutEngine, SamplingParams
from dapo_megatron.rollout.partial import FAILED, GID, PartialRollouts, group_id
from dapo_megatron.rollout.prompt_item import PromptItem, RolloutFailed, RoundStats
from dapo_megatron.types import Group, Sample

_HEALTH_TIMEOUT_S = 10.0


class RoutingNotReturned(RuntimeError):
    """Routing replay was asked for (``SamplingParams.return_routed_experts``) and an engine returned
    a completion without ``meta["routed_experts"]``: training on it would silently not replay."""


class StreamingRollout(PartialRollouts):
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
        offer_order: ``submission`` (groups are offered in the order they were submitted: a step is
            reproducible and unbiased by response length) or ``completion`` (as they finish: fastest).
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
        offer_order: str = "submission",
    ):
        if filter_metric not in ("acc", "score", "seq_reward"):
            raise ValueError(f"filter_metric must be acc, score or seq_reward, got {filter_metric!r}")
        if not engines:
            raise ValueError("StreamingRollout needs at least one engine")
        if offer_order not in ("submission", "completion"):
            raise ValueError(f"offer_order must be submission or completion, got {offer_order!r}")
        self.engines = list(engines)
        self.reward_fn, self.decode, self.sampling = reward_fn, tokenizer_decode, sampling
        self.max_response_len = max_response_len
        self.overlong = (overlong_enable, overlong_len, overlong_penalty_factor)
        self.filter_metric, self.gen_prompts_per_round = filter_metric, gen_prompts_per_round
        self.acc = GroupAccumulator(target_groups, max_num_gen_batches, on_exhausted, enabled=filter_enable)
        self.max_concurrency, self.request_timeout_s = max_concurrency, request_timeout_s
        self.max_retries, self.keep_surplus, self.restart_engine = max_retries, keep_surplus, restart_engine
        self.healthy = [True] * len(self.engines)
        self._dropped_because: List[str] = []  # per dropped engine: the failure that led to its health check
        self.in_flight = [0] * len(self.engines)
        self.carry: List[Group] = []  # surplus kept for the next step (keep_surplus)
        self._next_gid = 0
        self._stopping = False
        self._cond: Optional[asyncio.Condition] = None
        self.keep_partial, self.offer_order = keep_partial, offer_order
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
                    raise RolloutFailed("no healthy rollout engine left: " + "; ".join(self._dropped_because))
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

    async def _check_engine(self, idx: int, engine: RolloutEngine, failure: str) -> None:
        """After ``engine`` (at ``idx``) failed with ``failure``: keep it if healthy, else restart it or
        drop it (``failure`` then joins the error of a rollout left with no engine).

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
                if not ok:
                    self._dropped_because.append(f"{failure}, then its health check failed")
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
            idx, completions = await self._attempt(item, self._params_for(gid, attempt), failed_on, errors)
            if idx is None:
                return None
            if completions is FAILED:
                continue
            if completions is None or self._stopping:
                if completions is not None:  # generated for nothing: the throughput the stop threw away
                    self.stats.aborted_tokens += sum(len(c.token_ids) for c in completions)
                return None  # not started, or finished/aborted after the batch was full: never offered
            if any(c.finish_reason == "abort" for c in completions):
                errors.append(f"engine {idx}: aborted")  # not ours (the step is running): retry
                self.stats.retries += 1
                continue
            return completions, {GID: gid, "engine": idx, "attempts": attempt + 1}
        raise RolloutFailed(
            f"group {gid} (prompt {item.prompt_index}) failed {self.max_retries + 1} times: " + "; ".join(errors)
        )

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
            routes = c.meta.get("routed_experts", [])
            if self.sampling.return_routed_experts and not routes and c.token_ids:
                raise RoutingNotReturned(
                    f"group of prompt {item.prompt_index}: algo.routing_replay=rollout needs the routed experts of "
                    f"every token, and engine {meta.get('engine')} returned none (engines that return them: "
                    "embedded, sglang with --enable-return-routed-experts)"
                )
            res = self.reward_fn(self.decode(c.token_ids), item.ground_truth)
            samples.append(
                Sample(
                    list(item.prompt_ids),
                    list(c.token_ids),
                    list(c.logprobs),
                    c.finish_reason,
                    weight_version=c.weight_version,
                    token_versions=list(c.meta.get("token_versions", [])),
                    routed_experts=list(routes),
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
        group in progress (``partial.is_partial``) when it stopped."""
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

    def _next_offer(self, tasks: Dict[asyncio.Task, int]) -> Optional[asyncio.Task]:
        """The finished task to offer next, None when it is still running.

        ``submission`` order: the task of the lowest group id, once done. A group then waits for
        every group submitted before it, so the batch (and the carry) is the same whatever the
        engines' timing, and it is not biased towards short responses, which finish first.
        ``completion`` order: any finished task (lowest id first), for the fastest fill. A failed
        task is returned as soon as it is done either way: the step fails without waiting."""
        done = [t for t in tasks if t.done()]
        failed = [t for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            return failed[0]
        if self.offer_order == "completion":
            return min(done, key=tasks.__getitem__, default=None)
        head = min(tasks, key=tasks.__getitem__)
        return head if head.done() else None

    async def run(self, prompt_source: Callable[[int], List[PromptItem]]) -> Tuple[List[Group], Dict[str, float]]:
        """One step: ``acc.target_groups`` groups (ds/* metrics explain how many were generated)."""
        self._cond, self._stopping, self.stats = asyncio.Condition(), False, RoundStats()
        self._check_locks = [asyncio.Lock() for _ in self.engines]
        start = time.monotonic()
        carried, self.carry = self.carry, []
        for group in sorted(carried, key=group_id):  # surplus of the last step (keep_surplus) is offered first
            if not self._too_stale(group):
                self.acc.offer(group, self.metric_values(group))
        tasks: Dict[asyncio.Task, int] = {}
        self._resubmit_partials(tasks)
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
                task = self._next_offer(tasks)
                if task is None:
                    await asyncio.wait([t for t in tasks if not t.done()], return_when=asyncio.FIRST_COMPLETED)
                    continue
                # One offer per pass: the refill check above sees the same counts at the same point
                # of the offer sequence whatever the timing, so round sizes are reproducible too.
                tasks.pop(task)
                group = task.result()  # RolloutFailed propagates: the step cannot be completed
                if group is not None:
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
            "rollout/aborted_tokens": float(self.stats.aborted_tokens),
            "rollout/aborted_token_frac": self.stats.aborted_tokens
            / max(1, self.stats.aborted_tokens + self.stats.tokens),
            "rollout/healthy_engines": float(sum(self.healthy)),
        }


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
