"""Pure mapping functions: hand-built layouts, inverses, TP sharding, the whole-model tables."""

from dataclasses import dataclass, replace

import pytest
import torch

from dapo_megatron.weights import mapping as M


@dataclass(frozen=True)
class Spec:
    """The ModelSpec fields the mapping reads (the real class lives in dapo_megatron.megatron.model)."""

    model_type: str = "qwen2"
    num_layers: int = 2
    hidden_size: int = 8
    ffn_hidden_size: int = 12
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: int = 2
    vocab_size: int = 10
    qkv_bias: bool = True
    qk_layernorm: bool = False
    tied_embeddings: bool = False


def test_merge_qkv_interleaves_per_query_group_by_hand():
    # 4 heads, 2 groups, head_dim 1, hidden 1: rows are labelled by their value.
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])  # heads q0..q3; group 0 = q0,q1
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = M.merge_qkv(q, k, v, num_heads=4, num_groups=2, head_dim=1)
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    bias = M.merge_qkv(q[:, 0], k[:, 0], v[:, 0], 4, 2, 1)
    assert bias.tolist() == [10, 11, 20, 30, 12, 13, 21, 31]


@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (8, 2), (4, 1)])
def test_split_qkv_inverts_merge(heads, groups):
    d, h = 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    fused = M.merge_qkv(q, k, v, heads, groups, d)
    assert fused.shape == ((heads + 2 * groups) * d, h)
    for a, b in zip(M.split_qkv(fused, heads, groups, d), (q, k, v)):
        assert torch.equal(a, b)


