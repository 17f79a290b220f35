"""Converted checkpoints inside megatron: logits parity with transformers at TP/PP layouts, and the
TP/PP(/VPP) reshard stream reproducing the HF state dict. Multi-process (gloo), batched per world
size because every spawn pays the megatron import."""

import pytest
import torch
from distributed_harness import run_distributed
from weights_cases import (
    TINY_CASES,
    from_bytes,
    hf_logits,
    hf_state_dict,
    layouts_case,
    prepare_models,
    pure_mapping_case,
    run_tool,
)

from dapo_megatron.weights.hf_io import read_hf_config

pytestmark = pytest.mark.multiproc
LOGITS_ATOL = 1e-5
TOKENS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return prepare_models(tmp_path_factory.getbasetemp() / "weights_models")


@pytest.fixture(scope="module")
def references(models):
    return {case: hf_logits(p["hf"], TOKENS) for case, p in models.items()}


def _jobs(models, layouts):
    return [(p["ckpt"], read_hf_config(p["hf"]), layouts) for p in models.values()]


def _check_logits(got, want, where):
    assert got is not None, where
    err = (got - want).abs().max().item()
    assert err <= LOGITS_ATOL, f"{where}: max |megatron - transformers| = {err:.2e}"


def _last_stage_logits(per_rank, job, layout):
    found = [r[job][layout] for r in per_rank if r[job][layout] is not None]
    assert found, "no rank returned logits"
    assert all(torch.equal(found[0], f) for f in found)  # every TP rank of the last stage agrees
    return found[0]


def test_world1_pure_mapping_and_converted_checkpoint_match_transformers(models, references):
    cases = list(models)
    pure = from_bytes(run_distributed(pure_mapping_case, 1, [models[c]["hf"] for c in cases], TOKENS)[0])
    loaded = [from_bytes(r) for r in run_distributed(layouts_case, 1, _jobs(models, [(1, 1, 1, "logits")]), TOKENS)]
    for k, case in enumerate(cases):
        assert pure[k]["shapes_match"], f"{case}: mapping.megatron_shapes != built GPTModel state_dict shapes"
        assert pure[k]["missing"] == [] and pure[k]["unexpected"] == [], case
        _check_logits(pure[k]["logits"], references[case], f"{case} pure mapping TP1PP1")
        _check_logits(_last_stage_logits(loaded, k, 0), references[case], f"{case} checkpoint TP1PP1")


def test_world2_tp2_pp2_logits_and_vpp_reshard(models, references):
    layouts = [(2, 1, 1, "logits"), (1, 2, 1, "logits"), (1, 2, 2, "reshard")]
    per_rank = [from_bytes(r) for r in run_distributed(layouts_case, 2, _jobs(models, layouts), TOKENS)]
    for k, case in enumerate(models):
        _check_logits(_last_stage_logits(per_rank, k, 0), references[case], f"{case} TP2PP1")
        _check_logits(_last_stage_logits(per_rank, k, 1), references[case], f"{case} TP1PP2")
        _check_stream(per_rank, k, 2, models[case]["hf"], case)


def test_world4_tp2pp2_reshard_stream_logits_and_export_of_a_tp2pp2_checkpoint(models, references, tmp_path):
    jobs = [
        (
            p["ckpt"],
            read_hf_config(p["hf"]),
            [(2, 2, 1, "reshard"), (2, 2, 1, "logits"), (2, 2, 1, f"save:{tmp_path / c}")],
        )
        for c, p in models.items()
    ]
    per_rank = [from_bytes(r) for r in run_distributed(layouts_case, 4, jobs, TOKENS)]
    for k, case in enumerate(models):
        _check_stream(per_rank, k, 0, models[case]["hf"], case)
        _check_logits(_last_stage_logits(per_rank, k, 1), references[case], f"{case} TP2PP2")
        # A checkpoint written at TP2PP2 (as training saves it) exports bit-exactly.
        out = tmp_path / f"{case}.hf"
        done = run_tool("convert_megatron_to_hf.py", "--ckpt", str(tmp_path / case), "--hf-dir", models[case]["hf"],
                        "--out", str(out))  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        want, got = hf_state_dict(models[case]["hf"]), hf_state_dict(str(out))
        assert sorted(got) == sorted(want) and all(torch.equal(got[n], t) for n, t in want.items()), case


def _check_stream(per_rank, job, layout, hf_dir, case):
    """Rank 0's stream is exactly the source HF state dict, in plan order, in bounded buckets; the
    other ranks walked the same names and got no tensors."""
    rank0 = per_rank[0][job][layout]
    want = hf_state_dict(hf_dir)
    assert sorted(rank0["state"]) == sorted(want), case
    assert len(rank0["names"]) == len(want), f"{case}: a name was streamed twice"
    for name, t in want.items():
        assert torch.equal(rank0["state"][name], t), f"{case}: {name} differs"
    for count, nbytes in rank0["buckets"]:
        assert count == 1 or nbytes <= 40_000, f"{case}: bucket of {count} tensors has {nbytes} B"
    for other in per_rank[1:]:
        assert other[job][layout]["names"] == rank0["names"]
        assert all(t is None for t in other[job][layout]["tensors"])


def test_cases_cover_the_brief():
    ratios = sorted(c["heads"] // c["kv_heads"] for c in TINY_CASES.values())
    assert ratios == [1, 2, 4]
    assert {c["model_type"] for c in TINY_CASES.values()} == {"qwen2", "qwen3", "llama"}
    assert {c["tied"] for c in TINY_CASES.values()} == {True, False}
    assert any(c["vocab"] % 128 for c in TINY_CASES.values())
