"""Masked reductions and a dense entropy helper.

Masks may have any dtype; a nonzero entry means "this position counts". Masked-out positions are
replaced by 0 *before* summing (not multiplied by 0), so inf/nan on padding never leaks into a
result or a gradient.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``values`` where ``mask`` is nonzero. Shapes must broadcast; returns a 0-dim tensor."""
    return torch.where(mask != 0, values, torch.zeros_like(values)).sum()


def masked_mean(values: Tensor, mask: Tensor, denom: Optional[Union[float, Tensor]] = None) -> Tensor:
    """``masked_sum(values, mask) / denom``; ``denom`` defaults to the number of counted positions.

    With no counted positions and no ``denom`` the result is 0, not nan (the count is clamped to 1).
    Pass a global ``denom`` to get a local share of a mean over several micro-batches or ranks.
    """
    total = masked_sum(values, mask)
    if denom is None:
        return total / torch.clamp((mask != 0).sum().to(total.dtype), min=1.0)
    return total / denom


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy in nats of ``softmax(logits)`` over the last dim: ``[..., V] -> [...]``.

    Uses ``H = logsumexp(z) - sum(softmax(z) * z)``, which stays finite for large logits. Meant
    for small dense checks; the vocab-parallel version lives with the Megatron actor.
    """
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    probs = torch.softmax(logits, dim=-1)
    # A -inf logit (a masked-out token) has probability 0 and contributes 0, not 0 * -inf = nan.
    weighted = torch.where(probs > 0, probs * logits, torch.zeros_like(logits))
    return torch.logsumexp(logits, dim=-1) - weighted.sum(dim=-1)
