"""Partial rollouts and the staleness bound of asynchronous DAPO on the real embedded engine: a head
start cut at a fixed point or by an abort keeps its tokens, continues with the new weights (each
segment's log-probs are the engine's under the weights that drew it), per-token versions record the
mix, stale work is dropped or re-generated and counted, and the state survives a checkpoint."""

import asyncio
import json
import pathlib
import threading
import time

import pytest
import torch

from dapo_megatron.megatron.ckpt_data import from_json, to_json
from dapo_megatron.rewards.base import RewardResult
from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.generator import PromptItem, StreamingRollout
from dapo_megatron.rollout.partial import is_partial
from dapo_megatron.rollout.producer import version_metrics
from dapo_megatron.types import Group, Sample

CONFIG = json.loads((pathlib.Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text())
L, G = 8, 2  # response budget (no EOS: every response runs to it), group size


class Prompts:
    """source(k): prompts 0, 1, 2, ... in order; counts what was drawn."""

    def __init__(self):
        self.drawn = 0

    def __call__(self, k):
        items = [PromptItem(i, [5 + i, 6, 7], "R") for i in range(self.drawn, self.drawn + k)]
        self.drawn += k
        return items


def _rollout(engine, target=2):
    reward = lambda text, truth: RewardResult(0.0, False, "")  # noqa: E731 - filtering is off
    params = SamplingParams(n=G, temperature=1.0, max_new_tokens=L, seed=3)
    return StreamingRollout([engine], reward, tokenizer_decode=str, sampling=params, max_response_len=L,
                            target_groups=target, gen_prompts_per_round=target, filter_enable=False,
                            overlong_enable=False, max_concurrency=4, keep_partial=True)  # fmt: skip


def _teacher_forced(model, prompt, response):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _new_weights(engine, seed):
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in engine.state_dict().items()}


