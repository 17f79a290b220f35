"""Off-policy IS weights (token / sequence / geometric, truncate / mask), their stats, and the
staleness histogram: hand-computed expectations."""

from __future__ import annotations

import math

import pytest
import torch

from dapo_megatron.algo.offpolicy import (
    IS_LEVELS,
    IS_MODES,
    LOG_WEIGHT_CLAMP,
    WEIGHT_CEIL,
    hist_edges,
    is_stat_keys,
    offpolicy_weights,
)
from dapo_megatron.algo.staleness import staleness_histogram
from dapo_megatron.algo.tis import tis_weights
from dapo_megatron.config import TISConfig

LN = math.log


def _token_case():
    """One row, 4 response tokens with pi_old / pi_rollout = 0.25, 1, 1.5, 3, and a pad column
    holding -inf log-probs (must not leak a nan)."""
    rollout = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0, float("-inf")]])
    old = rollout + torch.tensor([[0.0, LN(0.25), 0.0, LN(1.5), LN(3.0), 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    return old, rollout, mask


def _two_rows():
    """Row 0: log-ratios 0.1, 0.2, -0.5 (sum -0.2); row 1: 1.0, 0.5 (sum 1.5) and one pad column."""
    diff = torch.tensor([[0.1, 0.2, -0.5], [1.0, 0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rollout = torch.full((2, 3), -2.0)
    return rollout + diff, rollout, mask


def _close(t, values):
    assert torch.allclose(t, torch.tensor(values, dtype=t.dtype), rtol=1e-6, atol=1e-7), t


def test_token_truncate_weights_stats_and_histogram():
    old, rollout, mask = _token_case()
    w, s = offpolicy_weights(old, rollout, mask, level="token", mode="truncate", cap=2.0)
    _close(w, [[0.0, 0.25, 1.0, 1.5, 2.0, 0.0]])
    assert float(s["weight_sum"]) == pytest.approx(0.25 + 1 + 1.5 + 2)
    assert (float(s["capped_sum"]), float(s["masked_sum"])) == (1.0, 0.0)
    assert float(s["weight_max"]) == pytest.approx(3.0) and float(s["weight_min"]) == pytest.approx(0.25)
    # Buckets of cap 2: [0,.5) [.5,.8) [.8,1) [1,1.25) [1.25,2) [2,inf); raw weights .25, 1, 1.5, 3.
    hist = [float(s[k]) for k in is_stat_keys(hist_edges("truncate", cap=2.0, lower=0.5, upper=2.0))[3:]]
    assert hist == [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    assert not w.requires_grad


def test_token_mask_drops_tokens_outside_the_bounds_and_keeps_raw_weights_inside():
    old, rollout, mask = _token_case()
    w, s = offpolicy_weights(old, rollout, mask, level="token", mode="mask", lower=0.5, upper=2.0)
    _close(w, [[0.0, 0.0, 1.0, 1.5, 0.0, 0.0]])
    assert (float(s["masked_sum"]), float(s["capped_sum"])) == (2.0, 0.0)
    assert float(s["weight_sum"]) == pytest.approx(2.5)


def test_sequence_level_uses_the_summed_log_ratio_on_every_token():
    old, rollout, mask = _two_rows()
    w, s = offpolicy_weights(old, rollout, mask, level="sequence", mode="truncate", cap=2.0)
    e = math.exp(-0.2)  # row 1's exp(1.5) = 4.48 is cut to 2 on both tokens
    _close(w, [[e, e, e], [2.0, 2.0, 0.0]])
    assert float(s["capped_sum"]) == 2.0 and float(s["weight_max"]) == pytest.approx(math.exp(1.5))
    w, s = offpolicy_weights(old, rollout, mask, level="sequence", mode="mask", lower=0.5, upper=2.0)
    _close(w, [[e, e, e], [0.0, 0.0, 0.0]])  # the whole of row 1 is masked
    assert float(s["masked_sum"]) == 2.0 and float(s["weight_sum"]) == pytest.approx(3 * e)


def test_geometric_level_uses_the_mean_log_ratio():
    old, rollout, mask = _two_rows()
    w, _ = offpolicy_weights(old, rollout, mask, level="geometric", mode="truncate", cap=2.0)
    g0, g1 = math.exp(-0.2 / 3), math.exp(1.5 / 2)  # 0.936, 2.117 -> capped
    _close(w, [[g0, g0, g0], [2.0, 2.0, 0.0]])
    assert g1 > 2.0


def test_token_truncate_matches_the_legacy_tis_weights_bitwise():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 9, generator=g) * 4
    rollout = -torch.rand(4, 9, generator=g) * 4
    mask = (torch.rand(4, 9, generator=g) > 0.3).float()
    new, s = offpolicy_weights(old, rollout, mask, cap=1.7)
    legacy, ls = tis_weights(old, rollout, mask, cap=1.7)
    assert torch.equal(new, legacy)
    assert 0 < float(s["capped_sum"]) <= float(ls["capped_sum"])  # legacy counts w == cap too


@pytest.mark.parametrize("level", IS_LEVELS)
@pytest.mark.parametrize("mode", IS_MODES)
def test_huge_log_ratios_stay_finite(level, mode):
    # 200 tokens of +5 nats sum to 1000 (exp overflows any float); -inf rollout on a kept token.
    old = torch.full((2, 201), 0.0)
    rollout = torch.full((2, 201), -5.0)
    rollout[1] = 5.0
    rollout[0, 7] = float("-inf")
    mask = torch.ones(2, 201)
    mask[:, -1] = 0
    old[:, -1] = float("-inf")  # padding
    w, s = offpolicy_weights(old, rollout, mask, level=level, mode=mode, cap=2.0, lower=0.5, upper=2.0)
    assert torch.isfinite(w).all() and all(torch.isfinite(v) for v in s.values())
    assert float(s["weight_max"]) <= WEIGHT_CEIL and float(s["weight_min"]) >= math.exp(-LOG_WEIGHT_CLAMP) * (1 - 1e-6)
    if level == "sequence":  # row 0 far above the bounds, row 1 far below: cut or dropped, never inf
        expected = [2.0, math.exp(-LOG_WEIGHT_CLAMP)] if mode == "truncate" else [0.0, 0.0]
        _close(w[:, 0], expected)


def test_stats_sum_over_microbatches_to_the_whole_batch():
    g = torch.Generator().manual_seed(3)
    old, rollout = -torch.rand(6, 7, generator=g) * 3, -torch.rand(6, 7, generator=g) * 3
    mask = (torch.rand(6, 7, generator=g) > 0.2).float()
    kw = dict(level="sequence", mode="mask", lower=0.3, upper=3.0)
    w_all, whole = offpolicy_weights(old, rollout, mask, **kw)
    parts = [offpolicy_weights(old[i : i + 2], rollout[i : i + 2], mask[i : i + 2], **kw) for i in (0, 2, 4)]
    assert torch.equal(torch.cat([p[0] for p in parts]), w_all)
    for key in is_stat_keys(hist_edges("mask", cap=2.0, lower=0.3, upper=3.0)):
        assert float(sum(p[1][key] for p in parts)) == pytest.approx(float(whole[key]))
    hist = [k for k in whole if k.startswith("hist_")]
    assert sum(float(whole[k]) for k in hist) == float(mask.sum())  # every token in one bucket
    assert float(whole["weight_max"]) == max(float(p[1]["weight_max"]) for p in parts)
    assert float(whole["weight_min"]) == min(float(p[1]["weight_min"]) for p in parts)


def test_empty_input_gives_neutral_peaks():
    z = torch.zeros(2, 3)
    w, s = offpolicy_weights(z, z, z, level="sequence")
    assert float(w.abs().sum()) == 0 and float(s["weight_sum"]) == 0
    assert float(s["weight_max"]) == 0 and float(s["weight_min"]) == pytest.approx(WEIGHT_CEIL)


def test_hist_edges_merge_the_bounds_in_use():
    assert hist_edges("truncate", cap=2.0, lower=0.1, upper=9.0) == (0.0, 0.5, 0.8, 1.0, 1.25, 2.0, math.inf)
    assert hist_edges("truncate", cap=3.0, lower=0.1, upper=9.0)[-3:] == (2.0, 3.0, math.inf)
    assert hist_edges("mask", cap=3.0, lower=0.1, upper=9.0) == (0.0, 0.1, 0.5, 0.8, 1.0, 1.25, 2.0, 9.0, math.inf)
    assert is_stat_keys(hist_edges("truncate", cap=2.0, lower=0.5, upper=2.0))[-1] == "hist_2_inf"


def test_bad_arguments_are_named():
    z = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="level: got 'row'"):
        offpolicy_weights(z, z, z, level="row")
    with pytest.raises(ValueError, match="mode: got 'clip'"):
        offpolicy_weights(z, z, z, mode="clip")
    with pytest.raises(ValueError, match="cap must be > 0"):
        offpolicy_weights(z, z, z, cap=0.0)
    with pytest.raises(ValueError, match="lower=2.0, upper=1.0"):
        offpolicy_weights(z, z, z, mode="mask", lower=2.0, upper=1.0)


def test_config_choices_match_the_math_and_bounds_are_validated():
    from dapo_megatron.config_base import ConfigError

    assert TISConfig() == TISConfig(enable=False, cap=2.0, level="token", mode="truncate")
    for level in IS_LEVELS:
        for mode in IS_MODES:
            TISConfig(level=level, mode=mode)
    for kw, key in ((dict(level="seq"), "algo.tis.level"), (dict(mode="veto"), "algo.tis.mode"),
                    (dict(mask_low=-0.1), "algo.tis.mask_low"), (dict(mask_low=1.0), "algo.tis.mask_low"),
                    (dict(mask_high=1.0), "algo.tis.mask_high"), (dict(cap=float("nan")), "algo.tis.cap")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            TISConfig(**kw)


# ----------------------------------------------------------------------------- staleness
def test_staleness_histogram_per_sample_and_per_token():
    h = staleness_histogram([7, 5, 7, 6, 5], current_version=7, max_staleness=2)
    assert (h.counts, h.oldest, h.total) == ((2, 1, 2), 2, 5)
    m = h.metrics()
    assert m == {"staleness/count_0": 2.0, "staleness/count_1": 1.0, "staleness/count_2": 2.0,
                 "staleness/max": 2.0, "staleness/mean": pytest.approx(5 / 5)}  # fmt: skip
    versions = torch.tensor([[3, 3, 4, 0], [4, 4, 4, 4]])  # the 0 is padding, masked out
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    h = staleness_histogram(versions, current_version=4, max_staleness=3, mask=mask)
    assert (h.counts, h.oldest, h.total) == ((4, 2, 0, 0), 1, 6)
    assert staleness_histogram([], 3, 1).metrics()["staleness/mean"] == 0.0


def test_staleness_outside_the_bound_is_an_error():
    with pytest.raises(ValueError, match="3 versions old .* more than max_staleness=2"):
        staleness_histogram([5, 2], current_version=5, max_staleness=2)
    with pytest.raises(ValueError, match="newer than the current version 5"):
        staleness_histogram([6], current_version=5, max_staleness=2)
    with pytest.raises(ValueError, match="max_staleness must be >= 0"):
        staleness_histogram([1], current_version=1, max_staleness=-1)
    with pytest.raises(ValueError, match="mask shape"):
        staleness_histogram(torch.zeros(2, 3), current_version=1, max_staleness=1, mask=torch.ones(2))


# ----------------------------------------------------------------------------- actor-side bookkeeping (no processes)
def test_stat_keys_accumulate_and_step_metrics_use_the_agreed_names():
    from dapo_megatron.megatron.offpolicy import accumulate, is_metrics, is_weights, stat_keys
    from dapo_megatron.observability import metric_names as M

    tis = TISConfig(enable=True, mode="mask", mask_low=0.5, mask_high=2.5)
    sums, peaks, lows = stat_keys(("loss", "num_tokens"), ("ratio_max",), tis)
    assert sums[:2] == ("loss", "num_tokens") and peaks == ("ratio_max", "tis_weight_max")
    assert lows == ("tis_weight_min",) and "tis_hist_2_2.5" in sums and "tis_hist_2.5_inf" in sums
    assert stat_keys(("loss",), ("ratio_max",), TISConfig()) == (("loss",), ("ratio_max",), ())

    old, rollout, mask = _token_case()  # raw weights .25, 1, 1.5, 3 -> .25 and 3 masked
    mb = type("MB", (), {"old_logprobs": old, "rollout_logprobs": rollout, "loss_mask": mask})()
    acc: dict = {}
    for _ in range(2):  # two micro-batches of the same update
        _, stats = is_weights(mb, tis)
        accumulate(acc, {**stats, "num_tokens": mask.sum()})
    assert acc["tis_masked_sum"] == 4.0 and acc["tis_weight_max"] == pytest.approx(3.0)
    assert acc["tis_weight_min"] == pytest.approx(0.25) and set(acc) >= set(sums[1:] + peaks[1:] + lows)
    metrics = is_metrics([acc, acc], num_tokens=16.0)
    assert metrics[M.TIS_MASKED_FRAC] == 0.5 and metrics[M.TIS_WEIGHT_MEAN] == pytest.approx(2.5 / 4)
    assert metrics[M.TIS_CAPPED_FRAC] == 0.0 and metrics[M.TIS_WEIGHT_MAX] == pytest.approx(3.0)
    assert metrics["tis/hist_0_0.5"] == 0.25 and metrics["tis/hist_2.5_inf"] == 0.25
    hist = {
        f"tis/hist_{lo:g}_{hi:g}"
        for lo, hi in zip((0, 0.5, 0.8, 1, 1.25, 2, 2.5), (0.5, 0.8, 1, 1.25, 2, 2.5, math.inf))
    }
    assert set(metrics) == set(M.TIS_KEYS) | hist
    assert is_metrics([acc], num_tokens=0.0)[M.TIS_WEIGHT_MIN] == 0.0  # no tokens: no neutral sentinel leaks
    assert is_weights(mb, TISConfig()) == (None, {}) and is_metrics([{"loss": 1.0}], 1.0) == {}


def test_staleness_metric_names_agree():
    from dapo_megatron.observability import metric_names as M

    m = staleness_histogram([3, 2], current_version=3, max_staleness=1).metrics()
    assert set(m) == {"staleness/count_0", "staleness/count_1", M.STALENESS_MAX, M.STALENESS_MEAN}
