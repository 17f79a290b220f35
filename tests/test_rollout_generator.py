"""Streaming dynamic sampling on scripted fake engines: filtering, refill and its sizing, abort of the
surplus (nothing starts after it), the round bound, retries, dead engines, per-worker concurrency, and
the dump/replay seam."""

import asyncio
import time

import pytest

from dapo_megatron.algo.dynamic_sampling import DynamicSamplingExhausted
from dapo_megatron.rewards.base import RewardResult
from dapo_megatron.rollout.base import Completion, EngineDeadError, EngineError, RolloutEngine, SamplingParams
from dapo_megatron.rollout.generator import PromptItem, RolloutFailed, StreamingRollout, dump_groups, load_groups

N = 4
LATE_S = 0.3  # long enough for every fast group of a round to be scored and offered first


class FakeEngine:
    """Scripted engine. The prompt's first token picks the script: ``kind[p]`` is "mixed" (2 right,
    2 wrong), "right", "wrong", "late" (wrong, after LATE_S), "late_mixed" (mixed, after LATE_S) or "slow" (blocks
    until aborted). Token 1
    decodes to the right answer."""

    def __init__(self, kinds, *, fail_times=0, dead=False, delay=0.0):
        self.kinds, self.fail_times, self.dead, self.delay = kinds, fail_times, dead, delay
        self.calls, self.aborts, self.version = [], 0, 0
        self._abort = None

    @property
    def weight_version(self):
        return self.version

    async def generate(self, prompt_ids, params, *, timeout_s):
        self.calls.append(prompt_ids[0])
        if self.dead:
            raise EngineDeadError("connection refused")
        if self.fail_times > 0:
            self.fail_times -= 1
            raise EngineError("HTTP 500")
        kind = self.kinds[prompt_ids[0]]
        if kind == "slow":
            self._abort = self._abort or asyncio.Event()
            await self._abort.wait()
            return [Completion([7], [-1.0], "abort", self.version) for _ in range(params.n)]
        await asyncio.sleep(LATE_S if kind.startswith("late") else self.delay)
        right = {"mixed": [1, 1, 2, 2], "late_mixed": [1, 1, 2, 2], "right": [1] * N, "wrong": [2] * N,
                 "late": [2] * N}[kind]  # fmt: skip
        lengths = [3, 8, 10, 12]  # 12 hits max_new_tokens -> "length"
        return [
            Completion(
                [right[i]] * lengths[i], [-0.5] * lengths[i], "length" if lengths[i] == 12 else "stop", self.version
            )
            for i in range(params.n)
        ]

    async def abort_all(self):
        self.aborts += 1
        if self._abort is not None:
            self._abort.set()

    async def pause(self): ...
    async def resume(self): ...
    async def release_memory(self): ...
    async def resume_memory(self): ...
    async def update_weights(self, named_tensors, version):
        self.version = version

    async def health(self):
        return not self.dead

    async def shutdown(self): ...


def reward(text, truth):
    ok = text.startswith(truth)
    return RewardResult(1.0 if ok else -1.0, ok, text[:1])


def decode(ids):
    return "".join("R" if t == 1 else "W" for t in ids)


class Source:
    """Prompts 0, 1, 2, ... in order; ``kinds`` maps the prompt index to its script."""

    def __init__(self):
        self.next, self.requests = 0, []

    def __call__(self, k):
        self.requests.append(k)
        items = [PromptItem(i, [i, 100], "R", {"src": i}) for i in range(self.next, self.next + k)]
        self.next += k
        return items


def rollout(engines, **kw):
    args = dict(
        tokenizer_decode=decode,
        sampling=SamplingParams(n=N, max_new_tokens=12, seed=1),
        max_response_len=12,
        overlong_len=4,
        target_groups=2,
        gen_prompts_per_round=3,
        max_num_gen_batches=0,
        max_concurrency=8,
        request_timeout_s=5,
        max_retries=2,
    )
    args.update(kw)
    return StreamingRollout(engines, reward, **args)


def run(r, source):
    return asyncio.run(r.run(source))


def test_fake_engine_satisfies_protocol():
    assert isinstance(FakeEngine({}), RolloutEngine)


