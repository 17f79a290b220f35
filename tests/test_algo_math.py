"""Advantages, overlong shaping, TIS weights and the masked/entropy helpers, against hand values."""

import math

import pytest
import torch

from dapo_megatron.algo import (
    broadcast_to_tokens,
    entropy_from_logits,
    group_advantages,
    masked_mean,
    masked_sum,
    overlong_filter_mask,
    overlong_penalty,
    tis_weights,
)

# ---------------------------------------------------------------- advantages


def test_advantages_with_std():
    # Group [1, -1, -1, 1]: mean 0, unbiased var = 4/3, std = sqrt(4/3) = 1.1547005.
    r = torch.tensor([1.0, -1.0, -1.0, 1.0])
    adv = group_advantages(r, torch.tensor([7, 7, 7, 7]))
    a = 1.0 / (math.sqrt(4 / 3) + 1e-6)  # 0.8660248...
    assert adv.tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert adv.dtype == torch.float32


def test_advantages_uneven_group_with_and_without_std():
    # [1, 0, 0]: mean 1/3, deviations (2/3, -1/3, -1/3), squares sum 2/3, unbiased var 1/3.
    r = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    g = torch.zeros(3, dtype=torch.long)
    std = math.sqrt(1 / 3)
    with_std = group_advantages(r, g, eps=1e-6)
    d = std + 1e-6
    assert with_std.tolist() == pytest.approx([(2 / 3) / d, -(1 / 3) / d, -(1 / 3) / d], abs=1e-12)
    assert group_advantages(r, g, norm_by_std=False).tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3], abs=1e-12)


def test_advantages_ragged_ids_singletons_and_constant_groups():
    # ids 5: [1, 0] -> mean .5, unbiased std sqrt(.5); ids 2: constant 0.5 -> 0; id 9: size 1 -> 0.
    r = torch.tensor([1.0, 0.5, 0.0, 3.0, 0.5, 0.5], dtype=torch.float64)
    g = torch.tensor([5, 2, 5, 9, 2, 2])
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    adv = group_advantages(r, g)
    assert adv.tolist() == pytest.approx([a, 0.0, -a, 0.0, 0.0, 0.0], abs=1e-12)
    assert adv[[1, 3, 4, 5]].tolist() == [0.0, 0.0, 0.0, 0.0]  # exactly zero
    assert group_advantages(r, g, norm_by_std=False).tolist() == pytest.approx([0.5, 0, -0.5, 0, 0, 0], abs=1e-12)


def test_constant_group_is_exactly_zero_despite_rounding():
    # mean(0.1, 0.1, 0.1) is not exactly 0.1 in floating point; the advantage still must be 0.
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7], dtype=torch.float64)
    assert (r[:3].sum() / 3).item() != 0.1  # the rounding this test is about
    g = torch.tensor([0, 0, 0, 1, 1])
    for norm in (True, False):
        assert group_advantages(r, g, norm_by_std=norm).tolist() == [0.0] * 5


def test_advantage_shape_errors_and_broadcast():
    with pytest.raises(ValueError, match=r"\[N\]"):
        group_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long))
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 1]])
    out = broadcast_to_tokens(torch.tensor([0.5, -2.0]), mask)
    assert out.tolist() == [[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, -2.0, -2.0]]
    with pytest.raises(ValueError, match="loss_mask"):
        broadcast_to_tokens(torch.zeros(3), mask)


# ---------------------------------------------------------------- overlong


def test_overlong_penalty_eq13_small():
    # L_max 20, L_cache 4: ramp starts after 16 tokens. 17 -> (16-17)/4 = -0.25, 18 -> -0.5, 20 -> -1.
    lengths = [5, 16, 17, 18, 20, 21, 50]
    p = overlong_penalty(lengths, max_response_len=20, buffer_len=4)
    assert p.tolist() == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert p.dtype == torch.float32
    half = overlong_penalty(torch.tensor(lengths), max_response_len=20, buffer_len=4, penalty_factor=0.5)
    assert half.tolist() == [0.0, 0.0, -0.125, -0.25, -0.5, -0.5, -0.5]


def test_overlong_penalty_paper_numbers():
    # DAPO: L_max 20480, L_cache 4096. 16384 -> 0; 16385 -> -1/4096; 18432 -> -0.5; 20480 -> -1.
    p = overlong_penalty([16384, 16385, 18432, 20480], max_response_len=20480, buffer_len=4096)
    assert p.tolist() == pytest.approx([0.0, -1 / 4096, -0.5, -1.0], abs=1e-9)


def test_overlong_validation_and_filter():
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], max_response_len=10, buffer_len=11)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty([1], max_response_len=10, buffer_len=0)
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)
    out = overlong_filter_mask(mask, torch.tensor([False, True, False]))
    assert out.tolist() == [[0, 1, 1], [0, 0, 0], [0, 1, 1]]
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter_mask(mask, torch.tensor([True]))


# ---------------------------------------------------------------- TIS


def test_tis_weights_cap_mask_and_stats():
    old = torch.tensor([[0.0, math.log(2.0), math.log(5.0), -math.log(2.0), 9.0]], requires_grad=True)
    rollout = torch.tensor([[0.0, 0.0, 0.0, 0.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    w, stats = tis_weights(old, rollout, mask, cap=3.0)
    # exp(diff) = 1, 2, 5 -> capped at 3, 0.5; masked -> 0
    assert w.tolist()[0] == pytest.approx([1.0, 2.0, 3.0, 0.5, 0.0], abs=1e-6)
    assert not w.requires_grad
    # |diff| = 0, ln2, ln5, ln2 -> sum ln 20, max ln 5
    assert stats["mismatch_abs_sum"].item() == pytest.approx(math.log(20.0), abs=1e-6)
    assert stats["mismatch_max"].item() == pytest.approx(math.log(5.0), abs=1e-6)
    assert stats["capped_sum"].item() == 1.0 and stats["num_tokens"].item() == 4.0
    with pytest.raises(ValueError, match="cap"):
        tis_weights(old, rollout, mask, cap=0.0)


def test_tis_huge_mismatch_is_capped_not_inf():
    w, _ = tis_weights(torch.tensor([[500.0]]), torch.tensor([[0.0]]), torch.ones(1, 1), cap=2.0)
    assert w.item() == 2.0


# ---------------------------------------------------------------- masked reductions and entropy


def test_masked_sum_and_mean():
    v = torch.tensor([[1.0, float("nan"), 3.0], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert masked_sum(v, m).item() == 10.0  # 1 + 3 + 6
    assert masked_mean(v, m).item() == pytest.approx(10 / 3)
    assert masked_mean(v, m, denom=20).item() == 0.5
    assert masked_mean(v, torch.zeros_like(m)).item() == 0.0


def test_entropy_from_logits():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -math.inf, -math.inf], [1000.0, 0.0, 0.0, 0.0]])
    h = entropy_from_logits(logits)
    # uniform over 4: ln 4; probs (1/4, 3/4): -(.25 ln .25 + .75 ln .75) = 0.5623351446; near one-hot: ~0
    assert h[0].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert h[1].item() == pytest.approx(0.5623351446, abs=1e-6)  # -inf logits contribute 0, not nan
    assert h[2].item() == pytest.approx(0.0, abs=1e-6)
    assert h.shape == (3,)
    h2 = entropy_from_logits(logits[1:2, :2].to(torch.bfloat16))
    assert h2.item() == pytest.approx(0.5623351446, abs=1e-2)
    assert entropy_from_logits(logits[1:2, :2]).item() == pytest.approx(0.5623351446, abs=1e-6)
