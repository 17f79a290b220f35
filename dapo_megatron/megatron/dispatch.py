"""One step's batch from the rollout driver to the trainer ranks: planned once, each replica its rows.

Trainer rank 0 holds the step's :class:`~dapo_megatron.types.TrainBatch` ``[B, T]``. It computes
the whole plan once (:func:`plan_step`: mini-batches, the split over DP, micro-batches, each
mini-batch's global loss denominators -- the functions of :mod:`~dapo_megatron.megatron.batching`,
so the split is the one the actor always used) and sends each data-parallel replica only its
micro-batches, already gathered and trimmed (:func:`dispatch_step`):

    rank 0 --(point-to-point, world group)--> the DP source of replica d  (d = 1 .. DP-1)
    DP source --(broadcast, its model-parallel group)--> its TP/PP peers

The DP source of a replica is the first rank of its model-parallel (TP x PP) group; rank 0 is the
source of replica 0. So each rank receives its replica's rows once (bytes per rank ~ 1/DP of the
step), no rank receives the whole step, and rank 0 sends the step once in total.

Rows are renumbered locally: ``MicroBatch.rows`` holds the index of the row in this rank's shard
(``0 .. num_local_rows - 1``, -1 for a dummy row), and ``StepShard.batch_rows[i]`` its row in the
step's batch. Old log-probs are recomputed on the owning rank into those local rows
(``MegatronActor.fill_old_logprobs``) and never leave it; only the logged gap scalars are reduced
(:func:`gap_stats`).

Wire format per replica: one small header tensor (two int64: pickled-metadata bytes, payload bytes),
the pickled metadata (plan shapes, denominators, dtypes; CPU tensor, so gloo carries it under the
``cpu:gloo,cuda:nccl`` world) and one ``uint8`` payload: every micro-batch field flattened and
concatenated (tokens as int32, exact for any vocabulary below 2**31). The payload travels on the
training device (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from dapo_megatron.megatron.batching import (
    DUMMY_ROW,
    MicroBatch,
    MiniBatchPlan,
    make_microbatch,
    sequence_lengths,
    split_minibatch,
    split_minibatches,
)
from dapo_megatron.types import TrainBatch

__all__ = ["StepShard", "dispatch_step", "gap_stats", "plan_step", "shard_wire_bytes", "world_broadcast_bytes"]

OLD_FROM = ("batch", "rollout", "recompute")
_SENT = ("tokens", "loss_mask", "advantages", "rollout_logprobs")  # + old_logprobs when old_from == "batch"
_BATCH_FIELDS = ("tokens", "loss_mask", "advantages", "rollout_logprobs", "seq_group", "old_logprobs")


@dataclass
class StepShard:
    """One data-parallel replica's share of a step: what ``MegatronActor.train_step`` trains on.

    Fields:
        plans: per mini-batch (update), this replica's micro-batches and the mini-batch's *global*
            denominators (response tokens and sequences over all DP ranks), as ``plan_minibatches``
            gives them; micro-batch tensors ``[b, t]``, ``rows`` local (see the module docstring).
        num_tokens: response tokens (loss mask != 0) of the whole step, all replicas.
        batch_rows: the step-batch row of each local row, ``len == num_local_rows``.
        old_from: where the micro-batches' ``old_logprobs`` come from: ``"batch"`` (sent),
            ``"rollout"`` (a copy of ``rollout_logprobs``) or ``"recompute"`` (zeros until
            ``fill_old_logprobs``; then ``"recomputed"``).
        received_bytes: bytes this rank received for the shard (0 on rank 0, which planned it).
        sent_bytes: on rank 0, bytes it sent to the other replicas' DP sources.
    """

    plans: List[MiniBatchPlan]
    num_tokens: float
    batch_rows: List[int]
    old_from: str
    received_bytes: int = 0
    sent_bytes: int = 0

    @property
    def num_local_rows(self) -> int:
        return len(self.batch_rows)

    @property
    def microbatches(self) -> List[MicroBatch]:
        return [mb for p in self.plans for mb in p.microbatches]


# ----------------------------------------------------------------------------- planning (rank 0, pure)
def plan_step(
    batch: TrainBatch,
    *,
    dp_size: int,
    prompts_per_update: int,
    micro_batch_size: int,
    max_tokens_per_microbatch: int = 0,
    microbatch_multiple: int = 1,
    use_rollout_logprobs: bool = False,
) -> List[StepShard]:
    """Every DP replica's shard of ``batch`` (index = DP rank); no communication.

    The split is :func:`~dapo_megatron.megatron.batching.plan_minibatches`'s, rank by rank, so the
    micro-batch tensors are the ones each rank built for itself when every rank held the batch.
    """
    if batch.old_logprobs is not None and not use_rollout_logprobs:
        old_from, old = "batch", batch.old_logprobs
    elif use_rollout_logprobs:
        old_from, old = "rollout", batch.rollout_logprobs
    else:
        old_from, old = "recompute", torch.zeros_like(batch.rollout_logprobs)
    lengths = sequence_lengths(batch)
    per_rank: List[List[MiniBatchPlan]] = [[] for _ in range(dp_size)]
    for rows in split_minibatches(batch.seq_group, prompts_per_update):
        tokens, seqs, split = split_minibatch(
            batch, rows, lengths, dp_size=dp_size, micro_batch_size=micro_batch_size,
            max_tokens_per_microbatch=max_tokens_per_microbatch, microbatch_multiple=microbatch_multiple,
        )  # fmt: skip
        for d in range(dp_size):
            mbs = [make_microbatch(batch, r, lengths, old) for r in split[d]]
            per_rank[d].append(MiniBatchPlan(mbs, global_num_tokens=tokens, global_num_seqs=seqs, num_rows=len(rows)))
    num_tokens = float((batch.loss_mask != 0).sum())
    return [_localize(plans, num_tokens, old_from) for plans in per_rank]


def _localize(plans: List[MiniBatchPlan], num_tokens: float, old_from: str) -> StepShard:
    """Renumber real rows 0, 1, ... in plan order (the order :func:`_unpack` rebuilds)."""
    batch_rows: List[int] = []
    for plan in plans:
        for mb in plan.microbatches:
            if int(mb.rows[0]) == DUMMY_ROW:
                continue
            start = len(batch_rows)
            batch_rows.extend(int(r) for r in mb.rows)
            mb.rows = torch.arange(start, len(batch_rows), dtype=torch.long)
    return StepShard(plans=plans, num_tokens=num_tokens, batch_rows=batch_rows, old_from=old_from)


# ----------------------------------------------------------------------------- wire format
def _fields(old_from: str, routes: bool = False) -> tuple:
    return _SENT + (("old_logprobs",) if old_from == "batch" else ()) + (("routed_experts",) if routes else ())


def _pack(shard: StepShard, dp_rank: int, device: torch.device) -> tuple:
    """``(metadata bytes, payload uint8 [n])`` of ``shard``."""
    mbs = shard.microbatches
    routes = mbs[0].routed_experts if mbs else None
    names = _fields(shard.old_from, routes is not None)
    parts, dtypes = [], {}
    for name in names:
        flat = torch.cat([getattr(mb, name).reshape(-1) for mb in mbs])
        dtypes[name] = flat.dtype
        if name == "tokens":
            flat = flat.to(torch.int32)  # ids < 2**31: exact, half the bytes of int64
        parts.append(flat.contiguous().view(torch.uint8))
    meta = {
        "dp_rank": dp_rank,
        "plans": [
            (
                p.global_num_tokens,
                p.global_num_seqs,
                p.num_rows,
                [(tuple(mb.tokens.shape), int(mb.rows[0]) == DUMMY_ROW) for mb in p.microbatches],
            )
            for p in shard.plans
        ],  # fmt: skip
        "num_tokens": shard.num_tokens,
        "batch_rows": shard.batch_rows,
        "old_from": shard.old_from,
        "dtypes": dtypes,
        # routed_experts [b, t, layers, k]: the per-position entries of that field
        "trailing": {"routed_experts": tuple(routes.shape[2:])} if routes is not None else {},
    }
    return pickle.dumps(meta), torch.cat(parts).to(device)


def _unpack(meta: dict, payload: Tensor) -> StepShard:
    """The shard of :func:`_pack` (micro-batch tensors are views into ``payload``, tokens a copy)."""
    shapes = [shape for _, _, _, mbs in meta["plans"] for shape, _ in mbs]
    fields: Dict[str, List[Tensor]] = {}
    offset = 0
    for name, dtype in meta["dtypes"].items():
        wire = torch.int32 if name == "tokens" else dtype
        trail = tuple(meta.get("trailing", {}).get(name, ()))
        per_pos = math.prod(trail)
        nbytes = sum(b * t for b, t in shapes) * per_pos * torch.empty((), dtype=wire).element_size()
        piece = payload[offset : offset + nbytes]
        try:
            flat = piece.view(wire)
        except RuntimeError:  # a view needs the offset aligned to the dtype's size; copy when it is not
            flat = piece.clone().view(wire)
        offset += nbytes
        pieces = flat.split([b * t * per_pos for b, t in shapes])
        fields[name] = [x.view(*shape, *trail).to(dtype) for x, shape in zip(pieces, shapes)]
    plans, k, next_row = [], 0, 0
    for tokens, seqs, num_rows, mbs in meta["plans"]:
        out = []
        for (b, _), dummy in mbs:
            rows = torch.full((b,), DUMMY_ROW, dtype=torch.long) if dummy else torch.arange(next_row, next_row + b)
            next_row += 0 if dummy else b
            got = {name: fields[name][k] for name in fields}
            if "old_logprobs" not in got:
                got["old_logprobs"] = got["rollout_logprobs"].clone() if meta["old_from"] == "rollout" else \
                    torch.zeros_like(got["rollout_logprobs"])  # fmt: skip
            out.append(MicroBatch(rows=rows, **got))
            k += 1
        plans.append(MiniBatchPlan(out, global_num_tokens=tokens, global_num_seqs=seqs, num_rows=num_rows))
    return StepShard(plans=plans, num_tokens=meta["num_tokens"], batch_rows=meta["batch_rows"],
                     old_from=meta["old_from"])  # fmt: skip


def shard_wire_bytes(shard: StepShard) -> int:
    """Bytes a receiving rank gets for ``shard``: header, pickled metadata and payload."""
    meta, payload = _pack(shard, 0, torch.device("cpu"))
    return 16 + len(meta) + payload.numel()


def world_broadcast_bytes(batch: TrainBatch) -> int:
    """Bytes each rank received per step from the former world broadcast of the whole batch: every
    ``[B, T]`` field (and ``seq_group``) at its dtype, plus the pickled shapes (its object broadcast)."""
    meta = {n: (tuple(v.shape), v.dtype) for n in _BATCH_FIELDS if (v := getattr(batch, n)) is not None}
    tensors = sum(v.numel() * v.element_size() for n in _BATCH_FIELDS if (v := getattr(batch, n)) is not None)
    return 8 + len(pickle.dumps(meta)) + tensors  # 8: the object broadcast's size tensor


# ----------------------------------------------------------------------------- transport (collective)
def _bytes_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def dispatch_step(
    batch: Optional[TrainBatch],
    plan: Callable[[TrainBatch], List[StepShard]],
    *,
    dp_rank: int,
    dp_sources: Sequence[int],
    mp_group: Any,
    mp_ranks: Sequence[int],
    device: torch.device,
) -> StepShard:
    """Collective over the world: this rank's :class:`StepShard` of rank 0's ``batch``.

    Args:
        batch: the step on global rank 0; ``None`` on the others.
        plan: rank 0's planner (``plan_step`` bound to the actor's settings).
        dp_rank: this rank's data-parallel rank.
        dp_sources: global rank of each replica's DP source, by DP rank (used on rank 0).
        mp_group / mp_ranks: this rank's model-parallel (TP x PP) group and its global ranks; the
            first is the replica's DP source.
        device: where the payload travels (the training device: NCCL on CUDA, gloo on CPU).
    """
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    source = min(mp_ranks)
    if rank == 0:
        if batch is None:
            raise ValueError("dispatch_step: rank 0 has no batch to dispatch")
        shards = plan(batch)
        shard = shards[dp_rank]
        packed = {d: _pack(s, d, device) for d, s in enumerate(shards) if dp_sources[d] != 0}
        shard.sent_bytes = _send_all(packed, dp_sources)
        if len(mp_ranks) == 1:
            return shard
        meta, payload = _pack(shard, dp_rank, device)
        _broadcast(meta, payload, source, mp_group, device)
        return shard
    if rank == source:
        meta_b, payload = _recv(0, device)
    else:
        meta_b, payload = None, None
    if len(mp_ranks) > 1:
        meta_b, payload = _broadcast(meta_b, payload, source, mp_group, device)
    meta = pickle.loads(meta_b)
    if meta["dp_rank"] != dp_rank:
        raise RuntimeError(f"dispatch_step: rank {rank} (DP rank {dp_rank}) received DP rank {meta['dp_rank']}'s rows")
    shard = _unpack(meta, payload)
    shard.received_bytes = 16 + len(meta_b) + payload.numel()
    return shard


def _send_all(packed: Dict[int, tuple], dp_sources: Sequence[int]) -> int:
    """Rank 0: header, metadata and payload to every other DP source, all in flight at once."""
    import torch.distributed as dist

    works, keep, sent = [], [], 0
    for d, (meta, payload) in packed.items():
        header = torch.tensor([len(meta), payload.numel()], dtype=torch.int64)
        for t in (header, _bytes_tensor(meta), payload):
            keep.append(t)  # a tensor must outlive its isend
            works.append(dist.isend(t, dst=dp_sources[d]))
            sent += t.numel() * t.element_size()
    for w in works:
        w.wait()
    return sent


def _recv(src: int, device: torch.device) -> tuple:
    import torch.distributed as dist

    header = torch.empty(2, dtype=torch.int64)
    dist.recv(header, src=src)
    meta = torch.empty(int(header[0]), dtype=torch.uint8)
    dist.recv(meta, src=src)
    payload = torch.empty(int(header[1]), dtype=torch.uint8, device=device)
    dist.recv(payload, src=src)
    return meta.numpy().tobytes(), payload


def _broadcast(
    meta: Optional[bytes], payload: Optional[Tensor], source: int, group: Any, device: torch.device
) -> tuple:
    """The DP source's ``(meta, payload)`` on every rank of its model-parallel group."""
    import torch.distributed as dist

    is_src = meta is not None
    header = torch.tensor([len(meta), payload.numel()] if is_src else [0, 0], dtype=torch.int64)
    dist.broadcast(header, src=source, group=group)
    meta_t = _bytes_tensor(meta) if is_src else torch.empty(int(header[0]), dtype=torch.uint8)
    dist.broadcast(meta_t, src=source, group=group)
    if not is_src:
        payload = torch.empty(int(header[1]), dtype=torch.uint8, device=device)
    dist.broadcast(payload, src=source, group=group)
    return meta_t.numpy().tobytes(), payload


