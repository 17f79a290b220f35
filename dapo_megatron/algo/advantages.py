"""Group-relative advantages (GRPO / DAPO) and their broadcast to tokens.

Every response of a prompt group shares one scalar advantage::

    A_i = (R_i - mean_g(R)) / (std_g(R) + eps)     (norm_by_std=True, GRPO/DAPO)
    A_i =  R_i - mean_g(R)                         (norm_by_std=False, Dr. GRPO)

``std_g`` is the *unbiased* (Bessel-corrected, n-1) standard deviation, as in the common GRPO
reference implementations. Invariants: a group of size 1 and a group whose rewards are all equal
get an advantage of exactly 0 (not a rounding residue like 1e-17), so they never push the policy.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, group_index: Tensor, *, norm_by_std: bool = True, eps: float = 1e-6) -> Tensor:
    """Advantages ``[N]`` from rewards ``[N]`` (float) and group ids ``[N]`` (long).

    Group ids need not be contiguous, sorted or start at 0 (ragged groups are fine). The statistics
    are computed in float64 and the result is cast back to ``rewards.dtype``.
    """
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be [N]; got {tuple(rewards.shape)} and {tuple(group_index.shape)}"
        )
    if rewards.numel() == 0:
        return rewards.clone()
    _, inverse = torch.unique(group_index, return_inverse=True)
    num_groups = int(inverse.max().item()) + 1
    r = rewards.to(torch.float64)
    zeros = torch.zeros(num_groups, dtype=torch.float64, device=r.device)
    count = zeros.index_add(0, inverse, torch.ones_like(r))
    mean = zeros.index_add(0, inverse, r) / count
    centred = r - mean[inverse]
    # Max == min identifies constant groups exactly, independent of the rounding in the mean.
    gmax = zeros.scatter_reduce(0, inverse, r, reduce="amax", include_self=False)
    gmin = zeros.scatter_reduce(0, inverse, r, reduce="amin", include_self=False)
    constant = (gmax == gmin)[inverse]  # also true for every group of size 1
    if norm_by_std:
        var = zeros.index_add(0, inverse, centred * centred) / torch.clamp(count - 1, min=1.0)
        centred = centred / (var.sqrt()[inverse] + eps)
    return torch.where(constant, torch.zeros_like(centred), centred).to(rewards.dtype)


def broadcast_to_tokens(adv: Tensor, loss_mask: Tensor) -> Tensor:
    """Per-token advantages ``[N, T]``: ``adv[i]`` on row i where the mask is nonzero, 0 elsewhere."""
    if adv.dim() != 1 or loss_mask.dim() != 2 or loss_mask.shape[0] != adv.shape[0]:
        raise ValueError(f"expected adv [N] and loss_mask [N, T]; got {tuple(adv.shape)} and {tuple(loss_mask.shape)}")
    full = adv[:, None].expand(loss_mask.shape)
    return torch.where(loss_mask != 0, full, torch.zeros_like(full))
