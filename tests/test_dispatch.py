"""DP-sharded step dispatch (``megatron/dispatch.py``): each replica receives only its rows, and the
update is bitwise the one of the former world broadcast.

Pure tests check the plan against ``plan_minibatches`` and the wire format's round trip. The
multi-process tests (real megatron-core on gloo, worlds of 2 and 4) run one step through the former
path (``tests/dispatch_reference.py``) and through the dispatch from the same seeded weights:
losses, grad norms and every rank's weights must be bitwise equal; and they count the bytes each
rank receives for a 64-row step at DP 1, 2 and 4.

Bitwise equality holds where the old-log-prob micro-batches are the same in both paths: the former
path recomputed old log-probs over a whole-step plan, the dispatch over each update's micro-batches
(the rows this rank owns). They coincide with one update per step, or with one row per micro-batch;
the cases below are such. With several updates *and* several rows per micro-batch, old log-probs
are computed in other micro-batch shapes, which moves them by float32 rounding only (the
micro-batch invariance of ``tests/test_actor_invariance.py``).
"""

from __future__ import annotations

import pickle
from dataclasses import replace

import pytest
import torch

from dapo_megatron.megatron.batching import plan_minibatches
from dapo_megatron.megatron.dispatch import _pack, _unpack, plan_step, shard_wire_bytes, world_broadcast_bytes
from tests import dispatch_cases as D

_MB_FIELDS = ("tokens", "loss_mask", "advantages", "rollout_logprobs", "old_logprobs")


def _batch(with_old: bool = False):
    b = D.big_batch(B=24, T=64, seed=5)
    return replace(b, old_logprobs=b.rollout_logprobs - 0.01 * (b.loss_mask != 0)) if with_old else b


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize(
    "kw",
    [
        {"prompts_per_update": 6, "micro_batch_size": 2},
        {"prompts_per_update": 2, "micro_batch_size": 3},
        {"prompts_per_update": 3, "micro_batch_size": 1, "microbatch_multiple": 2},
        {"prompts_per_update": 6, "micro_batch_size": 1, "max_tokens_per_microbatch": 150},
    ],
)
def test_plan_step_is_each_ranks_own_plan_with_local_rows(dp, kw):
    """Rank 0's plan for replica d is exactly what replica d planned for itself from the full batch:
    same micro-batch tensors, same global denominators; ``rows`` renumbered locally and mapped back
    by ``batch_rows``; every row of the step owned by exactly one replica."""
    batch = _batch(with_old=True)
    shards = plan_step(batch, dp_size=dp, **kw)
    owners = []
    for d, shard in enumerate(shards):
        own = plan_minibatches(batch, old_logprobs=batch.old_logprobs, dp_rank=d, dp_size=dp, **kw)
        assert len(own) == len(shard.plans)
        for a, b in zip(own, shard.plans, strict=True):
            assert (a.global_num_tokens, a.global_num_seqs, a.num_rows) == (
                b.global_num_tokens, b.global_num_seqs, b.num_rows,
            )  # fmt: skip
            for x, y in zip(a.microbatches, b.microbatches, strict=True):
                for f in _MB_FIELDS:
                    assert torch.equal(getattr(x, f), getattr(y, f)), f
                real = x.rows >= 0
                assert torch.equal(real, y.rows >= 0)
                assert [shard.batch_rows[int(i)] for i in y.rows[real]] == x.rows[real].tolist()
        assert shard.num_tokens == float((batch.loss_mask != 0).sum())
        owners += shard.batch_rows
    assert sorted(owners) == list(range(batch.num_sequences))


@pytest.mark.parametrize("old", ["batch", "rollout", "recompute"])
def test_wire_round_trip_is_bitwise(old):
    """Pack then unpack: every micro-batch tensor equal in value and dtype (tokens back to int64),
    old log-probs sent, copied from the rollout's or zero as the source says."""
    batch = _batch(with_old=old == "batch")
    (shard,) = plan_step(batch, dp_size=1, prompts_per_update=2, micro_batch_size=2,
                         use_rollout_logprobs=old == "rollout")  # fmt: skip
    meta, payload = _pack(shard, 0, torch.device("cpu"))
    got = _unpack(pickle.loads(meta), payload)
    assert got.old_from == old and got.batch_rows == shard.batch_rows and got.num_tokens == shard.num_tokens
    for a, b in zip(shard.microbatches, got.microbatches, strict=True):
        for f in _MB_FIELDS + ("rows",):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and torch.equal(x, y), f
    assert shard_wire_bytes(shard) == 16 + len(meta) + payload.numel()
    # tokens travel as int32: a payload of 4 bytes per token and per float field
    tokens = sum(mb.tokens.numel() for mb in shard.microbatches)
    assert payload.numel() == tokens * 4 * (5 if old == "batch" else 4)


