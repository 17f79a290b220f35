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


def _node_case(rank: int, world: int, tp: int, pp: int, nodes: list) -> dict:
    """Per-node senders on real megatron-core: ``nodes[r]`` is rank r's node, node ``n`` holds server
    ``n``. Every rank plans from the same places (the all-gather a run does is replaced by the list)
    and runs :func:`iter_node_buckets` with its own role."""
    from dapo_megatron.config import ModelConfig
    from dapo_megatron.controller.node_senders import RankPlace, plan_node_senders
    from dapo_megatron.megatron.model import build_model_chunks, model_spec_from_hf
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel
    from dapo_megatron.parallel.topology import Topology
    from dapo_megatron.weights.node_gather import iter_node_buckets
    from dapo_megatron.weights.reshard import iter_hf_weights
    from dapo_megatron.weights.stage_gather import stage_role

    init_distributed(backend="gloo")
    topology = Topology(world, tp=tp, pp=pp, vpp=1)
    init_model_parallel(topology, seed=3)
    spec = model_spec_from_hf(HF)
    chunks = build_model_chunks(spec, topology, ModelConfig(params_dtype="float32", transformer_impl="local"))
    full = {n: t.clone() for n, t in iter_hf_weights(chunks, spec, topology) if t is not None}
    import torch.distributed as dist

    role = stage_role()
    mine = RankPlace(rank, role.stage, role.replica, role.tp_rank, frozenset({nodes[rank]}))
    places = [None] * world
    dist.all_gather_object(places, mine)
    plan = plan_node_senders(places, [f"http://node{n}:1" for n in sorted(set(nodes))], pp)
    node_role = plan.role(mine)
    got = [
        (n, t.clone()) for bucket in iter_node_buckets(chunks, spec, topology, node_role, 1 << 14) for n, t in bucket
    ]
    return {"full": full, "got": got, "role": node_role, "senders": plan.senders}


def _check_senders_hold_the_model(results, senders):
    full = results[0]["full"]
    assert results[0]["senders"] == senders
    for rank, r in enumerate(results):
        if rank not in senders:
            assert r["got"] == [], rank  # gathers or relays at most, keeps nothing
            continue
        names = [n for n, _ in r["got"]]
        assert sorted(names) == sorted(full) and len(names) == len(set(names)), rank  # every tensor once
        for name, t in r["got"]:
            assert torch.equal(t, full[name]), (rank, name)


def test_pp2_across_nodes_each_senders_pipeline_group_relays_the_other_stage():
    """TP2 x PP2, stage 0 on node 0 (ranks 0, 1) and stage 1 on node 1 (ranks 2, 3), as megatron's order
    puts them: ranks 0 and 2 feed their node's server, and each receives the other stage over their
    pipeline group; their TP peers only join the all-gathers."""
    results = run_distributed(_node_case, 4, 2, 2, [0, 0, 1, 1], timeout_s=600)
    _check_senders_hold_the_model(results, {0: (0,), 2: (1,)})
    assert [r["role"].relays for r in results] == [True, False, True, False]
    assert all(r["role"].gathers for r in results)


def test_a_second_dp_replica_feeds_its_own_nodes_server():
    """TP2 x DP2 at PP1, replica 0 on node 0 and replica 1 on node 1: replica 1 gathers its own copy and
    its TP rank 0 (rank 2) feeds node 1's server; no tensor crosses the nodes."""
    results = run_distributed(_node_case, 4, 2, 1, [0, 0, 1, 1], timeout_s=600)
    _check_senders_hold_the_model(results, {0: (0,), 2: (1,)})
    assert not any(r["role"].relays for r in results)
