"""HF config -> ModelSpec -> TransformerConfig -> GPTModel chunks.

Pure parsing tests run in-process. Building and running megatron happens in spawned processes; there
the megatron logits are checked against transformers' own model holding the same weights (TP1, TP2
and PP2), which pins the spec mapping (q/k/v bias, Qwen3 qk-norm, head_dim, GQA, Llama 3 rope
scaling, tied embeddings).
"""

import json

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config, Qwen3Config

from dapo_megatron.config import ConfigError, ModelConfig
from dapo_megatron.megatron.model import (
    ARCHITECTURES,
    build_model_chunks,
    model_spec_from_hf,
    padded_vocab_size,
    transformer_config,
)
from dapo_megatron.parallel.topology import Topology
from tests.distributed_harness import run_distributed

TINY = dict(
    vocab_size=200, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2,
)  # fmt: skip
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _hf_configs(layers=2):
    """Tiny HF configs built in code (no download), one per architecture."""
    tiny = {**TINY, "num_hidden_layers": layers}
    return {
        "qwen2": Qwen2Config(**tiny, rope_theta=1e6, tie_word_embeddings=True),
        "qwen3": Qwen3Config(**tiny, head_dim=32, rms_norm_eps=1e-5),
        "llama": LlamaConfig(**tiny, max_position_embeddings=16384, rope_theta=10000.0, rope_scaling=dict(LLAMA3_ROPE)),
    }


# ----------------------------------------------------------------------------- parsing (pure)
def test_qwen2_spec():
    spec = model_spec_from_hf(_hf_configs()["qwen2"].to_dict())
    assert spec.model_type == "qwen2"
    assert (spec.num_layers, spec.hidden_size, spec.ffn_hidden_size) == (2, 64, 96)
    assert (spec.num_attention_heads, spec.num_query_groups, spec.kv_channels) == (4, 2, 16)
    assert spec.qkv_bias and not spec.qk_layernorm and spec.tied_embeddings
    assert spec.rope_theta == 1e6 and spec.rope_scaling is None
    assert spec.vocab_size == 200 and spec.rms_norm_eps == 1e-6


def test_qwen3_spec_head_dim_from_config():
    spec = model_spec_from_hf(_hf_configs()["qwen3"].to_dict())
    assert spec.kv_channels == 32  # not hidden/heads = 16
    assert spec.qk_layernorm and not spec.qkv_bias and not spec.tied_embeddings
    assert spec.rms_norm_eps == 1e-5


def test_llama3_rope_scaling_v5_and_v4_layouts():
    spec = model_spec_from_hf(_hf_configs()["llama"].to_dict())
    assert spec.rope_scaling == LLAMA3_ROPE and spec.rope_theta == 10000.0
    assert not spec.qkv_bias and not spec.qk_layernorm
    # transformers v4 config.json layout: rope_theta at top level and rope_scaling with "rope_type"/"type"
    v4 = {**TINY, "model_type": "llama", "max_position_embeddings": 131072, "rope_theta": 500000.0}
    v4["rope_scaling"] = {**LLAMA3_ROPE, "factor": 32.0}
    spec4 = model_spec_from_hf(v4)
    assert spec4.rope_theta == 500000.0 and spec4.rope_scaling["factor"] == 32.0
    plain = model_spec_from_hf({**v4, "rope_scaling": None})
    assert plain.rope_scaling is None and plain.kv_channels == 16


def test_llama3_scaling_constants_must_match_megatron():
    hf = _hf_configs()["llama"].to_dict()
    hf["rope_parameters"] = {**hf["rope_parameters"], "low_freq_factor": 2.0}
    with pytest.raises(
        ValueError,
        match=r"low_freq_factor=2 is not supported: megatron-core's RotaryEmbedding hard-codes low_freq_factor=1",
    ):
        model_spec_from_hf(hf)
    hf["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match=r"rope scaling type 'yarn' is not supported"):
        model_spec_from_hf(hf)


def test_unsupported_features_raise():
    base = _hf_configs()["llama"].to_dict()
    with pytest.raises(ValueError, match="attention_bias=True is not supported"):
        model_spec_from_hf({**base, "attention_bias": True})
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        model_spec_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="use_sliding_window"):
        model_spec_from_hf({**_hf_configs()["qwen2"].to_dict(), "use_sliding_window": True})


