"""The clipped DAPO loss, its statistics, its gradient and the four aggregation modes.

Expected values are worked out by hand in the comments (eps_low = 0.2, eps_high = 0.28, so the
ratio is clipped to [0.8, 1.28]). Ratios are produced as ``exp(log r - 0)``, exact to ~1e-7.
"""

import math

import pytest
import torch

from dapo_megatron.algo import aggregate_loss, policy_loss

EPS = {"clip_ratio_low": 0.2, "clip_ratio_high": 0.28}


def _run(rows, clip_ratio_c=None, mask=None):
    """rows: (advantage, ratio). Returns (loss [1, n], stats) on a single sequence."""
    adv = torch.tensor([[a for a, _ in rows]], dtype=torch.float64)
    lp = torch.tensor([[math.log(r) for _, r in rows]], dtype=torch.float64)
    m = torch.ones_like(lp) if mask is None else torch.tensor([mask], dtype=torch.float64)
    return policy_loss(lp, torch.zeros_like(lp), adv, m, clip_ratio_c=clip_ratio_c, **EPS)


# (A, ratio, expected loss without dual clip): loss = max(-r*A, -clip(r)*A)
BRANCHES = [
    (1.0, 1.1, -1.1),  # A>0, inside: max(-1.1, -1.1)
    (1.0, 1.28, -1.28),  # A>0, at the high edge: max(-1.28, -1.28)
    (1.0, 1.5, -1.28),  # A>0, beyond: max(-1.5, -1.28) -> clipped
    (1.0, 0.5, -0.5),  # A>0, below the low edge: max(-0.5, -0.8) -> unclipped (pessimistic side)
    (2.0, 0.8, -1.6),  # A>0, at the low edge: max(-1.6, -1.6)
    (-1.0, 0.9, 0.9),  # A<0, inside: max(0.9, 0.9)
    (-1.0, 0.8, 0.8),  # A<0, at the low edge
    (-1.0, 0.5, 0.8),  # A<0, beyond the low edge: max(0.5, 0.8) -> clipped
    (-1.0, 2.0, 2.0),  # A<0, above the high edge: max(2.0, 1.28) -> unclipped
    (-0.5, 10.0, 5.0),  # A<0, huge ratio: max(5.0, 0.64) -> 5.0 (unbounded without dual clip)
    (0.0, 3.0, 0.0),  # A=0: no signal whatever the ratio
]


@pytest.mark.parametrize("adv,ratio,expected", BRANCHES)
def test_every_branch_without_dual_clip(adv, ratio, expected):
    loss, _ = _run([(adv, ratio)])
    assert loss.item() == pytest.approx(expected, abs=1e-9)


# Dual clip c = 3: for A<0 the loss is min(previous, -A*c).
DUAL = [
    (-1.0, 2.0, 2.0, False),  # min(2.0, 3.0): bound inactive
    (-1.0, 5.0, 3.0, True),  # min(5.0, 3.0): bound active
    (-0.5, 10.0, 1.5, True),  # min(5.0, 1.5)
    (-1.0, 0.5, 0.8, False),  # min(0.8, 3.0): the ordinary low clip still applies
    (1.0, 5.0, -1.28, False),  # A>0 ignores the dual clip (a wrong bound would give min(-1.28, -3) = -3)
]


