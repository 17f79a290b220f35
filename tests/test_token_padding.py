"""FP8 / sequence-parallel column padding of micro-batches (``megatron/token_padding.py``).

The pure checks pin the multiples (against megatron-core's own FP8 table) and the padded shapes and
masks. The multi-process check runs the real CPU actor with the padding the FP8 path applies and
compares its log-probs, loss, token counts and update with the unpadded run. Measured differences
print with ``[measured]`` (``pytest -s``).
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from dapo_megatron.algo.policy_loss import aggregate_loss, policy_loss
from dapo_megatron.megatron.batching import DUMMY_ROW, MicroBatch, make_microbatch, sequence_lengths
from dapo_megatron.megatron.token_padding import fp8_align_size, pad_for_schedule, round_up, sequence_multiple
from tests import actor_cases as C


def _microbatches() -> list:
    batch = C.make_batch()
    lengths = sequence_lengths(batch)
    old = C.with_old_logprobs(batch, batch.rollout_logprobs).old_logprobs
    return [make_microbatch(batch, rows, lengths, old) for rows in ([0, 1, 2], [3], [4, 5, 6, 7])]


def test_sequence_multiple_table():
    assert sequence_multiple(fp8=None, fp8_recipe="delayed", sequence_parallel=False, tp=8) == 1
    assert sequence_multiple(fp8=None, fp8_recipe="delayed", sequence_parallel=True, tp=4) == 4
    assert sequence_multiple(fp8="e4m3", fp8_recipe="delayed", sequence_parallel=False, tp=8) == 16
    assert sequence_multiple(fp8="hybrid", fp8_recipe="blockwise", sequence_parallel=True, tp=2) == 32
    assert sequence_multiple(fp8="e4m3", fp8_recipe="mxfp8", sequence_parallel=True, tp=4) == 128
    with pytest.raises(ValueError, match="tp must be >= 1"):
        sequence_multiple(fp8=None, fp8_recipe="delayed", sequence_parallel=False, tp=0)
    assert [round_up(n, 16) for n in (1, 16, 17, 32)] == [16, 16, 32, 32]


def test_fp8_alignment_matches_megatron_core():
    """Our table (no megatron import at config time) equals megatron-core's for every recipe we allow."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    for recipe in ("delayed", "tensorwise", "blockwise", "mxfp8"):
        assert fp8_align_size(recipe) == get_fp8_align_size(Fp8Recipe(recipe)), recipe


def test_pad_for_schedule_shapes_and_zeros():
    mbs = _microbatches()
    padded = pad_for_schedule(mbs, multiple=16)
    for mb, p in zip(mbs, padded):
        b, t = mb.tokens.shape
        assert p.tokens.shape == (b, round_up(t, 16)) and p.tokens.shape[1] % 16 == 0
        for name in MicroBatch.__dataclass_fields__:
            if name == "rows":
                assert torch.equal(p.rows, mb.rows)
                continue
            x, y = getattr(mb, name), getattr(p, name)
            if x is None:  # optional (routed experts: MoE with routing replay only)
                assert y is None, name
                continue
            assert y.dtype == x.dtype and torch.equal(y[:, :t], x), name
            assert not y[:, t:].any(), name  # padding is 0: loss mask 0, token 0, advantage 0
    same = pad_for_schedule(mbs, multiple=16, same_shape=True)  # the interleaved schedule's one shape
    assert {tuple(p.tokens.shape) for p in same} == {(4, 32)}
    assert same[1].rows.tolist() == [3, DUMMY_ROW, DUMMY_ROW, DUMMY_ROW] and not same[1].loss_mask[1:].any()
    aligned = pad_for_schedule(padded, multiple=16)
    assert all(a is p for a, p in zip(aligned, padded))  # nothing to do: no copy


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_masked_loss_and_counts_ignore_padding(mode):
    """The DAPO loss of a micro-batch and its masked sums are unchanged by the padding columns.

    The log-probs of the padded columns are set to garbage (they are whatever the model says for
    token 0): the mask must remove them. Equality is exact: the masked terms are +0.0.
    """
    mb = _microbatches()[0]
    (p,) = pad_for_schedule([mb], multiple=16)
    t = mb.tokens.shape[1]
    g = torch.Generator().manual_seed(3)
    lp = mb.old_logprobs + 0.1 * torch.randn(mb.old_logprobs.shape, generator=g)
    lp_padded = torch.cat([lp, -5.0 - torch.rand((lp.shape[0], p.tokens.shape[1] - t), generator=g)], dim=1)
    kw = dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=3.0, log_ratio_clamp=20.0, tis_weights=None)
    agg = dict(mode=mode, global_num_tokens=float(mb.loss_mask.sum()), global_num_seqs=3.0, max_response_len=24)
    per_tok, stats = policy_loss(lp, mb.old_logprobs, mb.advantages, mb.loss_mask, **kw)
    per_tok_p, stats_p = policy_loss(lp_padded, p.old_logprobs, p.advantages, p.loss_mask, **kw)
    loss, loss_p = aggregate_loss(per_tok, mb.loss_mask, **agg), aggregate_loss(per_tok_p, p.loss_mask, **agg)
    assert torch.equal(loss, loss_p)
    assert stats.keys() == stats_p.keys()
    for key in stats:
        assert torch.equal(stats[key], stats_p[key]), key
    assert float((p.loss_mask != 0).sum()) == float((mb.loss_mask != 0).sum())


