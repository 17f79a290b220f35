"""Two real SGLang servers behind the real sglang-router (the trainer's local fleet). Released for the
trainer, they stay in the router's rotation. Then one is SIGKILLed in the middle of a rollout step:
the step completes on the survivor, and every group is accounted for exactly once (offered to the
batch, or aborted when the batch was full); none is lost or doubled.

The fleet is started by the shipped launcher and stopped by PID (process groups) in teardown."""

import asyncio
import threading
import time

import pytest

from dapo_megatron.rewards.base import RewardResult
from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.generator import PromptItem, StreamingRollout
from dapo_megatron.rollout.sglang import SGLangEngine
from dapo_megatron.rollout.sglang_server import LocalSGLangFleet, ServerOptions
from tests.cli_runs import write_demo_assets
from tests.sglang_real import SGLANG_PYTHON, needs_sglang, write_model

pytestmark = [needs_sglang, pytest.mark.sglang, pytest.mark.slow]

TARGET = 6


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_fleet")
    model = write_model(root / "model", write_demo_assets(root / "assets"), seed=0, eos=False)
    opts = ServerOptions(model, device="cpu", api_key="fleet-key", seed=0, max_total_tokens=8192)
    fleet = LocalSGLangFleet(opts, 2, python=SGLANG_PYTHON, log_dir=str(root / "logs")).start(timeout_s=900)
    yield fleet
    fleet.stop()


def mixed_reward(text, truth):
    """Half of each group right, by the parity of the first character: every group is informative."""
    ok = bool(text) and ord(text[0]) % 2 == 0
    return RewardResult(1.0 if ok else -1.0, ok, text[:1])


class CountingEngine(SGLangEngine):
    """The real adapter, counting its requests (to kill a worker once the step is under way)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = 0

    async def generate(self, prompt_ids, params, *, timeout_s):
        self.started += 1
        return await super().generate(prompt_ids, params, timeout_s=timeout_s)


def test_workers_released_for_the_trainer_stay_in_the_routers_rotation(fleet):
    """A colocated step holds the workers paused and released while the trainer works. The router
    probes them every second with a 5 s timeout; a probe that needs a generated token fails on a paused
    worker, and the router would answer the next rollout with 503 (seen in CI). Held longer than one
    probe timeout, both workers stay healthy and the first request after the resume is served."""
    engine = SGLangEngine(fleet.base_url, worker_urls=fleet.worker_urls, api_key="fleet-key")
    hold_s = 8.0  # > the router's probe timeout (5 s) plus its interval (1 s)

    async def go():
        try:
            await engine.release_memory()
            seen, deadline = [], time.monotonic() + hold_s
            while time.monotonic() < deadline:
                workers = await asyncio.to_thread(fleet.router.workers)
                seen.append(sorted(bool(w.get("is_healthy")) for w in workers.values()))
                await asyncio.sleep(0.5)
            await engine.resume_memory()
            after = await engine.generate([3, 4, 5], SamplingParams(n=1, max_new_tokens=4), timeout_s=120)
            return seen, after
        finally:
            await engine.shutdown()

    seen, after = asyncio.run(go())
    assert len(seen) >= 10 and all(s == [True, True] for s in seen), seen
    assert len(after[0].token_ids) == 4


def test_a_worker_killed_mid_step_loses_no_group(fleet):
    engine = CountingEngine(fleet.base_url, worker_urls=fleet.worker_urls, api_key="fleet-key")
    offered = []

    def decode(ids):
        return "".join(chr(97 + t % 26) for t in ids)

    rollout = StreamingRollout(
        [engine], mixed_reward, tokenizer_decode=decode,
        sampling=SamplingParams(n=4, temperature=1.0, max_new_tokens=200, seed=3), max_response_len=200,
        target_groups=TARGET, gen_prompts_per_round=12, filter_enable=False, max_concurrency=3,
        request_timeout_s=300, max_retries=3, overlong_enable=False,
    )  # fmt: skip
    offer = rollout.acc.offer
    rollout.acc.offer = lambda group, values: (offered.append(group.metadata["group_id"]), offer(group, values))[1]
    victim = fleet.servers[1]
    killed = threading.Event()

    def kill_when_busy():
        while engine.started < 4 and not killed.is_set():
            threading.Event().wait(0.05)
        threading.Event().wait(1.0)  # let requests reach the victim
        victim.kill()
        killed.set()

    killer = threading.Thread(target=kill_when_busy)
    killer.start()
    items = iter(range(10_000))

    def source(k):
        return [PromptItem(i, [3 + i % 7, 4, 5], "a") for i in (next(items) for _ in range(k))]

    async def step():
        try:
            return await rollout.run(source)
        finally:
            await engine.shutdown()

    try:
        batch, metrics = asyncio.run(step())
    finally:
        killed.set()
        killer.join()
    assert not victim.alive() and fleet.servers[0].alive()
    ids = [g.metadata["group_id"] for g in batch]
    assert len(batch) == TARGET and len(set(ids)) == TARGET  # the step completed, no group twice
    assert len(offered) == len(set(offered))  # nothing was offered twice either
    submitted = rollout._next_gid
    assert len(offered) + metrics["rollout/aborted_groups"] == submitted  # every group accounted for once
    print(f"killed mid-step: {submitted} groups submitted, {len(offered)} offered, "
          f"{int(metrics['rollout/aborted_groups'])} aborted, {int(metrics['rollout/retries'])} retries")  # fmt: skip