def test_zero_variance_groups_dropped_and_refilled():
    kinds = {0: "right", 1: "mixed", 2: "wrong", 3: "wrong", 4: "right", 5: "mixed"}
    eng, src = FakeEngine(kinds), Source()
    groups, m = run(rollout([eng]), src)
    assert [g.prompt_index for g in groups] == [1, 5]
    assert src.requests == [3, 3]  # a second round was needed
    assert m["ds/rounds"] == 2 and m["ds/kept_groups"] == 2
    # Rewards are scored in threads, so groups finish in any order: once 1 and 5 are in, the step is
    # full and the zero-variance groups still running are aborted uncounted. The second round only
    # starts after a round-one drop, so between 4 and 6 groups were generated.
    assert m["ds/generated_groups"] in (4.0, 5.0, 6.0)
    s = groups[0].samples
    assert [x.acc for x in s] == [True, True, False, False]
    assert [x.score for x in s] == [1.0, 1.0, -1.0, -1.0]
    # overlong: L_max 12, buffer 4 -> lengths 3, 8 unpenalised; 10 -> -0.5; 12 -> -1
    assert [x.reward for x in s] == [1.0, 1.0, -1.5, -2.0]
    assert s[3].finish_reason == "length" and m["rollout/truncation_rate"] == 0.25
    assert m["rollout/response_len_max"] == 12 and m["rollout/response_len_mean"] == 8.25
    assert {g.metadata["group_id"] for g in groups} == {1, 5} and groups[0].metadata["src"] == 1


def test_surplus_in_flight_is_aborted_and_not_counted():
    kinds = {0: "mixed", 1: "mixed", 2: "slow", 3: "slow"}
    eng = FakeEngine(kinds)
    r = rollout([eng], gen_prompts_per_round=4)
    groups, m = run(r, Source())
    assert [g.prompt_index for g in groups] == [0, 1]
    assert eng.aborts == 1
    assert m["ds/generated_groups"] == 2 and m["rollout/aborted_groups"] == 2
    # each aborted group came back with N one-token samples: the work the stop threw away is counted
    assert m["rollout/aborted_tokens"] == 2 * N
    assert m["rollout/aborted_token_frac"] == pytest.approx(
        2 * N / (2 * N + m["rollout/tokens_per_s"] * m["rollout/generate_time_s"])
    )
    assert r.carry == []


def test_keep_surplus_carries_completed_groups_to_next_step():
    kinds = {i: "mixed" for i in range(12)}
    r = rollout([FakeEngine(kinds)], gen_prompts_per_round=3, keep_surplus=True)
    src = Source()
    first, _ = run(r, src)
    assert len(first) == 2 and len(r.carry) == 1
    carried = r.carry[0]
    second, m = run(r, src)
    assert second[0] is carried  # offered first in the next step
    ids = [g.metadata["group_id"] for g in first + second]
    assert len(ids) == len(set(ids)) == 4  # nothing counted twice across steps
    assert src.requests == [3, 3]


def test_bound_raises_clear_error():
    eng = FakeEngine({i: "wrong" for i in range(20)})
    with pytest.raises(DynamicSamplingExhausted, match="too easy or too hard"):
        run(rollout([eng], max_num_gen_batches=2), Source())
    assert len(eng.calls) == 6  # exactly two rounds of three


def test_bound_with_pad_fills_with_zero_variance_groups():
    eng = FakeEngine({0: "mixed", 1: "wrong", 2: "right", 3: "wrong", 4: "wrong", 5: "wrong"})
    groups, m = run(rollout([eng], max_num_gen_batches=2, on_exhausted="pad", target_groups=3), Source())
    assert len(groups) == 3 and groups[0].prompt_index == 0 and m["ds/padded_groups"] == 2


def test_failed_request_retried_on_another_engine():
    kinds = {i: "mixed" for i in range(3)}
    bad, good = FakeEngine(kinds, fail_times=100), FakeEngine(kinds, delay=0.01)
    r = rollout([bad, good], gen_prompts_per_round=2)
    groups, m = run(r, Source())
    assert len(groups) == 2 and all(g.metadata["engine"] == 1 for g in groups)
    assert m["rollout/retries"] >= 1
    assert r.healthy == [True, True]  # bad answers health checks: still used, but retries go elsewhere


def test_dead_engine_is_skipped_and_nothing_lost():
    kinds = {i: "mixed" for i in range(6)}
    dead, alive = FakeEngine(kinds, dead=True), FakeEngine(kinds, delay=0.01)
    r = rollout([dead, alive], target_groups=4, gen_prompts_per_round=4)
    groups, m = run(r, Source())
    assert sorted(g.prompt_index for g in groups) == [0, 1, 2, 3]
    assert r.healthy == [False, True] and m["rollout/healthy_engines"] == 1
    # Requests already dispatched to it before the first failure was seen hit it; none after.
    calls = len(dead.calls)
    assert 1 <= calls <= 2
    more, _ = run(r, Source())
    assert len(more) == 4 and len(dead.calls) == calls


