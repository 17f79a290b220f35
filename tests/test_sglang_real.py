"""A real SGLang server (0.5.23, CPU backend) driven through the project's adapter: generation and
log-probs against transformers, per-sample seeds, abort, pause/continue, memory release/resume, both
weight-update paths with version stamps, and a server that cannot start.

One server, started by the shipped launcher (``LocalSGLangFleet``) on a free port, serves the module;
it is stopped by PID (its whole process group) in the fixture's teardown."""

import asyncio
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.process import free_port
from dapo_megatron.rollout.sglang import SGLangEngine
from dapo_megatron.rollout.sglang_server import LocalSGLangFleet, ServerOptions, SGLangServer, SGLangStartError
from tests.cli_runs import write_demo_assets
from tests.sglang_real import SGLANG_PYTHON, hf_model, needs_sglang, teacher_forced, write_model

pytestmark = [needs_sglang, pytest.mark.sglang, pytest.mark.slow]

PROMPT = [3, 4, 5, 6, 7]
LOGPROB_TOL = 2e-3  # fp32 weights on both sides; SGLang's torch-native attention vs transformers' eager


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sglang_models")
    assets = write_demo_assets(root / "assets")
    return {seed: write_model(root / f"model-{seed}", assets, seed=seed, eos=False) for seed in (0, 1)}


