"""`dapo-megatron demo --config examples/demo_cpu_moe.yaml` in CI: the MoE demo, a few steps.

The held-out accuracy gain of the full MoE demo is a benchmark figure (docs/benchmarks.md), not
asserted here. Asserted: the demo's model is a Qwen3-MoE that transformers and megatron both read
with the configured expert layout; DAPO steps train it through megatron's MoE layers with the
embedded engine serving exactly the trainer's weights (every expert reached the engine); and the
export is an HF Qwen3-MoE whose experts and routers moved away from the warm-up's weights.
"""

import json
import subprocess

import pytest
import torch

from tests.cli_runs import BIN, REPO, cli_env, run_cli

MOE_DEMO = str(REPO / "examples" / "demo_cpu_moe.yaml")
STEPS = 2
# Small rounds so the run stays well under a minute of compute; the model is the YAML's own.
SMALL = ["demo.sft_steps=20", "demo.sft_batch_size=16", "demo.num_eval=16", "rollout.prompts_per_step=4",
         "rollout.gen_prompts_per_round=4", "train.ppo_mini_batch_size=2", f"train.total_steps={STEPS}",
         f"run.eval_every={STEPS}", f"run.save_every={STEPS}"]  # fmt: skip


def test_moe_demo_config_is_checked_by_key():
    from dapo_megatron.config import ConfigError
    from dapo_megatron.config_io import load_config

    cfg = load_config(MOE_DEMO, [])
    assert (cfg.demo.model_type, cfg.demo.num_experts, cfg.demo.moe_topk) == ("qwen3_moe", 8, 2)
    with pytest.raises(ConfigError, match=r"demo.moe_topk: must be in \[1, num_experts=8\]"):
        load_config(MOE_DEMO, ["demo.moe_topk=9"])
    with pytest.raises(ConfigError, match="demo.model_type: got 'mixtral'"):
        load_config(MOE_DEMO, ["demo.model_type=mixtral"])


def test_moe_demo_assets_are_a_qwen3_moe_both_transformers_and_megatron_read(tmp_path):
    """``demo --assets-only``: the config.json builds transformers' Qwen3MoeForCausalLM with the
    configured experts (fused ``[E, 2I, H]`` in transformers 5) and megatron's spec reads the same
    layout; the dense default still writes the Qwen2 model, and refuses the MoE's folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.megatron.moe import MoESpec

    run_cli(tmp_path / "moe", "demo", "--assets-only", str(tmp_path / "moe"), "--config", MOE_DEMO,
            "demo.num_experts=4", "demo.moe_intermediate_size=32")  # fmt: skip
    model_dir = tmp_path / "moe" / "model"
    hf = AutoConfig.from_pretrained(model_dir)
    assert (hf.model_type, hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == ("qwen3_moe", 4, 2, 32)
    model = AutoModelForCausalLM.from_config(hf)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert tuple(model.model.layers[1].mlp.experts.gate_up_proj.shape) == (4, 2 * 32, 128)
    spec = model_spec_from_hf(str(model_dir))
    assert spec.moe == MoESpec(num_experts=4, topk=2, ffn_hidden_size=32, norm_topk_prob=True)
    assert (spec.model_type, spec.num_layers, spec.hidden_size, spec.qk_layernorm) == ("qwen3_moe", 2, 128, True)

    run_cli(tmp_path / "dense", "demo", "--assets-only", str(tmp_path / "dense"))
    assert AutoConfig.from_pretrained(tmp_path / "dense" / "model").model_type == "qwen2"
    # The dense config on the MoE's folder: refused by key, not silently trained on the other model.
    done = subprocess.run([*BIN, "demo", "--assets-only", str(tmp_path / "moe")], env=cli_env(tmp_path),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 2 and "demo.model_type='qwen2' but" in done.stderr, done.stderr[-2000:]


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_moe_demo_trains_a_qwen3_moe_through_megatron_and_exports_it(tmp_path):
    """SFT warm-up, 2 DAPO steps, export, evaluation of the export: ~1 min on the 2-core sandbox."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.megatron.moe import MoESpec

    run = tmp_path / "demo"
    out = run_cli(tmp_path, "demo", "--config", MOE_DEMO, f"run.dir={run}", *SMALL, timeout=600)
    model_dir = run / "assets" / "model"
    hf = AutoConfig.from_pretrained(model_dir)
    assert (hf.model_type, hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size) == ("qwen3_moe", 8, 2, 64)
    assert model_spec_from_hf(str(model_dir)).moe == MoESpec(num_experts=8, topk=2, ffn_hidden_size=64,
                                                              norm_topk_prob=True)  # fmt: skip

    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "actor/updates" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)), steps
    for r in steps:
        assert r["actor/updates"] >= 1 and 0 < r["actor/grad_norm"] < float("inf"), r
        # The engine scores the trainer's samples as the trainer does: all 8 experts of every layer
        # were synced (a missing or transposed expert would move the log-probs far beyond this).
        assert r["rollout/logprob_gap_max"] < 1e-4, r

    summary = json.loads((run / "demo_summary.json").read_text())
    assert summary["demo/exported_step"] == STEPS and "demo/acc_exported" in summary, summary
    assert "demo summary:" in out.stdout
    export = run / "export" / f"step_{STEPS:06d}"
    model = AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    ours = _weights(export)
    experts = {k for k in ours if ".mlp.experts." in k}
    assert len(experts) == 2 * 8 * 3, sorted(experts)  # 2 layers x 8 experts x gate/up/down

    # The warm-up's weights, exported the same way: DAPO moved the experts and the routers.
    run_cli(tmp_path, "export", "--ckpt", str(run / "assets" / "sft"), "--hf-dir", str(model_dir), "--out",
            str(tmp_path / "sft_hf"), "--dtype", "float32", "--no-progress")  # fmt: skip
    sft = _weights(tmp_path / "sft_hf")
    assert sft.keys() == ours.keys()
    moved = {k for k in ours if not torch.equal(ours[k], sft[k])}
    assert any(".mlp.experts." in k for k in moved) and any(k.endswith(".mlp.gate.weight") for k in moved), moved
