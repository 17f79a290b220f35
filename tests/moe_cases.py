"""Tiny Qwen3-MoE models and rank functions for the MoE tests (module level, so spawn can pickle them).

Every ``*_case(rank, world_size, ...)`` runs inside :func:`tests.distributed_harness.run_distributed`.
"""

from __future__ import annotations

from typing import Dict

import torch
from weights_cases import _write_tokenizer_files, as_bytes, forward_logits

# 4 experts, top-2, 2 layers; vocab 250 needs padding; expert width differs from the dense width.
TINY_MOE = dict(
    vocab_size=250, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
    max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False, router_aux_loss_coef=0.0,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)  # fmt: skip


def tiny_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**TINY_MOE, **overrides}, dtype="float32")


def make_tiny_moe(folder: str, seed: int = 0, router_scale: float = 1.0, **overrides) -> Dict[str, torch.Tensor]:
    """Save a random tiny Qwen3-MoE to ``folder``; return its on-disk (per-expert) state dict.

    Norm weights are randomised (all-ones defaults would hide a swapped tensor); the router weight
    is ``router_scale`` times a standard normal: large values make routing decisive, small ones put
    the top-k choice near ties.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(**overrides), attn_implementation="eager").float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(router_scale * torch.randn_like(p))
    model.save_pretrained(folder)
    _write_tokenizer_files(folder)
    from weights_cases import hf_state_dict

    return hf_state_dict(folder)


# ----------------------------------------------------------------------------- megatron side
def init_layout(world_size: int, tp: int = 1, pp: int = 1, ep: int = 1):
    from dapo_megatron.parallel.init import init_model_parallel
    from dapo_megatron.parallel.topology import Topology

    topology = Topology(world_size, tp=tp, pp=pp, ep=ep)
    init_model_parallel(topology, seed=1234)
    return topology


def build(spec, topology, training: bool = True, **model_kwargs):
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.megatron.model import build_model_chunks

    cfg = ModelConfig(params_dtype="float32", transformer_impl="local", **model_kwargs)
    return build_model_chunks(spec, topology, cfg, training=training)


def load_hf_into(chunks, spec, hf_dir: str) -> None:
    """Fill this rank's parameters from the HF folder through the mapping alone: each parameter's
    full tensor (``mapping.to_megatron``) is cut to this rank's TP (expert-TP) shard and EP expert."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.model import padded_vocab_size
    from dapo_megatron.weights import mapping
    from dapo_megatron.weights.hf_io import HFReader
    from dapo_megatron.weights.reshard import local_params

    index = mapping.conversion_index(spec)
    rows = padded_vocab_size(spec.vocab_size, ps.get_tensor_model_parallel_world_size())
    expert_tp = (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank())
    dense_tp = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
    with HFReader(hf_dir) as reader, torch.no_grad():
        for name, param in local_params(chunks, ps.get_expert_model_parallel_rank()).items():
            if name == "output_layer.weight" and spec.tied_embeddings:
                continue
            item = index[name]
            full = mapping.to_megatron(spec, item, [reader.get(n) for n in item.hf_names], rows)
            tp, rank = expert_tp if item.expert is not None else dense_tp
            param.copy_(mapping.tp_shard(name, full, tp, rank))


def layouts_case(rank: int, world_size: int, jobs: list, tokens: torch.Tensor) -> bytes:
    """For each job ``(hf_dir, [(tp, pp, ep), ...])`` and each layout: build, load ``hf_dir`` by the
    mapping, then the logits, the rank-0 gather (``iter_hf_weights``) and this rank's per-stage
    gather (``iter_stage_hf_weights``). The forward runs in training mode, except at TP > 1
    (megatron refuses MoE + TP without sequence parallelism in training, which needs Transformer
    Engine): there in eval mode."""
    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    results = []
    for hf_dir, layouts in jobs:
        results.append(_layouts(rank, world_size, hf_dir, layouts, tokens))
    shutdown()
    return as_bytes(results)


