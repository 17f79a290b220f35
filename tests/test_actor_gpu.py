"""The actor on CUDA + NCCL (one GPU): micro-batch invariance of one DAPO update in float32."""

from __future__ import annotations

import tempfile

import pytest
import torch

from tests import actor_cases as C

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_microbatch_invariance_on_cuda():
    from tests.distributed_harness import run_distributed

    with tempfile.TemporaryDirectory() as tmp:
        (res,) = run_distributed(C.gpu_case, 1, tmp, timeout_s=600)
    one, four = res["mb1"], res["mb4"]
    assert one["metrics"]["skipped_updates"] == 0 and one["metrics"]["clip_frac_high"] > 0
    w_rel, upd_rel = C.weights_rel_diff(four["w"], one["w"], res["w_init"])
    gn_rel = C.scalar_rel(four["metrics"]["grad_norm"], one["metrics"]["grad_norm"])
    loss_abs = abs(four["metrics"]["loss"] - one["metrics"]["loss"])
    C.report("cuda microbatch 4 vs 1", f"update rel {upd_rel:.2e}, weights rel {w_rel:.2e}, "
             f"grad_norm rel {gn_rel:.2e}, loss abs {loss_abs:.2e}")  # fmt: skip
    assert upd_rel <= 1e-5 and w_rel <= 1e-5 and gn_rel <= 1e-5 and loss_abs <= 1e-6