@pytest.mark.multiproc
def test_actor_update_with_fp8_padding_equals_unpadded():
    """The real CPU actor with every micro-batch padded to a multiple of 16 (the FP8 multiple) or 7:
    same log-probs, loss, token count, clip fractions, grad norm and next log-probs as unpadded.

    Held to the micro-batch-split tolerance of the invariance tests: padding changes the GEMM and
    attention shapes, so BLAS may sum in another order (the measured difference is printed).
    """
    from tests.distributed_harness import run_distributed
    from tests.padding_cases import MULTIPLES, padded_updates
    from tests.test_actor_invariance import MB_TOL

    (res,) = run_distributed(padded_updates, 1, 1, 1, timeout_s=600)
    ref = res[1]
    mask = res["batch"].loss_mask != 0
    assert max(sequence_lengths(res["batch"])) % 16 and max(sequence_lengths(res["batch"])) % 7  # really padded
    for multiple in MULTIPLES[1:]:
        got = res[multiple]
        m, r = got["metrics"], ref["metrics"]
        lp_abs = float((got["lp"] - ref["lp"])[mask].abs().max())
        after_abs = float((got["lp_after"] - ref["lp_after"])[mask].abs().max())
        bitwise = torch.equal(got["lp"], ref["lp"]) and torch.equal(got["lp_after"], ref["lp_after"])
        loss_abs, gn_rel = abs(m["loss"] - r["loss"]), C.scalar_rel(m["grad_norm"], r["grad_norm"])
        C.report(f"padding x{multiple}", f"bitwise {bitwise}; logprob abs {lp_abs:.2e}, after update {after_abs:.2e}, "
                 f"loss abs {loss_abs:.2e}, grad_norm rel {gn_rel:.2e}")  # fmt: skip
        assert m["num_tokens"] == r["num_tokens"] == float(mask.sum())
        assert m["clip_frac_high"] == r["clip_frac_high"] and m["clip_frac_low"] == r["clip_frac_low"]
        assert m["skipped_updates"] == 0
        assert lp_abs <= MB_TOL and after_abs <= MB_TOL
        assert loss_abs <= MB_TOL and gn_rel <= MB_TOL
    moved = float((ref["lp_after"] - ref["lp"])[mask].abs().max())
    assert moved > 1e-3  # the update did something the comparison can see


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
    reason="needs CUDA and Transformer Engine (FP8)",
)
def test_fp8_update_runs_on_padded_microbatches(tmp_path):
    """FP8 (e4m3, TE) on one GPU: the test batch's micro-batches (lengths not multiples of 16) are
    padded to 16, so TE's FP8 GEMMs accept them; token counts equal the bf16 run's and the log-probs
    after the update stay near the bf16 ones (FP8 rounding, not a different objective)."""
    from tests.distributed_harness import run_distributed
    from tests.padding_cases import fp8_vs_bf16

    (res,) = run_distributed(fp8_vs_bf16, 1, str(tmp_path), timeout_s=600)
    bf16, fp8 = res[None], res["e4m3"]
    mask = res["batch"].loss_mask != 0
    assert bf16["multiple"] == 1 and fp8["multiple"] == 16
    assert fp8["metrics"]["num_tokens"] == bf16["metrics"]["num_tokens"] == float(mask.sum())
    assert fp8["metrics"]["skipped_updates"] == 0 and math.isfinite(fp8["metrics"]["loss"])
    mean_abs = float((fp8["lp"] - bf16["lp"])[mask].abs().mean())
    C.report("fp8 vs bf16 log-probs after one update (GPU)", f"mean abs {mean_abs:.2e}")
    assert mean_abs <= 0.1
