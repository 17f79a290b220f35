"""Bin-packing: token budgets, DP balance with whole groups, equal micro-batch counts."""

from __future__ import annotations

import pytest

from dapo_megatron.data import balance_across_ranks, equalize_microbatches, padded_cost, split_by_token_budget


def _flat(parts):
    return sorted(i for p in parts for i in p)


def test_split_by_token_budget_hand_case():
    lengths = [5, 3, 8, 2, 2, 6]
    bins = split_by_token_budget(lengths, 12)
    # decreasing order 2(8),5(6),0(5),1(3),3(2),4(2):
    # 8 alone (2*8 > 12); 6+5 -> 2*6 = 12; 3,2,2 -> can't join [6,5] (3*6 = 18) -> new bin, 3*3 = 9
    assert bins == [[2], [5, 0], [1, 3, 4]]
    assert all(padded_cost(lengths, b) <= 12 for b in bins)
    assert _flat(bins) == list(range(6))


def test_split_fills_earlier_bins_first_and_is_deterministic():
    lengths = [4, 4, 4, 4, 1]
    assert split_by_token_budget(lengths, 8) == [[0, 1], [2, 3], [4]]
    # the budget checks padded cost, not the sum: 4 ones fit under a budget of 4
    assert split_by_token_budget([1, 1, 1, 1, 1], 4) == [[0, 1, 2, 3], [4]]
    assert split_by_token_budget(lengths, 8) == split_by_token_budget(list(lengths), 8)
    assert split_by_token_budget([], 8) == []


def test_oversize_sequence_gets_its_own_microbatch():
    lengths = [3, 20, 2, 3]
    bins = split_by_token_budget(lengths, 10)
    assert bins[0] == [1]
    assert bins[1:] == [[0, 3, 2]]
    assert padded_cost(lengths, bins[1]) == 9
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        split_by_token_budget([1], 0)


def test_budget_respected_on_many_lengths():
    lengths = [(i * 37) % 101 + 1 for i in range(200)]
    bins = split_by_token_budget(lengths, 256)
    assert _flat(bins) == list(range(200))
    assert all(padded_cost(lengths, b) <= 256 for b in bins)


def test_balance_hand_case_with_groups():
    # 4 groups of 2: tokens g0=10+10=20, g1=1+1=2, g2=15+15=30, g3=3+5=8
    lengths = [10, 10, 1, 1, 15, 15, 3, 5]
    parts = balance_across_ranks(lengths, 2, group_size=2)
    # largest first: g2 -> r0 (30), g0 -> r1 (20), g3 -> r1 (28), g1 -> r0 (32)
    assert parts == [[2, 3, 4, 5], [0, 1, 6, 7]]
    loads = [sum(lengths[i] for i in p) for p in parts]
    assert loads == [32, 28]
    for p in parts:  # groups stay together
        assert all(i + 1 in p for i in p if i % 2 == 0)


def test_balance_equal_counts_when_divisible_even_if_tokens_skewed():
    lengths = [100, 1, 1, 1, 1, 1]
    parts = balance_across_ranks(lengths, 2)
    assert [len(p) for p in parts] == [3, 3]
    # the long one on rank 0; rank 1 fills to its 3 sequences, the rest must go to rank 0
    assert parts == [[0, 4, 5], [1, 2, 3]]
    # not divisible: counts differ by at most one group
    parts = balance_across_ranks([5, 4, 3, 2, 1, 9, 9], 3)
    assert sorted(len(p) for p in parts) == [2, 2, 3]
    assert _flat(parts) == list(range(7))
    # fewer groups than ranks
    assert balance_across_ranks([4, 4], 3, group_size=2) == [[0, 1], [], []]


def test_balance_errors():
    with pytest.raises(ValueError, match="cannot be split into groups of 4"):
        balance_across_ranks([1] * 6, 2, group_size=4)
    with pytest.raises(ValueError, match="num_ranks must be >= 1"):
        balance_across_ranks([1], 0)


def test_equalize_splits_largest_then_adds_empty():
    lengths = [9, 8, 1, 1, 1, 1, 5, 5]
    per_rank = [[[0], [1]], [[2, 3, 4, 5]], [[6, 7]], []]
    out = equalize_microbatches(per_rank, lengths)
    assert [len(r) for r in out] == [2, 2, 2, 2]
    assert out[0] == [[0], [1]]
    assert out[1] == [[2, 3], [4, 5]]
    assert out[2] == [[6], [7]]
    assert out[3] == [[], []]
    assert per_rank[1] == [[2, 3, 4, 5]]  # input untouched
    # rounding to a multiple (interleaved pipeline): 3 -> 4
    out = equalize_microbatches([[[0, 1, 2]], [[3], [4], [5]]], lengths, multiple=2)
    assert [len(r) for r in out] == [4, 4]
    assert out[0] == [[0], [1], [2], []]
    assert out[1] == [[3], [4], [5], []]


def test_equalize_picks_costliest_by_padded_tokens():
    lengths = [10, 10, 1, 1, 1]
    # [0,1] costs 20 tokens, [2,3,4] costs 3: the 2-row one is split though it has fewer rows
    out = equalize_microbatches([[[2, 3, 4], [0, 1]], [[0], [1], [2]]], lengths)
    assert out[0] == [[2, 3, 4], [0], [1]]
    # without lengths, the one with more rows is split
    out = equalize_microbatches([[[2, 3, 4], [0, 1]], [[0], [1], [2]]])
    assert out[0] == [[2], [3, 4], [0, 1]]