def test_unknown_model_type_lists_supported():
    with pytest.raises(
        ValueError, match=r"unsupported HF model_type 'gpt2'; supported: llama, qwen2, qwen3, qwen3_moe"
    ):
        model_spec_from_hf({"model_type": "gpt2"})
    assert sorted(ARCHITECTURES) == ["llama", "qwen2", "qwen3", "qwen3_moe"]


def test_spec_from_folder_and_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_hf_configs()["qwen3"].to_dict()))
    assert model_spec_from_hf(tmp_path) == model_spec_from_hf(str(tmp_path / "config.json"))
    assert model_spec_from_hf(str(tmp_path)).model_type == "qwen3"


def test_padded_vocab_size():
    assert padded_vocab_size(151936, 1) == 151936  # 1187 * 128
    assert padded_vocab_size(151936, 2) == 152064  # 594 * 256
    assert padded_vocab_size(32000, 8) == 32768
    assert padded_vocab_size(200, 2) == 256
    assert padded_vocab_size(1, 1, multiple=64) == 64
    with pytest.raises(ValueError):
        padded_vocab_size(0, 1)


# ----------------------------------------------------------------------------- TransformerConfig
def test_transformer_config_fields_on_cpu():
    spec = model_spec_from_hf(_hf_configs()["qwen2"].to_dict())
    cfg = transformer_config(spec, Topology(world_size=8, tp=2, pp=2, vpp=1), ModelConfig(params_dtype="bfloat16"))
    assert cfg.normalization == "RMSNorm" and cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert cfg.add_qkv_bias and not cfg.add_bias_linear and not cfg.qk_layernorm
    assert (cfg.hidden_dropout, cfg.attention_dropout) == (0.0, 0.0)
    assert cfg.params_dtype == torch.bfloat16 and cfg.pipeline_dtype == torch.bfloat16 and cfg.bf16 and not cfg.fp16
    assert cfg.use_cpu_initialization and not cfg.batch_p2p_comm and cfg.variable_seq_lengths
    assert cfg.transformer_impl == "local"
    assert (cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size) == (2, 2)
    assert cfg.recompute_granularity is None
    assert (cfg.kv_channels, cfg.num_query_groups, cfg.layernorm_epsilon) == (16, 2, 1e-6)


def test_transformer_config_recompute_and_vpp():
    spec = model_spec_from_hf({**_hf_configs()["qwen3"].to_dict(), "num_hidden_layers": 4})
    full = ModelConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=1)
    cfg = transformer_config(spec, Topology(world_size=2, pp=2, vpp=2), full)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == ("full", "block", 1)
    assert cfg.virtual_pipeline_model_parallel_size == 2 and cfg.qk_layernorm
    sel = transformer_config(spec, Topology(world_size=1), ModelConfig(recompute_granularity="selective"))
    assert (sel.recompute_granularity, sel.recompute_method, sel.recompute_num_layers) == ("selective", None, None)
    assert sel.params_dtype == torch.float32 and not sel.bf16


def test_model_does_not_fit_topology():
    spec = model_spec_from_hf(_hf_configs()["qwen3"].to_dict())
    with pytest.raises(ValueError, match=r"num_query_groups \(key/value heads\)=2 is not divisible by tp=4"):
        transformer_config(spec, Topology(world_size=4, tp=4), ModelConfig())


def test_fp8_without_te_raises_before_build(monkeypatch):
    import dapo_megatron.megatron.model as model_mod

    monkeypatch.setattr(model_mod, "_te_importable", lambda: False)  # the same on a GPU machine with TE
    spec = model_spec_from_hf(_hf_configs()["llama"].to_dict())
    fp8 = ModelConfig(fp8="e4m3", fp8_recipe="blockwise")
    # build_model_chunks validates before it looks at (uninitialised) parallel state or builds anything
    with pytest.raises(
        ConfigError, match=r"model\.fp8: FP8 \('e4m3', recipe 'blockwise'\) .*missing: Transformer Engine"
    ):
        build_model_chunks(spec, Topology(world_size=1), fp8)
    with pytest.raises(ConfigError, match=r"model\.transformer_impl: 'transformer_engine' needs Transformer Engine"):
        transformer_config(spec, Topology(world_size=1), ModelConfig(transformer_impl="transformer_engine"))
    assert model_mod.resolve_transformer_impl(ModelConfig(transformer_impl="auto")) == "local"


