"""The loss-normalisation contract, end to end: one update is the same whatever the layout.

One seeded model (saved once as a dist checkpoint at TP1PP1 and loaded into every layout) takes one
``train_step`` on one fixed batch (4 prompt groups x 2 responses, ratios away from 1 so both clips
are active). Loss, grad norm, log-probs and the updated weights (reloaded at TP1PP1) must match the
(1,1,1) reference. The optimizer is set up so the update is ~``g`` (see ``actor_cases.sub_configs``),
so a wrong loss scale would show in the weights as well as in the grad norm.

Measured differences are printed (``pytest -s``) with a ``[measured]`` prefix.
"""

from __future__ import annotations

import pytest
import torch

from tests import actor_cases as C

pytestmark = pytest.mark.multiproc

TOL = 1e-5  # relative, layouts (float32; different reduction orders)
LOSS_ABS_TOL = 1e-6  # absolute, on a loss made of O(1) terms
MB_TOL = 1e-6  # micro-batch split (same kernels, different summation order)
TOKEN_LAYOUTS = ["tp2", "pp2", "dp2", "pp2vpp2", "tp2pp2", "pp4vpp2"]
SEQ_LAYOUTS = ["dp2_seq", "tp2pp2_seq"]
DISTOPT_LAYOUTS = ["dp2_distopt"]


def _layout_results() -> dict:
    """name -> (per-rank results of that layout, weights reloaded at TP1PP1)."""
    w2, w4 = C.suite("world2"), C.suite("world4")
    weights = w4[0]["weights"]
    out = {}
    for ranks in (w2, w4):
        for name in ranks[0]:
            if name in TOKEN_LAYOUTS + SEQ_LAYOUTS + DISTOPT_LAYOUTS:
                out[name] = ([r[name] for r in ranks], weights[name])
    return out


def _check_layout(name: str, ref_metrics: dict, ref_weights: dict, ref_lp: torch.Tensor) -> None:
    w1 = C.suite("world1")[0]
    per_rank, weights = _layout_results()[name]
    for r in per_rank[1:]:  # every rank returns the same dict
        assert r["metrics"].keys() == per_rank[0]["metrics"].keys()
        for key in ("loss", "grad_norm", "clip_frac_high", "entropy"):
            assert r["metrics"][key] == per_rank[0]["metrics"][key], (name, key)
        assert torch.equal(r["lp"], per_rank[0]["lp"])
    m = per_rank[0]["metrics"]
    # The loss is a small difference of O(1) terms (advantages are +-O(1)), so its *relative* error is
    # ill-conditioned; it is held to an absolute bound on that O(1) scale instead.
    loss_abs = abs(m["loss"] - ref_metrics["loss"])
    gn_rel = C.scalar_rel(m["grad_norm"], ref_metrics["grad_norm"])
    w_rel, upd_rel = C.weights_rel_diff(weights, ref_weights, w1["w_init"])
    mask = w1["batch"].loss_mask != 0
    lp_abs = float((per_rank[0]["lp"] - ref_lp)[mask].abs().max())
    C.report(
        f"layout {name}",
        f"loss abs {loss_abs:.2e} (loss {ref_metrics['loss']:.3e}), grad_norm rel {gn_rel:.2e}, "
        f"weights rel {w_rel:.2e}, update rel {upd_rel:.2e}, logprob abs {lp_abs:.2e}",
    )
    assert m["skipped_updates"] == 0 and m["updates"] == 1
    assert m["num_tokens"] == ref_metrics["num_tokens"]
    for key in ("clip_frac_high", "clip_frac_low"):
        assert m[key] == pytest.approx(ref_metrics[key], abs=1e-12), key  # counts: exact
    assert loss_abs <= LOSS_ABS_TOL and gn_rel <= TOL and w_rel <= TOL and upd_rel <= TOL
    assert lp_abs <= TOL


