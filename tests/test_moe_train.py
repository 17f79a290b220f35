"""The DAPO step of a tiny Qwen3-MoE through the real ``MegatronActor.train_step``, with the router
statistics of :mod:`dapo_megatron.megatron.moe_stats`. Multi-process (gloo).

1. Expert parallelism does not change the update: EP1 (1 rank), DP2 x EP1, DP2 x EP2 and PP2 give the same
   loss, grad norm and updated weights (the dense layout-invariance tolerances of
   ``test_actor_invariance``), with the load-balancing aux loss on, and with a capacity factor.
   One row per micro-batch, so every layout's micro-batches hold the same rows (the aux loss of a
   micro-batch is not additive over its rows).
2. The aux loss counts once per optimizer update: with identical rows and zero advantages (the
   gradient is the aux loss's alone) the grad norm is the same with 1 and 4 micro-batches and at
   DP2 x EP2, doubles with the coefficient and vanishes without it; the logged ``moe/aux_loss`` is
   the same too, and equals the switch loss computed from transformers' router logits.
3. The logged expert load and dropped-token fraction equal the counts from transformers' routers.

Measured differences are printed (``pytest -s``) with a ``[measured]`` prefix.
"""

from __future__ import annotations

import moe_train_cases as C
import pytest
import torch
from distributed_harness import run_distributed
from moe_cases import make_tiny_moe

pytestmark = pytest.mark.multiproc

TOL = 1e-5  # relative: grad norm, weights, update (test_actor_invariance.TOL)
LOSS_ABS_TOL = 1e-6  # absolute, on the O(1)-scale loss (test_actor_invariance.LOSS_ABS_TOL)
STAT_TOL = 1e-6  # moe/* metrics across layouts (counts are exact; the aux loss is a float mean)
HF_AUX_TOL = 1e-5  # aux loss from megatron's fp32 routers vs transformers' (logits agree to ~1e-5)
LAYOUTS = [("dp2", "ep1"), ("ep2", "ep1"), ("pp2", "ep1"), ("ep2_cap", "ep1_cap")]  # (world 2, world 1 reference)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(world-1 rank-0 results, world-2 per-rank results, HF folder); each world run once."""
    folder = str(tmp_path_factory.mktemp("moe_train") / "hf")
    make_tiny_moe(folder, seed=1, norm_topk_prob=True)
    w1 = run_distributed(C.world1, 1, folder, timeout_s=600)[0]
    w2 = run_distributed(C.world2, 2, folder, w1["batch"], timeout_s=600)
    return w1, w2, folder