def test_restart_callback_replaces_dead_engine():
    kinds = {i: "mixed" for i in range(2)}
    dead, fresh = FakeEngine(kinds, dead=True), FakeEngine(kinds)
    restarted = []

    async def restart(idx):
        restarted.append(idx)
        return fresh

    r = rollout([dead], restart_engine=restart, gen_prompts_per_round=2)
    groups, _ = run(r, Source())
    assert restarted == [0] and r.engines == [fresh] and len(groups) == 2


def test_retries_exhausted_fail_the_step():
    eng = FakeEngine({0: "mixed", 1: "mixed", 2: "mixed"}, fail_times=100)
    with pytest.raises(RolloutFailed, match="failed 3 times"):
        run(rollout([eng], max_retries=2), Source())


def test_all_engines_dead_fails_clearly():
    why = "no healthy rollout engine left: engine 0: EngineDeadError: connection refused, then its health check failed"
    with pytest.raises(RolloutFailed, match=why):
        run(rollout([FakeEngine({0: "mixed"}, dead=True)]), Source())


def test_filter_disabled_keeps_everything():
    eng = FakeEngine({0: "right", 1: "wrong", 2: "mixed"})
    groups, m = run(rollout([eng], filter_enable=False, target_groups=3), Source())
    assert [g.prompt_index for g in groups] == [0, 1, 2] and m["ds/kept_ratio"] == 1.0


def test_filter_on_shaped_reward_lets_all_wrong_with_lengths_through():
    eng = FakeEngine({0: "wrong", 1: "wrong"})
    groups, _ = run(rollout([eng], filter_metric="seq_reward", gen_prompts_per_round=2), Source())
    assert len(groups) == 2  # the overlong penalty makes all-wrong groups look varied (why acc is default)


def test_dump_and_replay_round_trip(tmp_path):
    groups, _ = run(rollout([FakeEngine({i: "mixed" for i in range(3)})]), Source())
    path = tmp_path / "step.jsonl"
    dump_groups(groups, str(path))
    again = load_groups(str(path))
    assert again == groups
    assert [p.name for p in tmp_path.iterdir()] == ["step.jsonl"]  # no temporary file left behind


def test_replay_of_a_damaged_dump_names_file_and_line(tmp_path):
    groups, _ = run(rollout([FakeEngine({i: "mixed" for i in range(3)})]), Source())
    path = tmp_path / "step.jsonl"
    dump_groups(groups, str(path))
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2] + "\n")  # a torn second line
    with pytest.raises(ValueError, match=rf"{path.name}:2: not a dumped rollout group"):
        load_groups(str(path))


class StopRaceEngine(FakeEngine):
    """Every prompt is "mixed" after ``work_s``. Per the protocol, ``abort_all`` ends only the requests
    in flight when it is called: one started later runs on until its timeout. ``events`` records
    "generate" and "abort" in call order."""

    def __init__(self, work_s=0.02):
        super().__init__({}, delay=0.0)
        self.work_s, self.events, self._running = work_s, [], set()

    async def generate(self, prompt_ids, params, *, timeout_s):
        self.events.append("generate")
        aborted = asyncio.Event()
        self._running.add(aborted)
        try:
            late = "abort" in self.events  # nothing will ever abort this request
            await asyncio.wait_for(aborted.wait(), None if late else self.work_s)
            return [Completion([7], [-1.0], "abort", self.version) for _ in range(params.n)]
        except asyncio.TimeoutError:
            self.kinds[prompt_ids[0]] = "mixed"
            return await super().generate(prompt_ids, params, timeout_s=timeout_s)
        finally:
            self._running.discard(aborted)

    async def abort_all(self):
        self.events.append("abort")
        for ev in self._running:
            ev.set()


@pytest.mark.parametrize("max_concurrency", [1, 2])
def test_no_request_starts_after_abort(max_concurrency):
    eng = StopRaceEngine()
    r = rollout([eng], gen_prompts_per_round=40, max_concurrency=max_concurrency, request_timeout_s=30)
    start = time.monotonic()
    groups, m = run(r, Source())
    elapsed = time.monotonic() - start
    assert len(groups) == 2 and eng.events.count("abort") == 1
    first_abort = eng.events.index("abort")
    # Tasks waiting for a slot when the batch filled must give up, not send fresh requests that the
    # abort does not cover (and that the stop would then wait out, up to request_timeout_s).
    assert eng.events[first_abort:].count("generate") == 0
    assert elapsed < 5
    assert r._next_gid == m["ds/generated_groups"] + m["rollout/aborted_groups"] == 40


