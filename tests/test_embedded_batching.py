"""Continuous batching in the embedded engine: concurrent requests share forward passes, a request's
completions are bitwise the same alone or among others, an abort ends a request at once with its
tokens, and a weight update never lands inside a completion."""

import asyncio
import json
import pathlib
import threading
import time

import pytest
import torch

from dapo_megatron.rollout.base import SamplingParams
from dapo_megatron.rollout.embedded import EmbeddedEngine
from dapo_megatron.rollout.embedded_sampling import sample_rows

CONFIG = {**json.loads((pathlib.Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text()),
          "eos_token_id": None}  # fmt: skip


def engine(slots=32, width=64, seed=0, **kw):
    return EmbeddedEngine(CONFIG, seed=seed, max_batch_rows=slots, max_seq_len=width, **kw)


def teacher_forced(model, prompt, response, temperature=1.0):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float() / temperature, -1)[len(prompt) - 1 : -1]
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


async def gather_requests(eng, requests, stagger_s=0.0):
    """``requests``: (prompt, params); started ``stagger_s`` apart on one event loop."""

    async def one(i, prompt, params):
        await asyncio.sleep(i * stagger_s)
        return await eng.generate(prompt, params, timeout_s=120)

    return await asyncio.gather(*(one(i, p, q) for i, (p, q) in enumerate(requests)))


def test_concurrent_groups_share_forward_passes():
    eng = engine()
    groups, new = 6, 12
    reqs = [([5 + i, 6, 7, 8], SamplingParams(n=4, max_new_tokens=new, seed=i)) for i in range(groups)]
    out = asyncio.run(gather_requests(eng, reqs))
    assert all(len(c.token_ids) == new and c.finish_reason == "length" for g in out for c in g)
    # One request alone takes a prefill and new - 1 decode steps; six together take about that many
    # decode steps, not six times (a request may join a step or two late).
    alone = new - 1
    assert alone <= eng.forward_steps <= alone + groups, eng.forward_steps
    for (prompt, _), group in zip(reqs, out):  # batched log-probs are still the model's
        for c in group:
            ref = teacher_forced(eng.model, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)


