"""The on-paper memory and FLOPs model: hand-computed numbers on a tiny shape, layout checks, presets, CLI."""

import importlib.util
import json
import pathlib

import pytest

import dapo_megatron
from dapo_megatron.observability import memory_plan as mp

REPO_ROOT = pathlib.Path(dapo_megatron.__file__).resolve().parent.parent

# Tiny Qwen2-like shape: L=2, h=8, f=16, a=4 heads, g=2 KV heads (head_dim d=2), V=256, QKV bias, untied.
TINY = mp.ModelShape(num_layers=2, hidden=8, ffn_hidden=16, num_heads=4, num_kv_heads=2, vocab_size=256)


def _work(**kw):
    return mp.Workload(**{"seq_len": 4, "micro_batch": 1, **kw})


def test_tiny_param_count_by_hand():
    # one layer, split by TP: Q h*(a*d)=8*8=64, K+V 2*h*(g*d)=2*8*4=64, O 64, QKV bias 8+4+4=16,
    # SwiGLU 3*h*f=3*8*16=384 -> 592; replicated: two RMSNorm weights 2*8=16 -> 608 per layer.
    assert mp.layer_params(TINY) == (592, 16)
    # total: 2 layers * 608 + embedding 256*8 + untied output layer 256*8 + final norm 8 = 5320.
    assert mp.param_count(TINY) == 5320
    # the closed form for a Qwen2 GQA layer: 2h^2 + 2h*g*d + 3hf + (h + 2gd) + 2h, plus V*h*(2 - tied) + h
    h, f, gd, L, V = 8, 16, 4, 2, 256
    assert mp.param_count(TINY) == L * (2 * h * h + 2 * h * gd + 3 * h * f + (h + 2 * gd) + 2 * h) + 2 * V * h + h
    tied = mp.ModelShape(2, 8, 16, 4, 2, 256, tied_embeddings=True, qkv_bias=False)
    assert mp.param_count(tied) == 5320 - 2048 - 2 * 16  # one embedding copy, no biases


def test_tp_halves_the_layer_params_per_gpu():
    one, two = mp.Layout(tp=1), mp.Layout(tp=2)
    assert mp.stage_params(TINY, one, 0) == 5320
    # TP2: layers 2*(592/2 + 16) = 624, embedding and output shards 128*8 each, final norm 8 -> 2680
    assert mp.stage_params(TINY, two, 0) == 2680
    norms = 2 * 16 + 8  # layer norms and the final norm are replicated on every TP rank
    assert mp.stage_params(TINY, one, 0) - norms == 2 * (mp.stage_params(TINY, two, 0) - norms)


def test_pipeline_stages_split_layers_and_embeddings():
    lay = mp.Layout(pp=2)
    # stage 0: one layer 608 + embedding 2048; stage 1: one layer 608 + final norm 8 + output layer 2048
    assert (mp.stage_params(TINY, lay, 0), mp.stage_params(TINY, lay, 1)) == (2656, 2664)
    tied = mp.ModelShape(2, 8, 16, 4, 2, 256, tied_embeddings=True)
    assert mp.stage_params(tied, mp.Layout(pp=1), 0) == 5320 - 2048  # tied, one stage: one copy
    assert mp.stage_params(tied, lay, 1) == 2664  # tied with PP > 1: the last stage keeps a copy


def test_vocab_is_padded_per_tp():
    assert mp.padded_vocab(151936, 1) == 151936  # 1187 * 128
    assert mp.padded_vocab(151936, 8) == 152576  # next multiple of 1024
    assert mp.padded_vocab(152064, 8) == 152576


