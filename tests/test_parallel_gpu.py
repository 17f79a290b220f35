"""The device-split world on CUDA: ``cpu:gloo,cuda:nccl`` carries CPU objects and GPU tensors alike.

Before, CUDA meant plain NCCL, and every CPU object collective (the rank-0 error flags, the batch
metadata) failed with "No backend type associated with device type cpu". Here one world does a CPU
object broadcast, a CPU tensor all-reduce (gloo) and a CUDA all-reduce (NCCL), the same on one of
megatron's groups (which inherit the backend), and the step dispatch's payload travels and unpacks
on the GPU. One rank per GPU (NCCL refuses two ranks on one device): world 1 on a single GPU,
world 2 where there are two.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed_harness import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _device_split(rank: int, world: int) -> dict:
    import pickle

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from dapo_megatron.megatron.dispatch import _pack, _unpack, plan_step
    from dapo_megatron.parallel.init import init_distributed, init_model_parallel, shutdown
    from dapo_megatron.parallel.topology import Topology
    from tests.dispatch_cases import big_batch

    init_distributed(timeout_s=120)
    out = {"backend": dist.get_backend_config()}
    box = [{"from": "rank 0", "shape": (2, 3)}] if rank == 0 else [None]
    dist.broadcast_object_list(box, src=0)
    out["object"] = box[0]
    cpu = torch.full((3,), float(rank + 1))
    gpu = torch.full((3,), float(rank + 1), device="cuda")
    dist.all_reduce(cpu)
    dist.all_reduce(gpu)
    out["cpu_sum"], out["gpu_sum"], out["gpu_device"] = cpu.tolist(), gpu.cpu().tolist(), gpu.device.type
    init_model_parallel(Topology(world_size=world, tp=world), seed=1)
    tp = ps.get_tensor_model_parallel_group()
    on_group = [torch.ones(2), torch.ones(2, device="cuda")]
    for t in on_group:
        dist.all_reduce(t, group=tp)
    out["group_sums"] = [t.sum().item() for t in on_group]
    (shard,) = plan_step(big_batch(B=16, T=64), dp_size=1, prompts_per_update=4, micro_batch_size=2)
    meta, payload = _pack(shard, 0, torch.device("cuda"))
    got = _unpack(pickle.loads(meta), payload)
    out["wire_equal"] = all(
        torch.equal(getattr(a, f), getattr(b, f).cpu()) and getattr(b, f).device.type == "cuda"
        for a, b in zip(shard.microbatches, got.microbatches, strict=True)
        for f in ("tokens", "loss_mask", "advantages", "rollout_logprobs")
    )
    shutdown()
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_cpu_objects_and_cuda_tensors_share_one_world(world):
    if torch.cuda.device_count() < world:
        pytest.skip(f"world {world} needs {world} GPUs (one rank per GPU), {torch.cuda.device_count()} visible")
    results = run_distributed(_device_split, world, timeout_s=600)
    total = float(sum(range(1, world + 1)))
    for r in results:
        assert r["backend"] == "cpu:gloo,cuda:nccl"
        assert r["object"] == {"from": "rank 0", "shape": (2, 3)}
        assert r["cpu_sum"] == [total] * 3 and r["gpu_sum"] == [total] * 3 and r["gpu_device"] == "cuda"
        assert r["group_sums"] == [2.0 * world, 2.0 * world]
        assert r["wire_equal"]