def test_reference_update_is_not_trivial():
    """The reference really trains: clipping on both sides, a real gradient, weights moved."""
    w1 = C.suite("world1")[0]
    m = w1["metrics"]
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] > 0
    assert m["grad_norm"] > 1e-3 and m["updates"] == 1 and m["skipped_updates"] == 0
    moved = max(float((w1["w_after"][k] - w1["w_init"][k]).abs().max()) for k in w1["w_init"])
    assert moved > 1e-3
    assert m["num_tokens"] == float(w1["batch"].loss_mask.sum())


@pytest.mark.parametrize("name", TOKEN_LAYOUTS + DISTOPT_LAYOUTS)
def test_layout_invariance_token_mean(name):
    w1 = C.suite("world1")[0]
    _check_layout(name, w1["metrics"], w1["w_after"], w1["lp_init"])


@pytest.mark.parametrize("name", SEQ_LAYOUTS)
def test_layout_invariance_seq_mean_token_mean(name):
    """GRPO's aggregation with the entropy bonus on (its gradient crosses TP through the entropy)."""
    w1 = C.suite("world1")[0]
    assert w1["metrics_seq"]["loss"] != pytest.approx(w1["metrics"]["loss"])  # another objective
    _check_layout(name, w1["metrics_seq"], w1["w_after_seq"], w1["lp_init"])


@pytest.mark.parametrize("variant", ["mb4", "tokens"])
def test_microbatch_invariance(variant):
    """1 micro-batch of 8 rows == 4 of 2 rows == token-budget bins, at (1,1,1)."""
    w1 = C.suite("world1")[0]
    res = w1["microbatch"]
    one, other = res["mb1"], res[variant]
    w_rel, upd_rel = C.weights_rel_diff(other["w"], one["w"], w1["w_init"])
    gn_rel = C.scalar_rel(other["metrics"]["grad_norm"], one["metrics"]["grad_norm"])
    loss_abs = abs(other["metrics"]["loss"] - one["metrics"]["loss"])
    C.report(f"microbatch {variant} vs 1", f"update rel {upd_rel:.2e}, weights rel {w_rel:.2e}, "
             f"grad_norm rel {gn_rel:.2e}, loss abs {loss_abs:.2e}")  # fmt: skip
    assert upd_rel <= MB_TOL and w_rel <= MB_TOL and gn_rel <= MB_TOL and loss_abs <= MB_TOL


def test_nan_guard_skips_the_update_and_keeps_weights():
    """An inf advantage: update skipped and reported, weights bitwise unchanged; the next update is
    bitwise the reference update (grads were cleared, Adam state untouched)."""
    w1 = C.suite("world1")[0]
    g = w1["nan_guard"]
    assert g["bad"]["skipped_updates"] == 1 and g["bad"]["updates"] == 1
    assert not torch.isfinite(torch.tensor(g["bad"]["loss"])) or not torch.isfinite(torch.tensor(g["bad"]["grad_norm"]))
    assert all(torch.equal(g["before"][k], g["after_bad"][k]) for k in g["before"])
    assert g["good"]["skipped_updates"] == 0
    assert all(torch.equal(g["after_good"][k], w1["w_after"][k]) for k in w1["w_after"])
    C.report("nan guard", "skipped update: weights bitwise unchanged; next update bitwise equal to reference")


def test_sft_step_is_token_mean_cross_entropy():
    """sft_step's loss equals -mean log-prob over the mask (from compute_logprobs), and it updates."""
    w1 = C.suite("world1")[0]
    sft = w1["sft"]
    diff = abs(sft["loss"] - w1["sft_expected"])
    C.report("sft_step loss vs token-mean NLL", f"abs diff {diff:.2e} (loss {sft['loss']:.4f})")
    assert diff <= 1e-6
    assert sft["num_tokens"] == float(w1["batch"].loss_mask.sum()) and sft["skipped_updates"] == 0
    assert sft["grad_norm"] > 0 and sft["updates"] == 1
    assert any(not torch.equal(w1["w_after_sft"][k], w1["w_init"][k]) for k in w1["w_init"])
