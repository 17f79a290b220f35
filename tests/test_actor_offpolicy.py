"""The decoupled off-policy objective on the real megatron actor (DP2 on gloo): sequence-level IS
with unit weights changes nothing bitwise, a masked sequence contributes no gradient, and the
``tis/*`` step metrics are the hand-computed ones, reduced over both DP ranks.
See ``tests/offpolicy_cases.py`` for the cases."""

from __future__ import annotations

import math

import pytest
import torch

from tests import offpolicy_cases as O

pytestmark = pytest.mark.multiproc


@pytest.fixture(scope="module")
def results():
    from tests.distributed_harness import run_distributed

    return run_distributed(O.world2, 2, timeout_s=600)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_every_case_starts_from_the_same_weights(results):
    for res in results:
        assert all(res[f"{name}_init_equal"] for name in O.CASES)


def test_sequence_is_with_unit_weights_equals_no_is_bitwise(results):
    res = results[0]
    off, ones = res["off"], res["seq_ones"]
    assert not _same_weights(off["w"], res["w_init"])  # the update did move the weights
    assert _same_weights(off["w"], ones["w"])
    for key in ("loss", "pg_loss", "grad_norm", "ratio_mean", "clip_frac_high", "clip_frac_low"):
        assert off["metrics"][key] == ones["metrics"][key], key
    m = ones["metrics"]
    assert (m["tis/weight_mean"], m["tis/weight_max"], m["tis/weight_min"]) == (1.0, 1.0, 1.0)
    assert (m["tis/capped_frac"], m["tis/masked_frac"], m["tis/hist_1_1.25"]) == (0.0, 0.0, 1.0)
    assert not any(k.startswith("tis/") for k in off["metrics"])  # IS off: no IS metrics


def test_a_masked_sequence_contributes_no_gradient(results):
    res = results[0]
    masked, ref = res["masked"], res["ref_masked"]
    assert _same_weights(masked["w"], ref["w"])  # == the update where that row's loss is 0
    assert not _same_weights(masked["w"], res["off"]["w"])  # and the row did matter without IS
    assert masked["metrics"]["loss"] == ref["metrics"]["loss"]
    assert masked["metrics"]["grad_norm"] == ref["metrics"]["grad_norm"]


def test_masked_metrics_are_reduced_over_both_ranks(results):
    batch, (r, _) = results[0]["batch"], results[0]["rows"]
    n, n_r = float(batch.loss_mask.sum()), float(batch.loss_mask[r].sum())
    for res in results:  # every rank reports the same, whole-step values
        m = res["masked"]["metrics"]
        assert m["tis/masked_frac"] == pytest.approx(n_r / n)
        assert m["tis/weight_mean"] == pytest.approx((n - n_r) / n)
        assert m["tis/hist_1_1.25"] == pytest.approx((n - n_r) / n)
        assert m["tis/hist_2_inf"] == pytest.approx(n_r / n)
        assert m["tis/weight_max"] == pytest.approx(math.exp(n_r), rel=1e-5)  # row r's e^(sum of +1s)
        assert m["tis/weight_min"] == 1.0 and m["tis/capped_frac"] == 0.0


def test_truncate_metrics_take_peaks_from_both_ranks(results):
    batch, (r, r2) = results[0]["batch"], results[0]["rows"]
    assert r in O._rows(batch, 0) and r2 in O._rows(batch, 1)  # the two peaks live on different ranks
    n, n_r = float(batch.loss_mask.sum()), float(batch.loss_mask[r].sum())
    for res in results:
        m = res["trunc"]["metrics"]
        assert m["tis/capped_frac"] == pytest.approx(n_r / n)
        assert m["tis/weight_mean"] == pytest.approx((2 * n_r + 0.9 + (n - n_r - 1)) / n, rel=1e-6)
        assert m["tis/weight_max"] == pytest.approx(math.e, rel=1e-5)  # from rank 0's row r
        assert m["tis/weight_min"] == pytest.approx(0.9, rel=1e-5)  # from rank 1's row r2
        assert m["tis/hist_0.8_1"] == pytest.approx(1 / n) and m["tis/hist_2_inf"] == pytest.approx(n_r / n)