def test_bytes_per_param_and_distributed_optimizer():
    assert mp.state_bytes_per_param("bf16") == (2, 4, 12)  # bf16 weights, fp32 main grads, fp32 master + m + v
    assert mp.state_bytes_per_param("fp32") == (4, 4, 8)  # no master copy
    plain = mp.plan_stage(TINY, mp.Layout(dp=4), _work(), 0, 0.0)
    dist = mp.plan_stage(TINY, mp.Layout(dp=4, distributed_optimizer=True), _work(), 0, 0.0)
    assert (plain.params, plain.grads, plain.optimizer) == (5320 * 2, 5320 * 4, 5320 * 12)
    assert (dist.params, dist.grads) == (plain.params, plain.grads)  # grad buffer stays full size
    assert dist.optimizer == plain.optimizer / 4
    with_cp = mp.plan_stage(TINY, mp.Layout(dp=4, cp=2, distributed_optimizer=True), _work(), 0, 0.0)
    assert with_cp.optimizer == plain.optimizer / 8  # sharded over DP x CP


def test_activations_by_hand_and_recompute():
    lay = mp.Layout()
    # one layer, s=4, b=1, bf16, TP1, flash: per token 4h=32 (norm + linear inputs) + Q h=8 + K,V 2gd=8
    # + attention output h=8 + SwiGLU 3f=48 = 104 elements -> 4*104*2 = 832 B, + fp32 LSE 4*a*4 = 64 B
    assert mp.layer_activation_bytes(TINY, lay, _work()) == 896
    # unfused attention keeps the bf16 softmax output instead: a*s per token -> 4*4*4*2 = 128 B
    assert mp.layer_activation_bytes(TINY, lay, _work(flash_attention=False)) == 832 + 128
    # stage 0 = last stage: 2 layers * 896 + final norm and output-layer inputs 4 * 2h * 2 B = 128
    none = mp.activation_bytes(TINY, lay, _work(), 0)
    assert none == 2 * 896 + 128 == 1920
    # full: each layer keeps its input (4 * h * 2 B = 64), plus one layer re-materialised, plus the head
    full = mp.activation_bytes(TINY, lay, _work(recompute="full"), 0)
    assert full == 2 * 64 + 896 + 128 == 1152
    assert full < none
    assert mp.activation_bytes(TINY, lay, _work(recompute="selective"), 0) == none  # flash: nothing to drop
    sel_unfused = mp.activation_bytes(TINY, lay, _work(recompute="selective", flash_attention=False), 0)
    assert sel_unfused == none < mp.activation_bytes(TINY, lay, _work(flash_attention=False), 0)


def test_sequence_parallel_and_tp_split_activations():
    w = _work(seq_len=8)
    # TP2 without SP: 8 tokens * (32 whole + 72/2 split) * 2 B + LSE 8 * 2 heads * 4 B = 1088 + 64
    assert mp.layer_activation_bytes(TINY, mp.Layout(tp=2), w) == 1152
    # with SP everything is split: 8 * 104/2 * 2 + 64 = 896
    assert mp.layer_activation_bytes(TINY, mp.Layout(tp=2, sequence_parallel=True), w) == 896


def test_pipeline_inflight_layers():
    eight = mp.ModelShape(8, 8, 16, 4, 2, 256)
    assert [mp.inflight_layers(eight, mp.Layout(pp=4), r) for r in range(4)] == [8, 6, 4, 2]  # (pp - r) * L/pp
    # interleaved, v=2: stage 0 holds L * (1 + (p-1)/(p*v)) = 8 * (1 + 3/8) = 11 layer-micro-batches
    assert mp.inflight_layers(eight, mp.Layout(pp=4, vpp=2), 0) == 11
    assert mp.inflight_layers(eight, mp.Layout(pp=4, vpp=2), 3) == 5  # (v-1)*p + 1 chunks of one layer


def test_logits_buffer_by_hand():
    # last stage: logits + their gradient 2 * 4 tokens * 256 * 2 B = 4096, + 4 fp32 [4, 256] chunks = 16384
    assert mp.logits_bytes(TINY, mp.Layout(), _work(), 0) == 20480
    assert mp.logits_bytes(TINY, mp.Layout(pp=2), _work(), 0) == 0  # only on the last stage


