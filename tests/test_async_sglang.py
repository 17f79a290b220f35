"""Partial rollouts on a real SGLang CPU server (0.5.23): a head start aborted mid-response keeps its
tokens (``/abort_request``), the weights change live, and the same samples continue from their prefix
with the new weights; per-token versions and each segment's log-probs follow the weights that drew it."""

import asyncio
import threading
import time

import pytest
import torch

from dapo_megatron.rewards.base import RewardResult
from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.generator import PromptItem, StreamingRollout
from dapo_megatron.rollout.sglang import SGLangEngine
from dapo_megatron.rollout.sglang_server import LocalSGLangFleet, ServerOptions
from tests.cli_runs import write_demo_assets
from tests.sglang_real import SGLANG_PYTHON, hf_model, needs_sglang, teacher_forced, write_model
from tests.test_sglang_real import _named

pytestmark = [needs_sglang, pytest.mark.sglang, pytest.mark.slow]

L, G = 1000, 2  # long enough that no response ends before the abort
PROMPT = [3, 4, 5, 6, 7]
LOGPROB_TOL = 2e-3  # as tests/test_sglang_real.py: SGLang's torch-native attention vs transformers' eager


def test_aborted_head_start_continues_with_new_weights_on_sglang(tmp_path):
    assets = write_demo_assets(tmp_path / "assets")
    models = {seed: write_model(tmp_path / f"model-{seed}", assets, seed=seed, eos=False) for seed in (0, 1)}
    opts = ServerOptions(models[0], device="cpu", api_key="test-key", seed=0, max_total_tokens=4096)
    fleet = LocalSGLangFleet(opts, 1, python=SGLANG_PYTHON, log_dir=str(tmp_path / "logs")).start(timeout_s=600)
    loop = asyncio.new_event_loop()
    try:
        engine = SGLangEngine(fleet.base_url, worker_urls=fleet.worker_urls, api_key="test-key", transport="tensor")
        reward = lambda text, truth: RewardResult(0.0, False, "")  # noqa: E731 - filtering is off
        ro = StreamingRollout([engine], reward, tokenizer_decode=str, sampling=SamplingParams(n=G, max_new_tokens=L,
                              seed=5), max_response_len=L, target_groups=1, gen_prompts_per_round=1,
                              filter_enable=False, overlong_enable=False, keep_partial=True)  # fmt: skip
        drawn = []

        def prompts(k):
            drawn.extend(range(len(drawn), len(drawn) + k))
            return [PromptItem(i, PROMPT, "R") for i in drawn[-k:]]

        interrupt = asyncio.Event()
        worker = threading.Thread(target=lambda: loop.run_until_complete(ro.head_start(prompts, interrupt)))
        worker.start()
        deadline = time.monotonic() + 120
        while not engine._in_flight and time.monotonic() < deadline:  # the requests reached the server
            time.sleep(0.05)
        time.sleep(2.0)  # some tokens of L, not all
        loop.call_soon_threadsafe(interrupt.set)
        worker.join(timeout=120)
        assert not worker.is_alive()
        assert len(ro.partials) == 1 and not ro.carry, (ro.partials, ro.carry)
        [partial] = ro.partials
        cut = [len(s.response_ids) for s in partial.samples]
        assert all(s.finish_reason == "abort" for s in partial.samples) and 0 < max(cut) < L, cut
        loop.run_until_complete(engine.update_weights(_named(models[1]), 1))
        [group], _ = loop.run_until_complete(ro.run(prompts))
        loop.run_until_complete(engine.shutdown())
    finally:
        loop.close()
        fleet.stop()
    assert len(drawn) == 1, "the aborted group was continued, not re-drawn"
    old, new = hf_model(models[0]), hf_model(models[1])
    for s, n in zip(group.samples, cut):
        assert len(s.response_ids) == L and s.token_versions == [0] * n + [1] * (L - n)
        gap_old = (torch.tensor(s.response_logprobs) - teacher_forced(old, PROMPT, s.response_ids, 1.0)).abs()
        gap_new = (torch.tensor(s.response_logprobs) - teacher_forced(new, PROMPT, s.response_ids, 1.0)).abs()
        # each segment follows the weights that drew it (a segment may be empty: a sample still queued)
        assert n == 0 or float(gap_old[:n].max()) < LOGPROB_TOL
        assert float(gap_new[n:].max()) < LOGPROB_TOL and float(gap_old[n:].max()) > 10 * LOGPROB_TOL
