"""The one loss-scaling rule, and the megatron-core behaviour it relies on (pinned here)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dapo_megatron.megatron.loss_scaling import CALCULATE_PER_TOKEN_LOSS, loss_scale_factor, scale_loss


def test_factor_cancels_microbatch_and_dp_averaging():
    assert loss_scale_factor(1, 1) == 1.0
    assert loss_scale_factor(4, 2) == 8.0
    assert loss_scale_factor(4, 2, cp_size=2) == 8.0  # the schedule's x cp and DDP's / (dp*cp) cancel
    assert float(scale_loss(torch.tensor(0.5), 3, 2)) == 3.0
    with pytest.raises(ValueError, match="num_microbatches=0"):
        loss_scale_factor(0, 1)


@pytest.mark.parametrize("num_microbatches,cp", [(1, 1), (4, 1), (3, 2)])
def test_schedule_divides_a_two_tuple_loss_by_microbatches_times_cp(num_microbatches, cp):
    """megatron-core's forward_step_calc_loss: 2-tuple loss -> loss * cp / M is back-propagated."""
    from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss

    config = SimpleNamespace(calculate_per_token_loss=CALCULATE_PER_TOKEN_LOSS, timers=None)
    store: list = []
    f = loss_scale_factor(num_microbatches, dp_size=2, cp_size=cp)
    out, _ = forward_step_calc_loss(
        model=None,
        output_tensor=torch.tensor(0.25),
        loss_func=lambda x: (scale_loss(x, num_microbatches, 2, cp), {"raw": x}),
        config=config,
        vp_stage=None,
        collect_non_loss_data=False,
        num_microbatches=num_microbatches,
        forward_data_store=store,
        cp_group_size=cp,
        is_last_stage=True,
    )
    # back-propagated value = raw * f * cp / M = raw * dp * cp; DDP then scales grads by 1/(dp*cp).
    assert float(out) == pytest.approx(0.25 * f * cp / num_microbatches)
    assert float(out) / (2 * cp) == pytest.approx(0.25)
    assert store == [{"raw": torch.tensor(0.25)}]


def test_ddp_scales_grads_by_one_over_dp_without_per_token_loss():
    """The DDP side of the rule, read from the installed source (exercised end to end at DP2)."""
    import inspect

    from megatron.core.distributed import distributed_data_parallel

    src = inspect.getsource(distributed_data_parallel.DistributedDataParallel.__init__)
    assert "gradient_scaling_factor = 1.0 / data_parallel_world_size" in src
    assert "if config.calculate_per_token_loss:" in src