def test_world_broadcast_bytes_counts_every_field():
    batch = _batch()
    B, T = batch.tokens.shape
    fields = B * T * (8 + 4 + 4 + 4) + B * 8  # tokens, mask, advantages, rollout, seq_group
    assert fields < world_broadcast_bytes(batch) < fields + 1024


# ----------------------------------------------------------------------------- multi-process
def _world(world: int) -> list:
    from tests.actor_cases import make_batch
    from tests.distributed_harness import run_distributed

    cases = D.WORLD2_CASES if world == 2 else D.WORLD4_CASES
    return run_distributed(D.world_body, world, make_batch(), cases, timeout_s=1500)


_RESULTS: dict = {}


def _results(world: int) -> list:
    if world not in _RESULTS:
        _RESULTS[world] = _world(world)
    return _RESULTS[world]


_CASES = [(2, c[0]) for c in D.WORLD2_CASES] + [(4, c[0]) for c in D.WORLD4_CASES]


@pytest.mark.multiproc
@pytest.mark.parametrize("world,name", _CASES, ids=[f"{w}-{n}" for w, n in _CASES])
def test_dispatch_step_is_bitwise_the_world_broadcast_step(world, name):
    """Loss, grad norm, every metric and every rank's weight shard: bitwise equal to the former path;
    the update really moved the weights; ranks other than 0 received fewer bytes than before
    whenever there is more than one replica."""
    ranks = _results(world)
    for rank, r in enumerate(ranks):
        c = r[name]
        assert c["same_init"] and c["moved"], (rank, name)
        assert c["new"].keys() == c["ref"].keys()
        for key, ref in c["ref"].items():
            assert c["new"][key] == ref or (ref != ref and c["new"][key] != c["new"][key]), (rank, name, key)
        assert c["weights_differ"] == [], (rank, name)
        if rank > 0:
            assert c["bytes_before"] == ranks[0][name]["bytes_before_formula"]
            assert c["bytes_after"] < c["bytes_before"], (rank, name)
    print(
        f"[measured] world {world} {name}: bytes received per rank before "
        f"{[r[name]['bytes_before'] for r in ranks]}, after {[r[name]['bytes_after'] for r in ranks]}"
    )


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_bytes_received_per_rank_fall_as_one_over_dp(world):
    """The 64-row step: each rank receives exactly its replica's wire bytes, which are within 20% of
    1/DP of the whole step's (the DP1 layout's), and its rows are the ones rank 0 planned for it."""
    ranks = _results(world)
    layouts = D.BYTE_LAYOUTS[world]
    whole = ranks[1]["bytes"]["dp1"]["received"]  # DP1: rank 1 receives every row
    for name, _, _ in layouts:
        per_rank = [r["bytes"][name] for r in ranks]
        dp = per_rank[0]["dp"]
        assert all(p["same_as_local_plan"] for p in per_rank), name
        assert per_rank[0]["received"] == 0  # rank 0 planned the step
        for p in per_rank[1:]:
            assert p["received"] == p["wire"], name
            assert p["received"] <= 1.2 * whole / dp, (name, p["received"], whole, dp)
            assert p["received"] >= 0.8 * whole / dp, (name, p["received"], whole, dp)
        print(f"[measured] world {world} {name}: bytes received per rank {[p['received'] for p in per_rank]}, "
              f"whole step {whole} B")  # fmt: skip


def test_gap_stats_are_the_former_whole_batch_numbers():
    """The logged gap and TIS scalars from the shard's micro-batches (one replica, nothing to reduce)
    are the ones ``tis_weights`` gave over the whole ``[B, T]`` batch; a stage without the log-probs
    (not the last) adds nothing."""
    from dapo_megatron.algo.tis import tis_weights
    from dapo_megatron.megatron.dispatch import gap_stats

    batch = _batch()
    wiggle = 0.3 * torch.sin(torch.arange(batch.tokens.numel()).view(batch.tokens.shape).float())
    old = batch.rollout_logprobs + wiggle * (batch.loss_mask != 0)
    (shard,) = plan_step(replace(batch, old_logprobs=old), dp_size=1, prompts_per_update=2, micro_batch_size=2)
    got = gap_stats(shard, cap=1.2, groups=(), last_stage=True)
    _, tis = tis_weights(old, batch.rollout_logprobs, batch.loss_mask, cap=1.2)
    tokens = float(tis["num_tokens"])
    assert 0 < float(tis["capped_sum"]) < tokens  # both sides of the cap occur
    assert got["rollout/logprob_gap_mean"] == pytest.approx(float(tis["mismatch_abs_sum"]) / tokens, rel=1e-6)
    assert got["rollout/logprob_gap_max"] == float(tis["mismatch_max"])
    assert got["rollout/tis_capped_frac"] == float(tis["capped_sum"]) / tokens
    idle = gap_stats(shard, cap=1.2, groups=(), last_stage=False)
    assert all(v == 0.0 for v in idle.values())