def _report(name: str, text: str) -> None:
    print(f"\n[measured] {name}: {text}")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def _weights_rel(w: dict, ref: dict, init: dict) -> tuple:
    """(max relative diff of the weights per tensor, max |update diff| / max |reference update|)."""
    assert w.keys() == ref.keys(), sorted(set(w) ^ set(ref))
    weights = max(float((w[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)) for k in ref)
    err = max(float(((w[k] - init[k]) - (ref[k] - init[k])).double().abs().max()) for k in ref)
    scale = max(float((ref[k] - init[k]).double().abs().max()) for k in ref)
    return weights, err / max(scale, 1e-30)


def _lengths(batch) -> list:
    from dapo_megatron.megatron.batching import sequence_lengths

    return sequence_lengths(batch)


def test_reference_step_trains_experts_and_router(runs):
    """The EP1 reference really trains: experts and routers move, the aux loss is on and logged."""
    w1, _, _ = runs
    ref = w1["ep1"]
    m = ref["metrics"]
    assert m["updates"] == 1 and m["skipped_updates"] == 0 and m["grad_norm"] > 1e-3
    # The router's gradient is small (through the top-k probabilities and the aux loss), yet far above
    # float32 rounding of O(1) weights (~1e-7).
    for part, least in ((".mlp.experts.3.down_proj.", 1e-3), (".mlp.gate.", 1e-5)):
        moved = max(float((ref["w_after"][k] - w1["w_init"][k]).abs().max()) for k in ref["w_after"] if part in k)
        assert moved > least, part
    assert m["moe/aux_loss"] > 1.0 and m["moe/dropped_token_frac"] == 0.0  # 1.0 only for a balanced router
    assert w1["ep1_cap"]["metrics"]["moe/dropped_token_frac"] > 0.0


@pytest.mark.parametrize("name,ref_name", LAYOUTS)
def test_expert_parallel_step_matches_ep1(runs, name, ref_name):
    """DP2 x EP1 / DP2 x EP2 / PP2 == EP1: loss, grad norm, updated weights, and every moe/* metric."""
    w1, w2, _ = runs
    ref = w1[ref_name]
    per_rank = [r[name] for r in w2]
    keys = ("loss", "grad_norm", *C.MOE_KEYS)
    for r in per_rank[1:]:  # every rank returns the same metrics
        assert [r["metrics"][k] for k in keys] == [per_rank[0]["metrics"][k] for k in keys], name
    m, mr = per_rank[0]["metrics"], ref["metrics"]
    loss_abs = abs(m["loss"] - mr["loss"])
    gn_rel = _rel(m["grad_norm"], mr["grad_norm"])
    w_rel, upd_rel = _weights_rel(per_rank[0]["w_after"], ref["w_after"], w1["w_init"])
    stats = {k: abs(m[k] - mr[k]) for k in mr if k.startswith("moe/")}
    _report(f"{name} vs {ref_name}", f"loss abs {loss_abs:.2e} (loss {mr['loss']:.3e}), grad_norm rel {gn_rel:.2e} "
            f"(grad_norm {mr['grad_norm']:.4f}), weights rel {w_rel:.2e}, update rel {upd_rel:.2e}, "
            f"moe stats max abs {max(stats.values()):.2e}")  # fmt: skip
    assert m["updates"] == 1 and m["skipped_updates"] == 0 and m["num_tokens"] == mr["num_tokens"]
    assert loss_abs <= LOSS_ABS_TOL and gn_rel <= TOL and w_rel <= TOL and upd_rel <= TOL
    assert set(stats) == set(C.MOE_KEYS)
    assert max(stats.values()) <= STAT_TOL, stats
    assert torch.equal(per_rank[0]["last"]["counts"], ref["last"]["counts"])  # per layer and expert, exact


def test_aux_loss_counts_once_per_update(runs):
    """Aux-only gradient: the same at 1 and 4 micro-batches and at DP2 x EP2 (a per-micro-batch sum would
    be 4x), linear in the coefficient, zero when it is 0; the logged aux loss does not grow either."""
    w1, w2, folder = runs
    aux = w1["aux_only"]
    gn = {k: v["metrics"]["grad_norm"] for k, v in aux.items()}
    gn["ep2_m4"] = w2[0]["aux_only"]["m4"]["metrics"]["grad_norm"]
    _report("aux-only grad norm", ", ".join(f"{k} {v:.6f}" for k, v in gn.items()))
    assert gn["off"] == 0.0 and gn["m1"] > 1e-3
    assert _rel(gn["m4"], gn["m1"]) <= TOL and _rel(gn["ep2_m4"], gn["m1"]) <= TOL
    assert _rel(gn["m4_2x"], 2 * gn["m1"]) <= TOL
    assert [float(v) for v in aux["m4"]["last"]["forwards"]] == [4.0, 4.0]  # 4 router calls per layer
    logged = [aux["m1"], aux["m4"], aux["m4_2x"], w2[0]["aux_only"]["m4"]]
    values = [r["metrics"]["moe/aux_loss"] for r in logged]
    assert max(values) - min(values) <= STAT_TOL, values
    assert "moe/aux_loss" not in aux["off"]["metrics"]
    rows = C.identical_rows(w1["batch"])
    want = C.hf_router_counts(folder, rows.tokens[:1], _lengths(rows)[:1])["aux"].mean()
    _report("aux loss vs transformers' routers", f"abs diff {abs(values[0] - float(want)):.2e} (aux {float(want):.4f})")
    assert abs(values[0] - float(want)) <= HF_AUX_TOL


def test_expert_load_and_aux_loss_match_transformers_routers(runs):
    """The reference step's logged load shares and aux loss are transformers' router counts."""
    w1, _, folder = runs
    batch, ref = w1["batch"], w1["ep1"]
    want = C.hf_router_counts(folder, batch.tokens, _lengths(batch))
    assert torch.equal(ref["last"]["counts"].cpu(), want["counts"])  # [layers, experts], exact
    assert [float(t) for t in ref["last"]["tokens"]] == [float(sum(_lengths(batch)))] * 2
    share = want["counts"] / want["counts"].sum(dim=1, keepdim=True)
    m = ref["metrics"]
    assert m["moe/expert_load_max"] == pytest.approx(float(share.max()), abs=1e-12)
    assert m["moe/expert_load_min"] == pytest.approx(float(share.min()), abs=1e-12)
    assert abs(m["moe/aux_loss"] - float(want["aux"].mean())) <= HF_AUX_TOL


def test_dropped_tokens_match_capacity(runs):
    """With model.moe_capacity_factor, layer 0 drops exactly the assignments over each micro-batch's
    capacity ``ceil(t * k / E * factor)`` (transformers' counts); the fraction is over both layers."""
    w1, _, folder = runs
    batch, cap = w1["batch"], w1["ep1_cap"]
    want = C.hf_router_counts(folder, batch.tokens, _lengths(batch), capacity=C.CAPACITY)
    dropped0 = float(cap["last"]["dropped"][0])
    assert dropped0 == float(want["dropped"][:, 0].sum()) and dropped0 > 0
    k = 2
    frac = float(cap["last"]["dropped"].sum() / (cap["last"]["tokens"].sum() * k))
    assert cap["metrics"]["moe/dropped_token_frac"] == pytest.approx(frac, abs=1e-12)
    kept = cap["last"]["counts"].sum(dim=1) + cap["last"]["dropped"]
    assert torch.equal(kept, cap["last"]["tokens"] * k)  # every assignment is kept or dropped
