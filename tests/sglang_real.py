"""Shared by the tests that run real SGLang servers (marker ``sglang``).

The servers run in the SGLang environment built by ``tools/sglang_env.sh`` (``.venv-sglang``), named by
``DAPO_SGLANG_PYTHON`` or found at its default place. The README test command builds it and runs these
tests with ``DAPO_REQUIRE_SGLANG=1``, where a missing environment fails the run instead of skipping.
"""

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SGLANG_PYTHON = os.environ.get("DAPO_SGLANG_PYTHON") or str(REPO / ".venv-sglang" / "bin" / "python")

needs_sglang = pytest.mark.skipif(
    os.environ.get("DAPO_REQUIRE_SGLANG") != "1" and not os.path.exists(SGLANG_PYTHON),
    reason="no SGLang environment (tools/sglang_env.sh builds .venv-sglang; tools/run_tests.sh runs these tests)",
)


def write_model(folder: Path, assets: Path, *, seed: int, eos: bool = True) -> str:
    """A copy of the demo model folder (config + character tokenizer) with random fp32 weights of ``seed``
    saved as safetensors, so a server loading it and transformers agree on every weight. The context is
    raised to 4096 positions so that long generations fit. ``eos=False`` takes the end-of-sequence token
    away (from the config and the tokenizer, both of which SGLang stops on): a random model would
    otherwise end most responses within a few dozen tokens, too soon to abort or pause them mid-flight."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    for f in (assets / "model").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if not eos:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok.pop("eos_token", None)
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    config = AutoConfig.from_pretrained(folder)
    config.max_position_embeddings = 4096
    if not eos:
        config.eos_token_id = None
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).to(torch.float32).save_pretrained(folder)
    return str(folder)


def teacher_forced(model, prompt, response, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[token] of ``response`` after ``prompt`` under an HF model, fp32."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float() / temperature
    rows = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]
    return rows.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def read_json(path: Path):
    return json.loads(path.read_text())