@pytest.mark.parametrize("adv,ratio,expected,active", DUAL)
def test_dual_clip(adv, ratio, expected, active):
    loss, stats = _run([(adv, ratio)], clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    assert stats["dual_clip_sum"].item() == float(active)


def test_masked_tokens_are_zero_even_with_garbage():
    lp = torch.tensor([[0.1, float("nan"), 5.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, -float("inf")]])
    adv = torch.tensor([[1.0, float("nan"), -2.0]])
    mask = torch.tensor([[1, 0, 0]])
    loss, stats = policy_loss(lp, old, adv, mask, **EPS)
    assert loss[0, 1].item() == 0.0 and loss[0, 2].item() == 0.0
    loss.sum().backward()
    assert torch.isfinite(lp.grad).all()
    assert lp.grad[0, 1:].tolist() == [0.0, 0.0]
    assert all(torch.isfinite(v) for v in stats.values())
    assert stats["num_tokens"].item() == 1.0


def test_stats_are_masked_sums():
    rows = [(1.0, 1.5), (1.0, 1.1), (-1.0, 0.5), (-1.0, 5.0), (1.0, 0.5), (-1.0, 0.1)]
    loss, stats = _run(rows, clip_ratio_c=3.0, mask=[1, 1, 1, 1, 1, 0])
    assert stats["clip_high_sum"].item() == 1  # only (1, 1.5); (1, 0.5) is not a clipped branch
    assert stats["clip_low_sum"].item() == 1  # (-1, 0.5); (-1, 0.1) is masked out
    assert stats["dual_clip_sum"].item() == 1  # (-1, 5.0)
    assert stats["num_tokens"].item() == 5
    # ratio_sum = 1.5 + 1.1 + 0.5 + 5.0 + 0.5 = 8.6; max = 5.0
    assert stats["ratio_sum"].item() == pytest.approx(8.6, abs=1e-9)
    assert stats["ratio_max"].item() == pytest.approx(5.0, abs=1e-9)
    # approx_kl_sum = sum(old - lp) = -ln(1.5 * 1.1 * 0.5 * 5.0 * 0.5) = -ln(2.0625)
    assert stats["approx_kl_sum"].item() == pytest.approx(-math.log(2.0625), abs=1e-9)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_on_policy_step_has_zero_kl_and_no_clipping():
    lp = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([[1.0], [-1.0], [0.5]]).expand(3, 5)
    _, stats = policy_loss(lp, lp.clone(), adv, torch.ones(3, 5), **EPS)
    assert stats["approx_kl_sum"].item() == 0.0
    assert stats["clip_high_sum"].item() == 0 and stats["clip_low_sum"].item() == 0
    assert stats["ratio_sum"].item() == 15.0 and stats["ratio_max"].item() == 1.0


def test_log_ratio_clamp():
    # lp - old = 30 is clamped to 20 before exp: loss = -A * e^20 for A = -1 (no dual clip), no gradient.
    lp = torch.tensor([[30.0]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(
        lp,
        torch.zeros(1, 1, dtype=torch.float64),
        -torch.ones(1, 1, dtype=torch.float64),
        torch.ones(1, 1),
        log_ratio_clamp=20.0,
        **EPS,
    )
    assert loss.item() == pytest.approx(math.exp(20.0), rel=1e-12)
    loss.sum().backward()
    assert lp.grad.item() == 0.0


def test_gradient_matches_hand_derivation():
    # token-mean over N = 5 unmasked tokens. Inside the clip d(-rA)/dlp = -A*r; clipped tokens give 0.
    rows = [(1.0, 1.1), (1.0, 1.5), (-1.0, 0.5), (-1.0, 0.9), (2.0, 1.0), (-1.0, 5.0)]
    lp = torch.tensor([[math.log(r) for _, r in rows]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[a for a, _ in rows]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1]])
    loss, _ = policy_loss(lp, torch.zeros_like(lp), adv, mask, clip_ratio_c=3.0, **EPS)
    aggregate_loss(loss, mask, "token-mean").backward()
    # (1, 1.1): -1.1/5; (1, 1.5): clipped high, 0; (-1, 0.5): clipped low, 0; (-1, 0.9): 0.9/5;
    # masked: 0; (-1, 5.0): dual clip active (loss = 3, a constant), 0.
    expected = [-1.1 / 5, 0.0, 0.0, 0.9 / 5, 0.0, 0.0]
    assert lp.grad[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_tis_weights_scale_loss_and_gradient_but_get_none():
    lp = torch.tensor([[math.log(1.1), math.log(0.9)]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    w = torch.tensor([[2.0, 0.5]], dtype=torch.float64, requires_grad=True)
    loss, _ = policy_loss(lp, torch.zeros_like(lp), adv, torch.ones(1, 2), tis_weights=w, **EPS)
    # (-1.1 * 2, 0.9 * 0.5); gradients -A*r*w = (-2.2, 0.45)
    assert loss[0].tolist() == pytest.approx([-2.2, 0.45], abs=1e-12)
    loss.sum().backward()
    assert lp.grad[0].tolist() == pytest.approx([-2.2, 0.45], abs=1e-12)
    assert w.grad is None


# Ragged batch: row 0 has 3 tokens, row 1 has 1, row 2 has 2, row 3 none. 100 marks masked junk.
L = torch.tensor(
    [[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0], [5.0, 6.0, 100.0, 100.0], [100.0] * 4], dtype=torch.float64
)
M = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])

AGG = [
    ("token-mean", {}, 21 / 6),  # (1+2+3+4+5+6) / 6 tokens
    ("token-mean", {"global_num_tokens": 12}, 21 / 12),
    ("seq-mean-token-mean", {}, (2.0 + 4.0 + 5.5) / 3),  # row means 2, 4, 5.5; empty row not counted
    ("seq-mean-token-mean", {"global_num_seqs": 5}, 11.5 / 5),
    ("seq-mean-token-sum", {}, (6.0 + 4.0 + 11.0) / 3),  # row sums 6, 4, 11
    ("seq-mean-token-sum-norm", {"max_response_len": 4}, 21 / (3 * 4)),
    ("seq-mean-token-sum-norm", {"max_response_len": 8, "global_num_seqs": 7}, 21 / (7 * 8)),
]


@pytest.mark.parametrize("mode,kw,expected", AGG)
def test_aggregation_modes_hand_values(mode, kw, expected):
    assert aggregate_loss(L, M, mode, **kw).item() == pytest.approx(expected, abs=1e-12)


def test_aggregation_errors_and_empty_batch():
    with pytest.raises(ValueError, match="loss_agg_mode.*'seq-mean'.*token-mean"):
        aggregate_loss(L, M, "seq-mean")
    with pytest.raises(ValueError, match="max_response_len"):
        aggregate_loss(L, M, "seq-mean-token-sum-norm")
    empty = torch.zeros(2, 3, dtype=torch.long)
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        assert aggregate_loss(L[:2, :3], empty, mode).item() == 0.0


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_microbatches_with_global_counts_equal_the_whole_batch(mode):
    g = torch.Generator().manual_seed(1)
    loss = torch.randn(6, 7, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 0, 6, 2])
    mask = (torch.arange(7)[None, :] < lengths[:, None]).long()
    kw = {"max_response_len": 7}
    whole = aggregate_loss(loss, mask, mode, **kw)
    counts = {"global_num_tokens": int(mask.sum()), "global_num_seqs": int((lengths > 0).sum())}
    # Two uneven micro-batches (think: two ranks, or gradient accumulation), each with the globals.
    parts = [aggregate_loss(loss[s], mask[s], mode, **counts, **kw) for s in (slice(0, 2), slice(2, 6))]
    assert (parts[0] + parts[1]).item() == pytest.approx(whole.item(), abs=1e-7)
    # Without the global counts the token-mean of micro-batch means is *not* the step's token-mean.
    if mode == "token-mean":
        naive = sum(aggregate_loss(loss[s], mask[s], mode) for s in (slice(0, 2), slice(2, 6))) / 2
        assert abs(naive.item() - whole.item()) > 1e-3
