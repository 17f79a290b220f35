"""Every layer on a per-node sender: its own stage by TP all-gather, the others over its pipeline group.

The gathering side of the per-node colocated sync (:mod:`dapo_megatron.controller.node_senders` says
who sends to which server and why). A rank's :class:`~dapo_megatron.controller.node_senders.NodeRole`
says whether its replica gathers, whether its pipeline group relays and whether it emits.

With relaying (PP > 1) the stages go in order. During stage ``s``, the member of stage ``s`` in each
relaying pipeline group converts its stage's tensors and broadcasts them bucket by bucket over that
group: a header (tensor names, dtypes, shapes) and then each tensor, closed by an empty header. The
other members receive into fresh tensors on the model's device (NCCL on GPUs, gloo on CPU). Every rank
walks the stages in the same order and a stage's TP all-gathers involve only that stage's ranks, so
nothing waits in a cycle. Peak extra memory on a member: one bucket.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, List, Tuple

import torch
from torch import Tensor

from dapo_megatron.weights.reshard import _Groups, bucketize, local_params
from dapo_megatron.weights.stage_gather import iter_stage_hf_weights
from dapo_megatron.weights.transports import dtype_name, dtype_of

Bucket = List[Tuple[str, Tensor]]


def iter_node_buckets(model_chunks: Any, spec: Any, topology: Any, role: Any, bucket_bytes: int) -> Iterator[Bucket]:
    """Collective over the gathering replicas (every rank must exhaust it): buckets of HF tensors
    covering the whole model, every stage's, on the ranks whose ``role.emits``; nothing elsewhere."""
    g = _Groups()
    keep = role.emits or role.relays  # a relay's own stage is sent to the group, so it converts too
    own = iter_stage_hf_weights(model_chunks, spec, topology, replica=(role.gathers, keep))
    if not role.relays:
        for bucket in bucketize(own, bucket_bytes):
            if role.emits:
                yield bucket
        return
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    group, device = ps.get_pipeline_model_parallel_group(), _model_device(model_chunks)
    for stage in range(g.pp):
        src = g.stage_ranks[stage]
        if stage == g.pp_rank:
            for bucket in bucketize(own, bucket_bytes):
                _send(bucket, src, group, device, dist)
                if role.emits:
                    yield bucket
            _send([], src, group, device, dist)  # the end of this stage
            continue
        while bucket := _receive(src, group, device, dist):
            if role.emits:
                yield bucket


def _model_device(model_chunks: Any) -> torch.device:
    params = local_params(model_chunks, 0)
    return next(iter(params.values())).device


def _send(bucket: Bucket, src: int, group: Any, device: torch.device, dist: Any) -> None:
    """Broadcast ``bucket`` from ``src``: the header's length, the header, then each tensor."""
    metas = [[name, dtype_name(t.dtype), list(t.shape)] for name, t in bucket]
    header = torch.frombuffer(bytearray(json.dumps(metas).encode()), dtype=torch.uint8).to(device)
    dist.broadcast(torch.tensor([header.numel()], dtype=torch.int64, device=device), src=src, group=group)
    dist.broadcast(header, src=src, group=group)
    for _, t in bucket:
        dist.broadcast(t.detach().to(device).contiguous(), src=src, group=group)


def _receive(src: int, group: Any, device: torch.device, dist: Any) -> Bucket:
    """What :func:`_send` broadcasts; an empty list ends the stage."""
    n = torch.empty(1, dtype=torch.int64, device=device)
    dist.broadcast(n, src=src, group=group)
    header = torch.empty(int(n.item()), dtype=torch.uint8, device=device)
    dist.broadcast(header, src=src, group=group)
    out = []
    for name, dtype, shape in json.loads(bytes(header.cpu().numpy()).decode()):
        t = torch.empty(tuple(shape), dtype=dtype_of(dtype), device=device)
        dist.broadcast(t, src=src, group=group)
        out.append((name, t))
    return out