@pytest.fixture(scope="module")
def fleet(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("sglang_logs")
    opts = ServerOptions(models[0], device="cpu", api_key="test-key", seed=0, max_total_tokens=4096)
    fleet = LocalSGLangFleet(opts, 1, python=SGLANG_PYTHON, log_dir=str(logs)).start(timeout_s=600)
    yield fleet
    fleet.stop()
    assert not any(s.alive() for s in fleet.servers)


def engine_for(fleet, transport="tensor"):
    return SGLangEngine(fleet.base_url, worker_urls=fleet.worker_urls, api_key="test-key", transport=transport)


def run(coro):
    return asyncio.run(coro)


def generate(fleet, params):
    """One ``generate`` through a fresh adapter (closed on the same event loop)."""

    async def go():
        engine = engine_for(fleet)
        try:
            return await engine.generate(PROMPT, params, timeout_s=120)
        finally:
            await engine.shutdown()

    return run(go())


def gap_to(model_path, completions, temperature):
    model = hf_model(model_path)
    gaps = [
        (teacher_forced(model, PROMPT, c.token_ids, temperature) - torch.tensor(c.logprobs)).abs().max().item()
        for c in completions
    ]
    return max(gaps)


def test_generate_logprobs_match_transformers(fleet, models):
    completions = generate(fleet, SamplingParams(n=2, temperature=0.7, max_new_tokens=12))
    assert len(completions) == 2 and all(len(c.token_ids) == len(c.logprobs) > 0 for c in completions)
    gap = gap_to(models[0], completions, 0.7)
    print(f"SGLang vs transformers log-prob gap at T=0.7: {gap:.2e}")
    assert gap < LOGPROB_TOL


def test_requests_need_the_api_key(fleet):
    r = httpx.post(fleet.base_url + "/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1}})
    assert r.status_code == 401


def test_a_seeded_group_gives_each_sample_its_own_request(fleet):
    completions = generate(fleet, SamplingParams(n=3, temperature=1.0, max_new_tokens=6, seed=11))
    assert len(completions) == 3 and len({c.meta["id"] for c in completions}) == 3


async def decoding(engine, n):
    """A request of ``n`` long samples (no EOS in the model), given 2 s to be decoding."""
    task = asyncio.ensure_future(engine.generate(PROMPT, SamplingParams(n=n, max_new_tokens=3000), timeout_s=300))
    await asyncio.sleep(2.0)
    return task


def test_abort_all_returns_partial_tokens_and_leaves_nothing_running(fleet):
    async def go():
        engine = engine_for(fleet)
        try:
            task = await decoding(engine, n=2)
            start = time.monotonic()
            await engine.abort_all()
            done = await asyncio.wait_for(task, 60)
            return done, time.monotonic() - start, engine._in_flight
        finally:
            await engine.shutdown()

    completions, waited, in_flight = run(go())
    assert [c.finish_reason for c in completions] == ["abort", "abort"]
    # A sample still queued behind its sibling comes back with no token at all; one that ran keeps its own.
    assert all(len(c.token_ids) < 3000 and len(c.logprobs) == len(c.token_ids) for c in completions)
    assert max(len(c.token_ids) for c in completions) > 0
    assert waited < 30 and not in_flight


def test_pause_continue_and_memory_release_resume(fleet):
    async def go():
        engine = engine_for(fleet)
        try:
            task = await decoding(engine, n=1)
            await engine.pause()  # mode "abort": the running request comes back aborted
            [paused] = await asyncio.wait_for(task, 60)
            await engine.resume()
            await engine.resume_memory()  # never released: must not reach the server (it would crash)
            await engine.release_memory()
            await engine.resume_memory()
            after = await engine.generate(PROMPT, SamplingParams(n=1, max_new_tokens=4), timeout_s=120)
            return paused, after, await engine.health()
        finally:
            await engine.shutdown()

    paused, after, healthy = run(go())
    assert paused.finish_reason == "abort" and len(after[0].token_ids) == 4 and healthy


def test_memory_released_while_a_request_runs_keeps_the_server(fleet):
    """The end of a colocated rollout: a release arrives while a request still decodes. The engine
    pauses (the request comes back aborted), waits until the scheduler is idle, then releases; the
    server survives and serves after the resume (SGLang exits on a release that is not idle)."""

    async def go():
        engine = engine_for(fleet)
        try:
            task = await decoding(engine, n=2)
            await engine.release_memory()
            aborted = await asyncio.wait_for(task, 60)
            await engine.resume_memory()
            after = await engine.generate(PROMPT, SamplingParams(n=1, max_new_tokens=4), timeout_s=120)
            return aborted, after
        finally:
            await engine.shutdown()

    aborted, after = run(go())
    assert [c.finish_reason for c in aborted] == ["abort", "abort"] and len(after[0].token_ids) == 4
    assert all(s.alive() for s in fleet.servers)


def _named(model_path):
    return sorted(load_file(str(next(Path(model_path).glob("*.safetensors")))).items())


def _version_of(fleet):
    r = httpx.get(fleet.base_url + "/model_info", headers={"Authorization": "Bearer test-key"})
    return r.json()["weight_version"]


@pytest.mark.parametrize("transport", ["tensor", "distributed"])
def test_live_weight_update_moves_logprobs_and_stamps_the_version(fleet, models, transport):
    """Load the other seed's weights live, then back: each time the log-probs follow transformers on the
    weights just sent, and the version is stamped on the server and on every completion."""
    params = SamplingParams(n=2, temperature=1.0, max_new_tokens=8)

    async def go():
        engine = engine_for(fleet, transport)
        try:
            if transport == "distributed":
                await engine.init_weight_group("127.0.0.1", free_port(), backend="gloo", group_name=f"g{free_port()}")
            results = []
            for version, seed in ((10, 1), (11, 0)):
                await engine.update_weights(_named(models[seed]), version)
                results.append((seed, version, await engine.generate(PROMPT, params, timeout_s=120)))
            return results
        finally:
            await engine.shutdown()

    for seed, version, completions in run(go()):
        assert all(c.weight_version == version for c in completions)
        gap = gap_to(models[seed], completions, 1.0)
        print(f"{transport}: after update to seed {seed} (version {version}) gap {gap:.2e}")
        assert gap < LOGPROB_TOL
    assert _version_of(fleet) == "11"


def test_a_server_that_cannot_start_is_reported_with_its_log(tmp_path):
    bad = tmp_path / "not-a-model"
    bad.mkdir()
    server = SGLangServer(ServerOptions(str(bad), device="cpu", port=free_port()), python=SGLANG_PYTHON,
                          log_path=str(tmp_path / "bad.log"))  # fmt: skip
    server.start()
    try:
        with pytest.raises(SGLangStartError, match="did not start") as err:
            server.wait_ready(timeout_s=300)
        assert "not-a-model" in str(err.value)  # the log tail names what it could not load
    finally:
        server.stop()