@pytest.mark.parametrize(
    "kinds, target, per_round, refill",
    [
        # 3 of 10 kept, none in flight: need = ceil(1 / 0.3) = 4, +25% -> 5
        ({**{i: "mixed" for i in range(3)}, **{i: "late" for i in range(3, 10)}}, 4, 10, 5),
        # 6 of 11 kept, 1 in flight (slow) counted at that rate: need = ceil(2 * 11 / 6) - 1 = 3, +25% -> 4.
        # (In completion order: in submission order the slow group would hold back the refill's.)
        ({**{i: "mixed" for i in range(6)}, **{i: "late" for i in range(6, 11)}, 11: "slow"}, 8, 12, 4),
    ],
)
def test_refill_round_is_sized_from_the_keep_rate(kinds, target, per_round, refill):
    kinds = {**kinds, **{i: "mixed" for i in range(per_round, per_round + 20)}}
    src = Source()
    order = "completion" if "slow" in kinds.values() else "submission"
    r = rollout([FakeEngine(kinds)], target_groups=target, gen_prompts_per_round=per_round, offer_order=order)
    groups, m = run(r, src)
    assert src.requests == [per_round, refill] and refill < per_round
    assert len(groups) == target and m["ds/rounds"] == 2


@pytest.mark.parametrize("order, batch", [("submission", [0, 1]), ("completion", [1, 2])])
def test_offer_order_decides_which_groups_fill_the_batch(order, batch):
    # Group 0 is informative but finishes last. Submission order waits for it (the batch does not
    # depend on timing, nor favour short responses); completion order fills with the two fast ones.
    kinds = {0: "late_mixed", 1: "mixed", 2: "mixed"}
    groups, m = run(rollout([FakeEngine(kinds)], target_groups=2, offer_order=order), Source())
    assert [g.prompt_index for g in groups] == batch
    assert m["rollout/aborted_groups"] == 1  # the third is the surplus either way


def test_refill_with_nothing_kept_yet_submits_a_full_round():
    src = Source()
    kinds = {**{i: "late" for i in range(3)}, **{i: "mixed" for i in range(3, 6)}}
    run(rollout([FakeEngine(kinds)], target_groups=2, gen_prompts_per_round=3), src)
    assert src.requests == [3, 3]  # no keep rate observed: the user's oversampling


class PeakEngine(FakeEngine):
    """Every prompt is "mixed" after ``delay``; ``seen`` holds, per call, how many calls were running."""

    def __init__(self, num_workers=None, delay=0.05):
        super().__init__({}, delay=delay)
        if num_workers is not None:
            self.num_workers = num_workers
        self.running, self.seen = 0, []

    async def generate(self, prompt_ids, params, *, timeout_s):
        self.kinds[prompt_ids[0]] = "mixed"
        self.running += 1
        self.seen.append(self.running)
        try:
            return await super().generate(prompt_ids, params, timeout_s=timeout_s)
        finally:
            self.running -= 1


@pytest.mark.parametrize("num_workers, peak", [(None, 2), (1, 2), (3, 6)])
def test_concurrency_cap_is_per_worker(num_workers, peak):
    eng = PeakEngine(num_workers)
    run(rollout([eng], max_concurrency=2, target_groups=12, gen_prompts_per_round=12), Source())
    assert max(eng.seen) == peak


def test_dead_worker_lowers_the_cap_at_the_next_acquire():
    eng = PeakEngine(num_workers=3)
    orig = eng.generate

    async def generate(prompt_ids, params, *, timeout_s):
        out = await orig(prompt_ids, params, timeout_s=timeout_s)
        eng.num_workers = 1  # a worker died while the first calls ran: one is left
        return out

    eng.generate = generate
    run(rollout([eng], max_concurrency=2, target_groups=12, gen_prompts_per_round=12), Source())
    assert eng.seen[:6] == [1, 2, 3, 4, 5, 6] and max(eng.seen[6:]) <= 2  # read at every acquire


def test_zero_workers_still_takes_one_slot_instead_of_blocking():
    eng = PeakEngine(num_workers=0, delay=0.0)
    groups, _ = run(rollout([eng], max_concurrency=2, gen_prompts_per_round=4), Source())
    assert len(groups) == 2 and max(eng.seen) == 2