def test_fixed_head_start_continues_with_the_new_weights_and_records_versions():
    engine = EmbeddedEngine({**CONFIG, "eos_token_id": None}, seed=0)
    old = EmbeddedEngine({**CONFIG, "eos_token_id": None}, seed=0)  # a frozen copy of version 0
    ro, prompts = _rollout(engine), Prompts()
    head = asyncio.run(ro.head_start(prompts, asyncio.Event(), segment_cap=L // 2))
    assert head["async/head_start_tokens"] == 2 * G * (L // 2) and prompts.drawn == 2
    assert len(ro.partials) == 2 and not ro.carry and all(is_partial(g) for g in ro.partials)
    assert all(len(s.response_ids) == L // 2 and s.token_versions == [0] * (L // 2)
               for g in ro.partials for s in g.samples)  # fmt: skip
    new = _new_weights(engine, 1)
    asyncio.run(engine.update_weights(list(new.items()), 1))
    batch, _ = asyncio.run(ro.run(prompts))
    assert prompts.drawn == 2, "the groups in progress were continued, not re-drawn"
    assert ro.stale["continued_groups"] == 2
    ref = EmbeddedEngine({**CONFIG, "eos_token_id": None}, seed=9, state_dict=new)
    for g in batch:
        for s in g.samples:
            assert s.finish_reason == "length" and len(s.response_ids) == L and s.weight_version == 0
            assert s.token_versions == [0] * (L // 2) + [1] * (L // 2)
            # each segment's log-probs are the engine's under the weights that drew it
            full_old = _teacher_forced(old.model, s.prompt_ids, s.response_ids)
            full_new = _teacher_forced(ref.model, s.prompt_ids, s.response_ids)
            got = torch.tensor(s.response_logprobs)
            torch.testing.assert_close(got[: L // 2], full_old[: L // 2], atol=5e-5, rtol=0)
            torch.testing.assert_close(got[L // 2 :], full_new[L // 2 :], atol=5e-5, rtol=0)
            assert (got[L // 2 :] - full_old[L // 2 :]).abs().max() > 1e-2  # the two weights do differ
    m = version_metrics(batch, current=1, max_staleness=1)
    assert m["staleness/count_1"] == m["staleness/count_0"] == 2 * G * (L // 2)
    assert m["async/mixed_version_samples"] == 1.0 and m["staleness/max"] == 1.0
    with pytest.raises(RuntimeError, match="max_staleness=1"):  # version 0 at version 2: outside K = 1
        version_metrics(batch, current=2, max_staleness=1)


class SlowEngine(EmbeddedEngine):
    """The embedded engine with slow decode steps; ``started`` is set after the third forward (the
    prompt and two tokens), so an abort then lands mid-response."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.forwards, self.started = 0, threading.Event()
        self.model.register_forward_hook(self._slow)

    def _slow(self, *_):
        self.forwards += 1
        if self.forwards >= 3:
            self.started.set()
        time.sleep(0.1)


def test_an_abort_keeps_the_tokens_and_the_same_prompt_continues():
    engine = SlowEngine({**CONFIG, "eos_token_id": None}, seed=0)
    ro, prompts = _rollout(engine, target=1), Prompts()
    interrupt, loop = asyncio.Event(), asyncio.new_event_loop()
    out = {}
    worker = threading.Thread(target=lambda: out.update(loop.run_until_complete(ro.head_start(prompts, interrupt))))
    worker.start()
    assert engine.started.wait(timeout=60)
    loop.call_soon_threadsafe(interrupt.set)
    worker.join(timeout=60)
    assert not worker.is_alive()
    [partial] = ro.partials
    cut = [len(s.response_ids) for s in partial.samples]
    assert all(0 < n < L for n in cut) and all(s.finish_reason == "abort" for s in partial.samples), cut
    loop.run_until_complete(engine.update_weights(list(_new_weights(engine, 2).items()), 1))
    batch, _ = loop.run_until_complete(ro.run(prompts))
    loop.close()
    assert prompts.drawn == 1 and [g.prompt_index for g in batch] == [0]
    for s, n in zip(batch[0].samples, cut):
        assert len(s.response_ids) == L and s.token_versions == [0] * n + [1] * (L - n)


def _group(index, version, finish="stop"):
    s = Sample([5, 6], [9, 9], [-1.0, -1.0], finish, weight_version=version, token_versions=[version] * 2)
    return Group(index, "R", [s, s], metadata={"group_id": index})


def test_stale_work_is_dropped_or_regenerated_and_counted():
    engine = EmbeddedEngine({**CONFIG, "eos_token_id": None}, seed=0)
    asyncio.run(engine.update_weights(list(engine.state_dict().items()), 3))
    ro, prompts = _rollout(engine, target=2), Prompts()
    ro.carry = [_group(100, 0), _group(101, 2)]  # version 0 is too old at min_version 1
    ro.partials = [_group(102, 0, "abort")]  # too old: its prompt is generated again from scratch
    ro._next_gid = 200
    ro.min_version = 1
    batch, _ = asyncio.run(ro.run(prompts))
    assert ro.stale == {"dropped_stale_groups": 1, "regenerated_stale_groups": 1, "continued_groups": 0}
    assert sorted(g.prompt_index for g in batch) == [101, 102] and prompts.drawn == 0
    regenerated = next(g for g in batch if g.prompt_index == 102)
    assert all(s.token_versions == [3] * L for s in regenerated.samples)


def test_partials_survive_the_checkpoint_format():
    engine = EmbeddedEngine({**CONFIG, "eos_token_id": None}, seed=0)
    ro, prompts = _rollout(engine), Prompts()
    asyncio.run(ro.head_start(prompts, asyncio.Event(), segment_cap=3))
    state = from_json(json.loads(json.dumps(to_json(ro.state_dict()))))
    again = _rollout(engine)
    again.load_state_dict(state)
    assert again.partials == ro.partials and again._next_gid == ro._next_gid
    a, _ = asyncio.run(ro.run(Prompts()))
    b, _ = asyncio.run(again.run(Prompts()))
    assert [[s.response_ids for s in g.samples] for g in a] == [[s.response_ids for s in g.samples] for g in b]
