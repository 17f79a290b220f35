"""Rank functions of ``tests/test_dispatch.py`` (run by tests.distributed_harness, megatron imported inside).

Each world runs every case once: the same seeded actor takes one step through the former path
(world broadcast + whole-batch old-log-prob all-reduce, ``tests/dispatch_reference.py``) and,
rebuilt from the same seed, through the DP-sharded dispatch; and a larger batch is dispatched per
layout to count the bytes each rank receives.
"""

from __future__ import annotations

from typing import Dict

import torch

# (name, tp, pp, train-config overrides); dp = world / (tp * pp)
WORLD2_CASES = [
    ("dp2", 1, 1, {}),  # one update, micro-batches of 2 rows
    ("dp2_two_updates", 1, 1, {"ppo_mini_batch_size": 2, "micro_batch_size": 1}),
    ("tp2", 2, 1, {}),  # DP1: rank 1 gets its rows from its DP source over the model-parallel group
    ("pp2", 1, 2, {}),
]
WORLD4_CASES = [
    ("dp4", 1, 1, {}),
    ("dp2tp2", 2, 1, {}),
    ("dp2pp2", 1, 2, {"ppo_mini_batch_size": 2, "micro_batch_size": 1}),
]
# (name, tp, pp) of the byte count, per world size
BYTE_LAYOUTS = {2: [("dp1", 2, 1), ("dp2", 1, 1)], 4: [("dp1", 2, 2), ("dp2", 2, 1), ("dp4", 1, 1)]}


def big_batch(B: int = 64, T: int = 256, vocab: int = 96, seed: int = 3):
    """A step for the byte count: B/4 groups x 4 responses of varied length (prompts up to T/6 tokens,
    the rest a response of 2 .. T - prompt tokens), padded to ``T``."""
    from dapo_megatron.types import TrainBatch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    rollout = torch.zeros((B, T))
    for b in range(B):
        p = int(torch.randint(2, T // 6 + 1, (1,), generator=g))
        r = int(torch.randint(2, T - p + 1, (1,), generator=g))
        tokens[b, : p + r] = torch.randint(1, vocab, (p + r,), generator=g)
        mask[b, p : p + r] = 1.0
        rollout[b, p : p + r] = -torch.rand(r, generator=g)
    adv = torch.randn(B, generator=g)[:, None] * mask
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=adv, rollout_logprobs=rollout,
                      seq_group=torch.arange(B) // 4)  # fmt: skip


def _local_weights(actor) -> Dict[str, torch.Tensor]:
    """This rank's float parameters and buffers, every model chunk (its TP/PP shard)."""
    return {
        f"{i}.{k}": v.detach().clone()
        for i, chunk in enumerate(actor.model_chunks)
        for k, v in chunk.state_dict().items()
        if torch.is_tensor(v) and v.is_floating_point()
    }


def _bitwise_case(rank: int, world: int, tp: int, pp: int, over: dict, batch) -> dict:
    """One step through the former path and through the dispatch, from the same seeded weights."""
    from dapo_megatron.megatron.dispatch import world_broadcast_bytes
    from dapo_megatron.parallel.topology import Topology
    from tests.actor_cases import TEMPERATURE, make_actor, teardown
    from tests.dispatch_reference import broadcast_batch, reference_train_step

    topo = Topology(world_size=world, tp=tp, pp=pp, vpp=1, cp=1, ep=1)
    actor = make_actor(topo, **over)
    w0 = _local_weights(actor)
    full, before = broadcast_batch(batch if rank == 0 else None)
    ref = reference_train_step(actor, full, temperature=TEMPERATURE)
    w_ref = _local_weights(actor)
    teardown()
    actor = make_actor(topo, **over)
    w1 = _local_weights(actor)
    shard = actor.dispatch(batch if rank == 0 else None)
    new = actor.train_step(shard, temperature=TEMPERATURE)
    w_new = _local_weights(actor)
    teardown()
    return {
        "ref": ref,
        "new": {k: v for k, v in new.items() if not k.startswith("time_")},
        "same_init": w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0),
        "moved": any(not torch.equal(w0[k], w_ref[k]) for k in w0),
        "weights_differ": [k for k in w_ref if not torch.equal(w_ref[k], w_new[k])],
        "bytes_before": before,
        "bytes_before_formula": world_broadcast_bytes(batch) if rank == 0 else None,
        "bytes_after": shard.received_bytes,
        "local_rows": shard.num_local_rows,
    }


def _byte_case(rank: int, world: int, tp: int, pp: int, batch) -> dict:
    """Dispatch ``batch`` at one layout: what this rank received, and what rank 0 planned for it."""
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.dispatch import shard_wire_bytes
    from dapo_megatron.parallel.topology import Topology
    from tests.actor_cases import make_actor, teardown

    actor = make_actor(Topology(world_size=world, tp=tp, pp=pp, vpp=1, cp=1, ep=1))
    shard = actor.dispatch(batch if rank == 0 else None)
    planned = actor.plan_step(batch)[ps.get_data_parallel_rank()]  # local replan, only to compare
    same = all(
        torch.equal(getattr(a, f), getattr(b, f))
        for a, b in zip(shard.microbatches, planned.microbatches, strict=True)
        for f in ("tokens", "loss_mask", "advantages", "rollout_logprobs", "old_logprobs", "rows")
    )
    out = {"received": shard.received_bytes, "wire": shard_wire_bytes(planned), "same_as_local_plan": same,
           "rows": shard.batch_rows, "dp": ps.get_data_parallel_world_size()}  # fmt: skip
    teardown()
    return out


def world_body(rank: int, world: int, batch, cases) -> dict:
    from tests.actor_cases import finish, start

    start()
    out = {name: _bitwise_case(rank, world, tp, pp, over, batch) for name, tp, pp, over in cases}
    big = big_batch()
    out["bytes"] = {name: _byte_case(rank, world, tp, pp, big) for name, tp, pp in BYTE_LAYOUTS[world]}
    finish()
    return out
