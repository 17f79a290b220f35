"""Qwen3-MoE on megatron-core: logits parity with transformers' Qwen3MoeForCausalLM at EP1, EP2, TP2
and PP2 (weights loaded through the HF <-> megatron mapping), and both weight gathers (to rank 0, and
per pipeline stage and EP rank) reproducing the HF state dict exactly. Multi-process (gloo)."""

import pytest
import torch
from distributed_harness import run_distributed
from moe_cases import layouts_case, make_tiny_moe
from weights_cases import from_bytes, hf_logits

pytestmark = pytest.mark.multiproc
LOGITS_ATOL = 1e-5
TOKENS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models: HF's normalised top-k probabilities (Qwen3-MoE's release configs) and not."""
    root = tmp_path_factory.mktemp("moe_models")
    out = {}
    for norm in (True, False):
        folder = str(root / f"norm_{norm}")
        out[norm] = (folder, make_tiny_moe(folder, seed=int(norm), norm_topk_prob=norm))
    return out


def _check_logits(got, want, where):
    assert got is not None, where
    diff = (got - want).abs().max().item()
    assert diff < LOGITS_ATOL, f"{where}: max |logit diff| {diff:.2e} >= {LOGITS_ATOL}"


def _check_state(got, want, where):
    assert sorted(got) == sorted(want), f"{where}: names differ"
    bad = [n for n in want if not torch.equal(got[n], want[n])]
    assert not bad, f"{where}: tensors differ: {bad[:4]}"


def test_world1_ep1_matches_transformers_for_both_topk_normalisations(models):
    jobs = [(folder, [(1, 1, 1)]) for folder, _ in models.values()]
    per_job = from_bytes(run_distributed(layouts_case, 1, jobs, TOKENS)[0])
    for (norm, (folder, state)), (per_layout,) in zip(models.items(), per_job):
        _check_logits(per_layout["logits"], hf_logits(folder, TOKENS), f"norm_topk_prob={norm}")
        _check_state(per_layout["rank0"], state, f"norm_topk_prob={norm} rank-0 gather")
        _check_state(per_layout["stage"], state, f"norm_topk_prob={norm} stage gather")


def test_world2_ep2_tp2_pp2_match_transformers_and_gather_exactly(models):
    folder, state = models[True]
    want = hf_logits(folder, TOKENS)
    layouts = [(1, 1, 2), (2, 1, 1), (1, 2, 1)]
    runs = run_distributed(layouts_case, 2, [(folder, layouts)], TOKENS, timeout_s=600)
    per_rank = [from_bytes(b)[0] for b in runs]
    for k, (tp, pp, ep) in enumerate(layouts):
        where = f"tp={tp} pp={pp} ep={ep}"
        last = [r[k]["logits"] for r in per_rank if r[k]["logits"] is not None]
        assert len(last) == (2 if pp == 1 else 1), where
        for logits in last:
            _check_logits(logits, want, where)
        _check_state(per_rank[0][k]["rank0"], state, f"{where} rank-0 gather")
        assert sorted(per_rank[1][k]["rank0"]) == sorted(state), f"{where}: rank 1 saw other names"
        merged = {}
        for r in per_rank:
            assert not set(r[k]["stage"]) & set(merged), f"{where}: a tensor was sent twice"
            merged.update(r[k]["stage"])
        _check_state(merged, state, f"{where} stage gather")
    # EP2: both ranks lead their EP rank; rank 1 sends exactly its experts (2 and 3) and nothing else.
    roles = [r[0]["role"] for r in per_rank]
    assert [(x.leader, x.ep_rank, x.ep) for x in roles] == [(True, 0, 2), (True, 1, 2)]
    assert per_rank[1][0]["stage"] and all(".experts.2." in n or ".experts.3." in n for n in per_rank[1][0]["stage"])