def test_fp8_recipe_checked_against_installed_megatron():
    from dataclasses import dataclass
    from typing import Literal, Optional

    from dapo_megatron.megatron.model import _fp8_kwargs

    @dataclass
    class OldConfig:  # a megatron-core without the 'blockwise' recipe
        fp8: Optional[str] = None
        fp8_recipe: Optional[Literal["tensorwise", "delayed"]] = "delayed"

    with pytest.raises(ConfigError, match=r"model\.fp8_recipe: 'blockwise' is not supported .* delayed, tensorwise"):
        _fp8_kwargs(ModelConfig(fp8="hybrid", fp8_recipe="blockwise"), OldConfig)
    assert _fp8_kwargs(ModelConfig(fp8="hybrid", fp8_recipe="delayed"), OldConfig) == {
        "fp8": "hybrid",
        "fp8_recipe": "delayed",
    }
    from megatron.core.transformer.transformer_config import TransformerConfig

    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):  # every ModelConfig recipe exists in 0.16.1
        assert _fp8_kwargs(ModelConfig(fp8="e4m3", fp8_recipe=recipe), TransformerConfig)["fp8_recipe"] == recipe


# ----------------------------------------------------------------------------- megatron vs transformers
def _hf_to_megatron(hf_sd, spec, name, *, tp, tp_rank, layer_offset, vocab_padded):
    """The megatron (local spec) tensor for parameter ``name`` of this rank, from an HF state dict.

    Test-local mapping for the layouts used here; the production mapping lives in ``weights/``.
    """

    def rows(t):  # column-parallel: split output rows
        return t.chunk(tp, dim=0)[tp_rank]

    def vocab(t):
        padded = torch.zeros(vocab_padded, *t.shape[1:], dtype=t.dtype)
        padded[: t.shape[0]] = t
        return rows(padded)

    if name == "embedding.word_embeddings.weight":
        return vocab(hf_sd["model.embed_tokens.weight"])
    if name == "output_layer.weight":
        return vocab(hf_sd.get("lm_head.weight", hf_sd["model.embed_tokens.weight"]))
    if name == "decoder.final_layernorm.weight":
        return hf_sd["model.norm.weight"]
    parts = name.split(".")
    layer, rest = int(parts[2]) + layer_offset, ".".join(parts[3:])
    p = f"model.layers.{layer}."
    groups, d = spec.num_query_groups, spec.kv_channels
    per_group = spec.num_attention_heads // groups

    def qkv(kind):  # megatron interleaves [q heads of group g, k_g, v_g] per query group
        q = hf_sd[p + f"self_attn.q_proj.{kind}"].reshape(groups, per_group * d, -1)
        k = hf_sd[p + f"self_attn.k_proj.{kind}"].reshape(groups, d, -1)
        v = hf_sd[p + f"self_attn.v_proj.{kind}"].reshape(groups, d, -1)
        fused = torch.cat([q, k, v], dim=1).chunk(tp, dim=0)[tp_rank]
        return fused.reshape(-1, *hf_sd[p + f"self_attn.q_proj.{kind}"].shape[1:])

    table = {
        "input_layernorm.weight": lambda: hf_sd[p + "input_layernorm.weight"],
        "pre_mlp_layernorm.weight": lambda: hf_sd[p + "post_attention_layernorm.weight"],
        "self_attention.q_layernorm.weight": lambda: hf_sd[p + "self_attn.q_norm.weight"],
        "self_attention.k_layernorm.weight": lambda: hf_sd[p + "self_attn.k_norm.weight"],
        "self_attention.linear_qkv.weight": lambda: qkv("weight"),
        "self_attention.linear_qkv.bias": lambda: qkv("bias"),
        "self_attention.linear_proj.weight": lambda: hf_sd[p + "self_attn.o_proj.weight"].chunk(tp, 1)[tp_rank],
        "mlp.linear_fc1.weight": lambda: torch.cat(
            [rows(hf_sd[p + "mlp.gate_proj.weight"]), rows(hf_sd[p + "mlp.up_proj.weight"])]
        ),
        "mlp.linear_fc2.weight": lambda: hf_sd[p + "mlp.down_proj.weight"].chunk(tp, 1)[tp_rank],
    }
    return table[rest]()