def _layouts(rank: int, world_size: int, hf_dir: str, layouts: list, tokens: torch.Tensor) -> list:
    from megatron.core import parallel_state

    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.weights.reshard import iter_hf_weights
    from dapo_megatron.weights.stage_gather import iter_stage_hf_weights, stage_role

    spec = model_spec_from_hf(hf_dir)
    results = []
    for tp, pp, ep in layouts:
        topology = init_layout(world_size, tp, pp, ep)
        chunks = build(spec, topology, training=tp == 1)
        if tp > 1:
            chunks[0].eval()
        load_hf_into(chunks, spec, hf_dir)
        out = {"logits": forward_logits(chunks, tokens, spec.vocab_size)}
        gathered = list(iter_hf_weights(chunks, spec, topology))
        out["rank0"] = dict(gathered) if rank == 0 else [n for n, _ in gathered]
        out["stage"] = dict(iter_stage_hf_weights(chunks, spec, topology))
        out["role"] = stage_role()
        results.append(out)
        parallel_state.destroy_model_parallel()
    return results


# ----------------------------------------------------------------------------- routing replay
def make_near_tie_moe(folder: str, seed: int = 0, gap: float = 1e-6) -> None:
    """A tiny Qwen3-MoE whose router rows 1 and 2 equal row 0 up to ``gap`` times noise: for tokens
    routed there, the top-2 is a near tie among three experts, so rounding differences between two
    implementations change which two are chosen, while the three MLPs stay different."""
    from transformers import AutoModelForCausalLM

    make_tiny_moe(folder, seed=seed, norm_topk_prob=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w[1:3] = w[0] + gap * torch.randn(w[1:3].shape, generator=gen)
    model.save_pretrained(folder)


def hf_rollout(hf_dir: str, tokens: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """What an engine would record: per token and layer, the experts HF used, running in ``dtype``
    (engines run bf16; their rounding is what moves near-tie tokens to other experts)."""
    from transformers import AutoModelForCausalLM

    from dapo_megatron.rollout.routing_capture import routed_experts

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=dtype)
    with torch.no_grad():
        out = model(tokens, output_router_logits=True)
    return routed_experts(out.router_logits, model.config.num_experts_per_tok, batch=tokens.shape[0])


def hf_forced_logits(hf_dir: str, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 HF logits with every MoE layer routed by ``ids`` ([b, s, layers, k]): the rollout policy
    in exact arithmetic, given the experts it used. Each gate keeps its own probabilities for those
    experts (renormalised when ``norm_topk_prob``), as HF's router does for its own choice."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager", dtype=torch.float32)
    for i, layer in enumerate(model.model.layers):
        gate, forced = layer.mlp.gate, ids[:, :, i, :].reshape(-1, ids.shape[-1])

        def forward(hidden, gate=gate, forced=forced):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.hidden_dim), gate.weight)
            top = torch.softmax(logits, dtype=torch.float, dim=-1).gather(1, forced)
            if gate.norm_topk_prob:
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), forced

        gate.forward = forward
    with torch.no_grad():
        return model(tokens).logits


def replay_case(rank: int, world_size: int, hf_dir: str, tokens: torch.Tensor, ids: torch.Tensor) -> bytes:
    """World of ``ep`` ranks (EP = world): megatron logits without and with routing replay of ``ids``."""
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.megatron.moe_replay import replay_routing
    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    spec = model_spec_from_hf(hf_dir)
    chunks = build(spec, init_layout(world_size, ep=world_size))
    load_hf_into(chunks, spec, hf_dir)
    free = forward_logits(chunks, tokens, spec.vocab_size)
    with replay_routing(chunks, ids):
        replayed = forward_logits(chunks, tokens, spec.vocab_size)
    after = forward_logits(chunks, tokens, spec.vocab_size)  # the targets were cleared on exit
    shutdown()
    return as_bytes({"free": free, "replayed": replayed, "after": after})
