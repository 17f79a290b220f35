"""Embedded workers as processes behind a real sglang-router, driven by SGLangEngine: generation with
exact logprobs, a broadcast weight update, abort, control endpoints, and a worker SIGKILLed mid-step.

Every process is started here on a free port and stopped by PID in fixture teardown."""

import asyncio
import json
import os
import pathlib
import signal
import threading

import pytest
import torch

from dapo_megatron.rewards.base import RewardResult
from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.generator import PromptItem, StreamingRollout
from dapo_megatron.rollout.process import embedded_worker_argv, free_port, start_process, stop_process, wait_http_ok
from dapo_megatron.rollout.router import SGLangRouter
from dapo_megatron.rollout.sglang import SGLangEngine

CONFIG = {
    **json.loads((pathlib.Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text()),
    "eos_token_id": None,
}  # no EOS: lengths are controlled by max_new_tokens only


class Cluster:
    def __init__(self, tmp, n_workers):
        cfg = tmp / "config.json"
        cfg.write_text(json.dumps(CONFIG))
        self.logs = [str(tmp / f"worker{i}.log") for i in range(n_workers)]
        self.ports = [free_port() for _ in range(n_workers)]
        # Same seed -> same initial weights on every worker (sampling seeds come per request).
        self.procs = [
            start_process(embedded_worker_argv(host="127.0.0.1", port=p, model_config=str(cfg), seed=0), log_path=log)
            for p, log in zip(self.ports, self.logs)
        ]
        self.router = SGLangRouter(port=free_port(), log_path=str(tmp / "router.log"))

    @property
    def worker_urls(self):
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    def start(self):
        self.router.start(timeout_s=60)
        for url, proc in zip(self.worker_urls, self.procs):
            wait_http_ok(url + "/health", timeout_s=120, proc=proc)
            self.router.add_worker(url)
        return self

    def stop(self):
        self.router.stop()
        for proc in self.procs:
            stop_process(proc, timeout_s=10)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"), 2)
    try:
        yield c.start()
    finally:
        c.stop()


def engine_for(cluster):
    return SGLangEngine(cluster.router.url, worker_urls=cluster.worker_urls, timeout_s=120)


def teacher_forced(model, prompt, response):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


async def _generate(engine, prompt, **kw):
    try:
        return await engine.generate(prompt, SamplingParams(**kw), timeout_s=120)
    finally:
        await engine.shutdown()


def test_generate_through_router_matches_local_model(cluster):
    prompt = [5, 6, 7, 8]
    out = asyncio.run(_generate(engine_for(cluster), prompt, n=3, max_new_tokens=16, seed=4))
    assert len(out) == 3 and {c.finish_reason for c in out} == {"length"}
    local = EmbeddedEngine(CONFIG, seed=0)  # the workers' initial weights
    for c in out:
        assert len(c.token_ids) == 16 and c.weight_version == 0
        torch.testing.assert_close(
            torch.tensor(c.logprobs), teacher_forced(local.model, prompt, c.token_ids), atol=1e-5, rtol=0
        )


def test_control_endpoints_answer_on_every_worker(cluster):
    async def scenario():
        eng = engine_for(cluster)
        try:
            await eng.pause()
            await eng.resume()
            await eng.flush_cache()
            await eng.release_memory()
            await eng.resume_memory()
            return await eng.health(), eng.dead_workers
        finally:
            await eng.shutdown()

    assert asyncio.run(scenario()) == (True, set())


def test_weight_update_over_broadcast_changes_outputs_and_version(cluster):
    prompt = [9, 10, 11]
    local = EmbeddedEngine(CONFIG, seed=0)
    gen = torch.Generator().manual_seed(3)
    new = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in local.state_dict().items() if k != "lm_head.weight"
    }  # tied to embed_tokens: sent once

    async def scenario():
        eng = engine_for(cluster)
        try:
            before = await eng.generate(prompt, SamplingParams(n=2, max_new_tokens=12, seed=1), timeout_s=60)
            await eng.init_weight_group("127.0.0.1", free_port(), backend="gloo", timeout_s=60)
            eng.bucket_bytes = 64 * 1024  # several buckets
            await eng.update_weights(list(new.items()), 5)
            after = [
                await eng.generate(prompt, SamplingParams(n=2, max_new_tokens=12, seed=1), timeout_s=60)
                for _ in range(2)
            ]  # round robin: both workers answer
            return before, after, eng.weight_version
        finally:
            await eng.shutdown()

    before, after, version = asyncio.run(scenario())
    assert version == 5
    local.update_weights_sync(list(new.items()), 5)
    for batch in after:
        assert {c.weight_version for c in batch} == {5}
        assert [c.token_ids for c in batch] != [c.token_ids for c in before]
        for c in batch:
            # float32 noise of a padded, cached batch vs one plain forward grows with |logp| (~5 here)
            torch.testing.assert_close(
                torch.tensor(c.logprobs), teacher_forced(local.model, prompt, c.token_ids), atol=1e-5, rtol=1e-5
            )


