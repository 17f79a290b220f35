"""The embedded engine in a worker process of its own, against a real worker with a tiny random Qwen2:
bitwise the in-process engine's completions, concurrency, abort, timeouts, shared-memory weight
updates, a killed worker, a dead trainer, shutdown, and one training step through the CLI."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dapo_megatron.observability.sinks import read_metrics
from dapo_megatron.rollout.base import EngineDeadError, RequestTimeout, RolloutEngine, SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.embedded_client import EmbeddedWorkerEngine
from tests.cli_runs import TINY, run_cli, write_demo_assets

CONFIG = {**json.loads((Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text())}
NO_EOS = {**CONFIG, "eos_token_id": None}  # lengths are then set by max_new_tokens alone
PROMPT = [5, 6, 7]


def alive(pid: int) -> bool:
    """The process exists and is not a zombie (a reparented worker is reaped by init, not by us)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def tokens(completions):
    return [(c.token_ids, c.logprobs, c.finish_reason, c.weight_version) for c in completions]


@pytest.fixture(scope="module")
def worker():
    engine = EmbeddedWorkerEngine.start(NO_EOS, seed=0)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def local():
    return EmbeddedEngine(NO_EOS, seed=0)


def test_completions_equal_the_in_process_engine_bitwise(worker, local):
    assert isinstance(worker, RolloutEngine)
    params = SamplingParams(n=3, temperature=0.7, top_p=0.9, max_new_tokens=12, seed=11)

    async def both():
        return await worker.generate(PROMPT, params, timeout_s=120), await local.generate(PROMPT, params)

    remote, ref = asyncio.run(both())
    assert len(remote) == 3 and tokens(remote) == tokens(ref)
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in remote)


def test_concurrent_requests_each_get_their_own_completions(worker, local):
    params = [SamplingParams(n=2, max_new_tokens=4 + i, seed=100 + i) for i in range(6)]
    prompts = [PROMPT[: 1 + i % 3] + [20 + i] for i in range(6)]

    async def many():
        return await asyncio.gather(*(worker.generate(p, sp, timeout_s=120) for p, sp in zip(prompts, params)))

    results = asyncio.run(many())
    for p, sp, got in zip(prompts, params, results):
        assert tokens(got) == tokens(local.generate_sync([p], sp)[0])


def test_abort_returns_partial_tokens_and_spares_later_requests(worker, local):
    long = SamplingParams(n=2, max_new_tokens=4000, seed=5)

    async def abort_midway():
        task = asyncio.ensure_future(worker.generate(PROMPT, long, timeout_s=120))
        await asyncio.sleep(1.5)
        # An update waits for the running request; the abort sent meanwhile must still reach it.
        update = asyncio.ensure_future(worker.update_weights(same_weights, worker.weight_version))
        await asyncio.sleep(0.5)
        await asyncio.wait_for(worker.abort_all(), 10)
        cut = await asyncio.wait_for(task, 30)
        await asyncio.wait_for(update, 30)
        later = await worker.generate(PROMPT, SamplingParams(n=1, max_new_tokens=5, seed=6), timeout_s=120)
        return cut, later

    same_weights = sorted(local.state_dict().items())[:1]  # the values it already has
    cut, later = asyncio.run(abort_midway())
    assert [c.finish_reason for c in cut] == ["abort", "abort"]
    assert all(0 < len(c.token_ids) < 4000 for c in cut)
    # The partial rows are the prefix of what the same seed samples uncut.
    ref = local.generate_sync([PROMPT], SamplingParams(n=2, max_new_tokens=len(cut[0].token_ids), seed=5))[0]
    assert cut[0].token_ids == ref[0].token_ids[: len(cut[0].token_ids)]
    assert later[0].finish_reason == "length" and len(later[0].token_ids) == 5


def test_timeout_raises_and_the_worker_keeps_serving(worker):
    async def run():
        t0 = time.monotonic()
        with pytest.raises(RequestTimeout):
            await worker.generate(PROMPT, SamplingParams(n=1, max_new_tokens=100000, seed=1), timeout_s=0.5)
        assert time.monotonic() - t0 < 5
        return await worker.generate(PROMPT, SamplingParams(n=1, max_new_tokens=3, seed=2), timeout_s=60)

    assert asyncio.run(run())[0].finish_reason == "length"
    assert asyncio.run(worker.health())


