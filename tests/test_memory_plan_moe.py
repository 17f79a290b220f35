"""The memory planner on mixture-of-experts shapes: hand-computed counts on a tiny MoE, the Qwen3-MoE presets."""

import importlib.util
import json
import pathlib

import pytest

import dapo_megatron
from dapo_megatron.observability import memory_plan as mp
from dapo_megatron.observability import memory_report as mr

REPO_ROOT = pathlib.Path(dapo_megatron.__file__).resolve().parent.parent

# Tiny MoE: L=2, h=8, a=4 heads, g=2 KV heads (d=2), V=256, no QKV bias, E=4 experts, top-2, f_m=4, untied.
MOE = mp.ModelShape(2, 8, 16, 4, 2, 256, qkv_bias=False, num_experts=4, top_k=2, moe_ffn_hidden=4)
QWEN3_30B_HF = {  # the public Qwen/Qwen3-30B-A3B config.json, its shape keys
    "model_type": "qwen3_moe",
    "num_hidden_layers": 48,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}


def _work(**kw):
    return mp.Workload(**{"seq_len": 4, **kw})


def test_moe_param_counts_by_hand():
    # dense part of a layer, split by TP: Q 8*8 + K,V 2*8*4 + O 8*8 = 192; replicated: norms 2*8 + router 4*8 = 48
    assert mp.layer_params(MOE) == (192, 48)
    assert mp.expert_layer_params(MOE) == 4 * 3 * 8 * 4 == 384  # E experts of gate, up, down h x f_m
    # total: 2 * (192 + 48 + 384) + embedding and output 2 * 256*8 + final norm 8 = 5352
    assert mp.param_count(MOE) == 5352
    assert mp.active_param_count(MOE) == 5352 - 2 * (384 - 2 * 96)  # top-2 of 4 experts a layer: 4968
    # FLOP-bearing weights per token: 2 * (192 + router 32 + two experts 2*96) + output 2048 = 2880
    assert mp.matmul_params(MOE) == 2880


