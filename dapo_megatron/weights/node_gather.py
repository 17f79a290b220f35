"""Every layer on a per-node sender: its own stage by TP all-gather, the others over its pipeline group.

The gathering side of the per-node colocated sync (:mod:`dapo_megatron.controller.node_senders` says
who sends to which server and why). A rank's :class:`~dapo_megatron.controller.node_senders.NodeRole`
says whether its replica gathers, whether its pipeline group relays and whether it emits.

With relaying (PP > 1) the stages go in order. During stage ``s``, the member of stage ``s`` in each
relaying pipeline group converts its stage's tensors and broadcasts them bucket by bucket over that
group with the update groups' bucket format (:class:`~dapo_megatron.weights.transports.BroadcastSender`:
a header of names, dtypes and shapes, then each tensor), closed by an empty bucket. The
other members receive into fresh tensors on the model's device (NCCL on GPUs, gloo on CPU). Every rank
walks the stages in the same order and a stage's TP all-gathers involve only that stage's ranks, so
nothing waits in a cycle. Peak extra memory on a member: one bucket.
"""

from __future__ import annotations

from typing import Any, Iterator, List, Tuple

from torch import Tensor

from dapo_megatron.weights.reshard import _Groups, bucketize
from dapo_megatron.weights.stage_gather import iter_stage_hf_weights
from dapo_megatron.weights.transports import BroadcastReceiver, BroadcastSender

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
    from megatron.core import parallel_state as ps

    group, device = ps.get_pipeline_model_parallel_group(), next(model_chunks[0].parameters()).device
    for stage in range(g.pp):
        src = g.stage_ranks[stage]
        if stage == g.pp_rank:
            sender = BroadcastSender(group, device, src)
            for bucket in bucketize(own, bucket_bytes):
                sender.send_bucket(bucket, version=0)
                if role.emits:
                    yield bucket
            sender.send_bucket([], version=0)  # the end of this stage
            continue
        receiver = BroadcastReceiver(group, device, src)
        while bucket := receiver.recv_bucket()[0]:
            if role.emits:
                yield bucket