def test_gate_up_and_vocab_padding():
    gate, up = torch.randn(3, 2), torch.randn(3, 2)
    fc1 = M.merge_gate_up(gate, up)
    assert torch.equal(fc1[:3], gate) and torch.equal(fc1[3:], up)
    g2, u2 = M.split_gate_up(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    emb = torch.randn(5, 2)
    padded = M.pad_vocab(emb, 8)
    assert padded.shape == (8, 2) and torch.equal(padded[:5], emb) and not padded[5:].any()
    assert torch.equal(M.strip_vocab(padded, 5), emb)
    with pytest.raises(ValueError, match="smaller than the vocab"):
        M.pad_vocab(emb, 4)


def test_tp_rules_and_gate_up_shard_layout():
    assert M.tp_rule("decoder.layers.3.self_attention.linear_qkv.weight") == M.COLUMN
    assert M.tp_rule("decoder.layers.3.self_attention.linear_proj.weight") == M.ROW
    assert M.tp_rule("decoder.layers.3.mlp.linear_fc2.weight") == M.ROW
    assert M.tp_rule("decoder.layers.3.mlp.linear_fc1.weight") == M.GATE_UP
    assert M.tp_rule("decoder.layers.3.mlp.linear_fc1.layer_norm_weight") == M.REPLICATED
    assert M.tp_rule("decoder.layers.3.self_attention.q_layernorm.weight") == M.REPLICATED
    assert M.tp_rule("embedding.word_embeddings.weight") == M.COLUMN
    # fc1 = [g0 g1 g2 g3; u0 u1 u2 u3] -> rank 0 holds [g0 g1; u0 u1], rank 1 [g2 g3; u2 u3].
    fc1 = torch.arange(8.0).reshape(8, 1)
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    assert M.tp_shard(name, fc1, 2, 0).flatten().tolist() == [0, 1, 4, 5]
    assert M.tp_shard(name, fc1, 2, 1).flatten().tolist() == [2, 3, 6, 7]


@pytest.mark.parametrize(
    "name,shape",
    [
        ("decoder.layers.0.mlp.linear_fc1.weight", (8, 3)),
        ("decoder.layers.0.mlp.linear_fc2.weight", (3, 8)),
        ("decoder.layers.0.self_attention.linear_qkv.weight", (16, 3)),
        ("decoder.layers.0.input_layernorm.weight", (3,)),
    ],
)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_gather_inverts_shard(name, shape, tp):
    full = torch.randn(shape)
    shards = [M.tp_shard(name, full, tp, r) for r in range(tp)]
    assert torch.equal(M.tp_gather(name, shards), full)


def test_unknown_architecture_lists_supported():
    with pytest.raises(ValueError, match="unsupported architecture model_type='mistral'.*llama, qwen2, qwen3"):
        M.arch_mapping("mistral")
    with pytest.raises(ValueError, match="no QK layernorm"):
        M.check_spec(Spec(model_type="llama", qk_layernorm=True))


def test_plan_names_for_qwen3_tied_and_te_naming():
    spec = Spec(model_type="qwen3", qkv_bias=False, qk_layernorm=True, tied_embeddings=True, num_layers=1)
    plan = M.conversion_plan(spec, naming="te")
    names = [i.megatron_name for i in plan]
    assert names == [
        "embedding.word_embeddings.weight",
        "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
        "decoder.layers.0.self_attention.linear_qkv.weight",
        "decoder.layers.0.self_attention.q_layernorm.weight",
        "decoder.layers.0.self_attention.k_layernorm.weight",
        "decoder.layers.0.self_attention.linear_proj.weight",
        "decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "decoder.layers.0.mlp.linear_fc1.weight",
        "decoder.layers.0.mlp.linear_fc2.weight",
        "decoder.final_layernorm.weight",
    ]
    hf = {n for i in plan for n in i.hf_names}
    assert "lm_head.weight" not in hf and "model.layers.0.self_attn.q_norm.weight" in hf


@pytest.mark.parametrize("naming", ["local", "te"])
@pytest.mark.parametrize("tied", [False, True])
def test_hf_to_megatron_to_hf_round_trip_is_exact(naming, tied):
    spec = Spec(tied_embeddings=tied)
    hf = {n: torch.randn(s) for n, s in M.hf_shapes(spec).items()}
    mg = dict(M.hf_to_megatron(spec, hf.__getitem__, padded_vocab=16, naming=naming))
    shapes = M.megatron_shapes(spec, 16, naming)
    assert {k: tuple(v.shape) for k, v in mg.items()} == shapes
    assert not mg["embedding.word_embeddings.weight"][10:].any()
    back = {}
    for name, t in mg.items():
        back.update(M.megatron_to_hf(spec, name, t))
    assert set(back) == set(hf)
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    # The tied model's last PP stage holds an output_layer copy: it maps to nothing.
    out = M.megatron_to_hf(spec, "output_layer.weight", torch.ones(16, 8))
    if tied:
        assert out == []
    else:
        assert [n for n, _ in out] == ["lm_head.weight"] and out[0][1].shape == (10, 8)


def test_megatron_to_hf_skips_extra_state_and_rejects_unknown():
    spec = Spec()
    assert M.megatron_to_hf(spec, "decoder.layers.0.mlp.linear_fc1._extra_state", None) == []
    with pytest.raises(KeyError, match="no HF mapping"):
        M.megatron_to_hf(spec, "decoder.layers.0.mlp.router.weight", torch.zeros(1))


def test_hf_shapes_follow_the_spec():
    spec = replace(Spec(), num_layers=1)
    s = M.hf_shapes(spec)
    assert s["model.layers.0.self_attn.q_proj.weight"] == (8, 8)  # 4 heads * 2
    assert s["model.layers.0.self_attn.k_proj.weight"] == (4, 8)  # 2 groups * 2
    assert s["model.layers.0.mlp.down_proj.weight"] == (8, 12)
    assert s["model.embed_tokens.weight"] == (10, 8)
    assert len(s) == 3 + 12  # embed, norm, lm_head + 12 per layer (qkv bias, no qk norm)


def test_hf_to_megatron_streams_with_a_bounded_number_of_live_tensors():
    import gc
    import weakref

    spec = Spec(num_layers=6)
    shapes = M.hf_shapes(spec)
    alive, peak = set(), [0]

    def getter(name):
        t = torch.randn(shapes[name])
        alive.add(id(t))
        weakref.finalize(t, alive.discard, id(t))
        return t

    for _name, _tensor in M.hf_to_megatron(spec, getter, padded_vocab=16):
        gc.collect()
        peak[0] = max(peak[0], len(alive))
    # At most the inputs of one item (q, k, v) are alive while its output is consumed.
    assert peak[0] <= 3
    assert len(shapes) > 3 * 6
