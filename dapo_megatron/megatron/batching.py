"""From one step's :class:`TrainBatch` to this rank's micro-batches.

Order of the split (each level keeps the previous one's invariants):

1. **Mini-batches** (one optimizer update each): consecutive prompt groups, ``prompts_per_update``
   groups x G rows. The global denominators of the loss (response tokens, non-empty sequences) are
   computed here, over the whole mini-batch, before any further split (rank 0 plans the step and
   sends them with each replica's rows: :mod:`dapo_megatron.megatron.dispatch`).
2. **DP ranks**: rows balanced by length with ``data.packing.balance_across_ranks``, keeping a
   prompt group on one rank when all groups have the same size.
3. **Micro-batches**: ``micro_batch_size`` rows each, or bins under ``max_tokens_per_microbatch``
   (``data.packing.split_by_token_budget``). Every DP rank gets the same count ``M`` (rounded up to
   ``microbatch_multiple``; the interleaved schedule needs a multiple of PP) with
   ``data.packing.equalize_microbatches``: it splits the costliest micro-batches, then adds empty
   ones, which become one dummy row with loss mask 0.
4. **Trimming**: each micro-batch keeps only ``max(row length)`` columns, where a row's length is
   one past its last position with a nonzero loss mask or rollout log-prob.

Shapes: batch tensors ``[B, T]`` target-aligned (see :mod:`dapo_megatron.types`); micro-batch
tensors ``[b, t]`` with ``t <= T``; ``rows[i]`` is the batch row of micro-batch row ``i``, -1 for a
dummy row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from dapo_megatron.data.packing import balance_across_ranks, equalize_microbatches, split_by_token_budget
from dapo_megatron.types import TrainBatch

DUMMY_ROW = -1
_DUMMY_LEN = 2


@dataclass
class MicroBatch:
    """One forward/backward unit. All tensors ``[b, t]``; ``rows`` ``[b]`` (long, -1 = dummy);
    ``routed_experts`` ``[b, t, layers, k]`` (routing replay; None without it), padding ``0..k-1``."""

    tokens: Tensor
    loss_mask: Tensor
    advantages: Tensor
    old_logprobs: Tensor
    rollout_logprobs: Tensor
    rows: Tensor
    routed_experts: Optional[Tensor] = None


@dataclass
class MiniBatchPlan:
    """This rank's share of one optimizer update, with the update's global denominators."""

    microbatches: List[MicroBatch]
    global_num_tokens: float
    global_num_seqs: float
    num_rows: int

    @property
    def num_microbatches(self) -> int:
        return len(self.microbatches)


def sequence_lengths(batch: TrainBatch) -> List[int]:
    """Per row: 1 + last index with a nonzero loss mask or rollout log-prob (at least 1)."""
    used = (batch.loss_mask != 0) | (batch.rollout_logprobs != 0)
    T = used.shape[1]
    positions = torch.arange(1, T + 1).expand_as(used)
    last = torch.where(used, positions, torch.zeros_like(positions)).max(dim=1).values
    return [max(1, int(v)) for v in last]


def prompt_groups(seq_group: Tensor) -> List[List[int]]:
    """Rows of each prompt group, groups in order of first appearance, rows in batch order."""
    groups: dict = {}
    for row, g in enumerate(seq_group.tolist()):
        groups.setdefault(g, []).append(row)
    return list(groups.values())


def split_minibatches(seq_group: Tensor, prompts_per_update: int) -> List[List[int]]:
    """Rows of each mini-batch: ``prompts_per_update`` consecutive groups (the last may be short)."""
    if prompts_per_update < 1:
        raise ValueError(f"prompts_per_update must be >= 1, got {prompts_per_update}")
    groups = prompt_groups(seq_group)
    return [
        [r for g in groups[i : i + prompts_per_update] for r in g] for i in range(0, len(groups), prompts_per_update)
    ]


def global_denominators(loss_mask: Tensor, rows: Sequence[int]) -> tuple:
    """``(response tokens, sequences with >= 1 response token)`` over ``rows``, as floats.

    Sequences are counted as :func:`aggregate_loss` counts them locally, so the global and local
    definitions agree.
    """
    mask = loss_mask[list(rows)] != 0
    return float(mask.sum()), float((mask.sum(dim=1) > 0).sum())


def assign_ranks(rows: List[int], lengths: Sequence[int], seq_group: Tensor, dp_size: int) -> List[List[int]]:
    """Split ``rows`` over ``dp_size`` ranks, balanced by length; groups kept whole when uniform.

    ``rows`` must list each prompt group contiguously (as :func:`split_minibatches` does), so that
    ``group_size`` consecutive entries are one group when every group has that size.
    """
    if dp_size == 1:
        return [list(rows)]
    sizes = {len(g) for g in prompt_groups(seq_group[rows])}
    group_size = sizes.pop() if len(sizes) == 1 else 1
    parts = balance_across_ranks([lengths[r] for r in rows], dp_size, group_size=group_size)
    return [[rows[i] for i in part] for part in parts]


def _chunk_rows(rows: List[int], lengths: Sequence[int], micro_batch_size: int, max_tokens: int) -> List[List[int]]:
    """One rank's rows into micro-batches (before equalising the count across ranks)."""
    if not rows:
        return []
    if max_tokens > 0:
        bins = split_by_token_budget([lengths[r] for r in rows], max_tokens)
        return [[rows[i] for i in b] for b in bins if b]
    ordered = sorted(rows, key=lambda r: -lengths[r])  # similar lengths together: less padding
    return [ordered[i : i + micro_batch_size] for i in range(0, len(ordered), micro_batch_size)]


