"""init_distributed + init_model_parallel + shutdown on 2 gloo processes."""

import pytest

from tests.distributed_harness import run_distributed


def _init_tp2(rank, world_size):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from dapo_megatron.parallel.init import init_distributed, init_model_parallel, shutdown
    from dapo_megatron.parallel.topology import Topology

    env = init_distributed()
    try:
        init_distributed()
    except RuntimeError as err:
        double_init = str(err)
    init_model_parallel(Topology(world_size=world_size, tp=2), seed=11)
    out = {
        "env": (env.rank, env.world_size, env.local_rank),
        "backend": dist.get_backend(),
        "tp": (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()),
        "dp": ps.get_data_parallel_world_size(),
        "double_init": double_init,
    }
    with get_cuda_rng_tracker().fork():
        out["tp_random"] = torch.rand(1).item()
    out["dp_random"] = torch.rand(1).item()
    shutdown()
    out["after"] = (dist.is_initialized(), ps.model_parallel_is_initialized())
    shutdown()  # twice is fine
    return out


@pytest.mark.multiproc
def test_init_tp2_then_shutdown():
    r0, r1 = run_distributed(_init_tp2, 2, timeout_s=180)
    assert r0["env"] == (0, 2, 0) and r1["env"] == (1, 2, 1)
    assert r0["backend"] == "gloo"
    assert r0["tp"] == (2, 0) and r1["tp"] == (2, 1)
    assert r0["dp"] == 1
    assert "already exists" in r0["double_init"]
    # Model-parallel RNG differs per TP rank; the default (data-parallel) RNG is shared.
    assert r0["tp_random"] != r1["tp_random"]
    assert r0["dp_random"] == r1["dp_random"]
    assert r0["after"] == (False, False)