def test_weight_update_changes_outputs_and_version_and_bad_buckets_load_nothing(worker, local, monkeypatch):
    params = SamplingParams(n=2, max_new_tokens=8, seed=21)
    before = asyncio.run(worker.generate(PROMPT, params, timeout_s=60))
    new = {k: v + 0.05 * torch.randn_like(v) for k, v in local.state_dict().items()}
    ref = EmbeddedEngine(NO_EOS, seed=123, state_dict=new)
    paths, pack = [], worker._shared.pack

    def spy(named):
        out = pack(named)
        paths.append(out[0])
        return out

    monkeypatch.setattr(worker._shared, "pack", spy)
    # Two buckets, bf16 and float32 mixed: the engine casts, as it does in process.
    items = sorted(new.items())
    half = len(items) // 2
    asyncio.run(worker.update_weights([(k, v.to(torch.bfloat16)) for k, v in items[:half]], 7))
    asyncio.run(worker.update_weights(items[half:], 7))
    ref.update_weights_sync([(k, v.to(torch.bfloat16)) for k, v in items[:half]], 7)
    assert worker.weight_version == 7
    after = asyncio.run(worker.generate(PROMPT, params, timeout_s=60))
    assert tokens(after) == tokens(ref.generate_sync([PROMPT], params)[0])
    assert [c.weight_version for c in after] == [7, 7] and tokens(after) != tokens(before)
    assert paths[0] is not None and not os.path.exists(paths[0])  # the shm file is unlinked once mapped
    name, tensor = items[0]
    with pytest.raises(KeyError, match="no.such.weight"):
        asyncio.run(worker.update_weights([(name, tensor * 0), ("no.such.weight", tensor)], 8))
    with pytest.raises(ValueError, match="shape"):
        asyncio.run(worker.update_weights([(name, tensor * 0), (items[1][0], torch.zeros(3, 3))], 8))
    assert worker.weight_version == 7
    assert tokens(asyncio.run(worker.generate(PROMPT, params, timeout_s=60))) == tokens(after)  # nothing loaded


def test_a_killed_worker_fails_pending_and_later_calls(tmp_path):
    engine = EmbeddedWorkerEngine.start(NO_EOS, seed=1, log_path=str(tmp_path / "w.log"))
    assert "engine ready" in (tmp_path / "w.log").read_text()

    async def kill_midway():
        task = asyncio.ensure_future(engine.generate(PROMPT, SamplingParams(max_new_tokens=100000), timeout_s=600))
        await asyncio.sleep(1.0)
        os.kill(engine.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="exited with -9"):
            await task
        assert time.monotonic() - t0 < 10
        with pytest.raises(EngineDeadError):
            await engine.generate(PROMPT, SamplingParams(), timeout_s=600)
        with pytest.raises(EngineDeadError):
            await engine.update_weights([], 1)
        assert not await engine.health()
        await engine.shutdown()

    asyncio.run(kill_midway())
    assert engine.proc.poll() == -9 and not alive(engine.pid)


PARENT = """
import sys
from dapo_megatron.rollout.embedded_client import EmbeddedWorkerEngine
engine = EmbeddedWorkerEngine.start({config!r}, seed=0)
print(engine.pid, flush=True)
import os
os._exit(0)  # a trainer that dies without shutting anything down
"""


def test_the_worker_exits_when_its_trainer_dies():
    code = PARENT.format(config=NO_EOS)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert wait_gone(int(done.stdout.split()[-1]), 30)


def test_shutdown_leaves_no_process_behind(worker):
    pid = worker.pid
    assert alive(pid)
    asyncio.run(worker.shutdown())
    assert worker.proc.poll() == 0 and not alive(pid)  # it exited by itself after the polite shutdown
    with pytest.raises(EngineDeadError):
        asyncio.run(worker.generate(PROMPT, SamplingParams(), timeout_s=10))
    worker.close()  # idempotent (the fixture calls it again)


def test_training_through_the_cli_with_the_engine_in_a_worker(tmp_path_factory):
    assets = write_demo_assets(tmp_path_factory.mktemp("demo_assets"))
    run = tmp_path_factory.mktemp("worker_run") / "run"
    done = run_cli(assets, "train", "--config", TINY, f"run.dir={run}", "train.total_steps=1",
                   "rollout.embedded_process=true", "run.eval_every=0", timeout=600)  # fmt: skip
    assert "weight check (first step)" in done.stdout  # it passed: the trainer's weights reached the worker
    first = [r for r in read_metrics(str(run)) if r["step"] == 1]
    assert len(first) == 1 and first[0]["sync/weight_version"] == 1
    assert first[0]["rollout/logprob_gap_max"] <= 1e-4
    log = (run / "logs" / "embedded_worker0.log").read_text()
    pid = int(log.split("embedded worker ")[1].split(":")[0])
    assert wait_gone(pid, 10), f"worker {pid} outlived the run"