def split_microbatches(
    rank_rows: List[List[int]],
    lengths: Sequence[int],
    *,
    micro_batch_size: int,
    max_tokens_per_microbatch: int = 0,
    microbatch_multiple: int = 1,
) -> List[List[List[int]]]:
    """Per rank, the rows of each micro-batch; every rank gets the same count ``M >= 1``.

    ``M`` is the largest per-rank count rounded up to a multiple of ``microbatch_multiple``.
    An empty list stands for a dummy micro-batch.
    """
    chunks = [_chunk_rows(r, lengths, micro_batch_size, max_tokens_per_microbatch) for r in rank_rows]
    return equalize_microbatches(chunks, lengths, multiple=microbatch_multiple)


def filler_routes(rows: int, cols: int, like: Tensor) -> Tensor:
    """``[rows, cols, layers, k]`` of ids ``0..k-1`` (``like``: ``[..., layers, k]``): routes for positions
    whose outputs no loss reads; distinct ids, so a router never gets one expert twice."""
    layers, k = like.shape[-2:]
    return torch.arange(k, dtype=like.dtype, device=like.device).expand(rows, cols, layers, k).clone()


def make_microbatch(batch: TrainBatch, rows: List[int], lengths: Sequence[int], old_logprobs: Tensor) -> MicroBatch:
    """Gather ``rows`` of ``batch`` and trim the right padding; ``[]`` gives one dummy row."""
    routes = batch.routed_experts
    if not rows:
        z = torch.zeros((1, _DUMMY_LEN))
        return MicroBatch(
            tokens=torch.zeros((1, _DUMMY_LEN), dtype=batch.tokens.dtype),
            loss_mask=z.to(batch.loss_mask.dtype),
            advantages=z.to(batch.advantages.dtype),
            old_logprobs=z.to(old_logprobs.dtype),
            rollout_logprobs=z.to(batch.rollout_logprobs.dtype),
            rows=torch.tensor([DUMMY_ROW], dtype=torch.long),
            routed_experts=None if routes is None else filler_routes(1, _DUMMY_LEN, routes),
        )
    idx = torch.tensor(rows, dtype=torch.long)
    t = max(lengths[r] for r in rows)
    return MicroBatch(
        tokens=batch.tokens[idx, :t].contiguous(),
        loss_mask=batch.loss_mask[idx, :t].contiguous(),
        advantages=batch.advantages[idx, :t].contiguous(),
        old_logprobs=old_logprobs[idx, :t].contiguous(),
        rollout_logprobs=batch.rollout_logprobs[idx, :t].contiguous(),
        rows=idx,
        routed_experts=None if routes is None else routes[idx, :t].contiguous(),
    )


