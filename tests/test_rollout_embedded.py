"""The embedded transformers engine: logprobs equal a teacher-forced recomputation, stop/length/abort,
seeded determinism, and live weight updates with versions. (Batching across requests, batch
invariance and weight-version ordering: tests/test_embedded_batching.py.)"""

import asyncio
import json
import pathlib
import time

import pytest
import torch

from dapo_megatron.rollout.base import RolloutEngine, SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine, sample_next

CONFIG = json.loads((pathlib.Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text())
PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15]]  # different lengths: exercises left padding


def small(config=None, seed=0, **kw):
    """An engine with few slots and a short cache: every step computes all slots, so tests keep it small."""
    kw = {"max_batch_rows": 8, "max_seq_len": 64, **kw}
    return EmbeddedEngine(config or {**CONFIG, "eos_token_id": None}, seed=seed, **kw)


@pytest.fixture(scope="module")
def engine():
    return small()


def teacher_forced(model, prompt, response, temperature):
    """log softmax(logits / T) of each response token, from one full forward without cache or padding."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def test_is_a_rollout_engine(engine):
    assert isinstance(engine, RolloutEngine)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_teacher_forced_recomputation(engine, temperature):
    params = SamplingParams(n=3, temperature=temperature, max_new_tokens=20, seed=11)
    results = engine.generate_sync(PROMPTS, params)
    assert [len(r) for r in results] == [3, 3]
    for prompt, group in zip(PROMPTS, results):
        for c in group:
            assert c.finish_reason == "length" and len(c.token_ids) == 20 == len(c.logprobs)
            ref = teacher_forced(engine.model, prompt, c.token_ids, temperature)
            assert torch.allclose(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0), ref - torch.tensor(c.logprobs)
        # n samples of one prompt differ (one generator, successive draws)
        assert len({tuple(c.token_ids) for c in group}) == 3


def test_seeded_determinism_and_seed_sensitivity(engine):
    params = SamplingParams(n=2, max_new_tokens=12, seed=5)
    a = engine.generate_sync(PROMPTS, params)
    b = engine.generate_sync(PROMPTS, params)
    c = engine.generate_sync(PROMPTS, params.with_seed(6))
    ids = lambda r: [[x.token_ids for x in g] for g in r]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)


def test_stop_token_ends_with_stop_and_is_included(engine):
    # Find a token the model actually samples, then declare it a stop token.
    probe = engine.generate_sync([PROMPTS[0]], SamplingParams(max_new_tokens=8, seed=3))[0][0]
    stop = probe.token_ids[4]
    out = engine.generate_sync([PROMPTS[0]], SamplingParams(max_new_tokens=8, seed=3, stop_token_ids=(stop,)))[0][0]
    first = probe.token_ids.index(stop)
    assert out.finish_reason == "stop"
    assert out.token_ids == probe.token_ids[: first + 1] and out.token_ids[-1] == stop


def test_eos_from_config_stops():
    eng = small(CONFIG)
    probe = small()
    p = SamplingParams(max_new_tokens=30, seed=1)
    free = probe.generate_sync([PROMPTS[0]], p)[0][0].token_ids
    eos_run = eng.generate_sync([PROMPTS[0]], p)[0][0]
    if 3 in free:
        assert eos_run.finish_reason == "stop" and eos_run.token_ids == free[: free.index(3) + 1]
    else:
        assert eos_run.finish_reason == "length" and eos_run.token_ids == free


def test_top_k_and_top_p_restrict_the_draws():
    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 200), -1)
    assert set(sample_next(logp, 1.0, 2, gen).tolist()) <= {0, 1}
    probs = logp[0].exp()  # top_p just above p0: only token 0 and 1 are kept
    assert set(sample_next(logp, float(probs[0]) + 1e-3, -1, gen).tolist()) <= {0, 1}
    assert set(sample_next(logp, float(probs[0]) * 0.5, -1, gen).tolist()) == {0}
    assert len(set(sample_next(logp, 1.0, -1, gen).tolist())) >= 4


def test_update_weights_changes_outputs_and_stamps_version():
    eng = small()
    params = SamplingParams(n=2, max_new_tokens=10, seed=9)
    before = eng.generate_sync(PROMPTS, params)
    assert {c.weight_version for g in before for c in g} == {0}
    gen = torch.Generator().manual_seed(1)
    new = {k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in eng.state_dict().items()}
    asyncio.run(eng.update_weights(list(new.items()), 7))
    after = eng.generate_sync(PROMPTS, params)
    assert eng.weight_version == 7 and {c.weight_version for g in after for c in g} == {7}
    assert [c.token_ids for c in before[0]] != [c.token_ids for c in after[0]]
    # The engine now holds exactly the new weights: logprobs match a model built from them.
    ref = small(seed=123, state_dict=new)
    c = after[1][0]
    torch.testing.assert_close(
        torch.tensor(c.logprobs), teacher_forced(ref.model, PROMPTS[1], c.token_ids, 1.0), atol=1e-5, rtol=0
    )


def test_update_weights_tied_embedding_and_bad_names():
    eng = small()
    head = torch.full_like(eng.state_dict()["lm_head.weight"], 0.01)
    eng.update_weights_sync([("lm_head.weight", head)], 1)
    assert torch.equal(eng.state_dict()["model.embed_tokens.weight"], head)  # tied: one tensor
    with pytest.raises(KeyError, match="unknown parameter"):
        eng.update_weights_sync([("model.nope.weight", head)], 2)
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights_sync([("lm_head.weight", head[:3])], 2)
    assert eng.weight_version == 1  # a rejected update changes nothing


def test_abort_all_cuts_in_flight_request_only():
    eng = small(max_batch_rows=4, max_seq_len=4096)

    async def scenario():
        slow = asyncio.ensure_future(eng.generate(PROMPTS[0], SamplingParams(n=2, max_new_tokens=4000), timeout_s=60))
        while eng.forward_steps < 5:  # wait until it is decoding
            await asyncio.sleep(0.005)
        await eng.abort_all()
        aborted = await slow
        later = await eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=5), timeout_s=60)
        return aborted, later

    aborted, later = asyncio.run(scenario())
    assert {c.finish_reason for c in aborted} == {"abort"}
    assert all(0 < len(c.token_ids) < 4000 and len(c.logprobs) == len(c.token_ids) for c in aborted)
    assert later[0].finish_reason == "length" and len(later[0].token_ids) == 5


def test_pause_parks_new_requests_until_resume():
    eng = small()

    async def scenario():
        await eng.pause()
        task = asyncio.ensure_future(eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=3), timeout_s=60))
        await asyncio.sleep(0.2)
        parked = not task.done()
        await eng.resume()
        return parked, await task

    parked, out = asyncio.run(scenario())
    assert parked and out[0].finish_reason == "length"


def test_timeout_raises_request_timeout_and_stops_the_thread():
    from dapo_megatron.rollout.base import RequestTimeout

    eng = small(max_batch_rows=4, max_seq_len=4096)
    with pytest.raises(RequestTimeout):
        asyncio.run(eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=100000), timeout_s=0.3))
    deadline = time.monotonic() + 10
    while eng.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not eng.busy, "the timed-out request kept decoding"
