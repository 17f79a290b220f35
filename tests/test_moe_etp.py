"""Expert tensor parallelism (``parallel.expert_tensor``) for Qwen3-MoE.

Pure checks: the key's default (same as ``parallel.tensor``), megatron's layout rule
(``expert_tensor * expert * pipeline`` divides the world) in the config and in ``Topology``, and
the model-build refusals (dense model, ``moe_intermediate_size`` not divisible). Multi-process
(gloo): at TP=1 with ETP=2 (world 2; world 4 with EP=2 and with PP=2) the training-mode logits
match transformers' and both weight gathers reproduce the HF state dict exactly; one DAPO step
matches EP1's (loss, grad norm, updated weights, moe/* statistics); a converted checkpoint loads
at ETP2 and the checkpoint saved there exports to exactly the live gather; routing replay gives the
rollout's log-probs. Measured differences are printed with ``pytest -s`` (``[measured]``).
"""

import pytest
import torch
from distributed_harness import run_distributed
from moe_cases import TINY_MOE, make_tiny_moe
from moe_etp_cases import etp_layouts_case
from weights_cases import from_bytes, hf_logits

from dapo_megatron.config import ConfigError, ModelConfig, ParallelConfig
from dapo_megatron.megatron.model import model_spec_from_hf, transformer_config
from dapo_megatron.parallel.topology import Topology

LOGITS_ATOL = 1e-5
TOKENS = torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(0))
HF = {"model_type": "qwen3_moe", "torch_dtype": "float32", **TINY_MOE}
DENSE = {k: v for k, v in HF.items() if k not in ("num_experts", "num_experts_per_tok", "moe_intermediate_size")}
DENSE["model_type"] = "qwen3"


def test_expert_tensor_defaults_to_tensor_and_follows_megatrons_world_rule():
    assert Topology(4, tp=2).etp == 2 and Topology(4, tp=2, etp=1).etp == 1
    assert Topology(2, etp=2).describe() == "world=2 tp=1 pp=1 vpp=1 cp=1 ep=1 etp=2 dp=2"
    assert Topology.from_config(ParallelConfig(expert=2, expert_tensor=2), 4) == Topology(4, ep=2, etp=2)
    with pytest.raises(ValueError, match=r"not divisible by etp\*ep\*pp = 2\*2\*1 = 4"):
        Topology(6, ep=2, etp=2)
    with pytest.raises(ValueError, match=r"Topology\.etp must be an integer >= 1"):
        Topology(2, etp=-1)
    assert ParallelConfig().expert_tensor == 0
    ParallelConfig(world_size=8, tensor=2, expert=2, expert_tensor=4)  # 4*2*1 divides 8
    ParallelConfig(world_size=12, tensor=2, pipeline=2, expert=3)  # 0 -> etp = tensor: 2*3*2 divides 12
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor: 6 ranks cannot hold .* = 4\*3\*1 = 12"):
        ParallelConfig(world_size=6, expert=3, expert_tensor=4)
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor: 8 ranks cannot hold .* = 2\*2\*4 = 16"):
        ParallelConfig(world_size=8, pipeline=4, expert=2, expert_tensor=2)
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor: must be >= 0"):
        ParallelConfig(expert_tensor=-1)


def test_model_build_refuses_expert_tensor_on_dense_models_and_uneven_experts():
    cfg = ModelConfig(transformer_impl="local")
    tc = transformer_config(model_spec_from_hf(HF), Topology(2, etp=2), cfg)
    assert (tc.expert_tensor_parallel_size, tc.tensor_model_parallel_size) == (2, 1)
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor: 3 ranks cannot split .*moe_intermediate_size=32"):
        transformer_config(model_spec_from_hf(HF), Topology(3, etp=3), cfg)
    with pytest.raises(ConfigError, match=r"parallel.expert_tensor: 2 splits routed experts, but this model is dense"):
        transformer_config(model_spec_from_hf(DENSE), Topology(2, etp=2), cfg)
    assert transformer_config(model_spec_from_hf(DENSE), Topology(2, tp=2), cfg).expert_tensor_parallel_size == 2


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("moe_etp") / "model")
    return folder, make_tiny_moe(folder, seed=1, norm_topk_prob=True)