def test_abort_stops_in_flight_requests(cluster):
    async def scenario():
        eng = engine_for(cluster)
        try:
            task = asyncio.ensure_future(
                eng.generate([1, 2, 3], SamplingParams(n=2, max_new_tokens=100_000), timeout_s=120)
            )
            await asyncio.sleep(1.0)
            assert not task.done()
            await eng.abort_all()
            return await asyncio.wait_for(task, 30)
        finally:
            await eng.shutdown()

    out = asyncio.run(scenario())
    assert {c.finish_reason for c in out} == {"abort"}
    assert all(0 < len(c.token_ids) < 100_000 for c in out)


def test_worker_killed_mid_rollout_step_completes_on_survivor(tmp_path):
    c = Cluster(tmp_path, 2)
    try:
        c.start()

        def reward(text, truth):  # "right" when the first response token is even: groups vary
            ok = int(text.split()[0]) % 2 == 0
            return RewardResult(1.0 if ok else -1.0, ok, text.split()[0])

        counter = iter(range(10**6))

        def source(k):
            return [PromptItem(i, [i % 100 + 1, 7, 8], "") for i in (next(counter) for _ in range(k))]

        r = StreamingRollout(
            [engine_for(c)],
            reward,
            tokenizer_decode=lambda ids: " ".join(map(str, ids)),
            sampling=SamplingParams(n=4, max_new_tokens=300, seed=0),
            max_response_len=300,
            overlong_len=50,
            target_groups=6,
            gen_prompts_per_round=8,
            max_concurrency=8,
            request_timeout_s=120,
            max_retries=3,
        )
        killer = threading.Timer(1.0, lambda: os.kill(c.procs[0].pid, signal.SIGKILL))
        killer.start()
        try:
            groups, m = asyncio.run(r.run(source))
        finally:
            killer.cancel()
        assert c.procs[0].poll() is not None, "the worker was not killed during the step"
        assert len(groups) == 6
        ids = [g.metadata["group_id"] for g in groups]
        assert len(set(ids)) == 6
        assert all(len(g.samples) == 4 and all(s.finish_reason == "length" for s in g.samples) for g in groups)
        # every submitted group is either offered once or was in flight at the stop, never both
        assert r._next_gid == m["ds/generated_groups"] + m["rollout/aborted_groups"]
        assert c.worker_urls[0] in r.engines[0].dead_workers  # the abort fan-out found it dead
    finally:
        c.stop()


def test_router_removes_and_readds_a_worker(cluster):
    router, url = cluster.router, cluster.worker_urls[1]
    assert set(router.workers()) == set(cluster.worker_urls)
    router.remove_worker(url)
    assert set(router.workers()) == {cluster.worker_urls[0]}
    router.add_worker(url)
    assert router.workers()[url]["is_healthy"] is True
