"""The step dispatch as it was before DP sharding, kept in tests only as the reference.

Before, rank 0 broadcast the whole ``[B, T]`` batch to every rank (:func:`broadcast_batch`); every
rank recomputed old log-probs on its DP rows of a separate whole-batch plan and all-reduced the full
``[B, T]`` over DP and PP (``MegatronActor.compute_logprobs``); then every rank planned its own
mini-batches (:func:`reference_train_step`). The DP-sharded path must give bitwise the same
losses, grad norms and weights wherever the old-log-prob micro-batches are the same ones (see
``tests/test_dispatch.py``).
"""

from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple

import torch

from dapo_megatron.types import TrainBatch

_FIELDS = ("tokens", "loss_mask", "advantages", "rollout_logprobs", "seq_group", "old_logprobs")


def broadcast_batch(batch: Optional[TrainBatch], src: int = 0, group=None) -> Tuple[TrainBatch, int]:
    """The former world broadcast: ``(batch on every rank, bytes this rank received)``.

    Shapes and dtypes travel first as one object (its size tensor and pickle counted), then one
    ``broadcast`` per tensor. ``src`` counts 0 received bytes.
    """
    import pickle

    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return batch, 0
    is_src = dist.get_rank() == src
    meta = [None]
    if is_src:
        meta[0] = {name: (tuple(v.shape), v.dtype) for name in _FIELDS if (v := getattr(batch, name)) is not None}
    dist.broadcast_object_list(meta, src=src, group=group)
    received = 0 if is_src else 8 + len(pickle.dumps(meta[0]))
    tensors = {}
    for name in _FIELDS:
        if name not in meta[0]:
            continue
        shape, dtype = meta[0][name]
        t = getattr(batch, name).contiguous() if is_src else torch.empty(shape, dtype=dtype)
        dist.broadcast(t, src=src, group=group)
        received += 0 if is_src else t.numel() * t.element_size()
        tensors[name] = t
    return (batch if is_src else TrainBatch(**tensors)), received


def reference_train_step(actor, batch: TrainBatch, *, temperature: float) -> Dict[str, float]:
    """``MegatronActor.train_step`` as it was: whole-batch old-log-prob pass, all-reduced ``[B, T]``,
    then each rank plans its own mini-batches from the full batch."""
    from dapo_megatron.megatron.actor import summarize_updates

    if actor.algo_cfg.use_rollout_logprobs:
        old = batch.rollout_logprobs
    elif batch.old_logprobs is not None:
        old = batch.old_logprobs
    else:
        old = actor.compute_logprobs(batch, temperature=temperature)
    plans = actor._plans(batch, old, actor.train_cfg.ppo_mini_batch_size)
    updates, times = [], {}
    for _ in range(actor.train_cfg.ppo_epochs):
        for plan in plans:
            make = partial(actor._policy_loss_func, plan=plan, temperature=temperature)
            updates.append(actor._update(plan, make, times))
    return summarize_updates(updates, float((batch.loss_mask != 0).sum()))