def pad_microbatch(mb: MicroBatch, rows: int, cols: int) -> MicroBatch:
    """``mb`` right-padded to ``[rows, cols]``: extra columns and dummy rows (``rows == -1``) are 0
    (routed experts: ``0..k-1``).

    Safe for the loss: padded positions have loss mask 0, a causal model never lets a later column
    change an earlier one, and rows are independent.
    """
    b, t = mb.tokens.shape
    if (b, t) == (rows, cols):
        return mb
    if b > rows or t > cols:
        raise ValueError(f"pad_microbatch: [{b}, {t}] does not fit in [{rows}, {cols}]")

    def pad(x: Tensor) -> Tensor:
        out = x.new_zeros((rows, cols))
        out[:b, :t] = x
        return out

    row_ids = mb.rows.new_full((rows,), DUMMY_ROW)
    row_ids[:b] = mb.rows
    routes = None
    if mb.routed_experts is not None:
        routes = filler_routes(rows, cols, mb.routed_experts)
        routes[:b, :t] = mb.routed_experts
    return MicroBatch(
        tokens=pad(mb.tokens),
        loss_mask=pad(mb.loss_mask),
        advantages=pad(mb.advantages),
        old_logprobs=pad(mb.old_logprobs),
        rollout_logprobs=pad(mb.rollout_logprobs),
        rows=row_ids,
        routed_experts=routes,
    )


def split_minibatch(
    batch: TrainBatch,
    rows: Sequence[int],
    lengths: Tensor,
    *,
    dp_size: int,
    micro_batch_size: int,
    max_tokens_per_microbatch: int,
    microbatch_multiple: int,
) -> Tuple[int, int, List[List[List[int]]]]:
    """One mini-batch's global denominators and its rows per DP rank per micro-batch.

    Returns ``(tokens, seqs, split)``: response tokens and sequences over all DP ranks (the loss
    normalisers), and ``split[d]`` the micro-batches (row lists) of DP rank ``d``. The one place the
    split is made, so a rank planning for itself and rank 0 planning for every rank agree.
    """
    tokens, seqs = global_denominators(batch.loss_mask, rows)
    split = split_microbatches(
        assign_ranks(rows, lengths, batch.seq_group, dp_size),
        lengths,
        micro_batch_size=micro_batch_size,
        max_tokens_per_microbatch=max_tokens_per_microbatch,
        microbatch_multiple=microbatch_multiple,
    )
    return tokens, seqs, split


def plan_minibatches(
    batch: TrainBatch,
    *,
    old_logprobs: Optional[Tensor],
    dp_rank: int,
    dp_size: int,
    prompts_per_update: Optional[int],
    micro_batch_size: int,
    max_tokens_per_microbatch: int = 0,
    microbatch_multiple: int = 1,
) -> List[MiniBatchPlan]:
    """This rank's plan for every mini-batch of ``batch`` (``prompts_per_update=None``: one).

    ``old_logprobs`` ``[B, T]`` go into the micro-batches (``None``: zeros, for forward-only use).
    """
    lengths = sequence_lengths(batch)
    old = old_logprobs if old_logprobs is not None else torch.zeros_like(batch.rollout_logprobs)
    if prompts_per_update is None:
        minis = [[r for g in prompt_groups(batch.seq_group) for r in g]]
    else:
        minis = split_minibatches(batch.seq_group, prompts_per_update)
    plans = []
    for rows in minis:
        tokens, seqs, per_rank = split_minibatch(
            batch, rows, lengths, dp_size=dp_size, micro_batch_size=micro_batch_size,
            max_tokens_per_microbatch=max_tokens_per_microbatch, microbatch_multiple=microbatch_multiple,
        )  # fmt: skip
        mbs = [make_microbatch(batch, r, lengths, old) for r in per_rank[dp_rank]]
        plans.append(MiniBatchPlan(mbs, global_num_tokens=tokens, global_num_seqs=seqs, num_rows=len(rows)))
    return plans