def _load_hf_weights(chunk, hf_model, spec, topo, vp_stage):
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.model import padded_vocab_size

    tp_rank = ps.get_tensor_model_parallel_rank()
    per_chunk = spec.num_layers // (topo.pp * topo.vpp)
    # interleaved layout: virtual stage v of pipeline rank r holds global chunk v * pp + r
    offset = (vp_stage * topo.pp + ps.get_pipeline_model_parallel_rank()) * per_chunk
    hf_sd = hf_model.state_dict()
    with torch.no_grad():
        for name, param in chunk.named_parameters():
            value = _hf_to_megatron(
                hf_sd, spec, name, tp=topo.tp, tp_rank=tp_rank, layer_offset=offset,
                vocab_padded=padded_vocab_size(spec.vocab_size, topo.tp),
            )  # fmt: skip
            assert value.shape == param.shape, (name, value.shape, param.shape)
            param.copy_(value)


def _pipeline_forward(chunks, topo, tokens, positions, hidden_size):
    """Run the chunks in pipeline order (virtual stage, then pipeline rank) with plain send/recv.

    Returns this rank's logits shard if it holds the last stage, else None.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp_rank, logits = ps.get_pipeline_model_parallel_rank(), None
    b, s = tokens.shape
    for vp in range(topo.vpp):
        for r in range(topo.pp):
            if r != pp_rank:
                continue
            chunk = chunks[vp]
            if chunk.pre_process:
                out = chunk(tokens, positions, None)
            else:
                hidden = torch.empty(s, b, hidden_size)
                dist.recv(hidden, src=ps.get_pipeline_model_parallel_prev_rank())
                chunk.set_input_tensor(hidden)
                out = chunk(None, positions, None)
            if chunk.post_process:
                logits = out
            else:
                dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
    return logits


def _hf_model(arch, layers=2, **overrides):
    from transformers import AutoModelForCausalLM

    cfg = _hf_configs(layers)[arch]
    for key, value in overrides.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so a dropped one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return cfg, model


def _gather_vocab(logits, tp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _megatron_vs_hf(rank, world_size, cases, seq_len):
    """For each (arch, tp, pp, vpp, layers): build, load the HF weights, run one forward.

    Returns per case the max |megatron - transformers| logit difference (on last-stage ranks), the
    logit scale, this rank's parameter count and each chunk's (pre_process, post_process, layers).
    """
    from megatron.core import parallel_state as ps

    from dapo_megatron.parallel.init import init_distributed, init_model_parallel, shutdown

    init_distributed()
    out = {}
    for arch, tp, pp, vpp, layers in cases:
        topo = Topology(world_size=world_size, tp=tp, pp=pp, vpp=vpp)
        init_model_parallel(topo, seed=5)
        cfg, hf = _hf_model(arch, layers)
        spec = model_spec_from_hf(cfg.to_dict())
        chunks = build_model_chunks(spec, topo, ModelConfig())
        assert len(chunks) == vpp
        for vp_stage, chunk in enumerate(chunks):
            _load_hf_weights(chunk, hf, spec, topo, vp_stage)
            chunk.eval()
        tokens = torch.randint(0, spec.vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(3))
        positions = torch.arange(seq_len).expand(2, -1)
        with torch.no_grad():
            ref = hf(input_ids=tokens).logits
            logits = _pipeline_forward(chunks, topo, tokens, positions, spec.hidden_size)
        key = f"{arch}_tp{tp}_pp{pp}_vpp{vpp}"
        if logits is not None:
            full = _gather_vocab(logits, tp)
            assert full.shape == (2, seq_len, padded_vocab_size(spec.vocab_size, tp)), full.shape
            out[key] = (full[..., : spec.vocab_size] - ref).abs().max().item()
            out[key + "_scale"] = ref.abs().max().item()
        out[key + "_params"] = sum(p.numel() for c in chunks for p in c.parameters())
        out[key + "_chunks"] = [(c.pre_process, c.post_process, len(c.decoder.layers)) for c in chunks]
        ps.destroy_model_parallel()
    if rank == 0 and world_size == 1:
        # Sensitivity of the Llama case: without the rope scaling the logits must differ clearly.
        _, plain = _hf_model("llama", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        tokens = torch.randint(0, 200, (2, seq_len), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            _, scaled = _hf_model("llama")
            out["llama_scaling_effect"] = (plain(input_ids=tokens).logits - scaled(input_ids=tokens).logits).abs().max()
            out["llama_scaling_effect"] = out["llama_scaling_effect"].item()
    shutdown()
    return out


MATCH_TOL = 2e-5  # fp32 logits of magnitude < 1; measured differences are 0 to 3e-7


@pytest.mark.multiproc
def test_tp1_matches_transformers_for_each_architecture():
    # seq 384: positions reach the band where Llama 3 scaling changes the low rope frequencies
    cases = [("qwen2", 1, 1, 1, 2), ("qwen3", 1, 1, 1, 2), ("llama", 1, 1, 1, 2)]
    (out,) = run_distributed(_megatron_vs_hf, 1, cases, 384)
    for arch in ("qwen2", "qwen3", "llama"):
        assert out[f"{arch}_tp1_pp1_vpp1"] < MATCH_TOL, (arch, out)
        assert out[f"{arch}_tp1_pp1_vpp1_chunks"] == [(True, True, 2)]
    # the Llama comparison can see the rope scaling: dropping it moves the logits far beyond the match error
    assert out["llama_scaling_effect"] > max(1e-4, 100 * out["llama_tp1_pp1_vpp1"]), out


@pytest.mark.multiproc
def test_tp2_pp2_and_vpp2_match_transformers():
    # One 2-process world, three layouts: TP2 (qwen3: qk-norm, GQA split over ranks), PP2 (qwen2: tied
    # embeddings across pipeline stages, q/k/v bias), PP2 x VPP2 (llama, 4 layers in 4 interleaved chunks).
    cases = [("qwen3", 2, 1, 1, 2), ("qwen2", 1, 2, 1, 2), ("llama", 1, 2, 2, 4)]
    r0, r1 = run_distributed(_megatron_vs_hf, 2, cases, 16, timeout_s=240)
    assert r0["qwen3_tp2_pp1_vpp1"] < MATCH_TOL and r1["qwen3_tp2_pp1_vpp1"] < MATCH_TOL, (r0, r1)
    assert r0["qwen3_tp2_pp1_vpp1_params"] == r1["qwen3_tp2_pp1_vpp1_params"]  # each TP rank holds half
    assert "qwen2_tp1_pp2_vpp1" not in r0 and r1["qwen2_tp1_pp2_vpp1"] < MATCH_TOL, (r0, r1)
    assert r0["qwen2_tp1_pp2_vpp1_chunks"] == [(True, False, 1)] and r1["qwen2_tp1_pp2_vpp1_chunks"] == [
        (False, True, 1)
    ]
    # tied embeddings: stage 1 holds a copy of the embedding as its output layer; it also has the final norm
    assert r1["qwen2_tp1_pp2_vpp1_params"] - r0["qwen2_tp1_pp2_vpp1_params"] == 64
    assert r1["llama_tp1_pp2_vpp2"] < MATCH_TOL, r1
    assert r0["llama_tp1_pp2_vpp2_chunks"] == [(True, False, 1), (False, False, 1)]
    assert r1["llama_tp1_pp2_vpp2_chunks"] == [(False, False, 1), (False, True, 1)]


@pytest.mark.multiproc
def test_pp4_and_tp2_pp2_vpp2_match_transformers():
    cases = [("qwen2", 1, 4, 1, 4), ("qwen3", 2, 2, 2, 4)]
    outs = run_distributed(_megatron_vs_hf, 4, cases, 16, timeout_s=300)
    assert [o["qwen2_tp1_pp4_vpp1_chunks"] for o in outs] == [
        [(True, False, 1)],
        [(False, False, 1)],
        [(False, False, 1)],
        [(False, True, 1)],
    ]
    assert outs[3]["qwen2_tp1_pp4_vpp1"] < MATCH_TOL, outs[3]
    # ranks are tp-major: ranks 2 and 3 are the last pipeline stage (both TP shards)
    for r in (2, 3):
        assert outs[r]["qwen3_tp2_pp2_vpp2"] < MATCH_TOL, outs[r]
        assert outs[r]["qwen3_tp2_pp2_vpp2_chunks"] == [(False, False, 1), (False, True, 1)]
