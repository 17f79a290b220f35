"""Dist checkpoints of the actor: reshard across layouts, exact resume, atomic publish.

The cases run inside the shared actor suite (``tests/actor_cases.py``): resume and atomicity at
world size 1, the TP2PP1 -> TP1PP2 reshard at world size 2, and every layout's checkpoint reloaded
at TP1PP1 x DP4 (used by the invariance tests). Measured differences print with ``[measured]``.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests import actor_cases as C

pytestmark = pytest.mark.multiproc


def test_tp2_checkpoint_loads_at_pp2_with_the_same_logprobs():
    """Saved at TP2PP1 after one update, loaded at TP1PP2: forward log-probs agree."""
    w2 = C.suite("world2")
    batch = C.suite("world1")[0]["batch"]
    saved = w2[0]["tp2"]["lp_after"]  # log-probs at TP2PP1 right after the update (and the save)
    loaded = w2[0]["reshard_lp"]
    assert torch.equal(w2[1]["reshard_lp"], loaded)  # every rank holds the same result
    mask = batch.loss_mask != 0
    diff = float((loaded - saved)[mask].abs().max())
    moved = float((saved - w2[0]["tp2"]["lp"])[mask].abs().max())
    C.report("checkpoint TP2PP1 -> TP1PP2 logprobs", f"max abs diff {diff:.2e} (the update moved them by {moved:.2e})")
    assert moved > 1e-3  # the checkpoint holds trained weights, not the initial ones
    assert diff <= 1e-5


def test_layout_checkpoints_reload_at_tp1pp1():
    """Every layout's checkpoint (TP2, PP2, VPP, TP2PP2, PP4VPP2) reloads into the full model."""
    weights = C.suite("world4")[0]["weights"]
    ref = weights["ref"]
    for name, w in weights.items():
        assert w.keys() == ref.keys(), name
        assert all(w[k].shape == ref[k].shape for k in ref), name


def test_save_load_continue_is_bitwise_equal_to_not_saving():
    """1 step, save, 2 more steps == load into a fresh actor, 2 steps (lr warm-up + cosine decay)."""
    r = C.suite("world1")[0]["resume"]
    assert r["step"] == 1 and r["extra"] == {"sampler": [1, 2, 3]} and r["rng_restored"]
    for a, b in zip(r["straight"], r["resumed"]):
        for key in ("loss", "grad_norm", "lr", "clip_frac_high", "entropy"):
            assert a[key] == b[key], key
    assert [m["lr"] for m in r["straight"]] == [0.05, 0.025]  # warm-up ended, then cosine half-way
    assert r["first"]["lr"] == 0.025  # update 1 of a 2-update warm-up
    equal = all(torch.equal(r["w_straight"][k], r["w_resumed"][k]) for k in r["w_straight"])
    worst = max(C.rel_diff(r["w_resumed"][k], r["w_straight"][k]) for k in r["w_straight"])
    C.report("checkpoint resume", f"bitwise equal: {equal} (max rel diff {worst:.1e})")
    assert equal


def test_crash_before_publish_keeps_the_previous_checkpoint():
    a = C.suite("world1")[0]["atomic"]
    assert "injected crash" in a["crash1"]
    after = a["after_crash1"]
    assert after["loaded"] == (1, {"tag": "first"})
    assert after["latest"].endswith(os.sep + "step_1")
    assert "step_1" in after["listing"] and any(x.startswith("step_1.tmp-") for x in after["listing"])


def test_crash_between_renames_leaves_the_old_copy_found_by_latest():
    a = C.suite("world1")[0]["atomic"]
    assert "between the renames" in a["crash2"]
    after = a["after_crash2"]
    assert not after["path_exists"]  # never a half-written path
    assert ".old-" in os.path.basename(after["latest"])
    assert after["loaded"] == (1, {"tag": "first"})


def test_next_save_recovers_and_cleans_leftovers():
    rec = C.suite("world1")[0]["atomic"]["after_recovery"]
    assert rec["loaded"] == (4, {"tag": "fourth"})
    assert rec["latest"].endswith(os.sep + "step_1")
    assert rec["listing"] == ["latest", "step_1"]
    C.report("checkpoint atomicity", "both injected crashes left a loadable previous checkpoint")


def _distopt_reshard() -> tuple:
    """(TP2PP2 straight run, rank 0's; TP1PP2 resumed runs, per rank), run once per session."""
    if "distopt_reshard" not in C._SUITE:
        import shutil
        import tempfile

        from tests import reshard_cases as R
        from tests.distributed_harness import run_distributed

        tmp = tempfile.mkdtemp(prefix="distopt_reshard_")
        try:
            straight = run_distributed(R.straight_tp2pp2, 4, tmp, timeout_s=600)[0]
            resumed = run_distributed(R.resumed_tp1pp2, 2, tmp, straight["batch"], timeout_s=600)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        C._SUITE["distopt_reshard"] = (straight, resumed)
    return C._SUITE["distopt_reshard"]


def test_distributed_optimizer_checkpoint_resumes_at_another_tp_pp():
    """Distributed optimizer, saved at TP2PP2 after update 1, resumed at TP1PP2 with its Adam state:
    updates 2 and 3 give the losses and log-probs of the uninterrupted TP2PP2 run (layout tolerance).
    Update 3's loss depends on update 2, i.e. on the restored moments; loading the weights alone
    (fresh Adam) changes it far beyond the tolerance, so the comparison sees the optimizer state."""
    from tests.test_actor_invariance import LOSS_ABS_TOL, TOL

    straight, resumed = _distopt_reshard()
    assert straight["meta"]["optimizer_saved"] and straight["meta"]["layout"]["tp"] == 2
    assert straight["meta"]["optimizer_format"] == "fully_reshardable"
    mask = straight["batch"].loss_mask != 0
    for name in ("resumed", "resumed_dp2"):  # TP1PP2, and TP1PP1 x DP2 (Adam state sharded over DP)
        run = resumed[0][name]
        assert all(r[name]["lp"].equal(run["lp"]) for r in resumed)  # the same on every rank
        losses = [abs(a["loss"] - b["loss"]) for a, b in zip(run["after"], straight["after"])]
        lp_abs = float((run["lp"] - straight["lp"])[mask].abs().max())
        C.report(f"distopt TP2PP2 -> {name}", f"loss abs diff update 2 {losses[0]:.2e}, update 3 {losses[1]:.2e}; "
                 f"logprob abs after update 3 {lp_abs:.2e}")  # fmt: skip
        assert all(m["skipped_updates"] == 0 for m in run["after"])
        assert max(losses) <= LOSS_ABS_TOL and lp_abs <= TOL, name
    control = abs(resumed[0]["weights_only"]["after"][1]["loss"] - straight["after"][1]["loss"])
    control_lp = float((resumed[0]["weights_only"]["lp"] - straight["lp"])[mask].abs().max())
    C.report("distopt weights-only control", f"update-3 loss diff {control:.2e}, logprob {control_lp:.2e}")
    assert control > 100 * LOSS_ABS_TOL and control_lp > 100 * TOL


def test_old_dp_reshardable_optimizer_state_is_refused_at_another_layout():
    """A checkpoint whose distributed-optimizer state is ``dp_reshardable`` (earlier versions) loaded
    at another TP/PP: a CheckpointError naming the format, the layout change and what to do."""
    _, resumed = _distopt_reshard()
    for r in resumed:
        msg = r.get("old_format_error", "")
        assert "'dp_reshardable'" in msg and "tp 2 -> 1" in msg and "parallel.tensor" in msg, msg
