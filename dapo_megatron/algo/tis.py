"""Truncated importance sampling (TIS) between the rollout engine and the trainer.

The engine samples with its own kernels (and possibly lower precision), so its log-probs differ
slightly from the trainer's recomputed ``old_logprobs`` for the same weights. Weighting each
token's loss by ``min(pi_old / pi_rollout, cap)`` corrects the off-policy gap while the cap bounds
the variance. Shapes: all ``[B, T]`` target-aligned (see :mod:`dapo_megatron.types`).

The loss uses the general form, :func:`dapo_megatron.algo.offpolicy.offpolicy_weights` (token,
sequence or geometric level; truncated or masked); at its defaults its weights are those of
:func:`tis_weights` (bitwise, for log-ratios inside its +-80 clamp).
This function stays for the old-log-prob gap metrics (``megatron/dispatch.gap_stats``).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor


def tis_weights(
    old_logprobs: Tensor, rollout_logprobs: Tensor, loss_mask: Tensor, *, cap: float
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Weights ``min(exp(old - rollout), cap)`` ``[B, T]``, detached, 0 outside the mask.

    Stats are detached 0-dim masked sums (add them across micro-batches, divide by ``num_tokens``):
    ``mismatch_abs_sum`` (sum of ``|old - rollout|``), ``mismatch_max`` (a max; 0 with no tokens),
    ``capped_sum`` (tokens whose weight hit the cap) and ``num_tokens``.
    """
    if cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    with torch.no_grad():
        mask = loss_mask != 0
        diff = torch.where(mask, old_logprobs - rollout_logprobs, torch.zeros_like(old_logprobs))
        # exp may overflow to inf for a wild mismatch; the cap turns that into `cap`, never nan.
        raw = torch.exp(diff)
        weights = torch.where(mask, torch.clamp(raw, max=cap), torch.zeros_like(raw))
        abs_diff = diff.abs()
        stats = {
            "mismatch_abs_sum": abs_diff.sum(),
            "mismatch_max": abs_diff.max() if abs_diff.numel() else abs_diff.new_zeros(()),
            "capped_sum": (mask & (raw >= cap)).sum().to(diff.dtype),
            "num_tokens": mask.sum().to(diff.dtype),
        }
    return weights, stats