@pytest.mark.parametrize(
    ("shape_kw", "layout_kw", "field"),
    [
        ({}, {"tp": 3}, "num_heads"),
        ({}, {"tp": 4}, "num_kv_heads"),  # 4 heads split, 2 KV heads do not
        ({}, {"pp": 4}, "num_layers"),
        ({"num_layers": 4}, {"pp": 2, "vpp": 4}, "num_layers"),
        ({"ffn_hidden": 18}, {"tp": 4, "sequence_parallel": False}, "ffn_hidden"),
    ],
)
def test_invalid_layouts_name_the_field(shape_kw, layout_kw, field):
    shape = mp.ModelShape(**{**TINY.__dict__, **shape_kw, "num_kv_heads": 4 if field == "ffn_hidden" else 2})
    with pytest.raises(ValueError, match=field):
        mp.plan_memory(shape, mp.Layout(**layout_kw), _work(), gpu_mem=1e9)


def test_other_invalid_inputs_name_the_field():
    with pytest.raises(ValueError, match="vpp"):
        mp.Layout(pp=1, vpp=2)
    with pytest.raises(ValueError, match="tp"):
        mp.Layout(tp=0)
    with pytest.raises(ValueError, match="recompute"):
        _work(recompute="some")
    with pytest.raises(ValueError, match="seq_len"):
        mp.plan_memory(TINY, mp.Layout(cp=4), _work(seq_len=12), gpu_mem=1e9)
    with pytest.raises(ValueError, match="num_heads"):
        mp.ModelShape(2, 8, 16, 3, 2, 256)
    with pytest.raises(ValueError, match="engine_tp"):
        mp.plan_memory(TINY, mp.Layout(), _work(), gpu_mem=1e9, rollout=mp.Rollout(engine_tp=3, kv_cache_tokens=1))
    with pytest.raises(ValueError, match="exactly one"):
        mp.Rollout(engine_tp=1)


def test_kv_cache_per_token():
    # 2 (K, V) * 2 layers * 2 KV heads * head_dim 2 * 2 B = 32 B per token; engine TP2: 1 head per GPU
    assert mp.kv_bytes_per_token(TINY, 1) == 32
    assert mp.kv_bytes_per_token(TINY, 2) == 16
    assert mp.kv_bytes_per_token(TINY, 4) == 16  # 2 KV heads on 4 GPUs: replicated, one head each
    # Qwen2.5-32B, engine TP 8: 2 * 64 layers * 1 head * 128 * 2 B = 32 KiB per token per GPU
    assert mp.kv_bytes_per_token(mp.preset("qwen2.5-32b"), 8) == 32 * 1024


def test_colocated_and_separate_engine_plans():
    gpu, ovh = 1_000_000.0, 100.0
    work = _work()
    train_only = mp.plan_memory(TINY, mp.Layout(), work, gpu, overhead=ovh)
    (st,) = train_only.stages
    assert st.train_total == 5320 * 18 + 1920 + 20480 + ovh and st.peak == st.train_total
    assert train_only.fits and train_only.headroom == gpu - st.peak
    co = mp.plan_memory(TINY, mp.Layout(), work, gpu, rollout=mp.Rollout(kv_cache_tokens=1000), overhead=ovh)
    (cs,) = co.stages
    assert cs.engine_weights == 5320 * 2 and cs.kv_cache == 1000 * 32
    # offload (the default): only the bf16 params (2 B each) meet the engine, during the weight push
    assert cs.trainer_offloaded and cs.rollout_resident == 5320 * 2
    assert cs.rollout_total == 5320 * 2 + 5320 * 2 + 32000 + 2 * ovh
    kept = mp.plan_memory(TINY, mp.Layout(), work, gpu, rollout=mp.Rollout(kv_cache_tokens=1000, offload_trainer=False),
                          overhead=ovh)  # fmt: skip
    assert kept.stages[0].rollout_total == 5320 * 18 + 5320 * 2 + 32000 + 2 * ovh  # trainer state stays resident
    frac = mp.plan_memory(TINY, mp.Layout(), work, gpu, rollout=mp.Rollout(mem_fraction=0.5), overhead=ovh)
    assert frac.stages[0].kv_cache == 0.5 * gpu - 5320 * 2  # weights + pool = fraction x GPU memory
    sep = mp.plan_memory(
        TINY, mp.Layout(), work, gpu, rollout=mp.Rollout(colocated=False, kv_cache_tokens=10), overhead=ovh
    )
    assert sep.stages[0] == st and sep.engine_gpu == {"engine_weights": 10640.0, "kv_cache": 320.0, "overhead": ovh}
    assert not mp.plan_memory(TINY, mp.Layout(), work, gpu_mem=1000.0).fits


