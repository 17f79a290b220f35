"""Splitting a TrainBatch into mini-batches, DP ranks and micro-batches (pure; no processes)."""

from __future__ import annotations

import pytest
import torch

from dapo_megatron.megatron.batching import (
    DUMMY_ROW,
    global_denominators,
    pad_microbatch,
    plan_minibatches,
    sequence_lengths,
    split_minibatches,
)
from dapo_megatron.types import TrainBatch


def _batch(lengths, groups, prompt=2, T=12):
    B = len(lengths)
    tokens = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T))
    for b, n in enumerate(lengths):
        tokens[b, :n] = torch.arange(1, n + 1)
        mask[b, prompt:n] = 1.0
    return TrainBatch(tokens=tokens, loss_mask=mask, advantages=mask.clone(), rollout_logprobs=-mask,
                      seq_group=torch.tensor(groups))  # fmt: skip


def test_sequence_lengths_use_mask_and_rollout_logprobs():
    b = _batch([5, 12, 3], [0, 0, 1])
    assert sequence_lengths(b) == [5, 12, 3]
    b.loss_mask[0] = 0  # overlong-filtered row: its rollout log-probs still give the length
    assert sequence_lengths(b) == [5, 12, 3]


def test_minibatches_are_whole_groups_in_first_appearance_order():
    seq_group = torch.tensor([2, 2, 0, 0, 1, 1, 3, 3])
    assert split_minibatches(seq_group, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_minibatches(seq_group, 3) == [[0, 1, 2, 3, 4, 5], [6, 7]]


def test_denominators_count_the_whole_minibatch_before_any_split():
    b = _batch([5, 12, 2, 7], [0, 0, 1, 1])  # row 2 has no response token
    assert global_denominators(b.loss_mask, [0, 1, 2, 3]) == (3 + 10 + 0 + 5, 3)
    plans = [plan_minibatches(b, old_logprobs=None, dp_rank=r, dp_size=2, prompts_per_update=None,
                              micro_batch_size=1) for r in range(2)]  # fmt: skip
    for (plan,) in plans:
        assert (plan.global_num_tokens, plan.global_num_seqs) == (18.0, 3.0)


@pytest.mark.parametrize("mbs,budget", [(1, 0), (2, 0), (3, 0), (1, 30)])
def test_every_row_once_equal_counts_groups_kept_trimmed(mbs, budget):
    lengths = [5, 12, 3, 9, 7, 7, 4, 11, 6, 2, 10, 8]
    groups = [g for g in range(6) for _ in range(2)]
    b = _batch(lengths, groups)
    used = sequence_lengths(b)  # the row of length 2 is all prompt: trimmed to 1 token
    assert used == [n if n > 2 else 1 for n in lengths]
    per_rank = [plan_minibatches(b, old_logprobs=b.rollout_logprobs, dp_rank=r, dp_size=2, prompts_per_update=3,
                                 micro_batch_size=mbs, max_tokens_per_microbatch=budget, microbatch_multiple=2)
                for r in range(2)]  # fmt: skip
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 6 groups / 3 per update
    for u in range(2):
        counts = {per_rank[r][u].num_microbatches for r in range(2)}
        assert len(counts) == 1 and counts.pop() % 2 == 0  # same M on every rank, a multiple of 2
        rows_per_rank = []
        for r in range(2):
            rows = []
            for mb in per_rank[r][u].microbatches:
                real = mb.rows[mb.rows != DUMMY_ROW].tolist()
                if real:
                    assert mb.tokens.shape[1] == max(used[i] for i in real)  # trimmed
                    assert torch.equal(mb.tokens, b.tokens[real, : mb.tokens.shape[1]])
                    assert torch.equal(mb.old_logprobs, b.rollout_logprobs[real, : mb.tokens.shape[1]])
                else:
                    assert float(mb.loss_mask.sum()) == 0  # a dummy micro-batch trains nothing
                rows += real
            rows_per_rank.append(rows)
            assert all((i ^ 1) in rows for i in rows)  # both responses of a prompt on one rank
        assert sorted(rows_per_rank[0] + rows_per_rank[1]) == list(range(6 * u, 6 * u + 6))


def test_pad_microbatch_adds_zero_columns_and_dummy_rows():
    b = _batch([5, 4], [0, 0])
    (plan,) = plan_minibatches(b, old_logprobs=None, dp_rank=0, dp_size=1, prompts_per_update=None,
                               micro_batch_size=2)  # fmt: skip
    (mb,) = plan.microbatches
    padded = pad_microbatch(mb, 3, 8)
    assert padded.tokens.shape == (3, 8) and padded.rows.tolist() == [0, 1, DUMMY_ROW]
    assert torch.equal(padded.tokens[:2, :5], mb.tokens) and float(padded.loss_mask.sum()) == float(mb.loss_mask.sum())
    with pytest.raises(ValueError, match="does not fit"):
        pad_microbatch(mb, 1, 8)


@pytest.mark.multiproc
def test_broadcast_batch_reaches_every_rank():
    """Rank 0 holds the batch, rank 1 passes None: both end with identical tensors (world 2)."""
    from dataclasses import fields

    from tests import actor_cases as C

    sent = C.suite("world1")[0]["batch"]
    for r in C.suite("world2"):
        got = r["broadcast"]
        for f in fields(sent):
            a, b = getattr(got, f.name), getattr(sent, f.name)
            if b is None:  # an optional field this batch does not carry (routed experts of a dense model)
                assert a is None, f.name
                continue
            assert a.dtype == b.dtype and torch.equal(a, b), f.name