# ----------------------------------------------------------------------------- logged scalars
def gap_stats(shard: StepShard, *, cap: float, groups: Sequence[Any], last_stage: bool) -> Dict[str, float]:
    """The loop's old-log-prob gap metrics, reduced from every replica's rows: only scalars travel.

    Masked sums of :func:`~dapo_megatron.algo.tis.tis_weights` over this shard's micro-batches (on
    the last pipeline stage, which holds the log-probs; other stages add 0), summed (max for the
    peak) over ``groups`` in order (DP, then PP). Same values on every rank.
    """
    import torch.distributed as dist

    from dapo_megatron.algo.tis import tis_weights

    sums = torch.zeros(3, dtype=torch.float64)  # |gap| sum, capped tokens, tokens
    peak = torch.zeros(1, dtype=torch.float64)
    if last_stage:
        for mb in shard.microbatches:
            _, s = tis_weights(mb.old_logprobs, mb.rollout_logprobs, mb.loss_mask, cap=cap)
            sums += torch.tensor([float(s["mismatch_abs_sum"]), float(s["capped_sum"]), float(s["num_tokens"])],
                                 dtype=torch.float64)  # fmt: skip
            peak = torch.maximum(peak, torch.tensor([float(s["mismatch_max"])], dtype=torch.float64))
    for g in groups:
        if dist.is_initialized() and dist.get_world_size(g) > 1:
            dist.all_reduce(sums, group=g)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=g)
    tokens = max(float(sums[2]), 1.0)
    return {
        "rollout/logprob_gap_mean": float(sums[0]) / tokens,
        "rollout/logprob_gap_max": float(peak[0]),
        "rollout/tis_capped_frac": float(sums[1]) / tokens,
    }