def _check_run(per_rank, k, want, state, where):
    """Every last-stage rank's logits match HF on its own rows and length; both gathers exact."""
    last = [r[k] for r in per_rank if r[k]["logits"] is not None]
    assert {o["etp"] for o in (r[k] for r in per_rank)} == {2}, where
    assert len({(tuple(o["rows"].tolist()), o["length"]) for o in last}) == len(last) > 1, where
    diffs = [(o["logits"] - want[o["rows"], : o["length"]]).abs().max().item() for o in last]
    print(f"\n[measured] {where}: max |logit diff| vs transformers {max(diffs):.2e}")
    for o, diff in zip(last, diffs):
        assert diff < LOGITS_ATOL, f"{where} rows {o['rows'].tolist()}: max |logit diff| {diff:.2e}"
    got = per_rank[0][k]["rank0"]
    assert sorted(got) == sorted(state), f"{where}: rank-0 gather names differ"
    assert all(torch.equal(got[n], state[n]) for n in state), f"{where}: rank-0 gather differs"
    merged: dict = {}
    for r in per_rank:
        assert not set(r[k]["stage"]) & set(merged), f"{where}: a tensor was sent twice"
        merged.update(r[k]["stage"])
    assert sorted(merged) == sorted(state), f"{where}: stage gather names differ"
    assert all(torch.equal(merged[n], state[n]) for n in state), f"{where}: stage gather differs"


@pytest.mark.multiproc
def test_world2_tp1_etp2_matches_transformers_and_gathers_exactly(model):
    folder, state = model
    runs = run_distributed(etp_layouts_case, 2, folder, [(1, 1, 1, 2)], TOKENS, timeout_s=600)
    per_rank = [from_bytes(b) for b in runs]
    _check_run(per_rank, 0, hf_logits(folder, TOKENS), state, "tp=1 etp=2 ep=1")
    # the expert-TP pair shares one copy of the experts: only its rank 0 sends them
    assert [(r[0]["role"].leader, r[0]["role"].ep_rank) for r in per_rank] == [(True, 0), (False, 0)]


@pytest.mark.multiproc
def test_world4_etp2_with_ep2_and_with_pp2_matches_transformers(model):
    folder, state = model
    layouts = [(1, 1, 2, 2), (1, 2, 1, 2)]
    runs = run_distributed(etp_layouts_case, 4, folder, layouts, TOKENS, timeout_s=900)
    per_rank = [from_bytes(b) for b in runs]
    want = hf_logits(folder, TOKENS)
    for k, (tp, pp, ep, etp) in enumerate(layouts):
        _check_run(per_rank, k, want, state, f"tp={tp} pp={pp} ep={ep} etp={etp}")
    # EP2 x ETP2: one sender per EP rank (its expert-TP rank 0), each sending only its own experts
    assert [(r[0]["role"].leader, r[0]["role"].ep_rank) for r in per_rank] == [
        (True, 0), (False, 0), (True, 1), (False, 1)
    ]  # fmt: skip
    assert per_rank[2][0]["stage"] and all(".experts.2." in n or ".experts.3." in n for n in per_rank[2][0]["stage"])


@pytest.mark.multiproc
@pytest.mark.parametrize("world,ep", [(2, 1), (4, 2)])
def test_dapo_step_at_etp2_matches_ep1(model, world, ep):
    """One DAPO step (aux loss on; and with a capacity factor) at TP1 x ETP2 (x EP2 at world 4) gives
    EP1's loss, grad norm, updated weights and moe/* statistics (test_moe_train's tolerances)."""
    import moe_train_cases as C
    from moe_etp_cases import train_etp, train_world1
    from test_moe_train import LOSS_ABS_TOL, STAT_TOL, TOL, _rel, _report, _weights_rel

    folder, _ = model
    w1 = run_distributed(train_world1, 1, folder, timeout_s=600)[0]
    runs = run_distributed(train_etp, world, folder, w1["batch"], ep, timeout_s=900)
    keys = ("loss", "grad_norm", *C.MOE_KEYS)
    for name, ref_name in (("etp2", "ep1"), ("etp2_cap", "ep1_cap")):
        ref, got = w1[ref_name], runs[0][name]
        for r in runs[1:]:
            assert [r[name]["metrics"][k] for k in keys] == [got["metrics"][k] for k in keys], name
        m, mr = got["metrics"], ref["metrics"]
        loss_abs, gn_rel = abs(m["loss"] - mr["loss"]), _rel(m["grad_norm"], mr["grad_norm"])
        w_rel, upd_rel = _weights_rel(got["w_after"], ref["w_after"], w1["w_init"])
        stats = max(abs(m[k] - mr[k]) for k in C.MOE_KEYS)
        _report(f"world {world} ep {ep} {name} vs {ref_name}", f"loss abs {loss_abs:.2e}, grad_norm rel {gn_rel:.2e}, "
                f"weights rel {w_rel:.2e}, update rel {upd_rel:.2e}, moe stats max abs {stats:.2e}")  # fmt: skip
        assert m["updates"] == 1 and m["skipped_updates"] == 0 and m["num_tokens"] == mr["num_tokens"]
        assert loss_abs <= LOSS_ABS_TOL and gn_rel <= TOL and w_rel <= TOL and upd_rel <= TOL, name
        assert stats <= STAT_TOL and torch.equal(got["last"]["counts"], ref["last"]["counts"]), name


