"""Partial rollouts: responses cut by a weight update, kept with their tokens, continued later.

A trajectory in progress is a :class:`~dapo_megatron.rollout.base.Completion` whose
``finish_reason`` is ``"abort"``; ``meta["token_versions"]`` holds the weight version of each of its
tokens. Continuing it sends ``prompt + response so far`` back to an engine with the remaining token
budget; :func:`extend` concatenates the new segment (tokens, log-probs, versions). The log-probs of
each segment are the engine's under the weights that drew it, so the concatenation is exactly the
behaviour policy of the whole response (the off-policy correction relies on it).

For the checkpoint a group in progress travels as a :class:`~dapo_megatron.types.Group` whose
unfinished samples have ``finish_reason="abort"`` (JSON data, like every ``extra_state``):
:func:`to_group` and :func:`from_group` convert.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from dapo_megatron.rollout.base import Completion, EngineError, SamplingParams
from dapo_megatron.rollout.prompt_item import PromptItem, RolloutFailed, RoundStats
from dapo_megatron.types import Group, Sample

GID = "group_id"  # metadata key of a group's id (seeds derive from it)
FAILED = object()  # PartialRollouts._attempt: the engine failed this try (recorded; retry elsewhere)


def versions_of(c: Completion) -> List[int]:
    """Per-token weight versions of ``c`` (``weight_version`` throughout when the engine gave none)."""
    return list(c.meta.get("token_versions", [c.weight_version] * len(c.token_ids)))


def unfinished(c: Optional[Completion]) -> bool:
    """Not started (None) or cut short (``abort``): it needs another segment."""
    return c is None or c.finish_reason == "abort"


def extend(prev: Optional[Completion], new: Completion, *, max_response_len: int) -> Completion:
    """``prev`` followed by the segment ``new``; ``weight_version`` becomes the oldest token's version.

    A segment that stopped at a per-segment cap (``length`` below ``max_response_len``) is still
    unfinished: it comes back as ``abort``."""
    tokens = (prev.token_ids if prev else []) + list(new.token_ids)
    logprobs = (prev.logprobs if prev else []) + list(new.logprobs)
    versions = (versions_of(prev) if prev else []) + [new.weight_version] * len(new.token_ids)
    reason = new.finish_reason
    if reason == "length" and len(tokens) < max_response_len:
        reason = "abort"
    oldest = min(versions) if versions else new.weight_version
    meta: Dict[str, Any] = {"token_versions": versions}
    routes = _joined_routes(prev, new)
    if routes:
        meta["routed_experts"] = routes
    return Completion(tokens, logprobs, reason, weight_version=oldest, meta=meta)


def _joined_routes(prev: Optional[Completion], new: Completion) -> list:
    """Routed experts of ``prev + new`` (see ``Completion.meta``), or ``[]`` when a segment with
    tokens lacks them. ``new`` was generated from ``prompt + prev``, so its routes cover every position
    again: positions ``prev`` already has keep ``prev``'s (the experts that generated those tokens),
    the rest come from ``new`` (its prefill routed ``prev``'s last token, never read before)."""
    old, fresh = (prev.meta.get("routed_experts", []) if prev else []), new.meta.get("routed_experts", [])
    if not prev or not prev.token_ids:
        return list(fresh)
    if not new.token_ids:
        return list(old)
    if not old or not fresh:
        return []
    return list(old) + list(fresh[len(old) :])


def oldest_version(parts: List[Optional[Completion]]) -> Optional[int]:
    """The oldest token version of a group in progress (None when it has no token yet)."""
    versions = [v for c in parts if c is not None for v in versions_of(c)]
    return min(versions) if versions else None


def to_group(prompt_index: int, prompt_ids: List[int], ground_truth: str, metadata: dict,
             parts: List[Optional[Completion]]) -> Group:  # fmt: skip
    """A group in progress as checkpointable data (a not-yet-started sample is an empty ``abort``)."""
    samples = []
    for c in parts:
        c = c or Completion([], [], "abort")
        v = versions_of(c)
        samples.append(Sample(list(prompt_ids), list(c.token_ids), list(c.logprobs), c.finish_reason,
                              weight_version=min(v) if v else c.weight_version, token_versions=v,
                              routed_experts=list(c.meta.get("routed_experts", []))))  # fmt: skip
    return Group(prompt_index, ground_truth, samples, metadata=dict(metadata))


def from_group(group: Group) -> Tuple[dict, List[Optional[Completion]]]:
    """Inverse of :func:`to_group`: the group's metadata and its per-sample completions so far."""
    parts: List[Optional[Completion]] = []
    for s in group.samples:
        if s.finish_reason == "abort" and not s.response_ids:
            parts.append(None)
            continue
        meta: Dict[str, Any] = {"token_versions": s.versions()}
        if s.routed_experts:
            meta["routed_experts"] = list(s.routed_experts)
        parts.append(Completion(list(s.response_ids), list(s.response_logprobs), s.finish_reason,
                                weight_version=s.weight_version, meta=meta))  # fmt: skip
    return dict(group.metadata), parts


def group_id(group: Group) -> int:
    """The id the group was submitted under (seeds derive from it); its prompt index when it has none."""
    return int(group.metadata.get(GID, group.prompt_index))


def is_partial(group: Group) -> bool:
    """A group still in progress (some sample cut short), not yet scored."""
    return any(s.finish_reason == "abort" for s in group.samples)


class PartialRollouts:
    """The partial-rollout half of :class:`~dapo_megatron.rollout.generator.StreamingRollout` (a mixin:
    it uses the rollout's engine pool, seeds, stats and stop flag). Active with ``keep_partial``."""

    # Set by StreamingRollout.__init__ (declared for readers and type checkers).
    engines: list
    sampling: SamplingParams
    max_response_len: int
    max_retries: int
    request_timeout_s: float
    gen_prompts_per_round: int
    partials: List[Group]
    carry: List[Group]
    min_version: Optional[int]
    stale: Dict[str, int]
    stats: RoundStats
    acc: Any
    _next_gid: int
    _stopping: bool
    _segment_cap: Optional[int]

    async def _attempt(self, item: PromptItem, params: SamplingParams, failed_on: set, errors: List[str]) -> Any:
        """One try of a request on the least-loaded engine it has not failed on. Returns
        ``(idx, completions)`` (``completions`` None when the run stopped before it started),
        ``(idx, FAILED)`` after an engine error (recorded in ``errors``, the engine health-checked), or
        ``(None, None)`` when no engine slot will be given any more."""
        idx = await self._acquire(failed_on)
        if idx is None:
            return None, None
        engine = self.engines[idx]
        try:
            out = await asyncio.wait_for(self._start(engine, item, params), self.request_timeout_s)
        except (EngineError, asyncio.TimeoutError, OSError) as e:
            errors.append(f"engine {idx}: {type(e).__name__}: {e}")
            failed_on.add(idx)
            await self._release(idx)
            self.stats.retries += 1
            await self._check_engine(idx, engine, errors[-1])  # EngineDeadError included: a restart may bring it back
            return idx, FAILED
        await self._release(idx)
        return idx, out

    async def _request(self, item: PromptItem, params_of: Callable[[int], SamplingParams]) -> Optional[list]:
        """One request retried across engines (``params_of(attempt)``); None once the run is stopping.
        Aborted completions are returned as they are: the caller continues them."""
        failed_on: set = set()
        errors: List[str] = []
        for attempt in range(self.max_retries + 1):
            idx, out = await self._attempt(item, params_of(attempt), failed_on, errors)
            if idx is None:
                return None
            if out is not FAILED:
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
        return parts, {GID: gid, "segments": segments}

    def _resubmit_partials(self, tasks: Dict[asyncio.Task, int]) -> None:
        """Continue the groups in progress first; one whose oldest token is below ``min_version`` is
        re-generated from its prompt (a fresh group id, so fresh seeds)."""
        partials, self.partials = self.partials, []
        for group in sorted(partials, key=group_id):
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
        self._cond, self._stopping, self.stats = asyncio.Condition(), False, RoundStats()
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