def test_flops_per_token_by_hand():
    # FLOP-bearing weights: layers 2 * 592 + output layer 256 * 8 = 3232; forward 2 * 3232 = 6464
    # attention, causal, seq 4: 4 * L * (s/2) * a*d = 4 * 2 * 2 * 8 = 128
    f = mp.flops_per_token(TINY, 4)
    assert (f.forward, f.model, f.hardware) == (6592, 3 * 6592, 3 * 6592)
    assert mp.flops_per_token(TINY, 4, recompute="full").hardware == 4 * 6592
    assert mp.flops_per_token(TINY, 4, causal=False).forward == 6464 + 256
    rate = mp.tokens_per_s_per_gpu(1e9, 1e15, 0.5)
    assert rate == 5e5 and mp.step_time_s(1e6, rate, 2) == 1.0


@pytest.mark.parametrize("name", sorted(mp.PRESETS))
def test_preset_param_counts_match_published_sizes(name):
    count = mp.param_count(mp.preset(name))
    assert abs(count / mp.PUBLISHED_PARAMS[name] - 1) < 0.02, (name, count)


def test_shape_from_hf_config():
    cfg = {
        "model_type": "qwen2",
        "num_hidden_layers": 28,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    }
    shape = mp.shape_from_hf_config(cfg, name="Qwen2.5-1.5B")
    assert shape == mp.preset("qwen2.5-1.5b")
    llama = mp.shape_from_hf_config({**cfg, "model_type": "llama", "tie_word_embeddings": False})
    assert not llama.qkv_bias and not llama.tied_embeddings
    with pytest.raises(ValueError, match="intermediate_size"):
        mp.shape_from_hf_config({k: v for k, v in cfg.items() if k != "intermediate_size"})
    with pytest.raises(ValueError, match="'num_experts_per_tok'"):  # a MoE config needs its routing keys
        mp.shape_from_hf_config({**cfg, "num_experts": 64})
    with pytest.raises(ValueError, match="preset"):
        mp.preset("qwen9")


def _tool():
    spec = importlib.util.spec_from_file_location("plan_memory_tool", REPO_ROOT / "tools" / "plan_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_prints_table_and_verdict(capsys, tmp_path):
    tool = _tool()
    assert tool.main(["--preset", "qwen2.5-1.5b", "--seq-len", "4096", "--gpu-mem-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "optimizer state" in out and "verdict FITS" in out and "FLOPs/token" in out
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "num_hidden_layers": 64,
                "hidden_size": 5120,
                "intermediate_size": 27648,
                "num_attention_heads": 40,
                "num_key_value_heads": 8,
                "vocab_size": 152064,
            }
        )
    )
    argv = [
        "--hf-config",
        str(tmp_path),
        "--tp",
        "8",
        "--prompt-len",
        "2048",
        "--response-len",
        "20480",
        "--colocated",
        "--engine-tp",
        "8",
        "--gpu-mem-gib",
        "80",
    ]
    assert tool.main(argv) == 1  # 32B on 8 GPUs with a replicated optimizer: no
    out = capsys.readouterr().out
    assert "verdict DOES NOT FIT" in out and "KV cache (rollout)" in out and "22528" in out


def test_cli_rejects_bad_layout(capsys):
    with pytest.raises(SystemExit) as e:
        _tool().main(["--preset", "qwen2.5-7b", "--tp", "7", "--seq-len", "1024"])
    assert e.value.code == 2
    assert "num_kv_heads=4 is not divisible by tp=7" in capsys.readouterr().err