def test_prompts_submitted_together_share_prefill_passes():
    """Eight prompts of one padded width per prefill forward: nine short prompts (width 8) take two
    passes, two longer ones (width 16) a third; each prompt's first log-prob is still the model's."""
    eng = engine()
    prompts = [[5 + i, 6, 7] for i in range(9)] + [[4] * 12, [9] * 10]
    out = eng.generate_sync(prompts, SamplingParams(n=2, max_new_tokens=1, seed=3))
    assert eng.prefill_passes == 3 and eng.forward_steps == 0  # one new token each: prefill only
    for prompt, group in zip(prompts, out):
        for c in group:
            ref = teacher_forced(eng.model, prompt, c.token_ids)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_a_request_is_bitwise_the_same_alone_and_in_a_batch(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        probe = ([9, 10, 11, 12, 13], SamplingParams(n=3, temperature=0.9, top_p=0.95, max_new_tokens=20, seed=42))
        alone = engine().generate_sync([probe[0]], probe[1])[0]
        # Among others: different prompts, lengths, temperatures, top-k/top-p, started before and after it
        # (so it sits in other slots, next to rows at other positions, joining mid-flight).
        others = [([4 + i] * (1 + i), SamplingParams(n=2 + i % 3, temperature=0.6 + 0.2 * i, seed=100 + i,
                                                      top_k=5 if i % 2 else -1, max_new_tokens=10 + 3 * i))
                  for i in range(6)]  # fmt: skip
        eng = engine()
        mixed = asyncio.run(gather_requests(eng, others[:3] + [probe] + others[3:], stagger_s=0.01))[3]
    finally:
        torch.set_num_threads(before)
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    assert [c.logprobs for c in mixed] == [c.logprobs for c in alone]  # bitwise, not approximately
    assert len({tuple(c.token_ids) for c in alone}) == 3


def test_a_step_computes_only_the_slots_up_to_the_highest_busy_one():
    from dapo_megatron.rollout.embedded_cache import decode_shapes

    assert decode_shapes(384) == [48, 96, 144, 192, 240, 288, 336, 384]
    assert decode_shapes(32) == [8, 16, 24, 32] and decode_shapes(5) == [5] and decode_shapes(20) == [8, 16, 20]
    eng = engine(slots=32)
    eng.generate_sync([[5, 6, 7]], SamplingParams(n=2, max_new_tokens=6, seed=1))  # slots 0 and 1
    sched = eng._sched
    assert sched._shapes[-1] == 32 and set(sched._shapes) <= {8, 16, 24, 32}
    assert sched.forwards == 5 and sched.rows_decoded == 5 * sched._shapes[0] and sched.rows_busy == 10


def test_a_late_request_moves_down_when_the_slots_below_it_free_and_keeps_its_bits():
    late = ([9, 10, 11], SamplingParams(n=4, temperature=0.9, max_new_tokens=14, seed=7))
    alone = engine(slots=32).generate_sync([late[0]], late[1])[0]
    eng = engine(slots=32)
    early = ([5, 6, 7, 8], SamplingParams(n=24, max_new_tokens=4, seed=3))  # slots 0-23, done in 3 steps
    mixed = asyncio.run(gather_requests(eng, [early, late]))[1]  # the late one starts in slots 24-27
    assert [c.token_ids for c in mixed] == [c.token_ids for c in alone]
    assert [c.logprobs for c in mixed] == [c.logprobs for c in alone]
    sched = eng._sched
    small = sched._shapes[0]  # 8 where the kernels allow it (32 otherwise: then nothing moves)
    # Full steps only while the early request runs (a few steps, plus one if the late one joins a step later).
    assert 13 <= sched.forwards <= 14 and sched.rows_decoded <= small * sched.forwards + (32 - small) * 5


def test_the_shape_probe_keeps_only_shapes_that_give_every_row_the_same_bits():
    from dapo_megatron.rollout.embedded_cache import SlotCache, batch_invariant_shapes

    eng = engine(slots=32)

    def cache():
        return SlotCache(2, 32, 2, 64, 16, torch.float32, "cpu")

    plain = batch_invariant_shapes(eng.model, cache(), 128)  # every rung where the kernels allow it
    assert plain[-1] == 32 and set(plain) <= {8, 16, 24, 32}

    class RowCountDependent(torch.nn.Module):
        """A model whose logits move with the number of rows (what a kernel switch would do)."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            out = self.inner(**kw)
            rows = out.logits.shape[0]
            out.logits = out.logits + (1e-6 if rows in (8, 24) else 0.0)
            return out

    assert batch_invariant_shapes(RowCountDependent(eng.model), cache(), 128) == [n for n in plain if n not in (8, 24)]


def test_sample_rows_depends_only_on_the_rows_own_parameters():
    logp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]] * 4), -1)
    u = torch.tensor([0.1, 0.5, 0.8, 0.97], dtype=torch.float64)
    plain = sample_rows(logp, torch.ones(4), torch.full((4,), -1), u)
    # row 0 filtered (top-k 1), the others not: rows 1..3 draw as before
    mixed = sample_rows(logp, torch.ones(4), torch.tensor([1, -1, -1, -1]), u)
    assert mixed[0] == 0 and torch.equal(mixed[1:], plain[1:])
    # inverse CDF by hand: p = softmax([3, 2, 1, 0, -1]); u=0.5 lies past p0=0.636? no: in token 0
    p = logp[0].exp()
    cdf = p.cumsum(0)
    assert plain.tolist() == [int((cdf > x * cdf[-1]).nonzero()[0]) for x in u.tolist()]


def test_abort_stops_at_once_and_keeps_the_partial_tokens():
    eng = engine(slots=4, width=4096)

    async def scenario():
        task = asyncio.ensure_future(eng.generate([5, 6, 7], SamplingParams(n=2, max_new_tokens=4000), timeout_s=60))
        while eng.forward_steps < 10:
            await asyncio.sleep(0.002)
        t0 = time.perf_counter()
        await eng.abort_all()
        cut = await task
        waited = time.perf_counter() - t0
        later = await eng.generate([5, 6, 7], SamplingParams(max_new_tokens=3), timeout_s=60)
        return cut, waited, later

    cut, waited, later = asyncio.run(scenario())
    assert waited < 1.0, f"the abort took {waited:.2f} s to end the request"
    assert all(c.finish_reason == "abort" and 5 <= len(c.token_ids) < 4000 for c in cut)
    for c in cut:  # the partial tokens are real samples with their log-probs: a continuation can use them
        torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(eng.model, [5, 6, 7], c.token_ids),
                                   atol=1e-5, rtol=0)  # fmt: skip
    assert later[0].finish_reason == "length" and len(later[0].token_ids) == 3


def test_width_caps_the_response_and_bad_requests_are_refused():
    eng = engine(slots=4, width=16)
    [c] = eng.generate_sync([[5] * 10], SamplingParams(max_new_tokens=50, seed=1))[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 16 - 10 + 1
    with pytest.raises(ValueError, match="max_seq_len=16"):
        eng.generate_sync([[5] * 17], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="max_batch_rows is 4"):
        eng.generate_sync([[5]], SamplingParams(n=5, max_new_tokens=2))


def test_update_weights_waits_for_running_requests_and_never_mixes_versions():
    eng = engine(slots=8, width=256)
    old_model = engine(slots=8, width=256).model  # same seed: the version-0 weights
    gen = torch.Generator().manual_seed(3)
    new = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in eng.state_dict().items()}
    params = SamplingParams(n=2, max_new_tokens=120, seed=7)

    async def scenario():
        first = asyncio.ensure_future(eng.generate([5, 6, 7], params, timeout_s=60))
        while eng.forward_steps < 3:
            await asyncio.sleep(0.002)
        update = asyncio.ensure_future(eng.update_weights(list(new.items()), 1))
        await asyncio.sleep(0.05)
        second = asyncio.ensure_future(eng.generate([8, 9], params, timeout_s=60))  # arrives during the wait
        done_first = await first
        steps_when_first_done = eng.forward_steps
        await update
        return done_first, steps_when_first_done, await second

    first, steps, second = asyncio.run(scenario())
    assert steps >= 120 - 1, "the update cut into the running request"
    assert all(c.weight_version == 0 and len(c.token_ids) == 120 for c in first)
    assert all(c.weight_version == 1 for c in second)
    for c in first:  # every token of the running request came from the old weights...
        torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(old_model, [5, 6, 7], c.token_ids),
                                   atol=5e-5, rtol=0)  # fmt: skip
    for c in second:  # ...and every token of the queued one from the new
        torch.testing.assert_close(torch.tensor(c.logprobs), teacher_forced(eng.model, [8, 9], c.token_ids),
                                   atol=5e-5, rtol=0)  # fmt: skip


def test_an_abort_lets_a_waiting_update_in_at_once():
    eng = engine(slots=4, width=4096)
    done = threading.Event()

    async def scenario():
        task = asyncio.ensure_future(eng.generate([5, 6], SamplingParams(n=2, max_new_tokens=4000), timeout_s=60))
        while eng.forward_steps < 3:
            await asyncio.sleep(0.002)
        update = asyncio.ensure_future(eng.update_weights(list(eng.state_dict().items()), 5))
        update.add_done_callback(lambda _: done.set())
        await asyncio.sleep(0.1)
        assert not done.is_set(), "the update did not wait for the running request"
        await eng.abort_all()
        cut = await task
        await asyncio.wait_for(update, 5)
        return cut

    cut = asyncio.run(scenario())
    assert eng.weight_version == 5 and all(c.finish_reason == "abort" and c.weight_version == 0 for c in cut)
