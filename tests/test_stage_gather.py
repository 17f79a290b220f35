"""The per-stage gather on real megatron-core at TP=2 x PP=2 (4 gloo ranks): each stage leader yields
exactly its own stage's HF tensors, bit for bit what the gather to rank 0 yields for them, and no
other rank yields anything."""

import torch

from tests.distributed_harness import run_distributed

HF = {"model_type": "qwen2", "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
      "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 96, "max_position_embeddings": 64,
      "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False}  # fmt: skip


def _case(rank: int, world: int) -> dict:
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.megatron.model import build_model_chunks, model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel
    from dapo_megatron.parallel.topology import Topology
    from dapo_megatron.weights.reshard import iter_hf_weights
    from dapo_megatron.weights.stage_gather import iter_stage_hf_weights, stage_role

    init_distributed(backend="gloo")
    topology = Topology(world, tp=2, pp=2, vpp=1)
    init_model_parallel(topology, seed=3)
    spec = model_spec_from_hf(HF)
    chunks = build_model_chunks(spec, topology, ModelConfig(params_dtype="float32", transformer_impl="local"))
    full = {n: t.clone() for n, t in iter_hf_weights(chunks, spec, topology) if t is not None}
    mine = [(n, t.clone()) for n, t in iter_stage_hf_weights(chunks, spec, topology)]
    role = stage_role()
    return {"full": full, "mine": mine, "stage": role.stage, "leader": role.leader}


def test_tp2pp2_stage_leaders_yield_their_own_layers():
    results = run_distributed(_case, 4, timeout_s=600)
    full = results[0]["full"]
    leaders = {r["stage"]: r for r in results if r["leader"]}
    assert sorted(leaders) == [0, 1] and leaders[0] is results[0]  # rank 0 leads stage 0
    assert all(r["mine"] == [] for r in results if not r["leader"])  # TP peers only join the all-gather
    sent = {n: t for r in leaders.values() for n, t in r["mine"]}
    assert len(sent) == sum(len(r["mine"]) for r in leaders.values())  # no tensor sent by both stages
    assert sorted(sent) == sorted(full)
    for name, t in sent.items():
        assert torch.equal(t, full[name]), name
    names0 = {n for n, _ in leaders[0]["mine"]}
    assert "model.embed_tokens.weight" in names0 and "model.layers.1.mlp.up_proj.weight" in names0
    assert "lm_head.weight" not in names0 and "model.layers.2.mlp.up_proj.weight" not in names0
