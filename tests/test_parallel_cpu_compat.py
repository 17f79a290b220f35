"""The CPU compatibility layer for megatron-core.

Patching is process-wide, so behaviour is checked in a fresh spawned process (world size 1).
"""

import inspect

import torch

from tests.distributed_harness import run_distributed


def test_private_autograd_internals_still_exist():
    # The backward re-entry in cpu_compat calls these directly; a torch upgrade that moves or changes
    # them must fail here rather than silently run backward passes without the mode.
    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    assert callable(_tensor_or_tensors_to_tuple)
    assert list(inspect.signature(_make_grads).parameters) == ["outputs", "grads", "is_grads_batched"]
    params = inspect.signature(_engine_run_backward).parameters
    assert list(params)[0] == "t_outputs"
    assert inspect.signature(torch.Tensor.backward).parameters.keys() == {
        "self",
        "gradient",
        "retain_graph",
        "create_graph",
        "inputs",
    }
    # Exercise the exact call the layer makes.
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    grads = _make_grads((y,), _tensor_or_tensors_to_tuple(None, 1), is_grads_batched=False)
    _engine_run_backward((y,), grads, False, False, (), allow_unreachable=True, accumulate_grad=True)
    assert torch.equal(x.grad, torch.tensor([2.0, 4.0]))


def test_megatron_patch_targets_exist():
    import megatron.core.tensor_parallel.random as mrandom

    for name in (
        "_get_cuda_rng_state",
        "_set_cuda_rng_state",
        "get_cuda_rng_tracker",
        "model_parallel_cuda_manual_seed",
    ):
        assert hasattr(mrandom, name), name


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    """Backward builds a tensor on device='cuda', as megatron's recompute path does."""

    @staticmethod
    def forward(ctx, x):
        return x * 3.0

    @staticmethod
    def backward(ctx, grad):
        return grad * torch.full(grad.shape, 5.0, device="cuda")


def _compat_probe(rank, world_size):
    from dapo_megatron.parallel.cpu_compat import apply_cpu_compat, is_cpu_compat_applied, needs_cpu_compat

    assert needs_cpu_compat()
    assert not is_cpu_compat_applied()
    apply_cpu_compat()
    apply_cpu_compat()  # idempotent: still exactly one mode on the stack
    from torch.overrides import _get_current_function_mode_stack

    out = {"modes": len(_get_current_function_mode_stack()), "applied": is_cpu_compat_applied()}
    x = torch.ones(2)
    out["device_kw"] = str(torch.zeros(2, device="cuda").device)
    out["device_idx"] = str(torch.empty(2, device=torch.cuda.current_device()).device)
    out["cuda_is_self"] = x.cuda() is x
    out["to_cuda"] = str(x.to("cuda").device) + "," + str(x.to(torch.device("cuda:0")).device)
    out["type"] = x.type() + "," + torch.ones(1, dtype=torch.bfloat16).type()
    torch.cuda.synchronize()
    torch.cuda.current_stream().wait_stream(torch.cuda.default_stream())

    # CUDA RNG API drives the CPU generator.
    torch.cuda.manual_seed(7)
    a = torch.rand(3)
    state = torch.cuda.get_rng_state()
    b = torch.rand(3)
    torch.cuda.set_rng_state(state)
    out["rng_replay"] = torch.equal(torch.rand(3), b)
    torch.manual_seed(7)
    out["rng_is_cpu"] = torch.equal(torch.rand(3), a)

    # Backward re-enters the mode: both entry points, positional and keyword gradients.
    for call in ("tensor", "tensor_pos", "autograd"):
        w = torch.ones(2, requires_grad=True)
        y = _AllocatesOnCudaInBackward.apply(w)
        if call == "tensor":
            y.sum().backward()
        elif call == "tensor_pos":
            y.backward(torch.ones(2))
        else:
            torch.autograd.backward([y], grad_tensors=[torch.ones(2)])
        out[f"grad_{call}"] = w.grad.tolist()

    # megatron's RNG tracker forks CPU generator states.
    import megatron.core.tensor_parallel.random as mrandom

    mrandom.model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0)
    before = torch.get_rng_state()
    with mrandom.get_cuda_rng_tracker().fork():
        forked = torch.rand(2)
    out["fork_restores"] = torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(123 + 2718)
    out["fork_uses_tp_seed"] = torch.equal(torch.rand(2), forked)
    return out


def test_cpu_compat_behaviour_in_fresh_process():
    (out,) = run_distributed(_compat_probe, 1, timeout_s=120)
    assert out["modes"] == 1 and out["applied"]
    assert out["device_kw"] == "cpu" and out["device_idx"] == "cpu"
    assert out["cuda_is_self"]
    assert out["to_cuda"] == "cpu,cpu"
    assert out["type"] == "torch.cuda.FloatTensor,torch.cuda.BFloat16Tensor"
    assert out["rng_replay"] and out["rng_is_cpu"]
    # The hand-written backward (grad * 5, built on device="cuda") ran under the mode; without the
    # re-entry, torch.full(device="cuda") raises on a CPU-only torch.
    assert out["grad_tensor"] == [5.0, 5.0]
    assert out["grad_tensor_pos"] == [5.0, 5.0]
    assert out["grad_autograd"] == [5.0, 5.0]
    assert out["fork_restores"] and out["fork_uses_tp_seed"]
