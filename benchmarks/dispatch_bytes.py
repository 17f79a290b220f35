#!/usr/bin/env python
"""Bytes each trainer rank receives per step for the batch: the former world broadcast vs the
DP-sharded dispatch, measured on 2- and 4-rank CPU (gloo) worlds, and projected for the 32B recipe.

    python benchmarks/dispatch_bytes.py                      # 64 rows x 1024 tokens, worlds 2 and 4
    python benchmarks/dispatch_bytes.py --rows 256 --seq-len 4096

Measured: each rank counts what it receives in the dispatch code path (``StepShard.received_bytes``:
header, pickled plan, payload) and in the former path (``tests/dispatch_reference.broadcast_batch``:
the object broadcast of shapes, then every ``[B, T]`` field). Rank 0 builds the batch, so it
receives nothing in either. The former path also all-reduced the recomputed old log-probs
``[B, T]`` float32 over DP and over PP; that is added as a ring estimate (``2 (n - 1) / n`` of the
buffer per group of ``n``), since gloo's own algorithm does not report bytes.

Projection (``examples/dapo_qwen2.5_32b.yaml``: 512 prompts x 16 = 8192 rows, 2048 + 20480 = 22,528
tokens, TP8 x PP2 x DP8 = 128 ranks; see ``tools/plan_memory.py``): before, every rank receives
every field at ``[B, T]`` (int64 tokens, three float32 fields, ``seq_group``) plus both
all-reduces; after, a rank receives its replica's rows only, tokens as int32, each micro-batch
trimmed to its longest row: at most ``B / DP x T x 16`` bytes (every row full length), and
``B / DP x L x 16`` for a mean padded length ``L`` (``--mean-len-32b``).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, tp, pp) per world size; dp = world / (tp * pp)
LAYOUTS = {2: [("TP2 (DP1)", 2, 1), ("DP2", 1, 1)], 4: [("TP2PP2 (DP1)", 2, 2), ("TP2 DP2", 2, 1), ("DP4", 1, 1)]}


def _rank(rank: int, world: int, rows: int, seq_len: int) -> dict:
    """Every layout of ``world``: bytes this rank received, before and after."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.dispatch import dispatch_step, plan_step
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel, shutdown
    from dapo_megatron.parallel.topology import Topology
    from tests.dispatch_cases import big_batch
    from tests.dispatch_reference import broadcast_batch

    init_distributed()
    batch = big_batch(B=rows, T=seq_len) if rank == 0 else None
    out = {}
    for name, tp, pp in LAYOUTS[world]:
        init_model_parallel(Topology(world_size=world, tp=tp, pp=pp), seed=0)
        dp = ps.get_data_parallel_world_size()
        _, before = broadcast_batch(batch)
        mp = ps.get_model_parallel_group()
        plan = partial(plan_step, dp_size=dp, prompts_per_update=rows // 4 // 2, micro_batch_size=2)
        shard = dispatch_step(batch, plan, dp_rank=ps.get_data_parallel_rank(),
                              dp_sources=dist.get_process_group_ranks(ps.get_data_parallel_group()),
                              mp_group=mp, mp_ranks=dist.get_process_group_ranks(mp),
                              device=torch.device("cpu"))  # fmt: skip
        out[name] = {"dp": dp, "pp": pp, "before": before, "after": shard.received_bytes, "sent": shard.sent_bytes}
        ps.destroy_model_parallel()
    shutdown()
    return out


def ring(nbytes: float, n: int) -> float:
    """Bytes one rank receives in a ring all-reduce of ``nbytes`` over ``n`` ranks."""
    return 2 * (n - 1) / n * nbytes if n > 1 else 0.0


def measure(rows: int, seq_len: int) -> None:
    from tests.distributed_harness import run_distributed

    print(f"CPU gloo, batch {rows} rows x {seq_len} tokens (tests/dispatch_cases.big_batch), micro-batches of 2 rows")
    print(f"{'world':>5} {'layout':<14} {'before/rank':>14} {'+logprob AR':>12} {'after/rank (max)':>17} {'ratio':>7}")
    for world in (2, 4):
        ranks = run_distributed(_rank, world, rows, seq_len, timeout_s=900)
        for name, _, _ in LAYOUTS[world]:
            r = [x[name] for x in ranks]
            before = max(x["before"] for x in r)
            dp, pp = r[0]["dp"], r[0]["pp"]
            ar = ring(rows * seq_len * 4, dp) + ring(rows * seq_len * 4, pp)
            after = max(x["after"] for x in r)
            print(f"{world:>5} {name:<14} {before:>14,} {ar:>12,.0f} {after:>17,} {(before + ar) / after:>6.1f}x"
                  f"   per rank after: {[x['after'] for x in r]}, rank 0 sent {r[0]['sent']:,}")  # fmt: skip


def project_32b(mean_len: int) -> None:
    B, T, tp, pp, dp = 512 * 16, 2048 + 20480, 8, 2, 8
    fields = B * T * (8 + 4 + 4 + 4) + B * 8
    ar = ring(B * T * 4, dp) + ring(B * T * 4, pp)
    worst = B // dp * T * 16
    typical = B // dp * mean_len * 16
    gb = 1e9
    print(f"\n32B recipe projection: B={B} rows x T={T:,} tokens, TP{tp} x PP{pp} x DP{dp} = {tp * pp * dp} ranks")
    print(f"  before: batch broadcast {fields / gb:.2f} GB + old-log-prob all-reduce {ar / gb:.2f} GB "
          f"= {(fields + ar) / gb:.2f} GB received per rank per step")  # fmt: skip
    print(f"  after:  at most {worst / gb:.3f} GB (every row {T:,} tokens); {typical / gb:.3f} GB at a mean "
          f"padded length of {mean_len:,} tokens; old log-probs stay on their rank (3 scalars reduced)")  # fmt: skip
    print(
        f"  ratio:  {(fields + ar) / worst:.1f}x (worst case) to {(fields + ar) / typical:.1f}x; rank 0 sends "
        f"the step once: {(dp - 1) / dp * B * T * 16 / gb:.2f} GB at most (before: the world broadcast's tree)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64, help="rows of the CPU batch (multiple of 8)")
    p.add_argument("--seq-len", type=int, default=1024, help="padded length T of the CPU batch")
    p.add_argument("--mean-len-32b", type=int, default=12288, help="assumed mean padded row length at 32B")
    p.add_argument("--skip-measure", action="store_true", help="only the 32B projection")
    args = p.parse_args()
    if not args.skip_measure:
        measure(args.rows, args.seq_len)
    project_32b(args.mean_len_32b)


if __name__ == "__main__":
    main()
