"""Uneven first-dimension gathers and reduce-scatters for megatron's MoE dispatcher on gloo.

With expert tensor parallelism (ETP > 1) megatron's alltoall dispatcher all-gathers the tokens of
the expert-TP group before the split expert MLPs and reduce-scatters the outputs after
(``token_dispatcher.py``, ``dispatch_postprocess`` / ``combine_preprocess``). Each rank of the
group brings its own number of tokens (expert parallelism, different sequence lengths per
data-parallel rank, token dropping), so megatron passes per-rank split sizes and calls
``torch.distributed.all_gather`` / ``reduce_scatter`` with unequal tensors. NCCL takes those; gloo
refuses unequal all-gathers ("invalid tensor size") and has no unequal reduce-scatter.

:func:`install` (CPU only) wraps ``megatron.core.tensor_parallel.mappings``'
``_gather_along_first_dim`` and ``_reduce_scatter_along_first_dim``, which every autograd
function of that module looks up at call time: calls with split sizes go through equal-size
collectives, calls without them go to megatron's own function unchanged. Same values, same
autograd (the wrapped functions are the forward/backward bodies of megatron's
``torch.autograd.Function`` classes).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

_ORIGINALS: dict = {}


def install() -> None:
    """Route megatron's uneven first-dimension collectives through gloo-safe ones (idempotent)."""
    from megatron.core.tensor_parallel import mappings

    if _ORIGINALS:
        return
    _ORIGINALS["gather"] = mappings._gather_along_first_dim
    _ORIGINALS["reduce_scatter"] = mappings._reduce_scatter_along_first_dim
    mappings._gather_along_first_dim = _gather_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_first_dim


def _gather_first_dim(
    input_: torch.Tensor,
    group: Any,
    output_split_sizes: Optional[Sequence[int]] = None,
    use_global_buffer: bool = False,
) -> torch.Tensor:
    """``[n_r, ...]`` on rank ``r`` -> ``[sum(n), ...]`` on every rank, in rank order.

    Uneven sizes: every rank pads its rows to ``max(n)``, the padded blocks are gathered with an
    equal-size ``all_gather``, and each block is cut back to its ``n_r`` rows.
    """
    original: Callable = _ORIGINALS["gather"]
    if output_split_sizes is None or group.size() == 1:
        return original(input_, group, output_split_sizes, use_global_buffer)
    import torch.distributed as dist

    sizes = [int(n) for n in output_split_sizes]
    rows = max(sizes)
    padded = input_.new_zeros((rows, *input_.shape[1:]))
    padded[: input_.shape[0]] = input_
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded.contiguous(), group=group)
    return torch.cat([block[:n] for block, n in zip(blocks, sizes)], dim=0)


def _reduce_scatter_first_dim(
    input_: torch.Tensor, group: Any, input_split_sizes: Optional[Sequence[int]] = None, use_global_buffer: bool = False
) -> torch.Tensor:
    """``[sum(n), ...]`` on every rank (same ``n`` everywhere) -> rank ``r``'s rows ``[n_r, ...]``
    of the sum over the group.

    Uneven sizes: an ``all_reduce`` of the whole tensor, then this rank's slice (the other ranks'
    rows are summed for nothing; on CPU, correctness over bandwidth).
    """
    original: Callable = _ORIGINALS["reduce_scatter"]
    if input_split_sizes is None or group.size() == 1:
        return original(input_, group, input_split_sizes, use_global_buffer)
    import torch.distributed as dist

    total = input_.contiguous().clone()
    dist.all_reduce(total, group=group)
    sizes = [int(n) for n in input_split_sizes]
    start = sum(sizes[: group.rank()])
    return total[start : start + sizes[group.rank()]].contiguous()