@pytest.mark.parametrize(("ep", "params"), [(1, 5352), (2, 4968), (4, 4776)])
def test_expert_params_per_ep_rank(ep, params):
    lay = mp.Layout(dp=4, ep=ep, distributed_optimizer=True)
    assert mp.stage_expert_params(MOE, lay) == 768 // ep  # 2 layers * 384, E/ep experts each
    assert mp.stage_params(MOE, lay, 0) == 2 * 240 + 4104 + 768 // ep == params
    st = mp.plan_stage(MOE, lay, _work(), 0, 0.0)
    assert (st.params, st.grads) == (2 * params, 4 * params)  # grad buffers stay full size
    # dense state over DP 4, expert state over expert DP 4/ep: ep * expert DP = world, so the expert share
    # of Adam per GPU is the same at every EP: 768 * 12 / 4
    assert lay.expert_dp == 4 // ep
    assert st.optimizer == (params - 768 // ep) * 12 / 4 + (768 // ep) * 12 / (4 // ep) == 4584 * 3 + 2304
    replicated = mp.plan_stage(MOE, mp.Layout(dp=4, ep=ep), _work(), 0, 0.0)
    assert replicated.optimizer == params * 12  # no distributed optimizer: every rank keeps its shard's state


def test_expert_tensor_parallel_defaults_to_tp():
    tp2 = mp.Layout(tp=2, dp=2, ep=2, sequence_parallel=True)  # ETP = TP = 2: experts split 2 x 2
    assert (tp2.expert_tp, tp2.expert_dp, mp.stage_expert_params(MOE, tp2)) == (2, 1, 192)
    etp1 = mp.Layout(tp=2, dp=2, ep=2, etp=1, sequence_parallel=True)  # whole experts, expert DP 2
    assert (etp1.expert_tp, etp1.expert_dp, mp.stage_expert_params(MOE, etp1)) == (1, 2, 384)
    pp2 = mp.Layout(pp=2, dp=2, ep=2)  # one layer per stage; expert DP = 4 / (1 * 2 * 2)
    assert (pp2.expert_dp, mp.stage_expert_params(MOE, pp2)) == (1, 192)


def test_moe_activations_by_hand():
    # per token, TP1: norm and linear inputs 4h = 32, Q + K,V + attention output 8 + 4 + 4 + 8 = 24,
    # two expert rows of input h + fc1 output 2f_m + SwiGLU output f_m + fc2 input f_m = 2 * 24 = 48,
    # router logits and scores 2E = 8: 112 elements -> 4 tokens * 112 * 2 B = 896, + fp32 LSE 4 * 4 * 4 = 64
    assert mp.moe_activation_elements(MOE, mp.Layout()) == 56
    assert mp.layer_activation_bytes(MOE, mp.Layout(), _work()) == 960
    # TP2 + SP, ETP2: a GPU routes 4/2 tokens; after the expert-TP all-gather its experts hold 4 * 2 rows of
    # h + 4 f_m/2 = 16, i.e. per token 2 * (2*8 + 16) / 2 = 32, router 8/2 = 4
    assert mp.moe_activation_elements(MOE, mp.Layout(tp=2, sequence_parallel=True)) == 36
    assert mp.moe_activation_elements(MOE, mp.Layout(tp=2, etp=1, sequence_parallel=True)) == 2 * 24 / 2 + 4
    assert mp.moe_activation_elements(mp.ModelShape(2, 8, 16, 4, 2, 256), mp.Layout()) == 0  # dense


@pytest.mark.parametrize(("ep", "expected"), [(1, 0), (2, 4 * 64), (4, 4 * 96)])
def test_alltoall_bytes_by_hand(ep, expected):
    # 4 tokens * top-2 * h 8 * 2 B = 128 B per all-to-all, (ep-1)/ep of it leaves the GPU; four per layer
    lay = mp.Layout(dp=4, ep=ep)
    assert mp.alltoall_bytes(MOE, lay, 4, 2) == expected
    assert mp.alltoall_bytes(MOE, lay, 4, 2, recompute="full") == expected * 6 / 4  # forward runs twice
    sp = mp.Layout(tp=2, dp=2, ep=2, sequence_parallel=True)
    assert mp.alltoall_bytes(MOE, sp, 4, 2) == 4 * 64 / 2  # each TP rank routes half the tokens


@pytest.mark.parametrize(
    ("layout_kw", "field"),
    [
        ({"dp": 3, "ep": 3}, "num_experts"),
        ({"tp": 2, "dp": 2, "ep": 2}, "sequence_parallel"),
        ({"dp": 2, "ep": 4}, "world_size"),
        ({"tp": 2, "dp": 4, "etp": 8, "ep": 1, "sequence_parallel": True}, "moe_ffn_hidden"),
    ],
)
def test_invalid_moe_layouts_name_the_field(layout_kw, field):
    with pytest.raises(ValueError, match=field):
        mp.plan_memory(MOE, mp.Layout(**layout_kw), _work(), gpu_mem=1e9)


def test_expert_parallel_on_a_dense_model_and_bad_moe_shapes_are_refused():
    with pytest.raises(ValueError, match="num_experts"):
        mp.plan_memory(mp.ModelShape(2, 8, 16, 4, 2, 256), mp.Layout(dp=2, ep=2), _work(), gpu_mem=1e9)
    with pytest.raises(ValueError, match="top_k"):
        mp.ModelShape(2, 8, 16, 4, 2, 256, num_experts=4, top_k=5, moe_ffn_hidden=4)
    with pytest.raises(ValueError, match="num_experts > 0"):
        mp.ModelShape(2, 8, 16, 4, 2, 256, top_k=2)


def test_qwen3_moe_presets_match_the_hf_config_and_published_sizes():
    shape = mp.shape_from_hf_config(QWEN3_30B_HF, name="Qwen3-30B-A3B")
    assert shape == mp.preset("qwen3-30b-a3b")
    for name in ("qwen3-30b-a3b", "qwen3-235b-a22b"):
        s = mp.preset(name)
        assert abs(mp.param_count(s) / mp.PUBLISHED_PARAMS[name] - 1) < 0.02, name
        assert abs(mp.active_param_count(s) / mp.PUBLISHED_ACTIVE_PARAMS[name] - 1) < 0.03, name
    big = mp.preset("qwen3-235b-a22b")
    assert (big.num_layers, big.hidden, big.num_heads, big.moe_ffn_hidden) == (94, 4096, 64, 1536)
    with pytest.raises(ValueError, match="mlp_only_layers"):
        mp.shape_from_hf_config({**QWEN3_30B_HF, "mlp_only_layers": [0]})
    with pytest.raises(ValueError, match="num_local_experts"):
        mp.shape_from_hf_config({**QWEN3_30B_HF, "num_local_experts": 8})
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        mp.shape_from_hf_config({k: v for k, v in QWEN3_30B_HF.items() if k != "moe_intermediate_size"})
    qwen2_moe = {k: v for k, v in QWEN3_30B_HF.items() if k != "attention_bias"}  # Qwen2-MoE: QKV bias by default
    shared = mp.shape_from_hf_config({**qwen2_moe, "model_type": "qwen2_moe", "shared_expert_intermediate_size": 512})
    assert shared.shared_ffn_hidden == 512 and shared.qkv_bias and not shared.qk_norm
    # a shared expert adds 3*h*f_s split by TP and its h-wide sigmoid gate
    assert mp.layer_params(shared)[0] - mp.layer_params(mp.preset("qwen3-30b-a3b"))[0] > 3 * 2048 * 512


def test_qwen3_235b_on_h800_nodes():
    """235B-A22B (94 layers: PP 2, 4 KV heads: TP <= 4): 64 GPUs do not hold it; 128 (16 nodes of 8) at
    TP4 PP2 DP16 with EP32 of whole experts do."""
    big, work = mp.preset("qwen3-235b-a22b"), _work(seq_len=24576, recompute="full")
    common = {"tp": 4, "pp": 2, "etp": 1, "sequence_parallel": True, "distributed_optimizer": True}
    assert not mp.plan_memory(big, mp.Layout(dp=8, ep=8, **common), work, gpu_mem=80 * mp.GIB).fits
    lay = mp.Layout(dp=16, ep=32, **common)
    plan = mp.plan_memory(big, lay, work, gpu_mem=80 * mp.GIB)
    assert plan.fits and lay.world_size == 128 and lay.expert_dp == 2
    assert mp.stage_expert_params(big, lay) == 47 * 4 * 3 * 4096 * 1536  # 47 layers' 4 whole experts


def _example_config(monkeypatch, models: str):
    from dapo_megatron.config_io import load_config

    for name, value in (("MODELS", models), ("CKPT", "/ckpt"), ("DATA", "/data")):
        monkeypatch.setenv(name, value)
    return load_config(str(REPO_ROOT / "examples" / "dapo_qwen3_30b_a3b.yaml"))


def test_example_config_plans_from_the_model_folder(monkeypatch, tmp_path):
    """`dapo-megatron plan`'s memory section for the Qwen3-30B-A3B recipe: the shape read from
    model.hf_path/config.json equals the preset's plan, and it fits 80 GiB GPUs; without the folder it
    says what to give instead."""
    (tmp_path / "Qwen3-30B-A3B-Base").mkdir()
    (tmp_path / "Qwen3-30B-A3B-Base" / "config.json").write_text(json.dumps(QWEN3_30B_HF))
    cfg = _example_config(monkeypatch, str(tmp_path))
    assert (cfg.parallel.tensor, cfg.parallel.expert, cfg.parallel.world_size, cfg.rollout.mode) == (
        2, 8, 16, "disaggregated",
    )  # fmt: skip
    lines, fits = mr.config_report(cfg, 16)
    assert fits and "EP8 ETP2 (expert DP 1)" in "\n".join(lines) and "verdict FITS" in lines[-1]
    plan = mr.plan_from_config(cfg, mp.preset("qwen3-30b-a3b"), 16, 80 * mp.GIB, 2 * mp.GIB)
    assert lines[-1] == mr.verdict(plan)
    assert (plan.layout.dp, plan.work.seq_len, plan.work.recompute, plan.rollout.engine_tp) == (8, 24576, "full", 2)
    assert not plan.rollout.colocated and plan.engine_gpu["engine_weights"] > 0
    skipped, none = mr.config_report(_example_config(monkeypatch, str(tmp_path / "absent")), 16)
    assert none is None and "--model-preset" in skipped[0] and "absent" in skipped[0]
    bad, none = mr.config_report(cfg, 12)  # 12 GPUs: no whole DP over TP 2 with EP 8
    assert none is None and bad[0].startswith("memory plan: not made:")


def test_plan_memory_tool_prints_experts_and_alltoall(capsys):
    spec = importlib.util.spec_from_file_location("plan_memory_tool", REPO_ROOT / "tools" / "plan_memory.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    argv = [
        "--preset",
        "qwen3-30b-a3b",
        "--tp",
        "2",
        "--sequence-parallel",
        "--dp",
        "8",
        "--ep",
        "8",
        "--etp",
        "1",
        "--distributed-optimizer",
    ]
    argv += ["--seq-len", "24576", "--recompute", "full", "--tokens-per-step", "1e6"]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "experts 16 of 128 per EP rank" in out and "EP8 ETP1 (expert DP 2)" in out
    # 24576 tokens / TP 2 * top-8 * 2048 * 2 B * 7/8 remote, six all-to-alls (full recompute): 2016 MiB
    assert "2,016.0 MiB sent per GPU per MoE layer" in out and "verdict FITS" in out