@pytest.mark.multiproc
@pytest.mark.parametrize("world,ep", [(2, 1), (4, 2)])
def test_etp2_loads_a_conversion_and_its_checkpoint_exports_to_the_live_gather(tmp_path, world, ep):
    """The converted (EP1, ETP1) checkpoint loads strictly at TP1 x ETP2 (x EP2 at world 4) with the
    source's logits; after a weight change, the checkpoint saved there has the converter's keys and
    global shapes and exports to exactly the live gather, and transformers on the export gives the
    trainer's logits."""
    from megatron.core import dist_checkpointing
    from moe_etp_cases import etp_checkpoint_case
    from test_moe_convert import TOKENS as CONVERT_TOKENS
    from test_moe_convert import _check_equal
    from weights_cases import hf_state_dict, run_tool

    paths = {k: str(tmp_path / k) for k in ("hf", "ckpt", "saved", "export")}
    state = make_tiny_moe(paths["hf"], seed=3, norm_topk_prob=True)
    done = run_tool("convert_hf_to_megatron.py", "--hf-dir", paths["hf"], "--out", paths["ckpt"])
    assert done.returncode == 0, done.stderr[-3000:]
    args = (paths["hf"], paths["ckpt"], paths["saved"], CONVERT_TOKENS, ep)
    ranks = [from_bytes(b) for b in run_distributed(etp_checkpoint_case, world, *args, timeout_s=600)]
    want = hf_logits(paths["hf"], CONVERT_TOKENS)
    assert len(ranks) == world
    for r in ranks:
        assert (r["loaded"] - want).abs().max().item() < LOGITS_ATOL
    gathered = ranks[0]["gathered"]
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert not torch.equal(gathered[name], state[name])
    shapes, converted_shapes = (
        {k: tuple(v.global_shape) for k, v in dist_checkpointing.load_tensors_metadata(c).items()}
        for c in (paths["saved"], paths["ckpt"])
    )
    assert shapes == converted_shapes
    done = run_tool(
        "convert_megatron_to_hf.py", "--ckpt", paths["saved"], "--hf-dir", paths["hf"], "--out", paths["export"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _check_equal(hf_state_dict(paths["export"]), gathered, "export of the ETP2 checkpoint")
    got = hf_logits(paths["export"], CONVERT_TOKENS)
    for r in ranks:
        assert (got - r["trained"]).abs().max().item() < LOGITS_ATOL


@pytest.mark.multiproc
def test_routing_replay_at_etp2_gives_the_rollouts_logprobs(tmp_path):
    """Routing replay (R3) at TP1 x ETP2 on a near-tie router: each rank's replayed log-probs are the
    rollout's (HF forced to the rollout's experts), its free-routed ones are not."""
    from moe_cases import hf_forced_logits, hf_rollout, make_near_tie_moe
    from moe_etp_cases import etp_replay_case
    from test_moe_replay import TOKENS as REPLAY_TOKENS
    from test_moe_replay import _logprobs

    folder = str(tmp_path / "near_tie")
    make_near_tie_moe(folder, gap=1e-3)
    ids = hf_rollout(folder, REPLAY_TOKENS, torch.bfloat16)
    want = _logprobs(hf_forced_logits(folder, REPLAY_TOKENS, ids), REPLAY_TOKENS)
    for r in (from_bytes(b) for b in run_distributed(etp_replay_case, 2, folder, REPLAY_TOKENS, ids, timeout_s=600)):
        gaps = {k: (_logprobs(r[k], REPLAY_TOKENS) - want).abs().max().item() for k in ("free", "replayed")}
        print(f"\n[measured] ETP2 routing replay, max |logprob - rollout logprob|: {gaps}")
        assert gaps["replayed"] < 1e-5 and gaps["free"] > 1e-3, gaps
