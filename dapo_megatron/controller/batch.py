"""Turning scored prompt groups into the actor's padded :class:`~dapo_megatron.types.TrainBatch`.

Row order is deterministic: groups sorted by ``prompt_index``, samples in their group order. The
rollout engines complete groups in any order, so sorting here is what makes a resumed run see the
same batch, and hence the same update, as an uninterrupted one.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from dapo_megatron.algo import broadcast_to_tokens, group_advantages, overlong_filter_mask
from dapo_megatron.types import Group, Sample, TrainBatch


def build_train_batch(
    groups: Sequence[Group],
    *,
    pad_id: int,
    norm_adv_by_std: bool,
    adv_eps: float,
    overlong_filter: bool,
) -> TrainBatch:
    """Pack ``groups`` into right-padded ``[B, T]`` tensors (B = total samples, T = longest sequence).

    ``advantages`` come from each sample's shaped ``reward`` normalised within its group; rollout
    log-probs are placed at the target positions of the response tokens (see ``types.py``).
    With ``overlong_filter`` the truncated samples get loss mask 0. When the samples carry routed
    experts (``algo.routing_replay: rollout``) they become ``routed_experts`` ``[B, T, layers, k]``.
    """
    ordered = sorted(groups, key=lambda g: g.prompt_index)
    samples = [s for g in ordered for s in g.samples]
    if not samples:
        raise ValueError("build_train_batch: no samples to train on")
    seq_group = torch.tensor([i for i, g in enumerate(ordered) for _ in g.samples], dtype=torch.long)
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    tokens = torch.full((len(samples), width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(samples), width), dtype=torch.float32)
    rollout_lp = torch.zeros((len(samples), width), dtype=torch.float32)
    for row, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[row, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        loss_mask[row, p : p + r] = 1.0
        rollout_lp[row, p : p + r] = torch.tensor(s.response_logprobs, dtype=torch.float32)
    if overlong_filter:
        truncated = torch.tensor([s.truncated for s in samples], dtype=torch.bool)
        loss_mask = overlong_filter_mask(loss_mask, truncated)
    rewards = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    adv = group_advantages(rewards, seq_group, norm_by_std=norm_adv_by_std, eps=adv_eps)
    return TrainBatch(
        tokens=tokens,
        loss_mask=loss_mask,
        advantages=broadcast_to_tokens(adv, loss_mask),
        rollout_logprobs=rollout_lp,
        seq_group=seq_group,
        routed_experts=routed_experts_tensor(samples, width),
    )


def routed_experts_tensor(samples: Sequence[Sample], width: int) -> Optional[torch.Tensor]:
    """``[B, width, layers, k]`` int16 expert ids of the samples (row order), or None when no sample
    has routing. Positions without one (the last response token, padding) hold ``0..k-1``: valid,
    distinct ids (a router given one expert twice would drop a slot), whose outputs no loss reads."""
    first = next((s.routed_experts for s in samples if s.routed_experts), None)
    if first is None:
        return None
    layers, k = len(first[0]), len(first[0][0])
    out = torch.arange(k, dtype=torch.int16).expand(len(samples), width, layers, k).clone()
    for row, s in enumerate(samples):
        if not s.routed_experts:
            if s.response_ids:
                raise ValueError(f"build_train_batch: sample {row} has no routed experts while others do "
                                 "(algo.routing_replay=rollout needs them for every response)")  # fmt: skip
            continue
        ids = torch.tensor(s.routed_experts, dtype=torch.int16)
        if tuple(ids.shape[1:]) != (layers, k):
            raise ValueError(f"build_train_batch: sample {row} routes {tuple(ids.shape[1:])} (layers, k), "
                             f"sample 0 {(layers, k)}")  # fmt: skip
        out[row, : ids.shape[0]] = ids
    return out


def reward_metrics(groups: Sequence[Group]) -> dict:
    """Per-step reward and length statistics over every kept sample."""
    samples: List = [s for g in groups for s in g.samples]
    n = max(1, len(samples))
    lengths = [len(s.response_ids) for s in samples] or [0]
    return {
        "reward/mean": sum(s.reward for s in samples) / n,
        "reward/score_mean": sum(s.score for s in samples) / n,
        "reward/acc": sum(1.0 for s in samples if s.acc) / n,
        "response/len_mean": sum(lengths) / len(lengths),
        "response/len_max": float(max(lengths)),
        "response/truncation_rate": sum(1.0 for s in samples if s.truncated) / n,
    }
