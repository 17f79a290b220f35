"""The memory planner against what megatron-core really allocates (CPU, gloo, 4 ranks).

The planner (``dapo_megatron.observability.memory_plan``) is pure arithmetic; here the same tiny model
is built as the project's actor at two layouts and the bytes it holds are counted tensor by tensor:
parameters, the DDP gradient buffers and Adam's state, after one real ``train_step``. Activations and
KV cache need a GPU allocator to measure and are not checked here.
"""

from __future__ import annotations

import pytest

from dapo_megatron.observability.memory_plan import Layout, Workload, plan_stage, shape_from_hf_config
from tests import actor_cases as C
from tests.distributed_harness import run_distributed

pytestmark = pytest.mark.multiproc

# (name, tp, pp, distributed optimizer); dp = 4 / (tp * pp)
LAYOUTS = [("tp2pp2", 2, 2, False), ("tp2dp2_distopt", 2, 1, True)]
# With the distributed optimizer megatron pads each gradient bucket so it splits evenly over DP; the
# planner does not model padding (measured here: 64 of 165,440 gradient elements, 0.04 %).
BUFFER_TOL = 0.01


def _state_bytes(actor) -> dict:
    """Parameters (count), gradient-buffer bytes and Adam moment bytes held by this rank."""
    params = sum(p.numel() for chunk in actor.model_chunks for p in chunk.parameters())
    grads = sum(
        buf.grad_data.numel() * buf.grad_data.element_size()
        for ddp in actor._ddp  # the DDP wrappers own the gradient buffers
        for buf in ddp.buffers + ddp.expert_parallel_buffers
    )
    megatron_optimizer = actor._opt.optimizer
    optimizers = getattr(megatron_optimizer, "chained_optimizers", [megatron_optimizer])
    moments = sum(
        t.numel() * t.element_size()
        for opt in optimizers
        for state in opt.optimizer.state.values()  # the torch Adam inside each megatron optimizer
        for key, t in state.items()
        if key in ("exp_avg", "exp_avg_sq")
    )
    return {"params": params, "grads": grads, "optimizer": moments}


def measure_layouts(rank: int, world: int) -> dict:
    """Rank function: per layout, this rank's pipeline stage and its measured state bytes."""
    from megatron.core import parallel_state

    from dapo_megatron.parallel.topology import Topology

    C.start()
    out = {}
    try:
        for name, tp, pp, distopt in LAYOUTS:
            actor = C.make_actor(Topology(world_size=world, tp=tp, pp=pp, vpp=1, cp=1, ep=1),
                                 distributed_optimizer=distopt)  # fmt: skip
            actor.train_step(C.make_batch(), temperature=C.TEMPERATURE)  # Adam's moments exist after a step
            out[name] = {"stage": parallel_state.get_pipeline_model_parallel_rank(), **_state_bytes(actor)}
            C.teardown()
    finally:
        C.finish()
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(measure_layouts, 4, timeout_s=600)


@pytest.mark.parametrize("name,tp,pp,distopt", LAYOUTS)
def test_planned_state_matches_megatron_allocation(measured, name, tp, pp, distopt):
    shape = shape_from_hf_config(C.TINY_HF)
    layout = Layout(tp=tp, pp=pp, dp=4 // (tp * pp), distributed_optimizer=distopt)
    work = Workload(seq_len=24, params_dtype="fp32")
    for rank, per_rank in enumerate(measured):
        got = per_rank[name]
        plan = plan_stage(shape, layout, work, got["stage"], overhead=0.0)
        where = f"{name} rank {rank} stage {got['stage']}"
        assert got["params"] * 4 == plan.params, f"{where}: parameters {got['params']} vs planned {plan.params / 4}"
        assert abs(got["grads"] / plan.grads - 1) <= BUFFER_TOL, f"{where}: grads {got['grads']} vs {plan.grads}"
        assert abs(got["optimizer"] / plan.optimizer - 1) <= BUFFER_TOL, (
            f"{where}: Adam moments {got['optimizer']} vs {plan.optimizer}"
        )
