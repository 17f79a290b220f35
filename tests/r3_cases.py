"""Routing replay end to end (R3): an embedded-engine rollout, then the real actor's log-probs of it.

Rank functions run inside :func:`tests.distributed_harness.run_distributed` (module level, so spawn
can pickle them); megatron is imported inside them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import List

PROMPTS = [[5, 17, 33, 99, 120, 7], [44, 3, 200, 61], [9, 9, 150, 31, 77, 12, 240], [130, 8, 66]]


def engine_rollout(hf_dir: str, *, routes: bool, n: int = 2, max_new_tokens: int = 12, seed: int = 3):
    """Groups of the embedded engine (fp32, batched decode) on :data:`PROMPTS`, rewards alternating
    per sample so every group has a nonzero advantage."""
    from dapo_megatron.rollout.base import SamplingParams
    from dapo_megatron.rollout.embedded import EmbeddedEngine
    from dapo_megatron.types import Group, Sample

    engine = EmbeddedEngine.from_pretrained(hf_dir, max_batch_rows=8, max_seq_len=64)
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, seed=seed, return_routed_experts=routes)
    groups = []
    for p, completions in enumerate(engine.generate_sync(PROMPTS, params)):
        samples = [
            Sample(
                list(PROMPTS[p]),
                c.token_ids,
                c.logprobs,
                c.finish_reason,
                reward=float(j % 2),
                routed_experts=c.meta.get("routed_experts", []),
            )  # fmt: skip
            for j, c in enumerate(completions)
        ]
        groups.append(Group(p, "", samples))
    return groups


def train_batch(groups):
    from dapo_megatron.controller.batch import build_train_batch

    return build_train_batch(groups, pad_id=0, norm_adv_by_std=False, adv_eps=1e-6, overlong_filter=False)


def _actor(hf_dir: str, routing_replay: str):
    from moe_cases import load_hf_into

    from dapo_megatron.config import AlgoConfig, ModelConfig, OptimConfig, TrainConfig
    from dapo_megatron.megatron.actor import MegatronActor
    from dapo_megatron.megatron.model import model_spec_from_hf
    from dapo_megatron.parallel.init import init_model_parallel
    from dapo_megatron.parallel.topology import Topology

    topology = Topology(1)
    init_model_parallel(topology, seed=1234)
    spec = model_spec_from_hf(hf_dir)
    actor = MegatronActor(
        spec, topology, model_cfg=ModelConfig(params_dtype="float32", transformer_impl="local"),
        optim_cfg=OptimConfig(lr=1e-2, lr_warmup_steps=0, weight_decay=0.0, clip_grad=0.0),
        train_cfg=TrainConfig(ppo_mini_batch_size=len(PROMPTS), micro_batch_size=3),
        algo_cfg=AlgoConfig(routing_replay=routing_replay), max_response_len=16, total_steps=2,
        prompts_per_step=len(PROMPTS), group_size=2,
    )  # fmt: skip
    load_hf_into(actor.model_chunks, spec, hf_dir)
    return actor


def logprobs_case(rank: int, world_size: int, jobs: List[tuple]) -> list:
    """For each ``(hf_dir, batch, moe)``: the actor's log-probs of ``batch`` with its own routing
    (``free``) and, for MoE, replaying the batch's routes (``replayed``), then one DAPO step with
    replay (``router_moved``: the router weights still learn; ``step``: its metrics)."""
    from megatron.core import parallel_state

    from dapo_megatron.parallel.init import init_distributed, shutdown

    init_distributed()
    out = []
    for hf_dir, batch, moe in jobs:
        actor = _actor(hf_dir, "rollout" if moe else "none")
        got = {}
        if moe:
            got["replayed"] = actor.compute_logprobs(batch, temperature=1.0)
        algo = actor.algo_cfg
        actor.algo_cfg = replace(algo, routing_replay="none")
        got["free"] = actor.compute_logprobs(batch, temperature=1.0)
        actor.algo_cfg = algo
        if moe:
            router = actor.model_chunks[0].decoder.layers[0].mlp.router.weight
            before = router.detach().clone()
            got["step"] = actor.train_step(batch, temperature=1.0)
            got["router_moved"] = float((router.detach() - before).abs().max())
        out.append(got)
        parallel_state.destroy_model_parallel()
    shutdown()
    return out
