"""Qwen3-MoE config handling without processes: HF config -> spec, refusals by key, the MoE config
keys, and the HF names/shapes the mapping expects against a real transformers checkpoint."""

import pytest
import torch
from moe_cases import TINY_MOE, make_tiny_moe

from dapo_megatron.config import ConfigError, ModelConfig
from dapo_megatron.megatron.model import model_spec_from_hf, transformer_config
from dapo_megatron.megatron.moe import MoESpec
from dapo_megatron.parallel.topology import Topology
from dapo_megatron.weights import mapping

HF = {**TINY_MOE, "model_type": "qwen3_moe", "norm_topk_prob": True}


def test_spec_reads_the_experts_and_refuses_dense_layers_by_key():
    spec = model_spec_from_hf(HF)
    assert spec.moe == MoESpec(num_experts=4, topk=2, ffn_hidden_size=32, norm_topk_prob=True)
    assert spec.ffn_hidden_size == 96 and spec.qk_layernorm and not spec.qkv_bias
    v5 = {k: v for k, v in HF.items() if k != "num_experts"} | {"num_local_experts": 4}
    assert model_spec_from_hf(v5).moe == spec.moe
    with pytest.raises(ValueError, match="decoder_sparse_step=2"):
        model_spec_from_hf({**HF, "decoder_sparse_step": 2})
    with pytest.raises(ValueError, match=r"mlp_only_layers=\[1\]"):
        model_spec_from_hf({**HF, "mlp_only_layers": [1]})
    with pytest.raises(ValueError, match="num_experts_per_tok=5"):
        model_spec_from_hf({**HF, "num_experts_per_tok": 5})


def test_moe_config_keys_are_validated_by_name():
    with pytest.raises(ConfigError, match="model.moe_token_dispatcher.*allgather"):
        ModelConfig(moe_token_dispatcher="allgather")
    with pytest.raises(ConfigError, match="model.moe_token_dispatcher"):
        ModelConfig(moe_token_dispatcher="ring")
    with pytest.raises(ConfigError, match="model.moe_aux_loss_coeff"):
        ModelConfig(moe_aux_loss_coeff=-0.1)
    with pytest.raises(ConfigError, match="model.moe_capacity_factor"):
        ModelConfig(moe_capacity_factor=0.0)


def test_transformer_config_maps_routing_and_refuses_impossible_layouts():
    cfg = ModelConfig(transformer_impl="local", moe_aux_loss_coeff=0.01, moe_capacity_factor=1.5)
    tc = transformer_config(model_spec_from_hf(HF), Topology(2, ep=2), cfg)
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 32)
    assert not tc.moe_router_pre_softmax  # norm_topk_prob=True: softmax over the chosen k
    assert tc.moe_router_load_balancing_type == "aux_loss" and tc.moe_aux_loss_coeff == 0.01
    assert tc.moe_expert_capacity_factor == 1.5 and tc.moe_token_dispatcher_type == "alltoall"
    unnormalised = transformer_config(model_spec_from_hf({**HF, "norm_topk_prob": False}), Topology(1), cfg)
    assert unnormalised.moe_router_pre_softmax  # softmax over all experts, then top-k
    with pytest.raises(ConfigError, match="parallel.expert: 3 ranks cannot split num_experts=4"):
        transformer_config(model_spec_from_hf(HF), Topology(3, ep=3), cfg)
    with pytest.raises(ConfigError, match="parallel.tensor.*sequence_parallel"):
        transformer_config(model_spec_from_hf(HF), Topology(2, tp=2), cfg)


def test_hf_names_and_shapes_match_a_transformers_checkpoint(tmp_path):
    state = make_tiny_moe(str(tmp_path), norm_topk_prob=True)
    spec = model_spec_from_hf(str(tmp_path))
    assert mapping.hf_shapes(spec) == {k: tuple(v.shape) for k, v in state.items()}
    items = [i for i in mapping.conversion_plan(spec, layers=[1], include_pre=False, include_post=False)]
    experts = [i for i in items if i.expert is not None]
    assert [(i.expert, i.kind) for i in experts] == [(e, k) for e in range(4) for k in (mapping.FC1, mapping.COPY)]
    assert experts[2].megatron_name == "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight"
    assert experts[2].hf_names == (
        "model.layers.1.mlp.experts.1.gate_proj.weight",
        "model.layers.1.mlp.experts.1.up_proj.weight",
    )
    # exact round trip of one expert through the megatron layout
    full = mapping.to_megatron(spec, experts[2], [state[n] for n in experts[2].hf_names], 256)
    back = dict(mapping.megatron_to_hf(spec, experts[2].megatron_name, full))
    assert all(torch.equal(back[n], state[n]) for n in experts[2].hf_names)
    assert mapping.renumber_expert("decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight", 2).endswith(
        "local_experts.3.linear_fc2.weight"
    )
